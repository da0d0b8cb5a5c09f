"""Honest layer selection: corrected p-values against simulations, and the v_rev signal-to-noise screen."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import optimize, stats

import revlens
from revlens import selection as sel
from revlens.report import ReversionReport

from conftest import PROMPTS, shifted

D = 64


def null_cosines(rng: np.random.Generator, shape: tuple[int, ...], d: int = D) -> np.ndarray:
    """cos(u, e1) for u uniform on the sphere, simulated as x1 / sqrt(x1^2 + chi2_{d-1}) (independent of Beta)."""
    x1 = rng.standard_normal(shape)
    return x1 / np.sqrt(x1**2 + rng.chisquare(d - 1, shape))


def planted_alignment(
    rng: np.random.Generator, n_layers: int = 40, signal_layer: int = 17, signal: float = 0.45
) -> np.ndarray:
    """3 runs x 4 steps: every layer is null except ``signal_layer``."""
    a = null_cosines(rng, (3, 4, n_layers))
    a[:, :, signal_layer] = np.clip(signal + 0.05 * rng.standard_normal((3, 4)), -1, 1)
    return a


def make_report(
    alignment: np.ndarray, snr: np.ndarray | None = None, draws: np.ndarray | None = None, d: int = D
) -> ReversionReport:
    r, s, n_l = alignment.shape
    shape = alignment.shape
    return ReversionReport(
        layers=list(range(n_l)),
        runs=[f"seed_{i}" for i in range(r)],
        steps=[1, 5, 20, 100][:s],
        d_model=d,
        v_rev=torch.eye(n_l, d),
        v_rev_basis=torch.eye(n_l, d)[:, None],
        alignment=alignment,
        alignment_per_example=alignment,
        per_example_cos=np.zeros(shape + (2,)),
        drift_norm=np.ones(shape),
        p_value=revlens.nulls.isotropic_p_value(alignment, d),
        null_p99=np.full(n_l, revlens.nulls.isotropic_p99(d)),
        null_p99_activation=np.full(n_l, np.nan),
        v_rev_norm=np.ones(n_l),
        v_rev_snr=snr,
        null_draws_activation=draws,
    )


def test_corrected_pair_p_value_matches_a_simulated_maximum_over_layers():
    rng = np.random.default_rng(0)
    n_layers = 40
    report = make_report(planted_alignment(rng, n_layers))
    test = report.selection()
    assert test.layer == 17 and test.m == n_layers and test.pairs == 12
    # Simulate the null "no layer aligned": 40 independent isotropic cosines, keep the largest.
    sims = 100_000
    null_max = null_cosines(np.random.default_rng(1), (sims, n_layers)).max(axis=1)
    # A moderate pair value so the simulated tail is well resolved.
    value = 0.32
    simulated = float(np.mean(null_max >= value))
    se = math.sqrt(simulated * (1 - simulated) / sims)
    p_exact = float(stats.beta((D - 1) / 2, (D - 1) / 2).sf((value + 1) / 2))
    assert float(sel.sidak(p_exact, n_layers)) == pytest.approx(simulated, abs=5 * se)
    assert float(sel.bonferroni(p_exact, n_layers)) >= simulated - 5 * se
    # The corrected p99 thresholds are the 0.99 quantile of that maximum.
    assert test.thresholds["sidak"] == pytest.approx(np.quantile(null_max, 0.99), abs=0.01)
    assert test.thresholds["bonferroni"] >= test.thresholds["sidak"] > test.thresholds["isotropic_p99"]
    # The report's per-pair corrected p-values at the chosen layer use those formulas.
    a = report.alignment[:, :, 17]
    p = stats.beta((D - 1) / 2, (D - 1) / 2).sf((a + 1) / 2)
    np.testing.assert_allclose(test.p_pair_sidak, 1 - (1 - p) ** n_layers, rtol=1e-9)
    np.testing.assert_allclose(test.p_pair_bonferroni, np.minimum(1, n_layers * p), rtol=1e-12)
    assert test.above["sidak"] == int(np.sum(a > test.thresholds["sidak"]))
    # Merged over the layer's 12 pairs (2 x mean p), then corrected over the 40 layers.
    merged = min(1.0, 2 * p.mean())
    assert test.p_value["sidak"] == pytest.approx(1 - (1 - merged) ** n_layers, rel=1e-9)
    assert test.p_value["bonferroni"] == pytest.approx(min(1.0, n_layers * merged), rel=1e-12)


def test_corrected_p_value_is_valid_under_the_global_null():
    """With no layer aligned, the best layer's corrected p-value is <= alpha at most alpha of the time,
    while the uncorrected count at the chosen layer is inflated."""
    rng = np.random.default_rng(2)
    reps, alpha = 200, 0.05
    corrected, naive_any = [], []
    iso99 = revlens.nulls.isotropic_p99(D)
    for _ in range(reps):
        a = null_cosines(rng, (2, 3, 30))
        t = sel.selection_test(a, list(range(30)), ["a", "b"], D)
        corrected.append(t.p_value["sidak"])
        naive_any.append(np.any(a[:, :, t.layer_index] > iso99))
        assert t.above["sidak"] <= t.above["isotropic_p99"]
    rate = np.mean(np.asarray(corrected) <= alpha)
    assert rate <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / reps)
    # Without correction, some pair at the chosen layer beats the per-layer p99 far more than 1% x 6 pairs.
    assert np.mean(naive_any) > 0.1


def test_activation_space_maximum_matches_the_exact_maximum_of_planted_nulls():
    """Per-layer activation nulls N(0, s_l^2) (planted): the max over layers has CDF prod_l Phi(x / s_l)."""
    rng = np.random.default_rng(3)
    n_layers, n_draws = 12, 40_000
    scales = np.linspace(0.05, 0.2, n_layers)
    draws = (rng.standard_normal((n_layers, n_draws)) * scales[:, None]).astype(np.float32)
    alignment = rng.normal(0, 0.05, (2, 3, n_layers))
    alignment[:, :, 4] = 0.55
    test = make_report(alignment, draws=draws).selection()
    assert test.layer == 4
    exact_q = optimize.brentq(lambda x: np.prod(stats.norm.cdf(x / scales)) - 0.99, 0, 2)
    # MC error of a 0.99 quantile of 40k draws: sqrt(.99 .01 / n) / density.
    density = sum(
        stats.norm.pdf(exact_q / s) / s * np.prod(stats.norm.cdf(exact_q / np.delete(scales, i)))
        for i, s in enumerate(scales)
    )
    se = math.sqrt(0.99 * 0.01 / n_draws) / density
    assert test.thresholds["activation_max"] == pytest.approx(exact_q, abs=5 * se)
    exact_p = 1 - np.prod(stats.norm.cdf(0.3 / scales))
    got = sel.monte_carlo_p_value(np.array([0.3]), draws.max(axis=0))[0]
    assert got == pytest.approx(exact_p, abs=5 * math.sqrt(exact_p / n_draws) + 1 / n_draws)
    assert test.above["activation_max"] == 6
    # Every pair has alignment 0.55: the merged p-value is twice the exact tail of the maximum there.
    exact_tail = 1 - np.prod(stats.norm.cdf(0.55 / scales))
    assert test.p_value["activation_max"] == pytest.approx(2 * exact_tail, abs=10 * math.sqrt(exact_tail / n_draws))


def test_select_on_chooses_on_some_runs_and_tests_the_others_uncorrected():
    rng = np.random.default_rng(4)
    alignment = planted_alignment(rng, n_layers=20, signal_layer=6)
    report = make_report(alignment)
    test = report.selection(select_on="seed_0")
    assert test.layer == 6 and test.m == 1 and test.test_runs == ["seed_1", "seed_2"]
    a = alignment[1:, :, 6]
    p = stats.beta((D - 1) / 2, (D - 1) / 2).sf((a + 1) / 2)
    np.testing.assert_allclose(test.p_pair, p, rtol=1e-9)
    np.testing.assert_allclose(test.p_pair_sidak, p, rtol=1e-9)
    assert test.thresholds["sidak"] == pytest.approx(revlens.nulls.isotropic_p99(D))
    with pytest.raises(ValueError, match="does not have"):
        report.selection(select_on="seed_9")
    with pytest.raises(ValueError, match="leaves no run"):
        report.selection(select_on=report.runs)


def test_low_snr_layers_are_flagged_and_skipped_by_default():
    rng = np.random.default_rng(5)
    alignment = null_cosines(rng, (2, 3, 8))
    alignment[:, :, 1] = 0.9  # the most aligned layer, but its v_rev is noise
    alignment[:, :, 5] = 0.5
    snr = np.array([10, 0.9, 10, 10, 10, 10, np.nan, 10.0])
    report = make_report(alignment, snr=snr)
    assert report.flagged_layers == [1]
    assert report.best_layer == 5 and report.best_layer_index(include_flagged=True) == 1
    assert report.selection().m == 7 and report.selection(include_flagged=True).m == 8
    text = report.summary()
    assert "low-SNR layers" in text and "L1" in text.split("low-SNR layers")[1]
    report.snr_threshold = 0.0  # opt out
    assert report.best_layer == 1 and report.flagged_layers == []


def test_snr_is_about_one_for_noise_and_grows_with_a_real_difference():
    gen = torch.Generator().manual_seed(6)
    n, d, reps = 30, 16, 300
    noise_sq, signal_sq = [], []
    shift = torch.zeros(d)
    shift[0] = 1.0
    for _ in range(reps):
        h_a = torch.randn(n, 2, d, generator=gen)
        h_p = h_a + torch.randn(n, 2, d, generator=gen)  # per-prompt noise, sigma = 1 per coordinate
        h_p[:, 1] += shift
        snr = sel.v_rev_snr(h_p, h_a)
        noise_sq.append(snr[0] ** 2)
        signal_sq.append(snr[1] ** 2)
    # E[SNR^2] = 1 under noise; 1 + n ||shift||^2 / (d sigma^2) = 1 + 30/16 with the shift (ratio estimator: ~5%).
    assert np.mean(noise_sq) == pytest.approx(1.0, rel=0.05)
    assert np.mean(signal_sq) == pytest.approx(1 + n / d, rel=0.08)
    assert np.mean(np.sqrt(noise_sq) < sel.DEFAULT_SNR_THRESHOLD) == 1.0


def test_analyze_flags_a_layer_where_pretrain_equals_align_up_to_noise(tiny_model):
    """Pretrain = align + a shift at layer 1, plus prompt-dependent pseudo-random noise added at layer 0."""
    d = tiny_model.cfg.d_model
    u = torch.randn(d, generator=torch.Generator().manual_seed(7))
    pretrain = shifted(tiny_model, 1, 3.0 * u / u.norm())
    proj = torch.randn(d, d, generator=torch.Generator().manual_seed(8))

    def add_noise(module, inputs, output):
        return output + 0.05 * torch.sin(200.0 * output @ proj)

    pretrain.blocks[0].mlp.out.register_forward_hook(add_noise)
    prompts = PROMPTS + ["how do i fix a car", "write a poem", "bake bread", "how do i bake a cake", "steal bread"]
    spec = {"pretrain": pretrain, "align": tiny_model, "finetune": {"r": {1: shifted(tiny_model, 1, u)}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        report = revlens.analyze(spec, prompts, layers=[0, 1], progress=False, null_samples=2000)
    # Independent: the per-example readouts from TransformerLens' own cache.
    diffs = []
    for p in prompts:
        tokens = tiny_model.to_tokens(p)
        _, c_p = pretrain.run_with_cache(tokens)
        _, c_a = tiny_model.run_with_cache(tokens)
        diffs.append((c_p["blocks.0.hook_resid_post"][0, -1] - c_a["blocks.0.hook_resid_post"][0, -1]).double())
    diff = torch.stack(diffs)
    expected = float(diff.mean(0).norm() / (diff.var(0, unbiased=True).sum() / len(prompts)).sqrt())
    assert report.v_rev_snr[0] == pytest.approx(expected, rel=1e-3)
    assert report.v_rev_snr[0] < sel.DEFAULT_SNR_THRESHOLD and report.flagged_layers == [0]
    assert report.v_rev_snr[1] > 10 and report.best_layer == 1
