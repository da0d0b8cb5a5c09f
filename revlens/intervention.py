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

Hooks and the probe anchor work on a TransformerBridge (TransformerLens hook points) and on a plain
Hugging Face causal LM, peft-wrapped or not (forward hooks on its decoder layers' outputs, which are
``resid_post``), so the same objects serve :func:`revlens.finetune` and a ``transformers.Trainer``
(:mod:`revlens.integrations.transformers`). A whole setup is one compact string
(:class:`~revlens.blocking_spec.BlockingSpec`), built by :func:`build_defense`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from jaxtyping import Float

from revlens._util import tensor_digest, training_mode
from revlens.blocking_spec import HOOK_MODES, BlockingSpec, InterventionError
from revlens.integrations import hf_hooks
from revlens.penalties import KLAnchor, PenaltySum
from revlens.readout import StopForward, TokenizedSet, hook_name, reduce_positions_unchecked, run_stopping
from revlens.reversion_directions import ReversionDirections
from revlens.shapes import shape_checked

MODES = HOOK_MODES
__all__ = [
    "Blocking",
    "BlockingSpec",
    "InterventionError",
    "ProbeAnchor",
    "Defense",
    "build_defense",
    "encode_prompts",
    "clamp_to",
    "orthonormal_basis",
    "parse_mode",
    "project_out",
]


def parse_mode(mode: str) -> frozenset[str]:
    """The hook modes of a :class:`Blocking`: ``"clamp+grad"`` -> {"clamp", "grad"} (read by :class:`BlockingSpec`).

    Anchor, subspace, sampling and layer parts belong to a whole setup: build it with :func:`build_defense`.
    """
    try:
        spec = BlockingSpec.parse(mode)
    except InterventionError as err:
        raise InterventionError(
            f"unknown blocking mode {mode!r} for hooks ({HOOK_MODES} joined by '+', e.g. 'clamp+grad'): {err}"
        ) from None
    if not spec.hooks or spec != BlockingSpec(hooks=spec.hooks):
        raise InterventionError(
            f"unknown blocking mode {mode!r} for hooks: Blocking takes {HOOK_MODES} joined by "
            "'+', e.g. 'clamp+grad'; build anchors and subspaces with build_defense()."
        )
    return frozenset(spec.hooks)


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


