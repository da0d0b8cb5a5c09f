"""The probe anchor: a penalty on the motion of the probe prompts' own readouts along v_rev (or a subspace),
added to the fine-tuning loss, and :func:`encode_prompts`, which tokenises prompts as the probe reads them.

Build an anchor from a compact setup string with :func:`revlens.blocking.build_defense` (``anchor@w``,
``contrast@w``, ``sample@k``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from revlens._util import tensor_digest, training_mode
from revlens.blocking_spec import InterventionError
from revlens.hooks import layer_hooks, orthonormal_basis
from revlens.readout import TokenizedSet, reduce_positions_unchecked, run_stopping
from revlens.reversion_directions import ReversionDirections

__all__ = ["ProbeAnchor", "encode_prompts"]


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
        with :func:`revlens.build_defense` (``anchor@w``, ``contrast@w``, ``sample@k``).

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
