"""The rank-k reversion subspace of a history (or report) and its random control.

The reversion subspace at layer l is spanned by the top-k principal directions of the per-example
differences h_l(pretrain, x) - h_l(align, x) over the probe prompts (uncentred, as
:func:`revlens.directions.v_rev_pca`): the rank-k generalisation of v_rev. A seeded random subspace of
the same rank is its control: blocking it tells whether an effect needs the reversion directions or
only k blocked dimensions.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from revlens import directions as dirs
from revlens.blocking_spec import InterventionError


def reversion_subspace(
    source: Any,
    k: int,
    *,
    layers: Sequence[int] | None = None,
    probe: Any = None,
    prompts: Any = None,
    control: Any = None,
    hook: str = "resid_post",
    readout: str = "last",
    device: str | None = None,
) -> dict[int, torch.Tensor]:
    """``{layer: [k, d_model]}`` orthonormal rows spanning the rank-k reversion subspace.

    Args:
        source: one of
            - a :class:`~revlens.report.ReversionReport` from ``analyze(..., estimator="pca", k=K)`` with
              K >= k (PCA bases are nested: its first k rows are the rank-k subspace), or
              :class:`~revlens.reversion_directions.ReversionDirections` with such a basis;
            - a pair ``(h_pretrain, h_align)`` of per-example readouts ``[n_prompts, n_layers, d_model]``
              (``layers`` names their layer axis; default 0..n_layers-1);
            - a history (a :class:`~revlens.history.History`, its folder or dict): its pretrain and
              aligned checkpoints are measured with ``probe`` (a per-example
              :class:`~revlens.probe.ReversionProbe`), or with one built from ``prompts``, ``control``,
              ``hook``, ``readout`` and ``layers``.
        k: the rank.
        layers: which layers to return (default: all of the source's).
        device: where a history's checkpoints are measured.

    Returns:
        ``{layer: Tensor[k, d_model]}`` float32 with orthonormal rows; each first row agrees in sign
        with the mean difference.

    Example:
        >>> basis = reversion_subspace(ckpts, 2, prompts=prompts, layers=[0])  # measures pretrain and align
        >>> basis[0].shape
        torch.Size([2, 16])
        >>> round(float(basis[0][0] @ report.v_rev[0]), 3)  # its first row is v_rev
        1.0
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InterventionError(f"the subspace rank k must be a positive integer, got {k!r}.")
    if _is_report(source) or _is_directions(source):
        return _from_report(source, k, layers)
    if isinstance(source, (tuple, list)) and len(source) == 2 and all(isinstance(t, torch.Tensor) for t in source):
        h_pre, h_ali = source
        names = list(range(h_pre.shape[1])) if layers is None else [int(l) for l in layers]
        if len(names) != h_pre.shape[1]:
            raise InterventionError(
                f"the readouts hold {h_pre.shape[1]} layers but layers names {len(names)}; "
                "give one layer index per readout layer."
            )
        return _as_dict(dirs.v_rev_pca(h_pre, h_ali, k), names)
    return _from_history(source, k, layers, probe, prompts, control, hook, readout, device)


def random_subspace(layers: Sequence[int], k: int, d_model: int, seed: int = 0) -> dict[int, torch.Tensor]:
    """``{layer: [k, d_model]}`` orthonormal rows of a seeded random subspace (Gaussian draw, QR).

    The control for :func:`reversion_subspace` with the same rank; each layer gets its own draw, and
    the same ``(layer, seed)`` always gives the same rows. The generator's seed is ``seed * 10007 + layer``
    modulo 2**64, so seeds of any size work (and seeds whose value fits 64 bits give the rows they always gave).

    Example:
        >>> random_subspace([0, 2], 4, 64, seed=1)[2].shape
        torch.Size([4, 64])
    """
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d_model:
        raise InterventionError(f"random@{k}: the rank must be an integer between 1 and d_model={d_model}.")
    out = {}
    for l in layers:
        gen = torch.Generator().manual_seed((int(seed) * 10_007 + int(l)) % 2**64)
        q, _ = torch.linalg.qr(torch.randn(d_model, k, generator=gen, dtype=torch.float64))
        out[int(l)] = q.T.float()
    return out


def subspace_directions(
    subspace: tuple | None,
    directions: Mapping[int, torch.Tensor],
    *,
    report: Any = None,
    history: Any = None,
    probe: Any = None,
    device: str | None = None,
    reference: Any = None,
    prompts: Any = None,
    control: Any = None,
    hook: str = "resid_post",
    readout: str = "last",
) -> dict[int, torch.Tensor]:
    """The directions a :class:`~revlens.blocking_spec.BlockingSpec` subspace asks for at ``directions``' layers.

    ``directions`` is ``{layer: tensor}`` or a :class:`~revlens.reversion_directions.ReversionDirections`.
    ``None`` keeps ``directions``; ``("random", k, draw)`` draws :func:`random_subspace`; ``("rank", k)``
    takes :func:`reversion_subspace` from ``report`` (or the directions themselves) when it carries a PCA basis of
    rank >= k, else from ``history`` measured with ``probe``; ``("full",)`` is every dimension (the identity);
    ``("refusal",)`` is :func:`refusal_direction` and ``("harmpca", k)`` :func:`readout_pca`, both measured
    on ``reference`` (the aligned model) with ``prompts`` (harmful) and ``control`` (harmless) token ids.
    :func:`revlens.build_defense` calls it; a pipeline that measures a subspace once for many runs calls it too.

    Example:
        >>> v_rev = report.directions()
        >>> subspace_directions(None, v_rev)[0].shape  # no subspace: the directions themselves
        torch.Size([1, 16])
        >>> subspace_directions(("random", 3, 1), v_rev)[1].shape  # random@3@1 at the directions' layers
        torch.Size([3, 16])
        >>> basis = subspace_directions(("rank", 2), v_rev, history=ckpts, probe=v_rev.probe(prompts, per_example=True))
        >>> basis[0].shape, round(float(basis[0][0] @ v_rev.bases[0][0]), 3)  # rank@2, measured on the history
        (torch.Size([2, 16]), 1.0)
    """
    bases = directions.bases if _is_directions(directions) else directions
    if subspace is None:
        return {int(l): v for l, v in bases.items()}
    layers = sorted(int(l) for l in bases)
    kind = subspace[0]
    d_model = int(next(iter(bases.values())).shape[-1])
    if kind == "full":
        return {l: torch.eye(d_model) for l in layers}
    if kind in ("refusal", "harmpca"):
        if reference is None or prompts is None or (kind == "refusal" and control is None):
            need = "prompts=... and control=..." if kind == "refusal" else "prompts=..."
            raise InterventionError(
                f"the {kind} subspace is measured on the aligned model: give reference=... (the aligned "
                f"model) and {need} (token ids of the harmful{' and harmless' if kind == 'refusal' else ''} "
                "probe prompts)."
            )
        if kind == "refusal":
            return refusal_direction(reference, prompts, control, layers=layers, hook=hook, readout=readout)
        return readout_pca(reference, prompts, int(subspace[1]), layers=layers, hook=hook, readout=readout)
    k = int(subspace[1])
    if kind == "random":
        return random_subspace(layers, k, d_model, seed=int(subspace[2]) if len(subspace) > 2 else 0)
    if kind != "rank":
        raise InterventionError(
            f"unknown subspace {subspace!r}; use ('rank', k), ('random', k, draw), ('refusal',), ('harmpca', k) "
            "or ('full',)."
        )
    nested = _is_directions(directions) and _estimator(directions) == "pca"
    source = report if report is not None else (directions if nested else None)
    if source is not None and (history is None or _report_rank(source) >= k):
        return reversion_subspace(source, k, layers=layers)
    if history is None:
        raise InterventionError(
            f"rank@{k} needs the rank-{k} reversion subspace: give directions from a report of "
            f"analyze(..., estimator='pca', k={k}) (report.directions()) or the history (history=...) to measure it."
        )
    return reversion_subspace(history, k, layers=layers, probe=probe, device=device)


def refusal_direction(
    model: Any,
    harmful: Any,
    harmless: Any,
    *,
    layers: Sequence[int] | None = None,
    hook: str = "resid_post",
    readout: str = "last",
) -> dict[int, torch.Tensor]:
    """The refusal direction: the unit difference of mean readouts, harmful minus harmless, per layer.

    This is the standard direction of Arditi et al. (2024, "Refusal in language models is mediated by a
    single direction") and the one ProCon (arXiv 2509.06795) constrains during fine-tuning, read here as revlens
    reads v_rev (chat-templated prompts, last token): so a defense along it and one along v_rev can be told apart.

    Args:
        model: the model to read (the aligned model for the defense), a TransformerBridge.
        harmful, harmless: prompts (strings, tokenised with the model's chat template, or 1-D token tensors).
        layers: layers to read (default: all).
        hook, readout: the hook point and the position read (as :class:`~revlens.probe.ReversionProbe`).

    Returns:
        ``{layer: Tensor[d_model]}`` float32 unit vectors.

    Example:
        >>> from revlens.checkpoint_loader import boot_native_model
        >>> cfg = dict(d_model=16, n_layers=2, n_ctx=8, d_head=4, n_heads=4, d_mlp=32, d_vocab=10, act_fn="gelu")
        >>> model = boot_native_model(cfg)
        >>> r = refusal_direction(model, [torch.tensor([1, 2, 3])], [torch.tensor([4, 5])], layers=[1])
        >>> round(float(r[1].norm()), 4)
        1.0
    """
    from revlens.probe import ReversionProbe

    probe = ReversionProbe(harmful, control=harmless, layers=layers, hook=hook, readout=readout, per_example=False)
    diff = probe.centroid(model)  # harmful mean minus harmless mean, float64 [n_layers, d_model]
    measured = probe.resolve_layers(model)
    norms = diff.norm(dim=-1)
    if not bool((norms > 0).all()):
        raise InterventionError(
            "the harmful and harmless mean readouts coincide at some layer, so there is no refusal direction; "
            "check that the two prompt sets differ."
        )
    return {l: (diff[i] / norms[i]).float() for i, l in enumerate(measured)}


def readout_pca(
    model: Any,
    prompts: Any,
    k: int,
    *,
    layers: Sequence[int] | None = None,
    hook: str = "resid_post",
    readout: str = "last",
) -> dict[int, torch.Tensor]:
    """The top-k principal directions of a model's centred per-prompt readouts, per layer.

    The data-matched control for the rank-k reversion subspace: it is built from the same prompts and as many
    dimensions, but from one model's readouts alone, not from the pretrain-to-align change.

    Args:
        model: the model read (the aligned model), a TransformerBridge.
        prompts: the prompts (strings or 1-D token tensors); at least ``k + 1`` of them.
        k: the number of directions.
        layers, hook, readout: as :class:`~revlens.probe.ReversionProbe`.

    Returns:
        ``{layer: Tensor[k, d_model]}`` float32 with orthonormal rows (the right singular vectors of the
        centred readouts, largest first).
    """
    from revlens.probe import ReversionProbe

    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InterventionError(f"the number of principal directions k must be a positive integer, got {k!r}.")
    probe = ReversionProbe(prompts, layers=layers, hook=hook, readout=readout, per_example=True)
    rows = probe.measure(model).per_example.double()  # [n, n_layers, d_model]
    if rows.shape[0] <= k:
        raise InterventionError(
            f"harmpca@{k} needs more than {k} prompts (the centred readouts of n prompts span at most n - 1 "
            f"dimensions); there are {rows.shape[0]}: give more prompts or a lower k."
        )
    centred = rows - rows.mean(0, keepdim=True)
    measured = probe.resolve_layers(model)
    out = {}
    for i, l in enumerate(measured):
        _, _, vh = torch.linalg.svd(centred[:, i], full_matrices=False)
        out[l] = vh[:k].float()
    return out


def _is_report(obj: Any) -> bool:
    return hasattr(obj, "v_rev_basis") and hasattr(obj, "layers") and hasattr(obj, "config")


def _is_directions(obj: Any) -> bool:
    """A :class:`~revlens.reversion_directions.ReversionDirections` (read by duck typing: it sits above this row)."""
    return hasattr(obj, "bases") and hasattr(obj, "estimator") and hasattr(obj, "layers")


def _estimator(source: Any) -> str:
    return source.estimator if _is_directions(source) else source.config.get("estimator", "mean_diff")


def _report_rank(source: Any) -> int:
    """The rank of a report's (or directions') PCA basis; 0 when it is not a principal subspace."""
    if _estimator(source) != "pca":
        return 0
    return source.rank if _is_directions(source) else int(source.v_rev_basis.shape[1])


def _from_report(source: Any, k: int, layers: Sequence[int] | None) -> dict[int, torch.Tensor]:
    rank = _report_rank(source)
    what = "directions have" if _is_directions(source) else "report has"
    if rank < k:
        have = (
            f"a rank-{rank} PCA basis"
            if rank
            else f"estimator {_estimator(source)!r} (one direction, not a principal subspace)"
        )
        raise InterventionError(
            f"the {what} {have}; the rank-{k} reversion subspace needs "
            f"analyze(..., estimator='pca', k={k}) (or pass the history to measure it)."
        )
    layers = list(source.layers) if layers is None else [int(l) for l in layers]
    missing = [l for l in layers if l not in source.layers]
    if missing:
        raise InterventionError(f"layers {missing} were not analysed; the {what} layers {source.layers}.")
    if _is_directions(source):
        return {l: source.bases[l][:k].float().clone() for l in layers}
    return {l: source.v_rev_basis[source.layers.index(l)][:k].float().clone() for l in layers}


def _from_history(
    source: Any,
    k: int,
    layers: Sequence[int] | None,
    probe: Any,
    prompts: Any,
    control: Any,
    hook: str,
    readout: str,
    device: str | None,
) -> dict[int, torch.Tensor]:
    from revlens.history import History
    from revlens.probe import ReversionProbe

    if not isinstance(source, (History, str, os.PathLike, Mapping)):
        raise InterventionError(
            f"cannot take a reversion subspace from {type(source).__name__}: give a report "
            "(estimator='pca'), per-example readouts (h_pretrain, h_align) or a history."
        )
    if probe is None:
        if prompts is None:
            raise InterventionError(
                "measuring the reversion subspace of a history needs the probe prompts "
                "(prompts=...) or a ReversionProbe (probe=...)."
            )
        probe = ReversionProbe(prompts, control=control, layers=layers, hook=hook, readout=readout, per_example=True)
    history = History.coerce(source)
    pre_model = history.pretrain.load(device)
    measured = probe.resolve_layers(pre_model)
    wanted = measured if layers is None else [int(l) for l in layers]
    missing = [l for l in wanted if l not in measured]
    if missing:
        raise InterventionError(f"the probe reads layers {measured}, not {missing}; give a probe at those layers.")
    pre = probe.measure(pre_model, per_example=True)
    del pre_model
    ali = probe.measure(history.align.load(device), per_example=True)
    basis = dirs.v_rev_pca(pre.per_example, ali.per_example, k)
    return {l: basis[measured.index(l)].float() for l in wanted}


def _as_dict(basis: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    return {int(l): basis[i].float() for i, l in enumerate(layers)}
