"""Null models for the alignment of a drift with v_rev.

- Isotropic: a direction uniform on the sphere in R^d. For a unit v, (cos(u, v) + 1)/2 follows
  Beta((d-1)/2, (d-1)/2) exactly; for a rank-k subspace the squared projection fraction
  ||P u||^2 follows Beta(k/2, (d-k)/2), so alignment sqrt(||P u||^2) has exact quantiles too.
- Activation-space: random directions drawn from N(0, Sigma_A), Sigma_A the covariance of the
  aligned model's readouts, so the null knows which directions activations actually move in.
"""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Float
from scipy import stats

from revlens.shapes import shape_checked


def _check_dim(d: int, k: int = 1) -> None:
    if d < 2:
        raise ValueError(f"the null needs a space of dimension >= 2, got d={d}.")
    if not 1 <= k < d:
        raise ValueError(f"subspace rank k must satisfy 1 <= k < d, got k={k}, d={d}.")


def isotropic_distribution(d: int, k: int = 1) -> stats.rv_continuous:
    """The exact Beta law of the isotropic null (of (cos+1)/2 for k=1, of ||P u||^2 for k>1)."""
    _check_dim(d, k)
    if k == 1:
        return stats.beta((d - 1) / 2, (d - 1) / 2)
    return stats.beta(k / 2, (d - k) / 2)


def isotropic_quantile(q: float, d: int, k: int = 1) -> float:
    """The q-quantile of alignment under the isotropic null (cosine for k=1, projection norm for k>1)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile q must lie in (0, 1), got {q}.")
    x = float(isotropic_distribution(d, k).ppf(q))
    return 2.0 * x - 1.0 if k == 1 else float(np.sqrt(x))


def isotropic_p99(d: int, k: int = 1) -> float:
    """The isotropic null's p99 (about 2.33/sqrt(d) for large d and k=1)."""
    return isotropic_quantile(0.99, d, k)


def isotropic_p_value(alignment: np.ndarray | float, d: int, k: int = 1) -> np.ndarray:
    """P(null alignment >= observed) under the isotropic null; NaN stays NaN."""
    a = np.asarray(alignment, dtype=np.float64)
    dist = isotropic_distribution(d, k)
    with np.errstate(invalid="ignore"):
        x = (a + 1.0) / 2.0 if k == 1 else np.square(a)
        return dist.sf(x)


@shape_checked
def alignment_with_random_directions(
    directions: Float[torch.Tensor, "n d"], basis: Float[torch.Tensor, "k d"]
) -> Float[torch.Tensor, " n"]:
    """Alignment of each direction with a subspace: signed cosine for k=1, projection norm ratio otherwise."""
    directions = directions.double()
    basis = basis.double()
    coords = directions @ basis.T
    norms = directions.norm(dim=-1)
    if basis.shape[0] == 1:
        return coords[:, 0] / norms
    return coords.norm(dim=-1) / norms


def monte_carlo_isotropic(d: int, k: int = 1, n: int = 100_000, seed: int = 0, q: float = 0.99) -> float:
    """A Monte Carlo estimate of the isotropic null's q-quantile (a check of the exact value)."""
    _check_dim(d, k)
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(n, d, generator=gen, dtype=torch.float64)
    basis = torch.eye(d, dtype=torch.float64)[:k]
    return float(np.quantile(alignment_with_random_directions(u, basis).numpy(), q))


@shape_checked
def sample_gaussian_directions(
    covariance: Float[torch.Tensor, "d d"], n: int, seed: int = 0
) -> Float[torch.Tensor, "n d"]:
    """n draws from N(0, covariance) via its eigendecomposition (works for singular covariances)."""
    cov = covariance.double()
    cov = (cov + cov.T) / 2
    evals, evecs = torch.linalg.eigh(cov)
    scale = evals.clamp_min(0).sqrt()
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, cov.shape[0], generator=gen, dtype=torch.float64)
    return (z * scale) @ evecs.T


@shape_checked
def activation_null_quantile(
    covariance: Float[torch.Tensor, "d d"],
    basis: Float[torch.Tensor, "k d"],
    q: float = 0.99,
    n: int = 20_000,
    seed: int = 0,
) -> float:
    """The q-quantile of alignment between N(0, Sigma_A) directions and v_rev (or its subspace)."""
    if float(covariance.double().trace()) <= 0:
        return float("nan")
    u = sample_gaussian_directions(covariance, n, seed)
    return float(np.quantile(alignment_with_random_directions(u, basis).numpy(), q))


def exceedance_count(alignment: np.ndarray, threshold: np.ndarray | float) -> tuple[int, int]:
    """(pairs above threshold, pairs measured); NaN entries are not measured."""
    a = np.asarray(alignment, dtype=np.float64)
    t = np.broadcast_to(np.asarray(threshold, dtype=np.float64), a.shape)
    measured = ~np.isnan(a)
    return int(np.sum(a[measured] > t[measured])), int(measured.sum())
