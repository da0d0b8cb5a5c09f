"""The response-only LM loss (logits only where a target has loss) equals the full-logits loss and its
gradients, on a TransformerBridge of an HF model, the plain HF model, the bridge with LoRA, and falls back
to full logits on a TransformerLens-native model."""

from __future__ import annotations

import pytest
import torch

from revlens.checkpoint_loader import load_hf_folder
from revlens.losses import masked_lm_loss, model_lm_loss, takes_logits_to_keep


def _batch(vocab: int, rows: int = 4, seq: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, vocab, (rows, seq), generator=gen)
    mask = torch.zeros(rows, seq, dtype=torch.long)
    for r, (start, stop) in enumerate([(5, 9), (7, 12), (3, 6), (8, 10)][:rows]):
        mask[r, start:stop] = 1  # a response in the middle of each row, of different lengths
    return tokens, mask


def _full_loss(model, tokens, mask):
    out = model(tokens)
    return masked_lm_loss(out.logits if hasattr(out, "logits") else out, tokens, mask)


def _loss_and_grads(model, loss_fn, tokens, mask):
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    loss = loss_fn(model, tokens, mask)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in params]


def _assert_same(model, tokens, mask):
    full, g_full = _loss_and_grads(model, _full_loss, tokens, mask)
    kept, g_kept = _loss_and_grads(model, model_lm_loss, tokens, mask)
    torch.testing.assert_close(kept, full, rtol=1e-5, atol=1e-6)
    assert len(g_full) == len(g_kept) > 0
    for a, b in zip(g_kept, g_full):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bridge_of_an_hf_model_keeps_only_the_response_logits(tiny_llama_dir):
    bridge = load_hf_folder(tiny_llama_dir, dtype=torch.float32)
    assert takes_logits_to_keep(bridge)
    tokens, mask = _batch(bridge.cfg.d_vocab)
    _assert_same(bridge, tokens, mask)
    logits = bridge(tokens, logits_to_keep=mask[:, 1:].any(0).nonzero().squeeze(1))
    assert logits.shape[1] == int(mask[:, 1:].any(0).sum()) < tokens.shape[1]


def test_plain_hf_model_and_lora(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from revlens.lora import apply_lora

    plain = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    assert takes_logits_to_keep(plain)
    tokens, mask = _batch(plain.config.vocab_size)
    _assert_same(plain, tokens, mask)
    bridge = load_hf_folder(tiny_llama_dir, dtype=torch.float32)
    apply_lora(bridge, {"r": 2, "lora_alpha": 4, "init_lora_weights": False})
    assert takes_logits_to_keep(bridge)
    _assert_same(bridge, tokens, mask)


def test_transformer_lens_native_models_compute_every_position(tiny_model):
    assert not takes_logits_to_keep(tiny_model)
    tokens, mask = _batch(tiny_model.cfg.d_vocab)
    _assert_same(tiny_model, tokens, mask)
    with pytest.raises(ValueError, match="ignores logits_to_keep"):
        model_lm_loss(tiny_model, tokens, mask, keep_logits=True)
