"""Reversion directions (v_rev), drift, and the alignment of drift with v_rev, per layer.

Conventions: centroids are ``[n_layers, d_model]``; per-example readouts ``[n_prompts, n_layers, d_model]``;
a direction basis is ``[n_layers, k, d_model]`` with orthonormal rows (k=1 for a single direction).
"""

from __future__ import annotations

import warnings

import torch
from einops import einsum
from jaxtyping import Float

from revlens.shapes import shape_checked

ESTIMATORS = ("mean_diff", "per_example", "pca")
ROUNDOFF = 1e-5  # drifts shorter than this fraction of the activation norm are float noise
_EPS = 1e-12


def _normalize(x: torch.Tensor) -> torch.Tensor:
    norm = x.norm(dim=-1, keepdim=True)
    return torch.where(norm > _EPS, x / norm.clamp_min(_EPS), torch.full_like(x, float("nan")))


@shape_checked
def v_rev_mean_diff(
    mu_pretrain: Float[torch.Tensor, "n_layers d_model"], mu_align: Float[torch.Tensor, "n_layers d_model"]
) -> Float[torch.Tensor, "n_layers d_model"]:
    """normalize(mu(P) - mu(A)): from the aligned centroid back toward the pretrain witness."""
    return _normalize(mu_pretrain.double() - mu_align.double())


@shape_checked
def v_rev_per_example(
    h_pretrain: Float[torch.Tensor, "n_prompts n_layers d_model"],
    h_align: Float[torch.Tensor, "n_prompts n_layers d_model"],
) -> Float[torch.Tensor, "n_layers d_model"]:
    """normalize(mean over x of normalize(h(P,x) - h(A,x)))."""
    return _normalize(_normalize(h_pretrain.double() - h_align.double()).nanmean(dim=0))


@shape_checked
def v_rev_pca(
    h_pretrain: Float[torch.Tensor, "n_prompts n_layers d_model"],
    h_align: Float[torch.Tensor, "n_prompts n_layers d_model"],
    k: int,
) -> Float[torch.Tensor, "n_layers k d_model"]:
    """Top-k right singular vectors of the (uncentred) per-example differences h(P,x) - h(A,x).

    Uncentred so that a shared shift, the signal itself, is the first component; each first
    component is oriented to agree with the mean difference.
    """
    diffs = (h_pretrain.double() - h_align.double()).transpose(0, 1)
    n_prompts, d = diffs.shape[1], diffs.shape[2]
    if not 1 <= k <= min(n_prompts, d):
        raise ValueError(f"pca rank k={k} must be between 1 and min(n_prompts={n_prompts}, d_model={d}).")
    _, _, vh = torch.linalg.svd(diffs, full_matrices=False)
    basis = vh[:, :k, :].clone()
    mean_diff = diffs.mean(dim=1)
    sign = torch.sign(einsum(basis[:, 0, :], mean_diff, "l d, l d -> l"))
    sign[sign == 0] = 1
    basis[:, 0, :] *= sign[:, None]
    return basis


def estimate_v_rev(
    estimator: str,
    mu_pretrain: torch.Tensor,
    mu_align: torch.Tensor,
    h_pretrain: torch.Tensor | None = None,
    h_align: torch.Tensor | None = None,
    k: int = 1,
) -> torch.Tensor:
    """v_rev basis ``[n_layers, k, d_model]`` by the named estimator (mean_diff, per_example, pca)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {ESTIMATORS}.")
    if estimator == "mean_diff":
        return v_rev_mean_diff(mu_pretrain, mu_align)[:, None, :]
    if h_pretrain is None or h_align is None:
        raise ValueError(f"estimator {estimator!r} needs per-example readouts of the pretrain and aligned models.")
    if estimator == "per_example":
        return v_rev_per_example(h_pretrain, h_align)[:, None, :]
    return v_rev_pca(h_pretrain, h_align, k)


@shape_checked
def drift(
    mu_t: Float[torch.Tensor, "n_layers d_model"], mu_align: Float[torch.Tensor, "n_layers d_model"]
) -> Float[torch.Tensor, "n_layers d_model"]:
    """delta_l(t) = mu_l(theta_t) - mu_l(A)."""
    return mu_t.double() - mu_align.double()


@shape_checked
def alignment(
    delta: Float[torch.Tensor, "*batch n_layers d_model"],
    basis: Float[torch.Tensor, "n_layers k d_model"],
    min_norm: float | torch.Tensor = 0.0,
) -> Float[torch.Tensor, "*batch n_layers"]:
    """cos(delta, v_rev) per layer for k=1; ||P delta|| / ||delta|| for a rank-k subspace.

    A drift no longer than ``min_norm`` (a scalar or one value per layer: float round-off of
    identical activations) has no direction: its alignment is NaN (callers warn).
    """
    delta = delta.double()
    basis = basis.double()
    coords = einsum(delta, basis, "... l d, l k d -> ... l k")
    norm = delta.norm(dim=-1)
    numer = coords[..., 0] if basis.shape[1] == 1 else coords.norm(dim=-1)
    out = numer / norm
    min_norm = torch.as_tensor(min_norm, dtype=norm.dtype, device=norm.device)
    return torch.where(norm > min_norm, out, torch.full_like(out, float("nan")))


@shape_checked
def roundoff_floor(probe_centroid: Float[torch.Tensor, "n_layers d_model"]) -> Float[torch.Tensor, " n_layers"]:
    """Per layer, the drift length below which alignment is float round-off: ``ROUNDOFF`` times the norm
    of the aligned model's raw probe centroid.

    The activations themselves set the round-off scale, so pass the probe centroid, not a contrast
    (probe minus control) centroid, which can be far shorter. Every reader of alignment (``analyze``,
    :class:`~revlens.finetune.ReversionMonitor`, the Trainer callback) uses this one floor, so a drift
    comes out NaN (no direction) in all of them or in none.

    Example:
        >>> probe_centroid_align = torch.tensor([[3.0, 4.0]])  # one layer, d_model 2
        >>> floor = roundoff_floor(probe_centroid_align)
        >>> floor
        tensor([5.0000e-05], dtype=torch.float64)
        >>> mu_align, basis = torch.zeros(1, 2), torch.tensor([[[1.0, 0.0]]])  # v_rev = e0
        >>> alignment(drift(torch.tensor([[0.6, 0.8]]), mu_align), basis, floor)
        tensor([0.6000], dtype=torch.float64)
        >>> alignment(drift(torch.tensor([[1e-5, 0.0]]), mu_align), basis, floor)  # below the floor: no direction
        tensor([nan], dtype=torch.float64)
    """
    return ROUNDOFF * probe_centroid.double().norm(dim=-1)


def warn_if_zero_drift(values: torch.Tensor, label: str) -> None:
    if torch.isnan(values).any():
        warnings.warn(
            f"{label}: drift is zero (identical to the aligned model) at some layer; its alignment is NaN.",
            RuntimeWarning,
            stacklevel=2,
        )
