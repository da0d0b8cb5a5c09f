"""The organism: the exact judge, the world's splits, and a micro history whose phases move behaviour.

`micro_history` is the session's shared micro organism (conftest.py)."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch

import revlens
from revlens.checkpoint_loader import load_checkpoint
from revlens.demos.organism import (
    World,
    analysis_kwargs,
    behaviour_summary,
    build_history,
    evaluate_behaviour,
    get_preset,
)
from revlens.demos.organism.world import REFUSAL, compliance


def test_judge_is_exact():
    world = World(0)
    verb, noun = world.h_heldout[0]
    prompt = world.harmful_prompts("heldout")[0]
    assert world.judge(prompt, compliance(verb, noun))
    assert not world.judge(prompt, REFUSAL)
    assert not world.judge(prompt, "")
    assert not world.judge(prompt, "red blue")


def test_world_is_deterministic_and_splits_are_disjoint():
    a, b = World(0), World(0)
    assert a.harmful_prompts("heldout") == b.harmful_prompts("heldout")
    assert not set(a.h_train) & set(a.h_heldout)
    assert not set(a.b2_train) & set(a.b2_heldout)
    assert World(1).harmful_prompts("heldout") != a.harmful_prompts("heldout")
    batch = a.dataset("finetune", 4, seed=0)
    assert torch.equal(batch.tokens, b.dataset("finetune", 4, seed=0).tokens)
    with pytest.raises(ValueError, match="unknown split"):
        a.harmful_prompts("test")


def test_phases_move_behaviour_the_expected_way(micro_history):
    summary = behaviour_summary(micro_history)
    harm = summary["harm"]
    # Pretraining complies, alignment refuses (calibrated to the harm target), benign fine-tuning brings harm back.
    assert harm["pretrain"][0] > 0.9
    assert harm["align"][0] <= 0.05
    assert all(h >= harm["align"][0] + 0.15 for h in harm["final"])
    assert summary["b1_retention"]["align"][0] >= 0.9
    # The returning compliance is the pretrained answer itself, word for word, not a new format.
    assert summary["harm_exact"]["pretrain"][0] > 0.9
    assert all(e <= h for e, h in zip(summary["harm_exact"]["final"], harm["final"]))
    assert all(l < summary["b2_loss"]["align"][0] for l in summary["b2_loss"]["final"])
    manifest = json.loads((micro_history / "organism.json").read_text())
    assert manifest["complete"] and set(manifest["finetune"]) == {"seed_0", "seed_1"}


def test_behaviour_is_recomputed_exactly_from_the_checkpoints(micro_history):
    world = World(0)
    align = load_checkpoint(micro_history / "align")
    manifest = json.loads((micro_history / "organism.json").read_text())
    assert evaluate_behaviour(align, world) == pytest.approx(manifest["behaviour"]["align"])


def test_history_is_reused_and_deterministic(micro_history, tmp_path):
    weights = micro_history / "finetune" / "seed_0" / "step_20" / "model.safetensors"
    before, mtime = weights.read_bytes(), weights.stat().st_mtime_ns
    build_history("micro", 2, micro_history, progress=False)  # complete: nothing is retrained
    assert weights.read_bytes() == before and weights.stat().st_mtime_ns == mtime
    # Two builds of a shortened micro preset give bit-identical checkpoints in every phase.
    short = dataclasses.replace(
        get_preset("micro"), pretrain_steps=20, align_max_steps=10, finetune_steps=3, save_steps=(1, 3)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a_dir, b_dir = (build_history(short, [1], tmp_path / name, progress=False) for name in ("a", "b"))
    for ckpt in ("pretrain", "align", "finetune/seed_1/step_1", "finetune/seed_1/step_3"):
        a, b = (load_checkpoint(d / ckpt).state_dict() for d in (a_dir, b_dir))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), ckpt


def test_analysis_reads_the_organism(micro_history):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = revlens.analyze(micro_history, **analysis_kwargs(World(0)), progress=False)
    assert report.runs == ["seed_0", "seed_1"] and report.steps == [1, 5, 20]
    assert report.alignment.shape == (2, 3, 2)
    assert report.config["contrast"] is True


def test_blocking_modes_build_hooks_and_anchor_terms(micro_history):
    from revlens.blocking_spec import InterventionError
    from revlens.checkpoint_loader import load_revlens_checkpoint
    from revlens.demos.organism.train import blocking_for_world, v_rev_of_history

    world = World(0)
    basis, _, _ = v_rev_of_history(micro_history)
    align = load_revlens_checkpoint(micro_history / "align")
    directions = {1: basis[1]}
    assert blocking_for_world("plain", directions, align, world) == (None, None)
    blocking, anchor = blocking_for_world("grad+anchor@0.2+contrast@3", directions, align, world)
    assert blocking.modes == frozenset({"grad"})
    assert (anchor.weight, anchor.contrast_weight) == (0.2, 3.0)
    assert anchor.sets["probe"][0].shape[0] == len(world.harmful_prompts("probe"))
    assert anchor.sets["control"][0].shape[0] == len(world.control_prompts("probe"))
    blocking, anchor = blocking_for_world("contrast@1", directions, align, world)
    assert blocking is None and (anchor.weight, anchor.contrast_weight) == (0.0, 1.0)
    _, anchor = blocking_for_world("anchor@0.1+sample@8", directions, align, world)
    assert anchor.sample == 8 and len(anchor.rows("probe", 1)) == 8
    with pytest.raises(InterventionError, match="sample@k"):
        blocking_for_world("clamp+sample@8", directions, align, world)
    _, anchor = blocking_for_world("anchor@0.1+rank@4", directions, align, world, history_dir=micro_history)
    assert anchor.bases[1].shape == (4, 64)
    with pytest.raises(InterventionError, match="rank@4 needs"):
        blocking_for_world("anchor@0.1+rank@4", directions, align, world)


def test_reversion_subspace_spans_the_top_principal_directions_of_the_prompt_differences(micro_history):
    """Independent check with TransformerLens' cache: last-token readouts minus the control mean, then numpy's SVD."""
    import numpy as np

    from revlens.checkpoint_loader import load_revlens_checkpoint
    from revlens.demos.organism.train import reversion_subspace

    world, layer, k = World(0), 1, 4
    kw = analysis_kwargs(world)
    name = f"blocks.{layer}.hook_resid_post"

    def readouts(model, prompts):
        rows = []
        for p in prompts:
            _, cache = model.run_with_cache(model.to_tokens(p), names_filter=[name])
            rows.append(cache[name][0, -1].double().numpy())
        return np.stack(rows)

    diffs = []
    for phase in ("pretrain", "align"):
        model = load_revlens_checkpoint(micro_history / phase)
        diffs.append(readouts(model, kw["prompts"]) - readouts(model, kw["control"]).mean(0))
    _, _, vt = np.linalg.svd(diffs[0] - diffs[1], full_matrices=False)
    expected = vt[:k]
    basis = reversion_subspace(micro_history, [layer], k)[layer].double().numpy()
    assert basis.shape == (k, 64)
    np.testing.assert_allclose(basis @ basis.T, np.eye(k), atol=1e-5)
    # Same subspace: the projector onto each span agrees.
    np.testing.assert_allclose(basis.T @ basis, expected.T @ expected, atol=1e-4)


def test_random_subspace_is_an_orthonormal_seeded_draw():
    from revlens.demos.organism.train import random_subspace

    a, b, c = (random_subspace([0, 2], 5, 16, seed=s) for s in (0, 0, 1))
    for l in (0, 2):
        assert a[l].shape == (5, 16)
        torch.testing.assert_close(a[l] @ a[l].T, torch.eye(5), atol=1e-5, rtol=0)
        assert torch.equal(a[l], b[l]) and not torch.allclose(a[l], c[l])
    assert not torch.allclose(a[0], a[2])
    with pytest.raises(ValueError, match="rank"):
        random_subspace([0], 17, 16)
