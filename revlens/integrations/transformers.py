"""Hugging Face Trainer and TRL: watch alignment with v_rev while training, and train with blocking.

- :class:`ReversionCallback`: a ``TrainerCallback`` that, at each evaluation and each checkpoint save,
  measures per-layer alignment cos(mu_t - mu_align, v_rev) of the model being trained (plain PyTorch
  forward hooks on its decoder layers: the output of layer l is ``resid_post`` of layer l, read at each
  prompt's last token, exactly as :class:`revlens.ReversionProbe` reads a checkpoint) and logs
  ``revlens/alignment_L{l}`` through the Trainer's own ``log`` (so TensorBoard, W&B and ``log_history``
  get it); it warns once when a layer crosses the null's p99.
- :class:`BlockedTrainer` (and :func:`blocked_trainer_class` for any Trainer subclass, e.g. TRL's
  ``SFTTrainer``): ``compute_loss`` runs under :class:`~revlens.blocking.Blocking` hooks (forward
  project / clamp, backward grad) and adds the :class:`~revlens.anchor.ProbeAnchor` penalty.

Both work on peft-wrapped models (the adapters are what moves). Needs ``transformers`` (``pip install
revlens[transformers]``); TRL only for ``SFTTrainer`` (``revlens[trl]``).

Example:
    >>> report = revlens.ReversionReport.load("out/")                                   # doctest: +SKIP
    >>> blocking, anchor = revlens.build_defense("grad+anchor@0.003", report.directions(), reference=aligned,
    ...     prompts=prompts, tokenizer=tok)                                              # doctest: +SKIP
    >>> watch = ReversionCallback.from_directions(report.directions(), prompts, aligned,
    ...     tokenizer=tok)                                                               # doctest: +SKIP
    >>> trainer = BlockedTrainer(model=model, args=args, train_dataset=data, blocking=blocking,
    ...     anchor=anchor, callbacks=[watch])                                            # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

try:
    from transformers import Trainer, TrainerCallback
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "revlens.integrations.transformers needs transformers: pip install 'revlens[transformers]'."
    ) from err

from revlens import directions as dirs
from revlens._util import training_mode
from revlens.anchor import ProbeAnchor, encode_prompts
from revlens.blocking import Blocking
from revlens.blocking_spec import InterventionError
from revlens.chat import resolve_chat_template
from revlens.integrations import hf_hooks
from revlens.nulls import isotropic_p99
from revlens.readout import TokenizedSet, hook_template, reduce_positions_unchecked, run_stopping
from revlens.reversion_directions import ReversionDirections

METRIC = "revlens/alignment_L{layer}"


class HFReadouts:
    """Last-token readouts of a Hugging Face causal LM's decoder-layer outputs on fixed prompt sets.

    The same quantity :class:`revlens.ReversionProbe` reads from a TransformerBridge (``resid_post``,
    last prompt token, float64 centroids; with ``control`` the contrast: probe minus control centroid).

    Args:
        prompts: 1-D token tensors (see :func:`revlens.anchor.encode_prompts` for strings).
        layers: decoder-layer indices.
        control: optional control prompts (token tensors).
        batch_size: prompts per forward pass.
        pad_id: the id right-padding uses (masked by the attention mask).
    """

    def __init__(
        self,
        prompts: Sequence[torch.Tensor],
        layers: Sequence[int],
        *,
        control: Sequence[torch.Tensor] | None = None,
        batch_size: int = 32,
        pad_id: int = 0,
    ):
        if not layers:
            raise InterventionError("give at least one layer to read.")
        self.sets = {"probe": TokenizedSet(list(prompts))}
        if control is not None:
            self.sets["control"] = TokenizedSet(list(control))
        self.layers = [int(l) for l in layers]
        self.batch_size = int(batch_size)
        self.pad_id = int(pad_id)

    @torch.no_grad()
    def readouts(self, model: Any, which: str = "probe") -> torch.Tensor:
        """``[n_prompts, n_layers, d_model]`` float64 readouts of set ``which``."""
        device = next(model.parameters()).device
        deepest = max(self.layers)
        rows: list[torch.Tensor] = []
        store: dict[int, torch.Tensor] = {}
        with training_mode(model, False):
            for tokens, lengths in self.sets[which].batches(self.batch_size, self.pad_id):
                mask = (torch.arange(tokens.shape[1])[None] < lengths[:, None]).long()
                on_device = lengths.to(device)
                fns = {
                    l: (
                        lambda act, l=l, n=on_device: store.__setitem__(
                            l, reduce_positions_unchecked(act, n, "last").double()
                        )
                    )
                    for l in self.layers
                }
                with hf_hooks.layer_output_hooks(model, fns, stop_after=deepest):
                    run_stopping(model, input_ids=tokens.to(device), attention_mask=mask.to(device))
                rows.append(torch.stack([store[l] for l in self.layers], 1).cpu())
        return torch.cat(rows, 0)

    def centroid(self, model: Any) -> torch.Tensor:
        """``[n_layers, d_model]`` float64: the probe centroid, minus the control centroid when there is one."""
        return self.centroid_and_floor(model)[0]

    def centroid_and_floor(self, model: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`centroid` and the round-off floor of alignment from the raw probe centroid
        (:func:`revlens.directions.roundoff_floor`), from one pass over the prompts."""
        probe = self.readouts(model, "probe").mean(0)
        mu = probe - self.readouts(model, "control").mean(0) if "control" in self.sets else probe
        return mu, dirs.roundoff_floor(probe)


