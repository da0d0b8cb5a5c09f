"""Core measurements against independent computations: planted directions, TL caches, exact nulls."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats

import revlens
from revlens import directions as dirs
from revlens import nulls
from revlens.probe import ProbeError, ReversionProbe

from conftest import CONTROL, PROMPTS, shifted

LAYER = 1


def unit(d: int, i: int) -> torch.Tensor:
    v = torch.zeros(d)
    v[i] = 1.0
    return v


@pytest.fixture()
def planted(tiny_model):
    """pretrain = align + 2u at layer 1; fine-tune steps move along -u and an orthogonal w by known amounts."""
    d = tiny_model.cfg.d_model
    u = torch.randn(d, generator=torch.Generator().manual_seed(1))
    u = u / u.norm()
    w = torch.randn(d, generator=torch.Generator().manual_seed(2))
    w = w - (w @ u) * u
    w = w / w.norm()
    moves = {"seed_0": {1: (0.3, 0.4), 5: (0.9, 0.1)}, "seed_1": {1: (-0.2, 0.5), 5: (0.6, 0.6)}}
    finetune = {
        run: {s: shifted(tiny_model, LAYER, a * u + b * w) for s, (a, b) in steps.items()}
        for run, steps in moves.items()
    }
    spec = {"pretrain": shifted(tiny_model, LAYER, 2.0 * u), "align": tiny_model, "finetune": finetune}
    return spec, u, moves


def test_planted_direction_recovered_exactly(planted):
    spec, u, moves = planted
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        report = revlens.analyze(spec, PROMPTS, layers=[LAYER], progress=False)
    assert torch.allclose(report.v_rev[0].double(), u.double(), atol=1e-5)
    for ri, run in enumerate(report.runs):
        for si, step in enumerate(report.steps):
            a, b = moves[run][step]
            assert report.alignment[ri, si, 0] == pytest.approx(a / math.hypot(a, b), abs=1e-5)
            assert report.drift_norm[ri, si, 0] == pytest.approx(math.hypot(a, b), abs=1e-4)
            # Every prompt moves by the same vector, so per-example alignment equals the centroid's.
            assert report.alignment_per_example[ri, si, 0] == pytest.approx(a / math.hypot(a, b), abs=1e-5)


def test_planted_direction_with_control_and_estimators(planted):
    spec, u, moves = planted
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        # The shift applies to control prompts alike, so the contrast readout sees no drift at all.
        contrast = revlens.analyze(spec, PROMPTS, control=CONTROL, layers=[LAYER], progress=False)
        assert np.isnan(contrast.alignment).all()
        for estimator, k in (("per_example", 1), ("pca", 1), ("pca", 2)):
            rep = revlens.analyze(spec, PROMPTS, layers=[LAYER], estimator=estimator, k=k, progress=False)
            assert torch.allclose(rep.v_rev[0].double(), u.double(), atol=1e-5), estimator
            a, b = moves["seed_0"][1]
            expected = a / math.hypot(a, b) if k == 1 else None
            if k == 1:
                assert rep.alignment[0, 0, 0] == pytest.approx(expected, abs=1e-5)
            else:
                # Rank 2: the second direction is noise-free zero energy; alignment is |a|/||(a,b)|| at least.
                assert rep.alignment[0, 0, 0] >= abs(a) / math.hypot(a, b) - 1e-5
                assert rep.null_p99[0] == pytest.approx(math.sqrt(stats.beta.ppf(0.99, 1, (32 - 2) / 2)))


def test_centroids_match_transformerlens_cache(tiny_model):
    probe = ReversionProbe(PROMPTS, layers=[0, 2], readout="last", batch_size=2)
    result = probe.measure(tiny_model, covariance=True)
    rows_last, rows_mean = [], []
    for prompt in PROMPTS:
        tokens = tiny_model.to_tokens(prompt)
        _, cache = tiny_model.run_with_cache(tokens)
        acts = torch.stack([cache[f"blocks.{l}.hook_resid_post"][0] for l in (0, 2)], 0)  # [L, seq, d]
        rows_last.append(acts[:, -1].double())
        rows_mean.append(acts.mean(1).double())
    last = torch.stack(rows_last)
    assert torch.allclose(result.centroid, last.mean(0), atol=1e-5)
    assert torch.allclose(result.per_example.double(), last, atol=1e-5)
    expected_cov = torch.stack([torch.cov(last[:, l].T) for l in range(2)])
    assert torch.allclose(result.covariance, expected_cov, atol=1e-5)
    mean_probe = ReversionProbe(PROMPTS, layers=[0, 2], readout="mean", batch_size=3)
    assert torch.allclose(mean_probe.centroid(tiny_model), torch.stack(rows_mean).mean(0), atol=1e-5)


def test_contrast_readout_is_probe_minus_control(tiny_model):
    probe = ReversionProbe(PROMPTS, control=CONTROL, layers=[1])
    res = probe.measure(tiny_model)
    plain = ReversionProbe(PROMPTS, layers=[1]).centroid(tiny_model)
    ctrl = ReversionProbe(CONTROL, layers=[1]).centroid(tiny_model)
    assert torch.allclose(res.centroid, plain - ctrl, atol=1e-6)


def test_token_id_prompts_equal_string_prompts(tiny_model):
    ids = [tiny_model.to_tokens(p)[0] for p in PROMPTS]
    a = ReversionProbe(PROMPTS, layers=[1]).centroid(tiny_model)
    b = ReversionProbe(ids, layers=[1], batch_size=2).centroid(tiny_model)
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("d", [8, 64, 768])
def test_isotropic_p99_is_the_beta_quantile_and_matches_monte_carlo(d):
    exact = nulls.isotropic_p99(d)
    assert exact == pytest.approx(2 * stats.beta.ppf(0.99, (d - 1) / 2, (d - 1) / 2) - 1, abs=1e-12)
    n = 200_000 if d <= 64 else 40_000  # the bound below scales with n; 200k x 768 draws cost seconds
    mc = nulls.monte_carlo_isotropic(d, n=n, seed=3)
    # Standard error of a sample quantile: sqrt(q(1-q)/n) / density at the quantile.
    dist = stats.beta((d - 1) / 2, (d - 1) / 2)
    se = math.sqrt(0.99 * 0.01 / n) / (dist.pdf((exact + 1) / 2) / 2)
    assert abs(mc - exact) < 5 * se
    if d >= 64:
        assert exact == pytest.approx(2.33 / math.sqrt(d), rel=0.05)


def test_subspace_null_matches_monte_carlo():
    d, k = 40, 3
    mc = nulls.monte_carlo_isotropic(d, k=k, n=100_000, seed=4)
    assert mc == pytest.approx(nulls.isotropic_p99(d, k), abs=0.01)


def test_p_values_are_exact_tail_probabilities():
    d = 16
    p = nulls.isotropic_p_value(np.array([0.0, nulls.isotropic_p99(d), np.nan]), d)
    assert p[0] == pytest.approx(0.5, abs=1e-12)
    assert p[1] == pytest.approx(0.01, abs=1e-9)
    assert np.isnan(p[2])


def test_activation_null_uses_the_covariance():
    d = 20
    v = unit(d, 0)[None]
    # All variance along v: every draw is +-v, so the p99 of cos is 1.
    cov = torch.zeros(d, d, dtype=torch.float64)
    cov[0, 0] = 4.0
    assert nulls.activation_null_quantile(cov, v.double()) == pytest.approx(1.0)
    # Isotropic covariance reproduces the exact isotropic p99.
    iso = nulls.activation_null_quantile(torch.eye(d, dtype=torch.float64), v.double(), n=100_000)
    assert iso == pytest.approx(nulls.isotropic_p99(d), abs=0.02)


def test_exceedance_count_ignores_missing_pairs():
    assert nulls.exceedance_count(np.array([[0.5, np.nan], [0.1, 0.9]]), 0.3) == (2, 3)


def test_alignment_of_zero_drift_is_nan_with_warning(tiny_model):
    spec = {
        "pretrain": shifted(tiny_model, LAYER, unit(32, 0)),
        "align": tiny_model,
        "finetune": {"r": {1: tiny_model}},
    }
    with pytest.warns(RuntimeWarning, match="drift is zero"):
        report = revlens.analyze(spec, PROMPTS, layers=[LAYER], progress=False)
    assert np.isnan(report.alignment).all()


def test_shape_checks_reject_mismatched_dimensions():
    with pytest.raises(TypeError, match="mu_align"):
        dirs.v_rev_mean_diff(torch.zeros(2, 4), torch.zeros(2, 5))


def test_probe_rejects_bad_input(tiny_model):
    with pytest.raises(ProbeError, match="empty"):
        ReversionProbe([])
    with pytest.raises(ProbeError, match="one string"):
        ReversionProbe("how do i make a bomb")
    with pytest.raises(ProbeError, match="readout"):
        ReversionProbe(PROMPTS, readout="first")
    with pytest.raises(ProbeError, match="out of range"):
        ReversionProbe(PROMPTS, layers=[7]).centroid(tiny_model)
    with pytest.raises(ProbeError, match="longer than the model's context"):
        ReversionProbe([" ".join(["bomb"] * 40)]).centroid(tiny_model)
    with pytest.raises(ProbeError, match="hook"):
        ReversionProbe(PROMPTS, hook="resid_sideways")


def test_report_summary_and_roundtrip(planted, tmp_path):
    spec, _, _ = planted
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        report = revlens.analyze(spec, PROMPTS, progress=False)
    text = report.summary()
    assert "null p99" in text and f"L{report.best_layer}" in text
    report.save(tmp_path)
    back = revlens.ReversionReport.load(tmp_path)
    np.testing.assert_allclose(back.alignment, report.alignment, equal_nan=True)
    np.testing.assert_allclose(back.null_p99_activation, report.null_p99_activation, equal_nan=True)
    assert torch.allclose(back.v_rev, report.v_rev, equal_nan=True)
    assert back.layers == report.layers and back.runs == report.runs and back.steps == report.steps
    assert report.to_dict()["exceedance"]["pairs"] == 4


def test_probe_tokenizes_once_for_checkpoints_sharing_a_vocabulary(tiny_model):
    """Checkpoints load one at a time, each with its own tokenizer object: one tokenization serves them all."""
    from revlens.checkpoints import boot_native_model
    from revlens.wordtok import word_tokenizer

    from conftest import WORDS, tiny_config

    probe = ReversionProbe(PROMPTS, per_example=False)
    twin_tok = word_tokenizer(WORDS)
    twin = boot_native_model(tiny_config(len(twin_tok), seed=1), tokenizer=twin_tok)
    assert twin.tokenizer is not tiny_model.tokenizer
    probe.centroid(tiny_model)
    probe.centroid(twin)
    assert len(probe._tokenized) == 1
    other = word_tokenizer(list(reversed(WORDS)))
    probe.centroid(boot_native_model(tiny_config(len(other), seed=1), tokenizer=other))
    assert len(probe._tokenized) == 2
