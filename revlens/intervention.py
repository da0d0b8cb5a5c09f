"""Blocking motion along v_rev during fine-tuning, with TransformerLens hooks.

Modes, at chosen layers and positions (V: orthonormal rows spanning v_rev or a rank-k subspace):
- ``project`` (forward): h <- h - (h V^T) V, the component is ablated (CAFT-style);
- ``clamp`` (forward): h <- h - (h V^T - c) V, the coordinate is held at c, by default the
  coordinate a frozen reference model (the aligned checkpoint) gives for the same input and
  position, or a constant: motion relative to the reference is removed, with no arbitrary origin;
- ``grad`` (backward): dL/dh <- dL/dh - (dL/dh V^T) V with the forward unchanged, so no update is
  pushed along V through that activation.
Combine with ``+`` (``"clamp+grad"``). Projections run in float32 and are cast back to the
activation's dtype, so bfloat16 models block to bfloat16 precision.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Sequence

import torch
from jaxtyping import Float

from revlens._util import pad_right, training_mode
from revlens.probe import hook_name
from revlens.shapes import shape_checked

MODES = ("project", "clamp", "grad")


class InterventionError(ValueError):
    """A blocking specification revlens cannot apply, with the fix."""


def parse_mode(mode: str) -> frozenset[str]:
    """``"clamp+grad"`` -> {"clamp", "grad"}; project and clamp exclude each other."""
    parts = frozenset(p.strip() for p in mode.split("+") if p.strip())
    unknown = parts - set(MODES)
    if not parts or unknown:
        raise InterventionError(f"unknown blocking mode {mode!r}; combine {MODES} with '+', e.g. 'clamp+grad'.")
    if {"project", "clamp"} <= parts:
        raise InterventionError("'project' and 'clamp' both set the coordinate; choose one (add '+grad' if wanted).")
    return parts


def orthonormal_basis(direction: torch.Tensor, d_model: int) -> torch.Tensor:
    """Rows spanning ``direction`` ([d] or [k, d]), orthonormalised (QR), float32."""
    basis = direction.detach().float()
    if basis.ndim == 1:
        basis = basis[None]
    if basis.ndim != 2 or basis.shape[1] != d_model:
        raise InterventionError(f"a direction must be [d_model] or [k, d_model] with d_model={d_model}, "
                                f"got shape {tuple(direction.shape)}.")
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
    hf = h.float()
    return (hf - (hf @ basis.T) @ basis).to(h.dtype)


@shape_checked
def clamp_to(
    h: Float[torch.Tensor, "batch seq d_model"],
    basis: Float[torch.Tensor, "k d_model"],
    coords: Float[torch.Tensor, "batch seq k"],
) -> Float[torch.Tensor, "batch seq d_model"]:
    """h - (h V^T - c) V: the coordinate in span(V) becomes ``coords``."""
    hf = h.float()
    return (hf - (hf @ basis.T - coords.float()) @ basis).to(h.dtype)


class Blocking:
    """Blocks motion along v_rev at chosen layers while active (a context manager around a model).

    Args:
        directions: ``{layer: Tensor[d] or Tensor[k, d]}``.
        mode: ``project``, ``clamp``, ``grad`` or a ``+`` combination.
        hook: hook point alias or template (default ``resid_post``).
        reference: the frozen model whose coordinates ``clamp`` holds (default for clamp).
        constant: ``{layer: Tensor[k]}`` coordinates for ``clamp`` instead of a reference model.
    Per batch, ``clamp`` takes coordinates from :meth:`set_batch` (computed from the reference
    model, or precomputed once with :meth:`reference_coords` and indexed), and an optional
    boolean ``positions`` mask ``[batch, seq]`` limits where any mode acts.
    """

    def __init__(
        self,
        directions: Mapping[int, torch.Tensor],
        mode: str = "clamp",
        *,
        hook: str = "resid_post",
        reference: Any = None,
        constant: Mapping[int, torch.Tensor] | None = None,
    ):
        if not directions:
            raise InterventionError("no blocking directions given; pass {layer: v_rev[layer]}.")
        self.modes = parse_mode(mode)
        self.mode = mode
        self.hook = hook
        self.layers = sorted(int(l) for l in directions)
        d_model = int(next(iter(directions.values())).shape[-1])
        self.bases = {int(l): orthonormal_basis(v, d_model) for l, v in directions.items()}
        self.d_model = d_model
        self.reference = reference
        self.constant = None if constant is None else {int(l): torch.as_tensor(c).float().reshape(-1)
                                                       for l, c in constant.items()}
        if "clamp" in self.modes and reference is None and constant is None:
            raise InterventionError("clamp needs a reference model (reference=aligned_model) or constant coordinates.")
        self._coords: dict[int, torch.Tensor] | None = None
        self._positions: torch.Tensor | None = None

    @property
    def needs_coords(self) -> bool:
        return "clamp" in self.modes and self.constant is None

    def _check_model(self, model: Any) -> None:
        if model.cfg.d_model != self.d_model:
            raise InterventionError(f"directions have d_model={self.d_model}, the model has {model.cfg.d_model}.")
        bad = [l for l in self.layers if not 0 <= l < model.cfg.n_layers]
        if bad:
            raise InterventionError(f"layers {bad} are out of range for a model with n_layers={model.cfg.n_layers}.")

    @torch.no_grad()
    def reference_coords(self, tokens: torch.Tensor, model: Any = None, batch_size: int = 64) -> dict[int, torch.Tensor]:
        """The reference model's coordinates ``{layer: [n, seq, k]}`` on ``tokens`` (computed once, reused)."""
        model = self.reference if model is None else model
        if model is None:
            raise InterventionError("no reference model to compute clamp coordinates from.")
        device = next(model.parameters()).device
        out: dict[int, list[torch.Tensor]] = {l: [] for l in self.layers}
        names = {hook_name(self.hook, l): l for l in self.layers}
        with training_mode(model, False):
            for start in range(0, tokens.shape[0], batch_size):
                chunk = tokens[start:start + batch_size].to(device)
                _, cache = model.run_with_cache(chunk, names_filter=list(names))
                for name, l in names.items():
                    out[l].append((cache[name].float() @ self.bases[l].to(device).T).cpu())
        return {l: torch.cat(v, 0) for l, v in out.items()}

    def set_batch(self, tokens: torch.Tensor | None = None, *, coords: Mapping[int, torch.Tensor] | None = None,
                  positions: torch.Tensor | None = None) -> None:
        """Coordinates (and an optional position mask) for the next forward pass.

        Give ``coords`` precomputed by :meth:`reference_coords` (indexed to this batch), or
        ``tokens`` to compute them from the reference model now.
        """
        if coords is None and tokens is not None and self.needs_coords:
            coords = self.reference_coords(tokens)
        self._coords = None if coords is None else dict(coords)
        self._positions = positions

    def _hook(self, layer: int):
        def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
            basis = self.bases[layer].to(act.device)
            mask = None if self._positions is None else self._positions.to(act.device)
            new = act
            if "project" in self.modes:
                new = project_out(act, basis)
            elif "clamp" in self.modes:
                coords = self._clamp_coords(layer, act)
                new = clamp_to(act, basis, coords)
            if mask is not None and new is not act:
                new = torch.where(mask[..., None], new, act)
            if "grad" in self.modes and torch.is_grad_enabled():
                new = _ProjectGrad.apply(new, basis, None if mask is None else mask.float())
            return new

        return fn

    def _clamp_coords(self, layer: int, act: torch.Tensor) -> torch.Tensor:
        batch, seq = act.shape[:2]
        if self.constant is not None:
            c = self.constant[layer].to(act.device)
            return c.expand(batch, seq, -1)
        if self._coords is None:
            raise InterventionError("clamp has no reference coordinates for this batch; call "
                                    "blocking.set_batch(tokens) or set_batch(coords=...) before the forward pass.")
        c = self._coords[layer].to(act.device)
        if c.shape[0] != batch or c.shape[1] < seq:
            raise InterventionError(f"clamp coordinates of shape {tuple(c.shape)} do not fit the batch "
                                    f"[{batch}, {seq}]; index the precomputed coordinates with this batch's rows.")
        return c[:, :seq]

    @contextlib.contextmanager
    def applied(self, model: Any) -> Iterator["Blocking"]:
        """Hooks on while inside; removed on exit, also when the step raises."""
        self._check_model(model)
        hooks = [(hook_name(self.hook, l), self._hook(l)) for l in self.layers]
        with model.hooks(fwd_hooks=hooks):
            yield self


