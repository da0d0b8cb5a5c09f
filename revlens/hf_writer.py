"""Write Hugging Face-architecture TransformerBridges as standard folders other tools read.

- :func:`save_hf_folder`: ``config.json`` (``config.save_pretrained``), ``model.safetensors`` (the HF state
  dict in standard names, in the model's dtype, shared/tied tensors cloned), ``generation_config.json``
  and the tokenizer with its chat template: ``transformers.AutoModelForCausalLM.from_pretrained`` loads it.
  ``save_pretrained`` on ``bridge.original_model`` is not used: it fails on the tied tensors and would
  write the bridge's wrapper names.
- :func:`save_adapter_folder`: ``adapter_config.json`` + ``adapter_model.safetensors`` for a peft-wrapped
  bridge (:func:`revlens.lora.apply_lora`), with ``base_model_name_or_path`` set to the local base folder:
  ``peft.PeftModel.from_pretrained(base, folder)`` loads it.
Both write into a folder the caller renames into place (see :func:`revlens.checkpoint_save.save_checkpoint`).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch

from revlens.lora import lora_config_of, standard_name


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous copies; a tensor whose storage another key already holds is cloned (safetensors
    refuses shared storage)."""
    out, seen = {}, set()
    for key, value in state.items():
        value = value.detach().to("cpu").contiguous()
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen:
            value = value.clone()
        seen.add(value.untyped_storage().data_ptr())
        out[key] = value
    return out


def _standard_keys(module: torch.nn.Module) -> set[str] | None:
    """The state-dict keys of a plain HF model of this class and config (built on the meta device)."""
    try:
        with torch.device("meta"):
            skeleton = type(module)(copy.deepcopy(module.config))
    except Exception:  # an architecture that cannot be built on meta: keep every key
        return None
    return set(skeleton.state_dict())


def hf_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The bridge's HF module state dict in standard HF names, without bridge-only extras (e.g. the zero
    ``lm_head.bias`` buffer the bridge adds), in the model's dtype."""
    module = model.original_model
    state = {standard_name(k): v for k, v in module.state_dict().items()}
    keep = _standard_keys(module)
    if keep is not None:
        missing = keep - set(state)
        if missing:
            raise ValueError(
                f"the bridge's HF module lacks {sorted(missing)[:4]} of its own architecture's keys; "
                "cannot write a standard Hugging Face folder."
            )
        state = {k: v for k, v in state.items() if k in keep}
    return state


def save_hf_folder(model: Any, folder: str | os.PathLike) -> Path:
    """Write an HF-architecture bridge into ``folder`` as a standard Hugging Face model folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    module = model.original_model
    state = _unshared(hf_state_dict(model))
    config = copy.deepcopy(module.config)
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(dtypes) == 1:
        config.dtype = next(iter(dtypes))
    config.save_pretrained(str(folder))
    generation = getattr(module, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(str(folder))
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(folder))
    return folder


def save_adapter_folder(model: Any, folder: str | os.PathLike, base: str | os.PathLike | None = None) -> Path:
    """Write a peft-wrapped bridge's LoRA adapter into ``folder`` (standard peft files).

    ``base`` (default: the folder the HF model was loaded from, ``config._name_or_path``) becomes
    ``base_model_name_or_path``, resolved to an absolute path when it is a local folder.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = Path(folder)
    module = model.original_model
    config = lora_config_of(model)
    base = base if base is not None else getattr(module.config, "_name_or_path", None) or config.base_model_name_or_path
    if base is None:
        raise ValueError("the base model's folder is unknown: pass base=<folder of the model LoRA was applied to>.")
    config.base_model_name_or_path = str(Path(base).resolve()) if Path(base).is_dir() else str(base)
    config.inference_mode = True
    state = get_peft_model_state_dict(module, adapter_name="default")
    state = {"base_model.model." + standard_name(k): v for k, v in state.items()}
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    save_file(_unshared(state), str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(folder))
    return folder
