"""Write a TransformerBridge as a checkpoint folder that revlens (and other tools) read: :func:`save_checkpoint`.

TL-native bridges become revlens folders, Hugging Face-architecture bridges standard Hugging Face folders and
peft-wrapped bridges LoRA adapter folders (:mod:`revlens.hf_writer`). Each is written to a temporary folder and
renamed into place; a full disk raises :class:`revlens.DiskFullError`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from revlens._util import naming_disk_full, replace_dir, temp_sibling
from revlens.checkpoint_format import CheckpointError

# The version of the revlens folder layout (config.json's "revlens_format").
REVLENS_FORMAT = 1


def _jsonable_config(cfg: Any) -> dict[str, Any]:
    out = {}
    for key, value in cfg.to_dict().items():
        if isinstance(value, torch.dtype):
            value = str(value).removeprefix("torch.")
        elif isinstance(value, torch.device):
            value = str(value)
        try:
            json.dumps(value)
        except TypeError:
            continue
        out[key] = value
    out.pop("device", None)
    return out


def save_checkpoint(
    model: Any,
    path: str | os.PathLike,
    *,
    metadata: Mapping[str, Any] | None = None,
    base: str | os.PathLike | None = None,
) -> Path:
    """Write a TransformerBridge as a folder that :func:`load_checkpoint` (and other tools) read.

    - TL-native bridge: a revlens folder, ``config.json`` (the TransformerBridgeConfig plus
      ``revlens_format``), ``model.safetensors`` and the tokenizer's files;
    - Hugging Face-architecture bridge: a standard HF folder (``config.json``, ``model.safetensors`` in the
      model's dtype, tokenizer with its chat template) that ``AutoModelForCausalLM.from_pretrained`` loads;
    - peft-wrapped bridge (:func:`revlens.lora.apply_lora`): a LoRA adapter folder (``adapter_config.json``,
      ``adapter_model.safetensors``) whose ``base_model_name_or_path`` is ``base`` (default: the local folder
      the model was loaded from).
    Files are written to a temporary folder and renamed into place, so an interrupted save never leaves a
    half-written checkpoint; a full disk raises :class:`revlens.DiskFullError` naming ``path`` and removes the
    temporary folder. ``metadata`` is recorded in revlens folders only.

    Example:
        >>> path = save_checkpoint(model, tmp / "save" / "finetune" / "seed_0" / "step_100")
        >>> sorted(p.name for p in path.iterdir())  # a TL-native bridge: a revlens folder
        ['config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json']
        >>> revlens.load_checkpoint(path).cfg.d_model
        16
    """
    path = Path(path)
    tmp = temp_sibling(path)
    tmp.mkdir(parents=True)
    try:
        with naming_disk_full(path):
            _write_checkpoint(model, tmp, metadata, base)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return replace_dir(tmp, path)


def _write_checkpoint(
    model: Any, folder: Path, metadata: Mapping[str, Any] | None, base: str | os.PathLike | None
) -> None:
    from safetensors.torch import save_file

    from revlens import hf_writer
    from revlens.lora import is_peft_wrapped

    architecture = getattr(model.cfg, "architecture", None)
    if architecture not in (None, "TransformerLensNative"):
        if getattr(model, "original_model", None) is None:
            raise CheckpointError(
                f"cannot save a bridge of architecture {architecture!r} without its "
                "original_model (the Hugging Face module)."
            )
        if is_peft_wrapped(model):
            hf_writer.save_adapter_folder(model, folder, base=base)
        else:
            hf_writer.save_hf_folder(model, folder)
        return
    config = {"revlens_format": REVLENS_FORMAT, "bridge_config": _jsonable_config(model.cfg)}
    if metadata:
        config["metadata"] = dict(metadata)
    state, seen = {}, set()
    for key, value in model.state_dict().items():
        value = value.detach().to("cpu").contiguous()
        if value.data_ptr() in seen:
            value = value.clone()
        seen.add(value.data_ptr())
        state[key] = value
    save_file(state, str(folder / "model.safetensors"))
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(folder))
    (folder / "config.json").write_text(json.dumps(config, indent=1))
