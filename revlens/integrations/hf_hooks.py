"""Forward hooks on the decoder layers of a plain Hugging Face causal LM (also peft-wrapped).

A decoder layer's output is the residual stream after that layer, the same activation as
TransformerLens' ``blocks.{l}.hook_resid_post``. Blocking and the probe anchor act on it here when the
model is an HF module (a Trainer's model) rather than a TransformerBridge. Nothing here imports
transformers: any ``nn.Module`` whose decoder layers sit in one ``ModuleList`` works. The early stop is
:mod:`revlens.readout`'s, shared with the TransformerLens hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from revlens.readout import StopForward, run_stopping

__all__ = [
    "LAYER_PATHS",
    "HookError",
    "decoder_layers",
    "is_bridge",
    "layer_output_hooks",
    "model_dims",
    "run_stopping",
    "unwrap",
]

LAYER_PATHS = (
    "model.layers",
    "model.model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
    "transformer.layers",
    "layers",
)


class HookError(ValueError):
    """A model whose decoder layers revlens cannot find or hook, with the fix."""


def is_bridge(model: Any) -> bool:
    """True for a TransformerLens model (hook points by name), False for a plain module."""
    return hasattr(model, "hook_dict") and hasattr(model, "run_with_cache")


def unwrap(model: Any) -> nn.Module:
    """The causal LM inside peft / DDP / compile wrappers."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model
    return model


def decoder_layers(model: Any) -> nn.ModuleList:
    """The ``ModuleList`` of decoder layers (``model.model.layers`` for Llama/Mistral/Qwen, ``transformer.h``...)."""
    base = unwrap(model)
    for path in LAYER_PATHS:
        obj: Any = base
        for name in path.split("."):
            obj = getattr(obj, name, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    n = getattr(getattr(base, "config", None), "num_hidden_layers", None)
    candidates = [m for m in base.modules() if isinstance(m, nn.ModuleList) and n is not None and len(m) == n]
    if len(candidates) >= 1:
        return candidates[0]
    raise HookError(
        f"cannot find the decoder layers of {type(base).__name__}: revlens looks at {LAYER_PATHS} "
        "and for a ModuleList of config.num_hidden_layers modules. Pass a causal LM from transformers."
    )


def model_dims(model: Any) -> tuple[int, int]:
    """(d_model, n_layers) of a bridge or an HF module."""
    if is_bridge(model):
        return int(model.cfg.d_model), int(model.cfg.n_layers)
    config = getattr(unwrap(model), "config", None)
    d = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or getattr(config, "d_model", None)
    if d is None:
        raise HookError(f"{type(model).__name__} has no config.hidden_size; cannot check the blocking directions.")
    return int(d), len(decoder_layers(model))


def _tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _replace(output: Any, new: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (new, *output[1:])
    if isinstance(output, list):
        return [new, *output[1:]]
    return new


@contextlib.contextmanager
def layer_output_hooks(
    model: Any, fns: Mapping[int, Callable[[torch.Tensor], torch.Tensor | None]], *, stop_after: int | None = None
) -> Iterator[None]:
    """While inside, ``fns[l](h)`` sees each decoder layer ``l``'s output ``[batch, seq, d]``; a returned tensor
    replaces it. With ``stop_after``, the forward stops (call the model with :func:`revlens.readout.run_stopping`)
    once that layer has run.
    Hooks are removed on exit, also when the block raises."""
    layers = decoder_layers(model)
    bad = [l for l in fns if not 0 <= l < len(layers)]
    if bad:
        raise HookError(f"layers {bad} are out of range for a model with {len(layers)} decoder layers.")
    handles = []

    def make(layer: int):
        fn = fns[layer]

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            new = fn(_tensor(output))
            if layer == stop_after:
                raise StopForward
            return None if new is None else _replace(output, new)

        return hook

    try:
        for l in sorted(fns):
            handles.append(layers[l].register_forward_hook(make(l)))
        yield
    finally:
        for h in handles:
            h.remove()
