"""LoRA on a TransformerBridge's Hugging Face module, through peft.

A TransformerBridge keeps the HF model as ``bridge.original_model`` and wraps its submodules in bridge
components in place (``q_proj`` is a ``LinearBridge`` holding the ``nn.Linear`` as ``_original_component``),
so peft's usual targets (``q_proj``, ``"all-linear"``) would hit the wrappers, which peft refuses, or the
``lm_head``. :func:`apply_lora` points the config's targets at the wrapped ``nn.Linear`` layers instead:
the bridge's hooks stay where they are (around the adapted layers), so ``Blocking`` and ``ProbeAnchor``
act on the adapted model's forward pass. Adapter keys and targets are written back in standard HF names
(``_original_component`` removed) by :func:`revlens.hf_writer.save_adapter_folder`.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Mapping
from typing import Any

import torch

WRAPPED = "_original_component"
_OUTPUT_LAYERS = ("lm_head", "embed_out", "output")


def standard_name(name: str) -> str:
    """A bridge module/parameter name in plain HF spelling (``._original_component`` segments removed)."""
    return name.replace(f".{WRAPPED}", "").replace(f"{WRAPPED}.", "")


def _hf_module(model: Any) -> torch.nn.Module:
    module = getattr(model, "original_model", None)
    if not isinstance(module, torch.nn.Module):
        raise ValueError(
            f"LoRA needs a TransformerBridge booted from a Hugging Face model (with .original_model); got "
            f"{type(model).__name__} with architecture {getattr(getattr(model, 'cfg', None), 'architecture', None)!r}. "
            "TL-native models are fine-tuned in full (lora=None)."
        )
    return module


def _linear_targets(module: torch.nn.Module) -> list[str]:
    """Standard leaf names of every ``nn.Linear`` except the output layer ("all-linear", as peft defines it)."""
    names = set()
    for name, sub in module.named_modules():
        if isinstance(sub, torch.nn.Linear):
            leaf = standard_name(name).rsplit(".", 1)[-1]
            if leaf not in _OUTPUT_LAYERS:
                names.add(leaf)
    return sorted(names)


def as_lora_config(lora: Any) -> Any:
    """A ``peft.LoraConfig`` from a config or a dict of its fields (``{"r": 8, "lora_alpha": 16}``)."""
    try:
        import peft
    except ImportError as err:
        raise ImportError("LoRA needs peft: pip install 'revlens[peft]' (or pip install peft).") from err
    if isinstance(lora, peft.LoraConfig):
        return copy.deepcopy(lora)
    if isinstance(lora, Mapping):
        fields = {"target_modules": "all-linear", "lora_dropout": 0.0, **dict(lora)}
        return peft.LoraConfig(**fields)
    raise ValueError(f"lora must be a peft.LoraConfig or a dict of its fields, got {type(lora).__name__}.")


def apply_lora(model: Any, lora: Any) -> Any:
    """Add LoRA adapters (trainable) to ``model.original_model`` in place; freeze everything else.

    Args:
        model: a TransformerBridge of a Hugging Face architecture.
        lora: a ``peft.LoraConfig`` or a dict of its fields (default targets: every linear layer
            but the output layer; no dropout, so resumed runs are exact).
    Returns:
        The ``peft.PeftModel`` around ``model.original_model`` (the bridge itself keeps working,
        now through the adapted layers).

    Example:
        >>> apply_lora(bridge, {"r": 8, "lora_alpha": 16})  # doctest: +SKIP
    """
    import peft

    module = _hf_module(model)
    if is_peft_wrapped(model):
        raise ValueError("this model already has LoRA adapters; load the base model again to add new ones.")
    config = as_lora_config(lora)
    targets = config.target_modules
    if targets is None or targets == "all-linear":
        targets = _linear_targets(module)
    elif isinstance(targets, str):
        raise ValueError(
            f"target_modules={targets!r}: give a list of module names (e.g. ['q_proj', 'v_proj']) "
            "or 'all-linear'; regular expressions do not map onto the bridge's module names."
        )
    wrapped = {standard_name(n).rsplit(".", 1)[-1] for n, m in module.named_modules() if hasattr(m, WRAPPED)}
    config.target_modules = sorted(f"{t}.{WRAPPED}" if t in wrapped else t for t in targets)
    peft_model = peft.get_peft_model(module, config)
    object.__setattr__(model, "_revlens_lora", {"targets": sorted(targets)})
    return peft_model


def is_peft_wrapped(model: Any) -> bool:
    """True when the model's HF module carries peft adapter layers."""
    if "peft" not in sys.modules:
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    module = getattr(model, "original_model", model)
    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


def lora_config_of(model: Any, adapter: str = "default") -> Any:
    """The adapter's ``LoraConfig`` with targets in standard HF names (as in ``adapter_config.json``)."""
    module = _hf_module(model)
    configs = getattr(module, "peft_config", None)
    if not configs or adapter not in configs:
        raise ValueError(f"the model has no peft adapter named {adapter!r}.")
    config = copy.deepcopy(configs[adapter])
    targets = config.target_modules
    if targets is not None and not isinstance(targets, str):
        config.target_modules = sorted({standard_name(t) for t in targets})
    return config


def lora_description(lora: Any) -> dict[str, Any] | None:
    """The JSON-able fields of a LoRA config that change training (for a run's recorded settings)."""
    if lora is None:
        return None
    config = as_lora_config(lora)
    keys = (
        "r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "bias",
        "use_rslora",
        "use_dora",
        "init_lora_weights",
        "modules_to_save",
        "layers_to_transform",
    )
    out = {}
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, (set, frozenset, list, tuple)):
            value = sorted(str(v) for v in value)
        out[key] = value if isinstance(value, (int, float, str, bool, list, type(None))) else str(value)
    return out