def blocking_from_report(report: Any, mode: str, layers: Sequence[int] | None = None, **kwargs: Any) -> Blocking:
    """A :class:`Blocking` along a report's v_rev (or its rank-k basis) at ``layers`` (default: the best layer)."""
    layers = [report.best_layer] if layers is None else list(layers)
    missing = [l for l in layers if l not in report.layers]
    if missing:
        raise InterventionError(f"layers {missing} were not analysed; the report has layers {report.layers}.")
    directions = {l: report.v_rev_basis[report.layers.index(l)] for l in layers}
    return Blocking(directions, mode, hook=report.config.get("hook", "resid_post"), **kwargs)


class ProbeAnchor:
    """Blocks motion of the probe prompts themselves along v_rev: a penalty added to the fine-tuning loss.

    penalty = weight * mean over probe prompts x, layers l of ||(h_l(theta, x) - h_l(ref, x)) V_l^T||^2
            + contrast_weight * mean over layers l of ||(c_l(theta) - c_l(ref)) V_l^T||^2,
    with h the last-token readout and c the contrast centroid (mean over the probe prompts minus mean
    over the ``control`` prompts), the quantity whose drift the report's alignment measures. Hooks on
    the fine-tuning examples cannot stop harmful-prompt activations from moving (they never pass
    through the hooks); this anchors them directly, and needs only prompts (no responses). It is an
    option beyond the paper's hook-based modes. With ``sample=k`` each step uses k prompts of each set,
    drawn afresh per step (seeded by ``seed`` and the step, so a resumed run draws the same ones): the
    cost per step no longer grows with the probe set.
    """

    def __init__(self, directions: Mapping[int, torch.Tensor], prompts: Sequence[torch.Tensor], reference: Any,
                 weight: float = 0.1, *, hook: str = "resid_post", control: Sequence[torch.Tensor] | None = None,
                 contrast_weight: float = 0.0, sample: int | None = None, seed: int = 0):
        if weight < 0 or contrast_weight < 0:
            raise InterventionError(f"anchor weights must be >= 0, got {weight} and {contrast_weight}.")
        if not prompts:
            raise InterventionError("the anchor needs at least one probe prompt.")
        if contrast_weight > 0 and not control:
            raise InterventionError("contrast_weight > 0 needs control prompts (control=[...]).")
        if sample is not None and sample < 1:
            raise InterventionError(f"sample must be a positive number of prompts per step, got {sample}.")
        self.sample, self.seed, self._calls = sample, int(seed), 0
        d_model = int(next(iter(directions.values())).shape[-1])
        self.bases = {int(l): orthonormal_basis(v, d_model) for l, v in directions.items()}
        self.layers = sorted(self.bases)
        self.weight, self.contrast_weight = float(weight), float(contrast_weight)
        self.hook = hook
        self.sets = {"probe": _pad(prompts)}
        if control:
            self.sets["control"] = _pad(control)
        with torch.no_grad():
            self.reference_coords = {name: {l: c.detach() for l, c in self._coords(reference, name).items()}
                                     for name in self.sets}

    def rows(self, name: str, step: int | None) -> torch.Tensor | None:
        """The prompts of set ``name`` this step uses: all (None), or ``sample`` of them for this step."""
        n = self.sets[name][0].shape[0]
        if self.sample is None or self.sample >= n or step is None:
            return None
        salt = 0 if name == "probe" else 1
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 2 * int(step) + salt)
        return torch.randperm(n, generator=gen)[: self.sample]

    def _coords(self, model: Any, name: str, rows: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """Per prompt of set ``name`` (or its ``rows``), per layer: the last-token readout's coordinates along V_l."""
        from revlens.probe import _reduce_positions

        device = next(model.parameters()).device
        tokens, lengths = self.sets[name]
        if rows is not None:
            tokens, lengths = tokens[rows], lengths[rows]
            tokens = tokens[:, : int(lengths.max())]
        store: dict[int, torch.Tensor] = {}

        def grab(layer: int):
            def fn(act: torch.Tensor, hook: Any) -> None:
                last = _reduce_positions(act, lengths.to(device), "last")
                store[layer] = last.float() @ self.bases[layer].to(device).T

            return fn

        with model.hooks(fwd_hooks=[(hook_name(self.hook, l), grab(l)) for l in self.layers]):
            model(tokens.to(device))
        return store

    def penalty(self, model: Any, step: int | None = None) -> torch.Tensor:
        """The differentiable anchor penalty for the model's current weights (``step`` picks the sample;
        without it, successive calls count steps themselves)."""
        if step is None and self.sample is not None:
            self._calls += 1
            step = self._calls
        rows = self.rows("probe", step)
        probe = self._coords(model, "probe", rows)
        ref = self.reference_coords["probe"]
        moved = {l: probe[l] - (ref[l] if rows is None else ref[l][rows]).to(probe[l].device) for l in self.layers}
        terms = []
        if self.weight > 0:
            terms.append(self.weight * torch.stack([(moved[l] ** 2).sum(-1).mean() for l in self.layers]).mean())
        if self.contrast_weight > 0:
            rows_c = self.rows("control", step)
            control = self._coords(model, "control", rows_c)
            ref_c = self.reference_coords["control"]
            shifts = []
            for l in self.layers:
                moved_control = control[l] - (ref_c[l] if rows_c is None else ref_c[l][rows_c]).to(control[l].device)
                shifts.append(((moved[l].mean(0) - moved_control.mean(0)) ** 2).sum())
            terms.append(self.contrast_weight * torch.stack(shifts).mean())
        return torch.stack(terms).sum() if terms else torch.zeros((), device=probe[self.layers[0]].device)


def _pad(prompts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``[n, max_len]`` tokens (pad id 0: only last real tokens are read) and the lengths."""
    return pad_right(list(prompts), pad_id=0)
