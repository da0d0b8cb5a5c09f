"""The shared tiny Llama chat fixture is what the real-checkpoint tests assume it is."""

from __future__ import annotations

import json

import torch


def test_tiny_llama_folder_is_bf16_with_chat_template(tiny_llama_dir, chat_tok):
    from safetensors import safe_open

    with safe_open(str(tiny_llama_dir / "model.safetensors"), framework="pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {torch.bfloat16}
    assert json.loads((tiny_llama_dir / "config.json").read_text())["model_type"] == "llama"
    text = chat_tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n")
