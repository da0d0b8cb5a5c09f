"""The nulls against exact distributions (scipy's Beta) and large independent Monte Carlo; the activation-space
null from per-example readouts (no d x d matrix) equals the covariance-based one."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats

import revlens
from revlens import nulls
from revlens.probe import ReversionProbe

from conftest import PROMPTS, shifted, unit


def quantile_se(samples: np.ndarray, q: float) -> float:
    """Monte Carlo standard error of a sample quantile: sqrt(q(1-q)/n) / density (density by finite differences)."""
    n, h = len(samples), 0.01
    density = 2 * h / (np.quantile(samples, q + h) - np.quantile(samples, q - h))
    return math.sqrt(q * (1 - q) / n) / density


def correlated_readouts(n: int, d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 2.0, d, dtype=torch.float64)
    return torch.randn(n, d, generator=gen, dtype=torch.float64) @ mix + 3.0


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


# ------------------------------------------------------------------------------------ from per-example readouts
@pytest.mark.parametrize("n, k", [(60, 1), (25, 1), (200, 3)])  # n > d, n < d, a rank-3 subspace
def test_readout_null_matches_covariance_null(n, k):
    d, draws = 40, 60_000
    x = correlated_readouts(n, d, seed=n)
    basis = torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(1), dtype=torch.float64))[0].T
    light = nulls.activation_null_draws_from_readouts(x, basis, draws, seed=2).numpy()
    cov = torch.cov(x.T)  # the old, d x d route, with an independent sampler (eigendecomposition)
    heavy = nulls.alignment_with_random_directions(nulls.sample_gaussian_directions(cov, draws, seed=3), basis).numpy()
    for q in (0.05, 0.25, 0.5, 0.75, 0.95, 0.99):
        se = math.hypot(quantile_se(light, q), quantile_se(heavy, q))
        assert np.quantile(light, q) == pytest.approx(np.quantile(heavy, q), abs=5 * se), q
    assert stats.ks_2samp(light, heavy).pvalue > 1e-3
    p99 = nulls.activation_null_quantile_from_readouts(x, basis, 0.99, draws, seed=2)
    assert p99 == pytest.approx(float(np.quantile(light, 0.99)))
    old = nulls.activation_null_quantile(cov, basis, 0.99, draws, seed=4)
    assert p99 == pytest.approx(old, abs=5 * math.hypot(quantile_se(light, 0.99), quantile_se(heavy, 0.99)))


def test_degenerate_readouts():
    d = 12
    v = torch.zeros(1, d, dtype=torch.float64)
    v[0, 0] = 1.0
    along_v = torch.zeros(30, d, dtype=torch.float64)
    along_v[:, 0] = torch.linspace(-1, 1, 30)
    assert nulls.activation_null_quantile_from_readouts(along_v, v, n_draws=2000) == pytest.approx(1.0)
    assert math.isnan(nulls.activation_null_quantile_from_readouts(torch.ones(30, d), v, n_draws=100))
    assert math.isnan(nulls.activation_null_quantile_from_readouts(torch.ones(1, d), v, n_draws=100))
    with pytest.raises(ValueError, match="quantile"):
        nulls.activation_null_quantile_from_readouts(along_v, v, q=1.0)


def test_no_d_by_d_matrix_at_a_large_width():
    """d = 50,000: a float64 covariance would take 20 GB; the readout route needs the n x d readouts only."""
    d, n = 50_000, 40
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(n, d, generator=gen)
    v = torch.randn(1, d, generator=gen)
    q = nulls.activation_null_quantile_from_readouts(x, v, n_draws=5000, seed=0)
    # Rank n-1 Gaussian directions: the cosine with a generic v is about N(0, 1/d) scaled; p99 ~ 2.33/sqrt(d).
    assert 0.5 * 2.33 / math.sqrt(d) < q < 2 * 2.33 / math.sqrt(d)


def test_analyze_builds_no_covariance_and_its_null_matches_the_covariance_route(tiny_model, monkeypatch):
    asked = []
    original = ReversionProbe.measure

    def spy(self, model, *, covariance=False, per_example=None):
        asked.append(covariance)
        return original(self, model, covariance=covariance, per_example=per_example)

    monkeypatch.setattr(ReversionProbe, "measure", spy)
    d = tiny_model.cfg.d_model
    u = torch.randn(d, generator=torch.Generator().manual_seed(1))
    spec = {
        "pretrain": shifted(tiny_model, 1, 2 * u / u.norm()),
        "align": tiny_model,
        "finetune": {"r": {1: shifted(tiny_model, 1, u / u.norm())}},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        report = revlens.analyze(spec, PROMPTS, layers=[1, 2], progress=False, null_samples=20_000, seed=0)
    assert asked and not any(asked)
    assert report.null_draws_activation.shape == (2, 20_000)
    # Independently: the covariance of the aligned model's readouts from TransformerLens' cache.
    rows = []
    for p in PROMPTS:
        _, cache = tiny_model.run_with_cache(tiny_model.to_tokens(p))
        rows.append(torch.stack([cache[f"blocks.{l}.hook_resid_post"][0, -1] for l in (1, 2)]).double())
    readouts = torch.stack(rows)
    for li in range(2):
        cov = torch.cov(readouts[:, li].T)
        basis = report.v_rev_basis[li].double()
        heavy = nulls.alignment_with_random_directions(
            nulls.sample_gaussian_directions(cov, 20_000, seed=9), basis
        ).numpy()
        light = report.null_draws_activation[li].astype(np.float64)
        se = math.hypot(quantile_se(light, 0.99), quantile_se(heavy, 0.99))
        assert report.null_p99_activation[li] == pytest.approx(np.quantile(heavy, 0.99), abs=5 * se)
