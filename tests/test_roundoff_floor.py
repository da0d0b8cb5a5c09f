"""One round-off floor for alignment everywhere: ROUNDOFF times the aligned model's raw probe centroid norm.

analyze, ReversionMonitor and the Trainer callback read contrast centroids (probe minus control) when given a
control set; the floor below which a drift is float noise must still come from the activations themselves.
The expected floors here are computed independently: TransformerLens' own cache for the bridge monitor and
transformers' hidden states for the Hugging Face callback.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from revlens import directions as dirs
from revlens.anchor import encode_prompts
from revlens.finetune import ReversionMonitor

from conftest import CONTROL, PROMPTS, shifted
from hf_models import chat_tokenizer, tiny_llama


def test_roundoff_floor_is_roundoff_times_the_centroid_norm():
    mu = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    torch.testing.assert_close(dirs.roundoff_floor(mu), torch.tensor([5e-5, 0.0], dtype=torch.float64))


def test_monitor_floor_comes_from_the_raw_probe_centroid_not_the_contrast(tiny_model):
    pretrain = shifted(tiny_model, 1, torch.full((32,), 0.5))
    monitor = ReversionMonitor.from_models(pretrain, tiny_model, PROMPTS, control=CONTROL, layers=[0, 1, 2])
    rows = []
    for prompt in PROMPTS:
        _, cache = tiny_model.run_with_cache(prompt)
        rows.append(torch.stack([cache[f"blocks.{l}.hook_resid_post"][0, -1] for l in range(3)]).double())
    expected = dirs.ROUNDOFF * torch.stack(rows).mean(0).norm(dim=-1)
    torch.testing.assert_close(monitor.floor, expected, rtol=1e-6, atol=0)
    assert (dirs.roundoff_floor(monitor.mu_align) < monitor.floor).all()  # the contrast is shorter here
    with pytest.warns(RuntimeWarning, match="drift is zero"):
        a = monitor.update(tiny_model, 1)  # the aligned model itself: no drift, no direction
    assert torch.isnan(torch.as_tensor(a)).all()


def test_callback_floor_comes_from_the_raw_probe_centroid_not_the_contrast():
    from revlens.integrations.transformers import ReversionCallback

    tok = chat_tokenizer()
    probe, control = encode_prompts(None, PROMPTS, tokenizer=tok), encode_prompts(None, CONTROL, tokenizer=tok)
    pretrain, align = tiny_llama(tok, hidden=32, layers=2, seed=1), tiny_llama(tok, hidden=32, layers=2, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        cb = ReversionCallback.from_models(pretrain, align, probe, control=control, layers=[0, 1])
    with torch.no_grad():
        rows = [
            torch.stack([h[0, -1] for h in align(ids[None], output_hidden_states=True).hidden_states[1:]]).double()
            for ids in probe
        ]
    # hidden_states[-1] is after the final norm; the decoder layer's own output is what the callback reads
    expected = dirs.ROUNDOFF * torch.stack(rows).mean(0).norm(dim=-1)
    torch.testing.assert_close(cb.floor[:1], expected[:1], rtol=1e-5, atol=0)
    assert torch.isnan(torch.as_tensor(cb.alignment(align))).all()
