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


def _orthonormal_rows(basis: torch.Tensor) -> torch.Tensor:
    if basis.shape[0] == 1:
        return basis / basis.norm()
    q, _ = torch.linalg.qr(basis.T)
    return q.T


@shape_checked
def activation_null_draws_from_readouts(
    readouts: Float[torch.Tensor, "n d"],
    basis: Float[torch.Tensor, "k d"],
    n_draws: int = 20_000,
    seed: int = 0,
    chunk: int = 65_536,
) -> Float[torch.Tensor, " n_draws"]:
    """Alignments of ``n_draws`` N(0, Sigma_A) directions with v_rev, without forming Sigma_A.

    With X_c the centred readouts (n x d) and g ~ N(0, I_n), u = X_c^T g / sqrt(n-1) is exactly
    N(0, Sigma_A) for Sigma_A = X_c^T X_c / (n-1), the sample covariance of the readouts. With the
    thin SVD X_c = U S W^T (r = min(n, d) singular values), u = W S z / sqrt(n-1) where z = U^T g is
    again N(0, I_r); so u . basis = z . (S W^T basis^T) and ||u||^2 = sum_i s_i^2 z_i^2 (up to the
    1/(n-1) that cancels in the alignment, a ratio). Memory is O(n d) (no d x d matrix is ever
    built) and each draw costs O(r k).

    Args:
        readouts: per-example readouts of the aligned model on the probe set, one layer.
        basis: v_rev (k=1) or a rank-k subspace (rows need not be orthonormal; they are made so).
        n_draws: Monte Carlo draws.
        seed: seed of the draws (a CPU generator: results do not depend on the device).
        chunk: draws per batch (bounds memory at ``chunk`` x r).

    Returns:
        The alignment of each draw: the signed cosine for k=1, the projection norm ratio for k>1.
        NaN everywhere when fewer than two readouts or all readouts are equal (Sigma_A = 0).

    Example:
        >>> x = torch.randn(50, 16, dtype=torch.float64)
        >>> a = activation_null_draws_from_readouts(x, torch.eye(16)[:1], n_draws=1000)
        >>> a.shape
        torch.Size([1000])
    """
    if n_draws < 1:
        raise ValueError(f"n_draws must be >= 1, got {n_draws}.")
    x = readouts.detach().cpu().double()
    n = x.shape[0]
    nan = torch.full((n_draws,), float("nan"), dtype=torch.float64)
    if n < 2:
        return nan
    x = x - x.mean(dim=0, keepdim=True)
    _, s, wh = torch.linalg.svd(x, full_matrices=False)
    if float(s.max()) <= 0:
        return nan
    b = _orthonormal_rows(basis.detach().cpu().double())
    coord_map = s[:, None] * (wh @ b.T)  # [r, k]: u . basis = z @ coord_map
    s2 = s.square()
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(n_draws, dtype=torch.float64)
    for start in range(0, n_draws, chunk):
        m = min(chunk, n_draws - start)
        z = torch.randn(m, s.shape[0], generator=gen, dtype=torch.float64)
        coords = z @ coord_map
        norm = (z.square() @ s2).sqrt()
        numer = coords[:, 0] if b.shape[0] == 1 else coords.norm(dim=-1)
        out[start : start + m] = numer / norm
    return out


@shape_checked
def activation_null_quantile_from_readouts(
    readouts: Float[torch.Tensor, "n d"],
    basis: Float[torch.Tensor, "k d"],
    q: float = 0.99,
    n_draws: int = 20_000,
    seed: int = 0,
) -> float:
    """The q-quantile of the activation-space null from per-example readouts, in O(n d) memory.

    The same distribution as :func:`activation_null_quantile` on the readouts' sample covariance
    (see :func:`activation_null_draws_from_readouts`), without the d x d matrix.

    Args:
        readouts: per-example readouts ``[n, d]`` of the aligned model at one layer.
        basis: v_rev ``[1, d]`` or a subspace ``[k, d]``.
        q: the quantile, in (0, 1).
        n_draws, seed: Monte Carlo draws and their seed.

    Returns:
        The quantile (NaN when the readouts do not vary).

    Example:
        >>> x = torch.randn(200, 8, dtype=torch.float64)
        >>> 0 < activation_null_quantile_from_readouts(x, torch.eye(8)[:1], n_draws=5000) < 1
        True
    """
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile q must lie in (0, 1), got {q}.")
    draws = activation_null_draws_from_readouts(readouts, basis, n_draws, seed).numpy()
    if np.isnan(draws).all():
        return float("nan")
    return float(np.quantile(draws, q))
