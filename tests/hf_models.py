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


def chat_tokenizer(vocab_size: int = 400):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with ChatML special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
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
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    out.chat_template = CHATML_TEMPLATE
    return out


def tiny_llama(tokenizer, *, hidden: int = 32, layers: int = 2, seed: int = 0, dtype=torch.bfloat16):
    """A random-init ``LlamaForCausalLM`` sized for tests (4 heads, 2 KV heads, tied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def save_tiny_llama(folder: str | Path, tokenizer=None, *, seed: int = 0, dtype=torch.bfloat16, model=None) -> Path:
    """Write a tiny Llama chat model (safetensors in ``dtype``, config, tokenizer with chat template)."""
    folder = Path(folder)
    tokenizer = chat_tokenizer() if tokenizer is None else tokenizer
    model = tiny_llama(tokenizer, seed=seed, dtype=dtype) if model is None else model
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
