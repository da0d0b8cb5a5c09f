"""The hook mechanics of blocking: hooks at chosen layers of a model, and what a hook does to an activation.

Modes, at chosen layers and positions (V: orthonormal rows spanning v_rev or a rank-k subspace):
- ``project`` (forward): h <- h - (h V^T) V, the component is ablated (CAFT-style);
- ``clamp`` (forward): h <- h - (h V^T - c) V, the coordinate is held at c (a reference model's coordinate
  for the same input and position, or a constant);
- ``grad`` (backward): dL/dh <- dL/dh - (dL/dh V^T) V with the forward unchanged, so no update is
  pushed along V through that activation.
Projections run in float32 and are cast back to the activation's dtype, so bfloat16 models block to bfloat16
precision. :func:`layer_hooks` puts functions on a TransformerBridge's hook points or on a Hugging Face
model's decoder-layer outputs (``resid_post``); :func:`blocked_activation` is one hook's action (unchecked,
for the hot loop), :func:`project_out` and :func:`clamp_to` its shape-checked parts. The objects that use
them: :class:`revlens.blocking.Blocking` and :class:`revlens.anchor.ProbeAnchor`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

import torch
from jaxtyping import Float

from revlens.blocking_spec import InterventionError
from revlens.integrations import hf_hooks
from revlens.readout import StopForward, hook_name
from revlens.shapes import shape_checked

__all__ = ["blocked_activation", "clamp_to", "layer_hooks", "orthonormal_basis", "project_out"]


@contextlib.contextmanager
def layer_hooks(
    model: Any,
    hook: str,
    fns: Mapping[int, Callable[[torch.Tensor], torch.Tensor | None]],
    stop_after: int | None = None,
) -> Iterator[None]:
    """``fns[l](act)`` at hook point ``hook`` of layer ``l`` (a returned tensor replaces the activation) on a
    TransformerBridge, or on a Hugging Face module's decoder layer outputs (``resid_post`` only). With
    ``stop_after``, the forward stops once that layer ran: call the model with :func:`revlens.readout.run_stopping`."""
    if hf_hooks.is_bridge(model):

        def tl(fn: Callable, layer: int) -> Callable:
            def hook_fn(act: torch.Tensor, hook: Any) -> torch.Tensor | None:
                out = fn(act)
                if layer == stop_after:
                    raise StopForward
                return out

            return hook_fn

        with model.hooks(fwd_hooks=[(hook_name(hook, l), tl(f, l)) for l, f in fns.items()]):
            yield
        return
    if hook != "resid_post":
        raise InterventionError(
            f"on a Hugging Face module revlens hooks the decoder layers' outputs (resid_post), "
            f"not {hook!r}; use hook='resid_post' or a TransformerBridge."
        )
    with hf_hooks.layer_output_hooks(model, fns, stop_after=stop_after):
        yield


def orthonormal_basis(direction: torch.Tensor, d_model: int) -> torch.Tensor:
    """Rows spanning ``direction`` ([d] or [k, d]), orthonormalised (QR), float32."""
    basis = direction.detach().float()
    if basis.ndim == 1:
        basis = basis[None]
    if basis.ndim != 2 or basis.shape[1] != d_model:
        raise InterventionError(
            f"a direction must be [d_model] or [k, d_model] with d_model={d_model}, got shape {tuple(direction.shape)}."
        )
    if not torch.isfinite(basis).all() or (basis.norm(dim=-1) == 0).any():
        raise InterventionError("a blocking direction is zero or not finite; v_rev is undefined at that layer.")
    q, r = torch.linalg.qr(basis.T)
    if (r.diagonal().abs() < 1e-6).any():
        raise InterventionError("blocking directions are linearly dependent; give independent rows.")
    return (q.T * torch.sign(r.diagonal())[:, None]).contiguous()


class _ProjectGrad(torch.autograd.Function):
    """Identity forward; backward removes the gradient's component in span(V) where ``mask`` is set."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, basis: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(basis, mask if mask is not None else torch.empty(0))
        ctx.has_mask = mask is not None
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        basis, mask = ctx.saved_tensors
        g = grad.float()
        removed = (g @ basis.T) @ basis
        if ctx.has_mask:
            removed = removed * mask[..., None]
        return (g - removed).to(grad.dtype), None, None


@shape_checked
def project_out(
    h: Float[torch.Tensor, "batch seq d_model"], basis: Float[torch.Tensor, "k d_model"]
) -> Float[torch.Tensor, "batch seq d_model"]:
    """h - (h V^T) V."""
    return _project_out(h, basis)


def _project_out(h: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """:func:`project_out` without the run-time shape check, for the blocking hooks."""
    hf = h.float()
    return (hf - (hf @ basis.T) @ basis).to(h.dtype)


@shape_checked
def clamp_to(
    h: Float[torch.Tensor, "batch seq d_model"],
    basis: Float[torch.Tensor, "k d_model"],
    coords: Float[torch.Tensor, "batch seq k"],
) -> Float[torch.Tensor, "batch seq d_model"]:
    """h - (h V^T - c) V: the coordinate in span(V) becomes ``coords``."""
    return _clamp_to(h, basis, coords)


def _clamp_to(h: torch.Tensor, basis: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """:func:`clamp_to` without the run-time shape check, for the blocking hooks."""
    hf = h.float()
    return (hf - (hf @ basis.T - coords.float()) @ basis).to(h.dtype)


def blocked_activation(
    act: torch.Tensor,
    basis: torch.Tensor,
    modes: Collection[str],
    coords: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act`` ``[batch, seq, d]`` with the hook ``modes`` applied along ``basis`` ``[k, d]``: project, or clamp
    to ``coords`` ``[batch, seq, k]``, only where the boolean ``mask`` ``[batch, seq]`` is set (None: everywhere),
    then grad (while autograd records). Unchecked: the blocking hooks call it on every forward pass."""
    new = act
    if "project" in modes:
        new = _project_out(act, basis)
    elif "clamp" in modes:
        new = _clamp_to(act, basis, coords)
    if mask is not None and new is not act:
        new = torch.where(mask[..., None], new, act)
    if "grad" in modes and torch.is_grad_enabled():
        new = _ProjectGrad.apply(new, basis, None if mask is None else mask.float())
    return new
