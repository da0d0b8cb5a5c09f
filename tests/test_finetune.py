"""The fine-tuning loop (resume, checkpoints, blocking) and the ReversionMonitor."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from revlens.blocking import Blocking
from revlens.checkpoint_loader import load_checkpoint
from revlens.finetune import ReversionMonitor, finetune
from revlens.history import History
from revlens.losses import masked_lm_loss

from conftest import PROMPTS, shifted


def toy_data(model, n: int = 24):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, model.cfg.d_vocab, (n, 8), generator=gen)
    mask = torch.zeros(n, 8)
    mask[:, 4:] = 1.0
    return tokens, mask


def test_masked_loss_matches_a_hand_computation():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 7, generator=gen)
    tokens = torch.randint(0, 7, (2, 5), generator=gen)
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.float)
    terms = [
        F.cross_entropy(logits[b, i - 1][None], tokens[b, i][None]) for b in range(2) for i in range(1, 5) if mask[b, i]
    ]
    assert float(masked_lm_loss(logits, tokens, mask)) == pytest.approx(float(torch.stack(terms).mean()), abs=1e-6)


def test_resume_after_interruption_gives_the_same_weights(tiny_model, tmp_path):
    tokens, mask = toy_data(tiny_model)
    kwargs = dict(steps=6, lr=1e-3, batch_size=4, seed=3, save_steps=(2, 4, 6), progress=False)
    straight = copy.deepcopy(tiny_model)
    finetune(straight, tokens, mask, out_dir=tmp_path / "a", **kwargs)

    interrupted = copy.deepcopy(tiny_model)

    def crash(step, model):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(interrupted, tokens, mask, out_dir=tmp_path / "b", on_step=crash, **kwargs)
    resumed = copy.deepcopy(tiny_model)  # a fresh process would start from the aligned weights again
    result = finetune(resumed, tokens, mask, out_dir=tmp_path / "b", **kwargs)
    assert result.resumed_from == 4
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    # The checkpoints are in the layout analyze reads.
    layout = {
        "pretrain": tiny_model,
        "align": tiny_model,
        "finetune": {"seed_0": {s: tmp_path / "b" / "finetune" / "seed_0" / f"step_{s}" for s in (2, 4, 6)}},
    }
    history = History.from_dict(layout)
    assert history.steps == [2, 4, 6]
    last = load_checkpoint(tmp_path / "b" / "finetune" / "seed_0" / "step_6")
    assert torch.equal(last.state_dict()["embed.weight"], straight.state_dict()["embed.weight"])


def test_blocked_training_runs_and_differs_from_plain(tiny_model):
    tokens, mask = toy_data(tiny_model)
    v = torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(2))
    plain, blocked = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    finetune(plain, tokens, mask, steps=3, lr=1e-3, batch_size=4, progress=False)
    blocking = Blocking({1: v}, "clamp", reference=tiny_model)
    finetune(blocked, tokens, mask, steps=3, lr=1e-3, batch_size=4, blocking=blocking, progress=False)
    diff = sum(float((a - b).detach().abs().sum()) for a, b in zip(plain.parameters(), blocked.parameters()))
    assert diff > 0


def test_sgd_and_gradient_accumulation(tiny_model):
    tokens, mask = toy_data(tiny_model)
    a, b = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    finetune(a, tokens, mask, steps=1, lr=0.1, optimizer="sgd", batch_size=8, progress=False)
    finetune(b, tokens, mask, steps=1, lr=0.1, optimizer="sgd", batch_size=4, grad_accum=2, progress=False)
    # The same 8 rows, one batch or two micro-batches of 4: the same SGD step.
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)
    with pytest.raises(ValueError, match="unknown optimizer"):
        finetune(a, tokens, mask, steps=1, lr=0.1, optimizer="lion", progress=False)


def test_monitor_tracks_alignment_and_warns_on_crossing(tiny_model):
    u = torch.zeros(tiny_model.cfg.d_model)
    u[0] = 1.0
    monitor = ReversionMonitor.from_models(shifted(tiny_model, 1, u), tiny_model, PROMPTS, layers=[1])
    with pytest.warns(RuntimeWarning, match="above the isotropic null"):
        a = monitor.update(shifted(tiny_model, 1, 0.5 * u), step=1)
    assert a[0] == pytest.approx(1.0, abs=1e-5)
    b = monitor.update(shifted(tiny_model, 1, -0.5 * u), step=2)
    assert b[0] == pytest.approx(-1.0, abs=1e-5)
    assert list(monitor.trajectory()) == [1, 2]


def test_finetune_config_is_the_one_list_of_settings(tiny_model):
    """finetune(config=...) runs what finetune(**settings) runs; lr=None is 1e-5 (2e-4 with LoRA); the
    `revlens finetune` options of the config's CLI fields come from it."""
    import argparse
    import dataclasses

    from revlens.cli import build_parser
    from revlens.config import FinetuneConfig

    tokens, mask = toy_data(tiny_model)
    a, b = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    cfg = FinetuneConfig(steps=2, batch_size=4, seed=1, spec="plain", progress=False)
    ra = finetune(a, tokens, mask, config=cfg)
    rb = finetune(b, tokens, mask, steps=2, batch_size=4, seed=1, spec="plain", progress=False)
    assert ra.settings == rb.settings and ra.settings["lr"] == 1e-5 and ra.settings["spec"] == "plain"
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert cfg.replace(lora={"r": 2}).learning_rate == 2e-4 and cfg.replace(lr=0.1).learning_rate == 0.1
    with pytest.raises(TypeError, match="unknown FinetuneConfig setting"):
        finetune(a, tokens, mask, step=2)
    sub = next(x for x in build_parser()._actions if isinstance(x, argparse._SubParsersAction))
    options = {x.dest for x in sub.choices["finetune"]._actions}
    wanted = {f.metadata["cli_name"] or f.name for f in dataclasses.fields(FinetuneConfig) if f.metadata["cli"]}
    assert wanted <= options and "warmup" in wanted
