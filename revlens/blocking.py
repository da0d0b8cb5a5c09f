"""Blocking motion along v_rev during fine-tuning: :class:`Blocking` (the hooks, a context manager around a
model) and :func:`build_defense`, the one builder from a compact setup string to the hooks and the penalty.

The hook modes (``project``, ``clamp``, ``grad``, combined with ``+``) are described in :mod:`revlens.hooks`.
Hooks and the probe anchor (:class:`revlens.anchor.ProbeAnchor`) work on a TransformerBridge (TransformerLens
hook points) and on a plain Hugging Face causal LM, peft-wrapped or not (forward hooks on its decoder layers'
outputs, which are ``resid_post``), so the same objects serve :func:`revlens.finetune` and a
``transformers.Trainer`` (:mod:`revlens.integrations.transformers`). A whole setup is one compact string
(:class:`~revlens.blocking_spec.BlockingSpec`) built along :class:`~revlens.reversion_directions.ReversionDirections`
by :func:`build_defense`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import torch

from revlens._util import training_mode
from revlens.anchor import ProbeAnchor, encode_prompts
from revlens.blocking_spec import HOOK_MODES, BlockingSpec, InterventionError
from revlens.hooks import blocked_activation, layer_hooks, orthonormal_basis
from revlens.integrations import hf_hooks
from revlens.penalties import KLAnchor, PenaltySum
from revlens.readout import run_stopping
from revlens.reversion_directions import ReversionDirections

__all__ = ["Blocking", "Defense", "build_defense", "parse_mode"]


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
            coords = self._clamp_coords(layer, act) if "clamp" in self.modes else None
            return blocked_activation(act, basis, self.modes, coords, mask)

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
    directions = _spec_subspace(
        spec, directions, prompts, control, tokens, control_tokens, reference, history, probe, device
    )
    anchor = _spec_anchor(spec, directions, tokens, control_tokens, reference, seed)
    blocking = Blocking(directions, spec.hook_mode, reference=reference) if spec.hooks else None
    return Defense(blocking, PenaltySum([anchor, kl]) if anchor is not None and kl is not None else anchor or kl)


def _spec_subspace(
    spec: BlockingSpec,
    directions: ReversionDirections,
    prompts: Any,
    control: Any,
    tokens: list[torch.Tensor] | None,
    control_tokens: list[torch.Tensor] | None,
    reference: Any,
    history: Any,
    probe: Any,
    device: str | None,
) -> ReversionDirections:
    """``directions`` with the bases of the spec's subspace (``rank@k``, ``random@k``, ...; unchanged without one).

    ``rank@k`` is measured on ``history`` with ``probe`` (default: one reading ``prompts`` / ``control`` at the
    directions' hook and readout); the others are read on ``reference`` with the encoded ``tokens`` /
    ``control_tokens``.
    """
    from revlens.subspace import subspace_directions

    if probe is None and history is not None and prompts is not None and (spec.subspace or ("",))[0] == "rank":
        probe = directions.probe(prompts, control, per_example=True)
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
    return directions


def _spec_anchor(
    spec: BlockingSpec,
    directions: ReversionDirections,
    tokens: list[torch.Tensor] | None,
    control_tokens: list[torch.Tensor] | None,
    reference: Any,
    seed: int,
) -> ProbeAnchor | None:
    """The spec's probe anchor (``anchor@w``, with ``contrast@w`` on the control prompts), or None without one."""
    if not spec.has_anchor:
        return None
    return ProbeAnchor(
        directions,
        tokens,
        reference,
        spec.anchor,
        control=control_tokens if spec.contrast else None,
        contrast_weight=spec.contrast,
        sample=spec.sample,
        seed=seed,
    )


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