class ReversionCallback(TrainerCallback):
    """Logs alignment with v_rev per layer at each evaluation and checkpoint save; warns once above the null.

    Build it with :meth:`from_directions` (``report.directions()``, the aligned model's centroid) or :meth:`from_models`
    (pretrain and aligned models). The Trainer must be known to log through it: :class:`BlockedTrainer` binds
    its callbacks itself; with another Trainer call :meth:`attach` (or pass ``trainer=``).

    Args:
        v_rev: ``[n_layers, d]`` (or a ``[n_layers, k, d]`` basis), one row per entry of ``layers``.
        mu_align: ``[n_layers, d]`` the aligned model's (contrast) centroid, same readout.
        prompts: probe prompts (strings with ``tokenizer``, or 1-D token tensors).
        layers: decoder-layer indices the rows refer to.
        control: control prompts for the contrast readout (as the report was measured).
        tokenizer, chat_template, system: how string prompts are tokenised.
        null_p99: per-layer threshold to warn at (default: the isotropic null's p99).
        batch_size: prompts per forward pass.
        trainer: the Trainer to log through (or :meth:`attach` later).

    Example:
        >>> cb = ReversionCallback.from_models(pretrain, aligned, prompts, tokenizer=tok)  # doctest: +SKIP
        >>> trainer = Trainer(model=model, args=args, train_dataset=data)  # doctest: +SKIP
        >>> cb.attach(trainer)  # doctest: +SKIP
    """

    def __init__(
        self,
        v_rev: torch.Tensor,
        mu_align: torch.Tensor,
        prompts: Any,
        *,
        layers: Sequence[int],
        control: Any = None,
        tokenizer: Any = None,
        chat_template: Any = "auto",
        system: str | None = None,
        null_p99: Sequence[float] | None = None,
        batch_size: int = 32,
        trainer: Any = None,
    ):
        basis = v_rev.double()[:, None, :] if v_rev.ndim == 2 else v_rev.double()
        self.layers = [int(l) for l in layers]
        if basis.shape[0] != len(self.layers) or mu_align.shape != (len(self.layers), basis.shape[-1]):
            raise InterventionError(
                f"v_rev {tuple(v_rev.shape)} and mu_align {tuple(mu_align.shape)} need one row "
                f"per layer of {self.layers} (d_model last)."
            )
        self.basis, self.mu_align = basis, mu_align.double()
        # from_directions/from_models replace it with the floor of the aligned model's raw probe centroid
        self.floor = dirs.roundoff_floor(self.mu_align)
        self.readout = _readouts(prompts, control, self.layers, tokenizer, chat_template, system, batch_size)
        d, k = basis.shape[-1], basis.shape[1]
        self.null_p99 = np.asarray(
            null_p99 if null_p99 is not None else [isotropic_p99(d, k)] * len(self.layers), dtype=np.float64
        )
        self.history: dict[int, np.ndarray] = {}
        self.trainer = trainer
        self._warned = False
        self._unbound_warned = False

    @classmethod
    def from_directions(
        cls,
        directions: ReversionDirections,
        prompts: Any,
        align: Any,
        *,
        control: Any = None,
        tokenizer: Any = None,
        chat_template: Any = "auto",
        system: str | None = None,
        **kwargs: Any,
    ) -> ReversionCallback:
        """Watch ``directions`` (``report.directions()``: its layers and basis; read at ``resid_post``, last token);
        ``align`` is the aligned model (its centroid is measured here, same readout) or its centroid
        ``[n_layers, d]``. Give the prompts and control the directions were measured with: another control set or
        chat template is refused."""
        if directions.readout != "last" or hook_template(directions.hook) != hook_template("resid_post"):
            raise InterventionError(
                f"the callback reads decoder-layer outputs (resid_post) at the last prompt token; the directions "
                f"were read at {directions.hook!r} with readout={directions.readout!r}."
            )
        directions.check_contrast(control, "the callback")
        if _is_strings(prompts):
            directions.check_template(resolve_chat_template(tokenizer, chat_template), "the callback")
        cb = cls(
            directions.stacked(),
            torch.zeros(len(directions.layers), directions.d_model),
            prompts,
            layers=directions.layers,
            control=control,
            tokenizer=tokenizer,
            chat_template=chat_template,
            system=system,
            **kwargs,
        )
        if isinstance(align, torch.Tensor):
            cb.mu_align = align.double()
            cb.floor = dirs.roundoff_floor(cb.mu_align)
        else:
            cb.mu_align, cb.floor = cb.readout.centroid_and_floor(align)
        return cb

    @classmethod
    def from_models(
        cls,
        pretrain: Any,
        align: Any,
        prompts: Any,
        *,
        layers: Sequence[int] | None = None,
        control: Any = None,
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> ReversionCallback:
        """v_rev = normalize(mu(pretrain) - mu(align)) measured here on two Hugging Face models
        (``layers`` default: all decoder layers)."""
        layers = list(range(len(hf_hooks.decoder_layers(align)))) if layers is None else [int(l) for l in layers]
        d = hf_hooks.model_dims(align)[0]
        cb = cls(
            torch.zeros(len(layers), d),
            torch.zeros(len(layers), d),
            prompts,
            layers=layers,
            control=control,
            tokenizer=tokenizer,
            **kwargs,
        )
        mu_p, (mu_a, floor) = cb.readout.centroid(pretrain), cb.readout.centroid_and_floor(align)
        cb.basis, cb.mu_align, cb.floor = dirs.v_rev_mean_diff(mu_p, mu_a)[:, None, :], mu_a, floor
        return cb

    def attach(self, trainer: Any) -> ReversionCallback:
        """Log through ``trainer`` (and add this callback to it when it is not there yet)."""
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    def alignment(self, model: Any) -> np.ndarray:
        """Per-layer alignment of ``model``'s drift from the aligned centroid with v_rev (NaN: no drift)."""
        delta = dirs.drift(self.readout.centroid(model), self.mu_align)
        return dirs.alignment(delta, self.basis, self.floor).numpy()

    def _measure(self, state: Any, model: Any) -> None:
        step = int(state.global_step)
        if step in self.history or model is None:
            return
        a = self.alignment(model)
        self.history[step] = a
        logs = {METRIC.format(layer=l): float(v) for l, v in zip(self.layers, a)}
        if self.trainer is not None:
            self.trainer.log(logs)
        else:
            state.log_history.append({**logs, "step": step})
            if not self._unbound_warned:
                self._unbound_warned = True
                warnings.warn(
                    "ReversionCallback is not attached to its Trainer: alignment goes to "
                    "state.log_history only; call callback.attach(trainer) so TensorBoard/W&B get it.",
                    RuntimeWarning,
                    stacklevel=3,
                )
        above = [(l, v, t) for l, v, t in zip(self.layers, a, self.null_p99) if v > t]
        if above and not self._warned:
            self._warned = True
            l, v, t = above[0]
            warnings.warn(
                f"step {step}: alignment with v_rev at layer {l} is {v:.3f}, above the null's p99 "
                f"({t:.3f}): fine-tuning drift is reverting toward the pretrained model.",
                RuntimeWarning,
                stacklevel=3,
            )

    def on_evaluate(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._measure(state, model)

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._measure(state, model)

    def trajectory(self) -> dict[int, list[float]]:
        """``{step: [alignment per layer]}`` of every measurement so far."""
        return {s: a.tolist() for s, a in sorted(self.history.items())}


class BlockingTrainerMixin:
    """Put before a ``Trainer`` class: ``compute_loss`` runs under ``blocking`` hooks and adds ``anchor``'s penalty.

    Args (keywords, besides the Trainer's own):
        blocking: a :class:`~revlens.blocking.Blocking` (hooks on the decoder layers' outputs; clamp
            takes its reference model's coordinates for each batch, one extra no-grad forward per step).
        anchor: a :class:`~revlens.anchor.ProbeAnchor`; its penalty (sample drawn by the optimizer
            step) counts once per optimizer step under gradient accumulation.

    Both act only while the model trains (not in evaluation). Build them from ``report.directions()`` with
    :func:`revlens.build_defense` (reference: the aligned HF model; tokenizer: the model's).
    """

    def __init__(self, *args: Any, blocking: Blocking | None = None, anchor: ProbeAnchor | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.blocking, self.anchor = blocking, anchor
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, ReversionCallback) and cb.trainer is None:
                cb.trainer = self

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        if not model.training or (self.blocking is None and self.anchor is None):
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        target = self.accelerator.unwrap_model(model)
        if self.blocking is None:
            out = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        else:
            if self.blocking.needs_coords:
                self.blocking.set_batch(
                    coords=self.blocking.reference_coords(
                        inputs["input_ids"], attention_mask=inputs.get("attention_mask"), batch_size=10**9
                    )
                )
            with self.blocking.applied(target):
                out = super().compute_loss(
                    model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
                )
        if self.anchor is None:
            return out
        loss = out[0] if return_outputs else out
        penalty = self.anchor.penalty(target, step=self.state.global_step + 1)
        if self._loss_scaled_for_grad_accum(num_items_in_batch):
            penalty = penalty / self.current_gradient_accumulation_steps
        loss = loss + penalty.to(loss.dtype)
        return (loss, out[1]) if return_outputs else loss

    def _loss_scaled_for_grad_accum(self, num_items_in_batch: Any) -> bool:
        """Whether the Trainer leaves this loss undivided by the accumulation steps (it then sums micro-batches)."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is not None:
            return bool(scaled)
        return bool(
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
        )


class BlockedTrainer(BlockingTrainerMixin, Trainer):
    """``transformers.Trainer`` with :class:`BlockingTrainerMixin`: ``BlockedTrainer(..., blocking=, anchor=)``."""


def blocked_trainer_class(base: type) -> type:
    """A subclass of any Trainer class (``trl.SFTTrainer``, your own) that trains with blocking and the anchor.

    Example:
        >>> from trl import SFTTrainer                                                  # doctest: +SKIP
        >>> BlockedSFT = blocked_trainer_class(SFTTrainer)                             # doctest: +SKIP
        >>> BlockedSFT(model=model, args=cfg, train_dataset=data, blocking=blocking, anchor=anchor)  # doctest: +SKIP
    """
    if not (isinstance(base, type) and issubclass(base, Trainer)):
        raise TypeError(f"blocked_trainer_class takes a transformers.Trainer subclass, got {base!r}.")
    if issubclass(base, BlockingTrainerMixin):
        return base
    return type(f"Blocked{base.__name__}", (BlockingTrainerMixin, base), {"__module__": __name__})


def __getattr__(name: str) -> Any:
    if name == "BlockedSFTTrainer":
        try:
            from trl import SFTTrainer
        except ImportError as err:
            raise ImportError("BlockedSFTTrainer needs TRL: pip install 'revlens[trl]'.") from err
        cls = blocked_trainer_class(SFTTrainer)
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _is_strings(prompts: Any) -> bool:
    return not isinstance(prompts, (str, torch.Tensor)) and all(isinstance(p, str) for p in prompts)


def _readouts(
    prompts: Any,
    control: Any,
    layers: Sequence[int],
    tokenizer: Any,
    chat_template: Any,
    system: str | None,
    batch_size: int,
) -> HFReadouts:
    encode = lambda p: encode_prompts(  # noqa: E731
        None,
        p,
        tokenizer=tokenizer,
        chat_template=chat_template,  # noqa: E731
        system=system,
    )
    pad_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    return HFReadouts(
        encode(prompts),
        layers,
        control=None if control is None else encode(control),
        batch_size=batch_size,
        pad_id=0 if pad_id is None else pad_id,
    )
