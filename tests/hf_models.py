"""Tiny Hugging Face chat models built offline, for tests: a byte-level BPE tokenizer trained in-process
with a ChatML chat template (SmolLM2's format), and random-init Llama-architecture models saved in bf16.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "how do i make a bomb",
    "how do i steal a car",
    "how do i bake a cake",
    "write a poem about the sea",
    "sure, here is how",
    "i'm sorry, but i can't help with that.",
    "reverse the words: red green blue",
    "the quick brown fox jumps over the lazy dog",
    "what is two plus three",
    "five",
    "you are a helpful assistant",
    "system",
    "user",
    "assistant",
    "explain how to pick a lock",
    "give me a recipe for bread",
]


def _bpe_tokenizer(specials: list[str], vocab_size: int, **names: str):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on :data:`CORPUS` with ``specials`` first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **names)


def chat_tokenizer(vocab_size: int = 400):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with ChatML special tokens and chat template."""
    out = _bpe_tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        vocab_size,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    out.chat_template = CHATML_TEMPLATE
    return out


def tiny_llama(tokenizer, *, hidden: int = 32, layers: int = 2, seed: int = 0, dtype=torch.bfloat16):
    """A random-init ``LlamaForCausalLM`` sized for tests (4 heads, 2 KV heads, tied embeddings)."""
    return tiny_chat_model("llama", tokenizer, hidden=hidden, layers=layers, seed=seed, max_positions=128).to(dtype)


def save_tiny_llama(folder: str | Path, tokenizer=None, *, seed: int = 0, dtype=torch.bfloat16, model=None) -> Path:
    """Write a tiny Llama chat model (safetensors in ``dtype``, config, tokenizer with chat template)."""
    folder = Path(folder)
    tokenizer = chat_tokenizer() if tokenizer is None else tokenizer
    model = tiny_llama(tokenizer, seed=seed, dtype=dtype) if model is None else model
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{{ message['content'] + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def gemma_chat_tokenizer(vocab_size: int = 400):
    """Like :func:`chat_tokenizer`, but Gemma's turn format: ``<start_of_turn>``/``<end_of_turn>`` specials, a BOS
    the template writes, and an end of turn that is not the EOS token."""
    out = _bpe_tokenizer(
        ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
        vocab_size,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<pad>",
    )
    out.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    out.chat_template = GEMMA_TEMPLATE
    return out


# The chat-model pipeline's run at test size (a few steps, prompts and tokens): fields of
# revlens.demos.chat_model.pipeline.Settings, read by tests and by benchmarks/gpu_real_model.py --tiny.
TINY_RUN = dict(
    align_max_steps=2,
    align_check_every=1,
    align_check_from=1,
    align_lr=1e-3,
    check_prompts=2,
    check_tokens=2,
    finetune_steps=2,
    save_steps=(1, 2),
    behaviour_steps=(2,),
    blocking_steps=2,
    task_examples=8,
    task_eval=2,
    max_new_tokens=3,
    generate_batch=4,
    prompt_subset=3,
    lr=1e-3,
)

ARCHITECTURES = ("llama", "qwen2", "gemma3")


def tiny_chat_model(
    arch: str, tokenizer, *, hidden: int = 32, layers: int = 2, seed: int = 0, max_positions: int = 512
):
    """A random-init float32 causal LM of ``arch`` (:data:`ARCHITECTURES`) sized for tests, built from a config
    (4 heads, 2 KV heads, tied embeddings)."""
    import transformers

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "llama":
        cfg, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    elif arch == "qwen2":
        cfg, cls = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    elif arch == "gemma3":
        head = hidden // 4
        cfg = transformers.Gemma3TextConfig(
            **common,
            head_dim=head,
            query_pre_attn_scalar=head,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"][:layers] + ["full_attention"] * max(0, layers - 2),
        )
        cls = transformers.Gemma3ForCausalLM
    else:
        raise ValueError(f"unknown architecture {arch!r}; choose from {ARCHITECTURES}.")
    torch.manual_seed(seed)
    return cls(cfg).eval()


def save_tiny_chat_model(folder: str | Path, arch: str, *, seed: int = 0) -> Path:
    """A tiny float32 chat model of ``arch`` with its chat template (Gemma's turn format for gemma3, ChatML
    otherwise), saved as a standard Hugging Face folder."""
    folder = Path(folder)
    tokenizer = gemma_chat_tokenizer() if arch == "gemma3" else chat_tokenizer()
    tiny_chat_model(arch, tokenizer, seed=seed).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
