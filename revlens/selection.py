"""Honest layer selection: a p-value for the best of many layers, and a signal-to-noise screen for v_rev.

Choosing the layer with the highest mean alignment out of L layers and then testing it against
that layer's own null overstates the evidence: under "no layer aligned" the best of L null
alignments is larger than one. This module tests the chosen layer against the null of the
*maximum* over the layers the choice was made among.

What is tested (alignment a[r, t, l] of run r at step t, layer l; m competing layers):

- Per run-step pair, at the chosen layer: the exact isotropic tail p = P(a_null >= a) (Beta law),
  corrected for the choice by Bonferroni, min(1, m p) (valid for any dependence between layers),
  and by Sidak, 1 - (1 - p)^m (exact for independent layers; for positively dependent ones it is
  conservative). The activation-space version draws, for every Monte Carlo draw, one null
  alignment per layer from that layer's N(0, Sigma_A) null and takes the maximum over the m layers:
  p = P(max_l a_null_l >= a). A pair "exceeds" when its corrected p-value is below alpha, i.e.
  its alignment is above the corrected threshold (the 1 - alpha quantile of the maximum).
- The chosen layer's mean alignment over its pairs (the statistic the layer was chosen by): the
  pairs of one layer are strongly dependent (steps of one run share their past), so their p-values
  are merged by twice their mean, min(1, 2 mean_pairs p), a p-value valid under ANY dependence
  (Vovk & Wang 2020, "Combining p-values via averaging"); that layer-level p-value is then corrected
  for the choice among m layers by Bonferroni or Sidak. The activation-space version merges the
  pairs' max-over-layers Monte Carlo p-values the same way.
- ``select_on``: the layer is chosen on some runs (seeds) and tested on the others. The choice does
  not see the tested runs, so no correction is needed (m = 1): the tested runs' alignments at the
  chosen layer are compared with that layer's own null.

Signal-to-noise of v_rev (paired: pretrain and align are read on the same prompts). With
D_i = h(P, x_i) - h(A, x_i) over the n probe prompts, the standard error of the mean difference
is sqrt(trace(Cov(D)) / n), and

    SNR = ||mean_i D_i|| / sqrt(trace(Cov(D)) / n).

With no real difference (pretrain == align up to noise) SNR is about 1 (E[SNR^2] = 1); with a
real difference mu, SNR^2 is about 1 + n ||mu||^2 / trace(Cov(D)), and the estimated direction's
cosine with the population difference is about sqrt(1 - 1/SNR^2). The default threshold 3 flags
noise even when it lives in one dimension (SNR^2 ~ chi2_1: SNR > 2.6 with probability 1%) and
keeps directions within cos 0.94 of their population value. Chosen over a bootstrap: closed form,
deterministic, O(n d) per layer, and the bootstrap's estimate of the same standard error agrees
to O(1/n). With a contrast readout the control centroid's own sampling noise is not included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Float

from revlens import nulls
from revlens.shapes import shape_checked

DEFAULT_SNR_THRESHOLD = 3.0
DEFAULT_ALPHA = 0.01


@shape_checked
def v_rev_snr(
    h_pretrain: Float[torch.Tensor, "n_prompts n_layers d_model"],
    h_align: Float[torch.Tensor, "n_prompts n_layers d_model"],
) -> np.ndarray:
    """Per-layer signal-to-noise of mu(P) - mu(A): ||mean D|| / sqrt(trace(Cov D) / n), D = h(P,x) - h(A,x).

    Args:
        h_pretrain: per-example readouts of the pretrain model (same prompts, same order as ``h_align``).
        h_align: per-example readouts of the aligned model.

    Returns:
        ``[n_layers]`` float64: about 1 where pretrain and align differ only by noise; very large (``inf``
        if exact) where every prompt moves by the same vector; NaN with fewer than two prompts or no difference.

    Example:
        >>> h = torch.randn(40, 2, 8)
        >>> snr = v_rev_snr(h + torch.tensor([1.0] + [0.0] * 7), h)  # a shared shift: no noise but float32 rounding
        >>> bool((snr > 1e3).all())
        True
    """
    n, n_layers, _ = h_pretrain.shape
    out = np.full(n_layers, np.nan)
    if n < 2:
        return out
    for layer in range(n_layers):
        diff = h_pretrain[:, layer].double() - h_align[:, layer].double()
        mean = diff.mean(dim=0)
        signal = float(mean.norm())
        noise = float((diff - mean).square().sum() / (n - 1) / n) ** 0.5
        scale = max(float(diff.abs().max()), 1e-300)
        if signal <= 1e-12 * scale:
            out[layer] = np.nan if noise <= 1e-12 * scale else 0.0
        elif noise <= 1e-12 * scale:
            out[layer] = np.inf
        else:
            out[layer] = signal / noise
    return out


def sidak(p: np.ndarray | float, m: int) -> np.ndarray:
    """1 - (1 - p)^m, computed without cancellation for small p."""
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    with np.errstate(divide="ignore"):
        return -np.expm1(m * np.log1p(-p))


def bonferroni(p: np.ndarray | float, m: int) -> np.ndarray:
    """min(1, m p)."""
    return np.minimum(1.0, m * np.asarray(p, dtype=np.float64))


def merge_p_values(p: np.ndarray) -> float:
    """min(1, 2 mean(p)) over the finite entries: a p-value valid under any dependence (Vovk & Wang 2020)."""
    p = np.asarray(p, dtype=np.float64)
    p = p[np.isfinite(p)]
    return float("nan") if p.size == 0 else float(min(1.0, 2.0 * p.mean()))


def monte_carlo_p_value(values: np.ndarray, null_draws: np.ndarray) -> np.ndarray:
    """(1 + #{draws >= value}) / (N + 1) for each value (never 0); NaN values stay NaN."""
    draws = np.sort(np.asarray(null_draws, dtype=np.float64))
    draws = draws[np.isfinite(draws)]
    values = np.asarray(values, dtype=np.float64)
    out = np.full(values.shape, np.nan)
    if draws.size == 0:
        return out
    ok = np.isfinite(values)
    above = draws.size - np.searchsorted(draws, values[ok], side="left")
    out[ok] = (1.0 + above) / (draws.size + 1.0)
    return out


def layer_means(alignment: np.ndarray) -> np.ndarray:
    """Mean alignment per layer over every measured run-step pair of ``alignment[runs, steps, layers]``."""
    a = np.asarray(alignment, dtype=np.float64)
    counts = np.sum(np.isfinite(a), axis=(0, 1))
    sums = np.nansum(a, axis=(0, 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def choose_layer(alignment: np.ndarray, eligible: np.ndarray) -> int:
    """Index of the eligible layer with the highest mean alignment (the first eligible one if none is finite)."""
    means = layer_means(alignment)
    means = np.where(eligible & np.isfinite(means), means, -np.inf)
    if not np.isfinite(means).any():
        candidates = np.flatnonzero(eligible)
        return int(candidates[0]) if candidates.size else 0
    return int(np.argmax(means))


@dataclass
class SelectionTest:
    """The chosen layer, tested against the null "no layer aligned" (see the module docstring).

    Per-pair arrays are ``[n_test_runs, n_steps]`` at the chosen layer (NaN where not measured).
    """

    layer: int
    layer_index: int
    competing_layers: list[int]
    select_on: list[str] | None
    test_runs: list[str]
    alpha: float
    mean_alignment: float
    pairs: int
    p_pair: np.ndarray
    p_pair_bonferroni: np.ndarray
    p_pair_sidak: np.ndarray
    p_pair_activation_max: np.ndarray
    thresholds: dict[str, float] = field(default_factory=dict)
    above: dict[str, int | None] = field(default_factory=dict)
    p_value: dict[str, float] = field(default_factory=dict)

    @property
    def m(self) -> int:
        """How many layers the tested pairs' layer was chosen among (1 with ``select_on``)."""
        return len(self.competing_layers)

    def to_dict(self) -> dict[str, Any]:
        """Scalars only (JSON-ready)."""
        return {
            "layer": self.layer,
            "competing_layers": self.competing_layers,
            "select_on": self.select_on,
            "test_runs": self.test_runs,
            "alpha": self.alpha,
            "mean_alignment": self.mean_alignment,
            "pairs": self.pairs,
            "thresholds": self.thresholds,
            "above": self.above,
            "p_value": self.p_value,
        }


def selection_test(
    alignment: np.ndarray,
    layers: Sequence[int],
    runs: Sequence[str],
    d_model: int,
    k: int = 1,
    eligible: np.ndarray | None = None,
    null_draws_activation: np.ndarray | None = None,
    select_on: str | Sequence[str] | None = None,
    alpha: float = DEFAULT_ALPHA,
) -> SelectionTest:
    """Choose the layer with the highest mean alignment and test it honestly (module docstring).

    Args:
        alignment: ``[n_runs, n_steps, n_layers]`` alignments (NaN where not measured).
        layers, runs: the layer numbers and run names of its axes.
        d_model, k: dimension and subspace rank of the isotropic null.
        eligible: ``[n_layers]`` bool, the layers the choice may pick (default: all).
        null_draws_activation: ``[n_layers, n_draws]`` activation-space null alignments (independent
            draws per layer); without them the activation-space results are NaN.
        select_on: run name(s) to choose the layer on; the other runs are tested (no correction).
        alpha: level of the corrected thresholds and counts (0.01: the p99).

    Returns:
        A :class:`SelectionTest`.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> a = rng.normal(0, 0.05, (3, 4, 30)); a[:, :, 7] += 0.6
        >>> t = selection_test(a, list(range(30)), ["r0", "r1", "r2"], d_model=256)
        >>> t.layer, t.above["sidak"], t.pairs
        (7, 12, 12)
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}.")
    a = np.asarray(alignment, dtype=np.float64)
    n_runs, _, n_layers = a.shape
    if len(layers) != n_layers or len(runs) != n_runs:
        raise ValueError(f"alignment has shape {a.shape} but {len(runs)} runs and {len(layers)} layers were given.")
    eligible = _measured_eligible(a, eligible)
    runs = list(runs)
    chosen_runs, test_runs = _split_runs(runs, select_on)
    li = choose_layer(a[[runs.index(r) for r in chosen_runs]], eligible)
    competing = np.flatnonzero(eligible) if select_on is None else np.array([li])
    m = len(competing)
    tested = a[[runs.index(r) for r in test_runs], :, li]
    p, p_bonf, p_sidak = _pair_p_values(tested, d_model, k, m)
    thresholds = _isotropic_thresholds(alpha, m, d_model, k)
    above: dict[str, int | None] = {name: nulls.exceedance_count(tested, thr)[0] for name, thr in thresholds.items()}
    pairs = int(np.isfinite(tested).sum())
    p_value = {
        "isotropic": merge_p_values(p),
        "bonferroni": float(bonferroni(merge_p_values(p), m)),
        "sidak": float(sidak(merge_p_values(p), m)),
    }
    p_act_max, act_thresholds, above["activation_max"], p_value["activation_max"] = _activation_max_test(
        tested, null_draws_activation, n_layers, li, competing, alpha
    )
    thresholds.update(act_thresholds)
    with np.errstate(all="ignore"):
        mean = float(np.nanmean(tested)) if pairs else float("nan")
    return SelectionTest(
        layer=int(layers[li]),
        layer_index=li,
        competing_layers=[int(layers[i]) for i in competing],
        select_on=None if select_on is None else chosen_runs,
        test_runs=test_runs,
        alpha=alpha,
        mean_alignment=mean,
        pairs=pairs,
        p_pair=p,
        p_pair_bonferroni=p_bonf,
        p_pair_sidak=p_sidak,
        p_pair_activation_max=p_act_max,
        thresholds=thresholds,
        above=above,
        p_value=p_value,
    )


def _measured_eligible(a: np.ndarray, eligible: np.ndarray | None) -> np.ndarray:
    """The eligible layers with a measured alignment (every measured layer when none of them is eligible)."""
    n_layers = a.shape[2]
    eligible = np.ones(n_layers, bool) if eligible is None else np.asarray(eligible, bool)
    measured = np.isfinite(layer_means(a))
    if not measured.any():
        raise ValueError(
            f"every alignment is NaN ({a.size} run-step-layer values): no layer can be chosen or tested. Either the "
            "fine-tuning checkpoints diverged (NaN/inf weights; see report.config['non_finite']), or v_rev is "
            "undefined because pretrain and align give the same readouts (report.v_rev_norm is 0): check that the "
            "history's pretrain and align are different models and replace the diverged checkpoints."
        )
    eligible = eligible & measured
    if not eligible.any():
        eligible = measured
    return eligible


def _split_runs(runs: list[str], select_on: str | Sequence[str] | None) -> tuple[list[str], list[str]]:
    """(the runs the layer is chosen on, the runs tested): every run for both without ``select_on``."""
    if select_on is None:
        return runs, runs
    chosen_runs = [select_on] if isinstance(select_on, str) else list(select_on)
    unknown = [r for r in chosen_runs if r not in runs]
    if unknown:
        raise ValueError(f"select_on names runs {unknown} that the report does not have; its runs are {runs}.")
    test_runs = [r for r in runs if r not in chosen_runs]
    if not test_runs:
        raise ValueError(
            f"select_on={chosen_runs} leaves no run to test; keep at least one run out of the {len(runs)} ({runs})."
        )
    return chosen_runs, test_runs


def _pair_p_values(tested: np.ndarray, d_model: int, k: int, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each tested pair's isotropic p-value, and its Bonferroni and Sidak corrections for m layers (NaN stays NaN)."""
    p = nulls.isotropic_p_value(tested, d_model, k)
    p_bonf, p_sidak = bonferroni(p, m), sidak(p, m)
    p_bonf[np.isnan(p)] = np.nan
    p_sidak[np.isnan(p)] = np.nan
    return p, p_bonf, p_sidak


def _isotropic_thresholds(alpha: float, m: int, d_model: int, k: int) -> dict[str, float]:
    """The isotropic null's 1 - alpha quantile, alone and corrected for the best of m layers (Bonferroni, Sidak)."""
    return {
        "isotropic_p99": nulls.isotropic_quantile(1 - alpha, d_model, k),
        "bonferroni": nulls.isotropic_quantile(1 - alpha / m, d_model, k),
        "sidak": nulls.isotropic_quantile((1 - alpha) ** (1 / m), d_model, k),
    }


def _activation_max_test(
    tested: np.ndarray,
    null_draws_activation: np.ndarray | None,
    n_layers: int,
    li: int,
    competing: np.ndarray,
    alpha: float,
) -> tuple[np.ndarray, dict[str, float], int | None, float]:
    """The tested pairs against the maximum over the competing layers of their activation-space null alignments:
    per-pair p-values, thresholds (``activation_max``; ``activation_p99``, the chosen layer's own), the count of
    pairs above the corrected one and the merged p-value. NaN, no thresholds and None without usable draws."""
    draws = None if null_draws_activation is None else np.asarray(null_draws_activation, dtype=np.float64)
    if draws is not None and draws.ndim == 2 and draws.shape[0] == n_layers and np.isfinite(draws[competing]).any():
        layer_max = np.nanmax(np.where(np.isfinite(draws[competing]), draws[competing], -np.inf), axis=0)
        p_act_max = monte_carlo_p_value(tested, layer_max)
        thresholds = {
            "activation_max": float(np.quantile(layer_max, 1 - alpha)),
            "activation_p99": float(np.nanquantile(draws[li], 1 - alpha)),
        }
        above = nulls.exceedance_count(tested, thresholds["activation_max"])[0]
        return p_act_max, thresholds, above, merge_p_values(p_act_max)
    return np.full(tested.shape, np.nan), {}, None, float("nan")
