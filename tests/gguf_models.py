"""A tiny Llama GGUF file written with the `gguf` package (no download), for the GGUF conversion tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hf_models import CHATML_TEMPLATE, chat_tokenizer

D, LAYERS, HEADS, KV, FF = 32, 2, 4, 2, 64


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A tiny Llama GGUF (float32 tensors, BPE tokenizer with ChatML specials and chat template)."""
    import gguf

    tok = chat_tokenizer()
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    merges = [
        " ".join(m) if isinstance(m, (list, tuple)) else m
        for m in json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    ]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(D)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_rope_dimension_count(D // HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in specials else 1 for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(CHATML_TEMPLATE)
    g = np.random.default_rng(seed)

    def t(*shape):
        return (g.standard_normal(shape) * 0.2).astype(np.float32)

    w.add_tensor("token_embd.weight", t(len(tokens), D))
    for b in range(LAYERS):
        w.add_tensor(f"blk.{b}.attn_norm.weight", 1 + t(D))
        w.add_tensor(f"blk.{b}.attn_q.weight", t(D, D))
        w.add_tensor(f"blk.{b}.attn_k.weight", t(KV * D // HEADS, D))
        w.add_tensor(f"blk.{b}.attn_v.weight", t(KV * D // HEADS, D))
        w.add_tensor(f"blk.{b}.attn_output.weight", t(D, D))
        w.add_tensor(f"blk.{b}.ffn_norm.weight", 1 + t(D))
        w.add_tensor(f"blk.{b}.ffn_gate.weight", t(FF, D))
        w.add_tensor(f"blk.{b}.ffn_up.weight", t(FF, D))
        w.add_tensor(f"blk.{b}.ffn_down.weight", t(D, FF))
    w.add_tensor("output_norm.weight", 1 + t(D))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