class Blocking:
    """Blocks motion along v_rev at chosen layers while active (a context manager around a model).

    Args:
        directions: a :class:`~revlens.reversion_directions.ReversionDirections` (``report.directions(...)``:
            blocked at its layers and hook point), or ``{layer: Tensor[d] or Tensor[k, d]}``.
        mode: ``project``, ``clamp``, ``grad`` or a ``+`` combination.
        hook: hook point alias or template for a ``{layer: tensor}`` mapping (default ``resid_post``).
        reference: the frozen model whose coordinates ``clamp`` holds (default for clamp).
        constant: ``{layer: Tensor[k]}`` coordinates for ``clamp`` instead of a reference model.
    Per batch, ``clamp`` takes coordinates from :meth:`set_batch` (computed from the reference
    model, or precomputed once with :meth:`reference_coords` and indexed), and an optional
    boolean ``positions`` mask ``[batch, seq]`` limits where any mode acts.

    Returns:
        :meth:`applied` is the context manager that puts the hooks on a model (a TransformerBridge or a
        Hugging Face causal LM) and takes them off on exit; :meth:`reference_coords` gives the reference
        model's coordinates ``{layer: [n, seq, k]}``. Build it from a spec with :func:`build_defense`.

    Example:
        >>> v = report.v_rev[report.layers.index(0)]
        >>> blocking = Blocking({0: v}, "clamp+grad", reference=aligned)
        >>> tokens = model.to_tokens(prompts)
        >>> blocking.set_batch(tokens)  # clamp's coordinates: the aligned model's, on this batch
        >>> with blocking.applied(model):
        ...     loss = model(tokens, return_type="loss"); loss.backward()
        >>> model.zero_grad(set_to_none=True)
        >>> probe = revlens.ReversionProbe(prompts, layers=[0])
        >>> along_v = lambda m: float(probe.centroid(m)[0] @ v.double())  # mean readout's coordinate along v
        >>> round(along_v(model) - along_v(aligned), 3)  # fine-tuning moved it by 0.6
        0.6
        >>> with Blocking({0: v}, "project").applied(model):  # project removes it in every forward pass inside
        ...     abs(along_v(model)) < 1e-5
        True
    """

    def __init__(
        self,
        directions: ReversionDirections | Mapping[int, torch.Tensor],
        mode: str = "clamp",
        *,
        hook: str | None = None,
        reference: Any = None,
        constant: Mapping[int, torch.Tensor] | None = None,
    ):
        directions = ReversionDirections.of(directions, hook)
        self.modes = parse_mode(mode)
        self.mode = mode
        self.hook = directions.hook
        self.layers = directions.layers
        d_model = directions.d_model
        self.bases = {l: orthonormal_basis(v, d_model) for l, v in directions.bases.items()}
        self.d_model = d_model
        self.reference = reference
        self.constant = (
            None if constant is None else {int(l): torch.as_tensor(c).float().reshape(-1) for l, c in constant.items()}
        )
        if "clamp" in self.modes and reference is None and constant is None:
            raise InterventionError("clamp needs a reference model (reference=aligned_model) or constant coordinates.")
        self._coords: dict[int, torch.Tensor] | None = None
        self._positions: torch.Tensor | None = None

    @property
    def needs_coords(self) -> bool:
        return "clamp" in self.modes and self.constant is None

    def _check_model(self, model: Any) -> None:
        d_model, n_layers = hf_hooks.model_dims(model)
        if d_model != self.d_model:
            raise InterventionError(f"directions have d_model={self.d_model}, the model has {d_model}.")
        bad = [l for l in self.layers if not 0 <= l < n_layers]
        if bad:
            raise InterventionError(f"layers {bad} are out of range for a model with n_layers={n_layers}.")

    @torch.no_grad()
    def reference_coords(
        self, tokens: torch.Tensor, model: Any = None, batch_size: int = 64, attention_mask: torch.Tensor | None = None
    ) -> dict[int, torch.Tensor]:
        """The reference model's coordinates ``{layer: [n, seq, k]}`` on ``tokens`` (computed once, reused).

        ``attention_mask`` (``[n, seq]``) is passed to a Hugging Face reference model's forward.
        """
        model = self.reference if model is None else model
        if model is None:
            raise InterventionError("no reference model to compute clamp coordinates from.")
        device = next(model.parameters()).device
        out: dict[int, list[torch.Tensor]] = {l: [] for l in self.layers}

        def grab(layer: int) -> Callable[[torch.Tensor], None]:
            def fn(act: torch.Tensor) -> None:
                out[layer].append((act.float() @ self.bases[layer].to(device).T).cpu())

            return fn

        with (
            training_mode(model, False),
            layer_hooks(model, self.hook, {l: grab(l) for l in self.layers}, stop_after=max(self.layers)),
        ):
            for start in range(0, tokens.shape[0], batch_size):
                chunk = tokens[start : start + batch_size].to(device)
                kwargs = {}
                if attention_mask is not None:
                    kwargs["attention_mask"] = attention_mask[start : start + batch_size].to(device)
                run_stopping(model, chunk, **kwargs)
        return {l: torch.cat(v, 0) for l, v in out.items()}

    def set_batch(
        self,
        tokens: torch.Tensor | None = None,
        *,
        coords: Mapping[int, torch.Tensor] | None = None,
        positions: torch.Tensor | None = None,
    ) -> None:
        """Coordinates (and an optional position mask) for the next forward pass.

        Give ``coords`` precomputed by :meth:`reference_coords` (indexed to this batch), or
        ``tokens`` to compute them from the reference model now.
        """
        if coords is None and tokens is not None and self.needs_coords:
            coords = self.reference_coords(tokens)
        self._coords = None if coords is None else dict(coords)
        self._positions = positions

    def _hook(self, layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(act: torch.Tensor) -> torch.Tensor:
            basis = self.bases[layer].to(act.device)
            mask = None if self._positions is None else self._positions.to(act.device)
            new = act
            if "project" in self.modes:
                new = _project_out(act, basis)
            elif "clamp" in self.modes:
                coords = self._clamp_coords(layer, act)
                new = _clamp_to(act, basis, coords)
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
            raise InterventionError(
                "clamp has no reference coordinates for this batch; call "
                "blocking.set_batch(tokens) or set_batch(coords=...) before the forward pass."
            )
        c = self._coords[layer].to(act.device)
        if c.shape[0] != batch or c.shape[1] < seq:
            raise InterventionError(
                f"clamp coordinates of shape {tuple(c.shape)} do not fit the batch "
                f"[{batch}, {seq}]; index the precomputed coordinates with this batch's rows."
            )
        return c[:, :seq]

    @contextlib.contextmanager
    def applied(self, model: Any) -> Iterator[Blocking]:
        """Hooks on while inside; removed on exit, also when the step raises.

        ``model`` is a TransformerBridge or a Hugging Face causal LM (peft-wrapped or not).
        """
        self._check_model(model)
        fns = {l: self._hook(l) for l in self.layers}
        with layer_hooks(model, self.hook, fns):
            yield self


def encode_prompts(
    model: Any, prompts: Any, *, tokenizer: Any = None, chat_template: Any = "auto", system: str | None = None
) -> list[torch.Tensor]:
    """Prompts as 1-D token tensors: token tensors pass through; strings are tokenised as the probe reads them.

    ``tokenizer`` defaults to ``model.tokenizer`` (a TransformerBridge's); give it for a Hugging Face module.
    """
    if isinstance(prompts, str):
        raise InterventionError("prompts must be a list of prompts, got one string; wrap it in a list.")
    if isinstance(prompts, torch.Tensor):
        prompts = list(prompts)
    prompts = list(prompts)
    if not prompts:
        raise InterventionError("no prompts given: the anchor needs at least one (strings or 1-D token tensors).")
    if all(isinstance(p, torch.Tensor) and p.ndim == 1 and p.numel() > 0 for p in prompts):
        return [p.long().cpu() for p in prompts]
    if not all(isinstance(p, str) for p in prompts):
        raise InterventionError("prompts must be all strings or all non-empty 1-D token tensors.")
    tokenizer = getattr(model, "tokenizer", None) if tokenizer is None else tokenizer
    if tokenizer is None:
        raise InterventionError("string prompts need a tokenizer: pass tokenizer=... (or token ids instead).")
    from revlens.chat import encode_requests

    return [t.long().cpu() for t in encode_requests(tokenizer, prompts, chat_template=chat_template, system=system)]


class Defense(NamedTuple):
    """What :func:`build_defense` builds: the hooks and the loss penalty (either None when the spec has none)."""

    blocking: Blocking | None
    penalty: Any  # ProbeAnchor, KLAnchor, their PenaltySum, or None


def build_defense(
    spec: str | BlockingSpec,
    directions: ReversionDirections | Mapping[int, torch.Tensor] | None = None,
    *,
    reference: Any = None,
    prompts: Any = None,
    control: Any = None,
    tokenizer: Any = None,
    chat_template: Any = "auto",
    system: str | None = None,
    history: Any = None,
    probe: Any = None,
    device: str | None = None,
    seed: int = 0,
) -> Defense:
    """The hooks and the penalty a :class:`BlockingSpec` asks for, along ``directions``: the one builder.

    ``spec.layers`` (``layers@``) picks among the directions' layers (default: all of them). ``rank@k`` /
    ``random@k`` / ``refusal`` / ``harmpca@k`` / ``full`` replace the directions at those layers
    (:func:`revlens.subspace.subspace_directions`). ``replay@R`` and ``safelora@F`` are neither hooks nor
    penalties: :func:`revlens.finetune` (``replay=``) and :func:`revlens.weight_projection.safe_lora_project`
    apply them.

    Args:
        spec: a :class:`BlockingSpec` or its string (``"clamp+grad"``, ``"anchor@0.003+contrast@0.1+rank@64"``).
        directions: :class:`~revlens.reversion_directions.ReversionDirections` (``report.directions()``,
            ``ReversionDirections.from_models(...)`` or ``.load(folder)``: blocked at their hook point), or
            ``{layer: Tensor[d] or Tensor[k, d]}`` at ``resid_post``; not needed by ``kl@W`` alone.
        reference: the frozen aligned model: clamp's coordinates, the anchor's and KL's reference, and the model
            the ``refusal`` / ``harmpca@k`` subspaces are read on.
        prompts, control: the harmful probe and the harmless control prompts (strings, or 1-D token tensors) for
            the anchor, ``contrast@w``, ``kl@w``, ``refusal``, ``harmpca@k`` and for measuring ``rank@k`` on
            ``history``.
        tokenizer, chat_template, system: how string prompts are tokenised (:func:`encode_prompts`; tokenizer
            default: ``reference.tokenizer``); a chat template other than the directions' is refused.
        history, probe: ``rank@k`` beyond the directions' own PCA rank is measured on ``history`` with ``probe``
            (default: one reading ``prompts`` / ``control`` at the directions' hook and readout).
        device: where ``history``'s checkpoints are measured.
        seed: seeds the anchor's and KL's per-step prompt sample.

    Returns:
        :class:`Defense` ``(blocking, penalty)``: use ``blocking.applied(model)`` around the forward pass and add
        ``penalty.penalty(model, step)`` to the loss (``revlens.finetune`` and ``BlockedTrainer`` take both);
        the penalty is a :class:`ProbeAnchor`, a :class:`~revlens.penalties.KLAnchor` or their
        :class:`~revlens.penalties.PenaltySum`.

    Example:
        >>> blocking, anchor = build_defense("grad+anchor@0.003+contrast@0.1+rank@2", report.directions(),
        ...     reference=aligned, prompts=prompts, control=control, history=ckpts)
        >>> blocking.layers, sorted(blocking.modes), anchor.weight, anchor.contrast_weight
        ([0, 1], ['grad'], 0.003, 0.1)
        >>> anchor.bases[0].shape  # rank@2: the reversion subspace measured on the history
        torch.Size([2, 16])
        >>> build_defense("plain")
        Defense(blocking=None, penalty=None)
    """
    from revlens.probe import ReversionProbe
    from revlens.subspace import subspace_directions

    spec = BlockingSpec.parse(spec)
    if not spec.needs_directions and not spec.has_penalty:
        return Defense(None, None)
    if spec.needs_directions and directions is None:
        raise InterventionError(
            f"{spec} blocks along directions: pass report.directions() (or ReversionDirections.from_models(...))."
        )
    directions = None if directions is None else ReversionDirections.of(directions)
    if directions is not None and spec.layers is not None:
        directions = directions.at(spec.layers)
    tokens, control_tokens = _spec_prompts(
        spec, directions, reference, prompts, control, tokenizer, chat_template, system
    )
    kl = None if spec.kl == 0 else KLAnchor(tokens, reference, spec.kl, sample=spec.sample, seed=seed)
    if directions is None or not spec.needs_directions:
        return Defense(None, kl)
    if probe is None and history is not None and prompts is not None and (spec.subspace or ("",))[0] == "rank":
        probe = ReversionProbe(
            prompts,
            control=control,
            layers=directions.layers,
            hook=directions.hook,
            readout=directions.readout,
            per_example=True,
        )
    bases = subspace_directions(
        spec.subspace,
        directions,
        history=history,
        probe=probe,
        device=device,
        reference=reference,
        prompts=tokens,
        control=control_tokens,
        hook=directions.hook,
    )
    if spec.subspace is not None:
        directions = directions.with_bases(bases, estimator="pca" if spec.subspace[0] == "rank" else spec.subspace[0])
    anchor = None
    if spec.has_anchor:
        anchor = ProbeAnchor(
            directions,
            tokens,
            reference,
            spec.anchor,
            control=control_tokens if spec.contrast else None,
            contrast_weight=spec.contrast,
            sample=spec.sample,
            seed=seed,
        )
    blocking = Blocking(directions, spec.hook_mode, reference=reference) if spec.hooks else None
    return Defense(blocking, PenaltySum([anchor, kl]) if anchor is not None and kl is not None else anchor or kl)


def _spec_prompts(
    spec: BlockingSpec,
    directions: ReversionDirections | None,
    reference: Any,
    prompts: Any,
    control: Any,
    tokenizer: Any,
    chat_template: Any,
    system: str | None,
) -> tuple[list[torch.Tensor] | None, list[torch.Tensor] | None]:
    """The probe and control prompts as token tensors, when the spec reads them (else None)."""
    measured = spec.subspace is not None and spec.subspace[0] in ("refusal", "harmpca")
    if not (spec.has_penalty or measured):
        return None, None
    if prompts is None:
        raise InterventionError(
            f"{spec}: the anchor, KL penalty or measured subspace needs the probe prompts (prompts=...)."
        )
    with_control = bool(spec.contrast) or spec.subspace == ("refusal",)
    if with_control and control is None:
        raise InterventionError(
            f"{spec}: contrast@w and the refusal direction need the control prompts (control=..., the harmless set)."
        )
    tokenizer = getattr(reference, "tokenizer", None) if tokenizer is None else tokenizer
    strings = not isinstance(prompts, (str, torch.Tensor)) and any(isinstance(p, str) for p in prompts)
    if strings and directions is not None and tokenizer is not None:
        from revlens.chat import resolve_chat_template

        directions.check_template(resolve_chat_template(tokenizer, chat_template), str(spec))

    def encode(p: Any) -> list[torch.Tensor]:
        return encode_prompts(reference, p, tokenizer=tokenizer, chat_template=chat_template, system=system)

    return encode(prompts), encode(control) if with_control else None


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

    Args:
        directions: a :class:`~revlens.reversion_directions.ReversionDirections` read at the last token, or
            ``{layer: Tensor[d] or Tensor[k, d]}`` (v_rev or a rank-k basis per layer).
        prompts: the probe prompts as 1-D token tensors (:func:`encode_prompts` tokenises strings).
        reference: the frozen aligned model (a TransformerBridge or a Hugging Face module); its
            coordinates on the prompts are computed once, here.
        weight: weight of the per-prompt term.
        hook: hook point for a ``{layer: tensor}`` mapping (default ``resid_post``; Hugging Face modules: only
            that); directions carry their own.
        control: control prompts (1-D token tensors), needed when ``contrast_weight > 0``.
        contrast_weight: weight of the contrast-centroid term.
        sample: prompts of each set per step (None: all).
        seed: seeds the per-step sample.

    Returns:
        :meth:`penalty` gives the differentiable scalar to add to the training loss. Build it from a spec
        with :func:`build_defense` (``anchor@w``, ``contrast@w``, ``sample@k``).

    Example:
        >>> anchor = ProbeAnchor({0: report.v_rev[0]}, encode_prompts(aligned, prompts), aligned, 0.003)
        >>> tokens = model.to_tokens(prompts)
        >>> loss = model(tokens, return_type="loss") + anchor.penalty(model, 1)  # step 1's training loss
        >>> round(anchor.penalty(model, 1).item() / 0.003, 3)  # 0.6 ** 2: model moved 0.6 along v_rev
        0.36
    """

    def __init__(
        self,
        directions: ReversionDirections | Mapping[int, torch.Tensor],
        prompts: Sequence[torch.Tensor],
        reference: Any,
        weight: float = 0.1,
        *,
        hook: str | None = None,
        control: Sequence[torch.Tensor] | None = None,
        contrast_weight: float = 0.0,
        sample: int | None = None,
        seed: int = 0,
    ):
        if weight < 0 or contrast_weight < 0:
            raise InterventionError(f"anchor weights must be >= 0, got {weight} and {contrast_weight}.")
        if not prompts:
            raise InterventionError("the anchor needs at least one probe prompt.")
        if contrast_weight > 0 and not control:
            raise InterventionError("contrast_weight > 0 needs control prompts (control=[...]).")
        if sample is not None and sample < 1:
            raise InterventionError(f"sample must be a positive number of prompts per step, got {sample}.")
        self.sample, self.seed, self._calls = sample, int(seed), 0
        directions = ReversionDirections.of(directions, hook)
        if directions.readout != "last":
            raise InterventionError(
                f"the probe anchor holds last-token readouts, but the directions were read with "
                f"readout={directions.readout!r}; analyze with readout='last' to anchor what it measures."
            )
        self.bases = {l: orthonormal_basis(v, directions.d_model) for l, v in directions.bases.items()}
        self.layers = directions.layers
        self.weight, self.contrast_weight = float(weight), float(contrast_weight)
        self.hook = directions.hook
        # pad id 0 is safe: right padding under causal attention, and only each prompt's last real token is read
        self.sets = {"probe": TokenizedSet(list(prompts)).padded(pad_id=0)}
        if control:
            self.sets["control"] = TokenizedSet(list(control)).padded(pad_id=0)
        if reference is None:
            raise InterventionError("the anchor needs the frozen reference model (the aligned checkpoint).")
        with torch.no_grad(), training_mode(reference, False):
            self.reference_coords = {
                name: {l: c.detach() for l, c in self._coords(reference, name).items()} for name in self.sets
            }

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
        device = next(model.parameters()).device
        tokens, lengths = self.sets[name]
        if rows is not None:
            tokens, lengths = tokens[rows], lengths[rows]
            tokens = tokens[:, : int(lengths.max())]
        lengths = lengths.to(device)
        store: dict[int, torch.Tensor] = {}

        def grab(layer: int) -> Callable[[torch.Tensor], None]:
            def fn(act: torch.Tensor) -> None:
                last = reduce_positions_unchecked(act, lengths, "last")
                dtype = torch.promote_types(last.dtype, torch.float32)  # float32, or float64 for a float64 model
                store[layer] = last.to(dtype) @ self.bases[layer].to(device, dtype).T

            return fn

        with layer_hooks(model, self.hook, {l: grab(l) for l in self.layers}, stop_after=max(self.layers)):
            run_stopping(model, tokens.to(device))
        return store

    def description(self) -> dict[str, Any]:
        """What decides the penalty (recorded with a fine-tuning run's settings, so a resume refuses another)."""
        tensors = [self.bases[l] for l in self.layers]
        for name in sorted(self.sets):
            tensors += list(self.sets[name])
            tensors += [self.reference_coords[name][l] for l in self.layers]
        return {
            "weight": self.weight,
            "contrast_weight": self.contrast_weight,
            "hook": self.hook,
            "layers": list(self.layers),
            "sample": self.sample,
            "seed": self.seed,
            "sets": sorted(self.sets),
            "directions_prompts_reference": tensor_digest(*tensors),
        }

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
