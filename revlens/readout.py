"""Readouts of the residual stream: which hook point, which positions, which prompts, and stopping early.

One module that the probe (:class:`revlens.ReversionProbe`), the probe anchor
(:class:`revlens.ProbeAnchor`), blocking's reference coordinates (:class:`revlens.Blocking`) and the
Hugging Face hooks (:mod:`revlens.integrations.hf_hooks`) share:

- hook-point naming: :func:`hook_name` turns an alias (``resid_post``) or its ``{layer}`` template into
  the TransformerLens name (``blocks.3.hook_resid_post``). The alias table is kept rather than calling
  TransformerLens' ``get_act_name``: both give the same names on native and Hugging Face-architecture
  bridges (tests/test_readout.py checks every alias against it), but ``get_act_name`` accepts any
  activation (``q``, ``pattern``, ...) where readouts and blocking need ``[batch, seq, d_model]``
  residual-stream activations, mangles ``{layer}`` templates (``blocks.3.hook_blocks.{layer}...``) and
  was 2.8x slower per name (8.2 vs 2.95 us, measured on this project's CPU box): the table is the
  whitelist, and naming stays a dictionary lookup;
- position reduction: :func:`reduce_positions` (shape-checked, for callers outside hot loops) and
  :func:`reduce_positions_unchecked` (the same code, for hooks that run every batch);
- the prompt set: :class:`TokenizedSet`, 1-D token tensors right-padded into batches;
- stopping the forward once the deepest layer read has run: :class:`StopForward` and :func:`run_stopping`.
  Kept over TransformerLens' ``stop_at_layer``, which stops only at a block's entry and so still runs the
  unembedding when the last layer is read (the default): benchmarks/probe_stop.py measured it 2.4x slower
  at d512 x 6 layers and 15x on the 3-layer tiny model (vocabulary 49152), equal otherwise.

Nothing here imports another revlens module but :mod:`revlens._util` and :mod:`revlens.shapes`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int

from revlens._util import pad_right
from revlens.shapes import shape_checked

HOOK_ALIASES = {
    "resid_post": "blocks.{layer}.hook_resid_post",
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
}
READOUTS = ("last", "mean")


class ProbeError(ValueError):
    """Bad probe input (prompts, layers, hook), with the fix."""


class StopForward(Exception):
    """Raised by a hook once the deepest layer read has run, to skip the rest of the forward pass."""


def run_stopping(model: Any, *args: Any, **kwargs: Any) -> None:
    """Call ``model`` and swallow the :class:`StopForward` its hooks raise."""
    try:
        model(*args, **kwargs)
    except StopForward:
        pass


def hook_template(hook: str) -> str:
    """The per-layer template of ``hook``: an alias (``resid_post``) or one of the alias templates.

    Readouts and blocking act on ``[batch, seq, d_model]`` activations of the residual stream, so only
    the residual hook points (and the attention / MLP outputs added to it) are accepted.

    Raises:
        ProbeError: ``hook`` is not one of :data:`HOOK_ALIASES` or their templates.
    """
    template = HOOK_ALIASES.get(hook, hook) if isinstance(hook, str) else None
    if template not in HOOK_ALIASES.values():
        raise ProbeError(
            f"hook {hook!r} is not a residual-stream hook point; choose one of {sorted(HOOK_ALIASES)} "
            f"or its template ({', '.join(sorted(HOOK_ALIASES.values()))})."
        )
    return template


def hook_name(hook: str, layer: int) -> str:
    """The TransformerLens hook point for ``hook`` (an alias like ``resid_post`` or its ``{layer}`` template).

    Example:
        >>> hook_name("resid_post", 3)
        'blocks.3.hook_resid_post'
    """
    return hook_template(hook).format(layer=layer)


def check_hook_points(model: Any, hook: str, layers: Sequence[int]) -> None:
    """Raise :class:`ProbeError` unless ``model`` has the hook point of ``hook`` at every layer in ``layers``."""
    hook_dict = getattr(model, "hook_dict", None)
    if hook_dict is None:
        return
    missing = [hook_name(hook, l) for l in layers if hook_name(hook, l) not in hook_dict]
    if missing:
        present = sorted(a for a, t in HOOK_ALIASES.items() if t.format(layer=layers[0]) in hook_dict)
        raise ProbeError(f"the model has no hook point {missing[0]}; the residual hooks it has are {present}.")


@shape_checked
def reduce_positions(
    act: Float[torch.Tensor, "batch seq d_model"], lengths: Int[torch.Tensor, " batch"], readout: str
) -> Float[torch.Tensor, "batch d_model"]:
    """Reduce a right-padded activation over positions: the last real token, or the mean of real tokens.

    Args:
        act: activations of right-padded prompts.
        lengths: each prompt's number of real tokens.
        readout: ``"last"`` or ``"mean"``.

    Returns:
        ``[batch, d_model]`` in ``act``'s dtype.

    Example:
        >>> act = torch.arange(12.0).reshape(2, 3, 2)
        >>> reduce_positions(act, torch.tensor([3, 1]), "last")
        tensor([[4., 5.],
                [6., 7.]])
    """
    return reduce_positions_unchecked(act, lengths, readout)


def reduce_positions_unchecked(act: torch.Tensor, lengths: torch.Tensor, readout: str) -> torch.Tensor:
    """:func:`reduce_positions` without the run-time shape check, for hooks that run every batch."""
    if readout == "last":
        idx = (lengths - 1).clamp_min(0)
        return act[torch.arange(act.shape[0], device=act.device), idx]
    positions = torch.arange(act.shape[1], device=act.device)
    mask = (positions[None, :] < lengths[:, None]).to(act.dtype)
    return (act * mask[..., None]).sum(1) / lengths[:, None].to(act.dtype)


class TokenizedSet:
    """Prompts as a list of 1-D token tensors, with their lengths, right-padded on demand.

    Example:
        >>> prompts = TokenizedSet([torch.tensor([5, 6, 7]), torch.tensor([8])])
        >>> prompts.padded(pad_id=0)
        (tensor([[5, 6, 7],
                [8, 0, 0]]), tensor([3, 1]))
    """

    def __init__(self, tokens: list[torch.Tensor]):
        self.tokens = tokens
        self.lengths = torch.tensor([len(t) for t in tokens])
        self._on_device: dict[tuple[int, int, str], list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    def padded(self, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All prompts in one right-padded ``[n, max_len]`` tensor, and their lengths."""
        return pad_right(self.tokens, pad_id)

    def batches(self, batch_size: int, pad_id: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Right-padded ``(tokens [batch, max_len], lengths [batch])`` of ``batch_size`` prompts at a time."""
        for start in range(0, len(self.tokens), batch_size):
            yield pad_right(self.tokens[start : start + batch_size], pad_id)

    def device_batches(
        self, batch_size: int, pad_id: int, device: torch.device
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The padded batches on ``device``, built once and kept: token ids are small next to activations,
        and a per-batch copy from pageable host memory would stall an accelerator's launch queue."""
        key = (batch_size, pad_id, str(device))
        if key not in self._on_device:
            self._on_device[key] = [(b.to(device), l.to(device)) for b, l in self.batches(batch_size, pad_id)]
        return self._on_device[key]
