"""Checkpoint weight files: what is in them, checked before and while they are read; never unpickled.

- safetensors headers are validated against the file size without reading the data (:func:`safetensors_header`);
  ``.bin``/``.pt`` state dicts are read with ``torch.load(weights_only=True)`` only;
- a Hugging Face folder's weight set is picked in transformers' own order (:func:`hf_weight_files`), its shard
  index checked against the shards' headers, and a single weight file beside an index of the same format refused
  (the two could be read differently by different processes);
- every floating tensor is checked as it is read (:func:`check_weight_values`: NaN, inf, or |w| above
  ``MAX_ABS_WEIGHT`` raise :class:`WeightValueError`, naming the tensor and the checkpoint).

:class:`CheckpointError` (a checkpoint or history revlens cannot use, with the reason and the fix) lives here, the
lowest checkpoint module.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint or history that revlens cannot use, with the reason and the fix."""


class WeightValueError(CheckpointError):
    """A checkpoint whose weights hold NaN/inf or absurdly large values (a diverged run or a damaged file)."""


# Largest |w| accepted in a floating weight tensor. Healthy models stay far below (random init and trained
# language models: |w| < 1e3; old GPT-2 files hold the buffer masked_bias = -1e4); a diverged run or a damaged
# file does not.
MAX_ABS_WEIGHT = 1e6


DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


_CONVERT_HINT = (
    "revlens never unpickles weights. Re-save the model as safetensors from the code that trained it "
    "(model.save_pretrained(folder) writes model.safetensors by default; revlens.save_checkpoint for "
    "TL-native models), or convert a plain tensor state dict with "
    "safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors')."
)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"auto"``/None -> None (keep the checkpoint's own dtype); a name or torch.dtype -> that torch.dtype."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of auto, float32, bfloat16, float16.")
    return DTYPES[name]


def first_line(err: BaseException) -> str:
    """The first non-empty line of an error's message (its type's name when it has none), for one-line errors."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def read_json(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON file (``config.json``, an index, ``adapter_config.json``); CheckpointError if invalid."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); re-save the checkpoint.") from err


# ---------------------------------------------------------------------------------------------------------
# Weight files: safetensors (header validated without reading the data), or weights-only pickles.


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, checked against the file's size (catches truncation)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
            if n < 2 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit in {size} bytes")
            header = json.loads(f.read(n))
        entries = [v for k, v in header.items() if k != "__metadata__"]
        end = max((int(v["data_offsets"][1]) for v in entries), default=0)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is corrupt or truncated ({err}); re-save the checkpoint.") from err
    if 8 + n + end != size:
        raise CheckpointError(
            f"{path} is corrupt or truncated ({size} bytes on disk, its header describes {8 + n + end}); "
            "re-save the checkpoint."
        )
    return header


def _load_pickled_weights(path: Path, device: str | torch.device | None = "cpu") -> dict[str, torch.Tensor]:
    """A ``.bin``/``.pt`` state dict read with ``weights_only=True``; anything else is refused."""
    import pickle

    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (zero bytes); re-save the checkpoint.")
    try:
        state = torch.load(str(path), map_location=device or "cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path} holds pickled Python objects, not plain tensors, and revlens refuses to load it. " + _CONVERT_HINT
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} is corrupt or truncated ({type(err).__name__}: {err}); re-save the checkpoint."
        ) from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors; " + _CONVERT_HINT)
    return dict(state)


# A weight set transformers reads: the single file, or the shards its index lists; in transformers' own order
# of preference (modeling_utils: model.safetensors, its index, pytorch_model.bin, its index).
_WEIGHT_SETS = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)


def hf_weight_files(folder: Path) -> list[Path]:
    """The model weight files of a Hugging Face folder (never optimizer.pt, rng_state*.pth, training_args.bin).

    Picked in transformers' order, so that ``from_pretrained`` (the boot) and revlens' own reads (weight swaps,
    worker processes, the measurement cache) read the same files; a single file beside a sharded index of the
    same format is refused, and an index is checked against its shards' headers.
    """
    for single_name, index_name in _WEIGHT_SETS:
        single, index = folder / single_name, folder / index_name
        if index.is_file():
            shards = _indexed_shards(folder, index)
            if single.is_file() and [p.name for p in shards] != [single_name]:
                raise CheckpointError(
                    f"{folder} holds both {single_name} and the shards listed in {index_name} "
                    f"({', '.join(p.name for p in shards[:3])}{', ...' if len(shards) > 3 else ''}): two copies of "
                    "the weights, perhaps from different saves, which transformers and revlens' workers could read "
                    f"differently. Delete the stale one: {single_name}, or {index_name} with its shards."
                )
            return shards
        if single.is_file():
            return [single]
    for pattern in ("model-*.safetensors", "pytorch_model-*.bin"):
        files = sorted(folder.glob(pattern))
        if files:
            return files
    raise CheckpointError(
        f"{folder} has no weight files (model.safetensors or pytorch_model.bin); save the model with save_pretrained()."
    )


def shard_keys(path: Path) -> list[str]:
    """The tensor names one weight file holds, read from its header (safetensors) or as meta tensors (.bin)."""
    if path.suffix == ".safetensors":
        return [k for k in safetensors_header(path) if k != "__metadata__"]
    return list(_load_pickled_weights(path, "meta"))


def _indexed_shards(folder: Path, index: Path) -> list[Path]:
    """The shards an index names, after checking that every tensor is where the index says and nowhere else."""
    data = read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, Mapping) else None
    if not isinstance(weight_map, Mapping) or not weight_map:
        raise CheckpointError(f"{index} has no weight_map; re-save the model with save_pretrained().")
    if not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(
            f"{index}: weight_map must map each tensor name to a shard file name; re-save the model with "
            "save_pretrained()."
        )
    files = [folder / name for name in sorted(set(weight_map.values()))]
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise CheckpointError(
            f"{folder} is missing the shard(s) {missing} named in {index.name}; copy every shard or re-save the model."
        )
    found: dict[str, list[str]] = {}
    for path in files:
        for key in shard_keys(path):
            found.setdefault(key, []).append(path.name)
    problems = []
    unnamed: dict[str, str] | None = None  # shard files on disk that the index does not name (diagnosis only)
    for name, shard in weight_map.items():
        holders = found.get(name, [])
        if shard not in holders:
            if not holders and unnamed is None:
                pattern = "model-*.safetensors" if index.name.startswith("model.") else "pytorch_model-*.bin"
                unnamed = {
                    key: path.name
                    for path in sorted(set(folder.glob(pattern)) - set(files))
                    for key in shard_keys(path)
                }
            if holders:
                where = f"it is in {holders[0]}"
            elif name in (unnamed or {}):
                where = f"it is in {unnamed[name]}, a shard the index does not name"
            else:
                where = "no shard holds it"
            problems.append(f"{name} -> {shard}, but {where}")
    problems += [f"{name} is in {len(h)} shards ({', '.join(h)})" for name, h in found.items() if len(h) > 1]
    problems += [
        f"{h[0]} holds {name}, which the index does not list" for name, h in found.items() if name not in weight_map
    ]
    if problems:
        raise CheckpointError(
            f"{index} does not match its shards ({len(problems)} problem(s): {'; '.join(problems[:3])}"
            f"{'; ...' if len(problems) > 3 else ''}): the index and the shards come from different saves or "
            "were edited. Re-save the model with save_pretrained(), or copy the index and every shard together "
            "from one save."
        )
    return files


def check_weight_files(files: Sequence[Path]) -> dict[str, int]:
    """Validate every weight file; return the element count per floating safetensors dtype."""
    counts: dict[str, int] = {}
    for path in files:
        if path.suffix == ".safetensors":
            for key, entry in safetensors_header(path).items():
                if key != "__metadata__" and entry["dtype"] in _SAFETENSORS_DTYPES:
                    counts[entry["dtype"]] = counts.get(entry["dtype"], 0) + math.prod(entry["shape"])
        else:
            _load_pickled_weights(path, "meta" if path.stat().st_size else None)
    return counts


def stored_dtype(counts: Mapping[str, int], config: Mapping[str, Any]) -> torch.dtype:
    """The dtype the weights are stored in (most elements), else config's ``dtype``/``torch_dtype``, else fp32."""
    if counts:
        return _SAFETENSORS_DTYPES[max(counts, key=counts.get)]
    named = config.get("dtype") or config.get("torch_dtype")
    return DTYPES.get(str(named).removeprefix("torch."), torch.float32)


def check_weight_values(name: str, tensor: torch.Tensor, where: str | os.PathLike) -> None:
    """Raise :class:`WeightValueError` when a floating tensor holds NaN/inf or |w| > ``MAX_ABS_WEIGHT``.

    One pass over the tensor (``torch.aminmax``, which propagates NaN), no copy; integer, empty and meta
    tensors pass. ``where`` names the checkpoint in the message.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0 or tensor.device.type == "meta":
        return
    values = tensor.detach()
    try:
        lo, hi = torch.stack(torch.aminmax(values)).float().tolist()
    except (RuntimeError, NotImplementedError):  # dtypes without aminmax (float8): through float32
        lo, hi = torch.stack(torch.aminmax(values.float())).tolist()
    if math.isfinite(lo) and math.isfinite(hi) and max(-lo, hi) <= MAX_ABS_WEIGHT:
        return
    if math.isnan(lo) or math.isnan(hi):
        what = "holds NaN values"
    elif not (math.isfinite(lo) and math.isfinite(hi)):
        what = "holds infinite values"
        if tensor.dtype == torch.float16:
            what += " (float16 overflows above 65504: if dtype= cast it, load it with dtype='float32')"
    else:
        what = f"reaches |w| = {max(-lo, hi):.3g}, beyond any healthy model (|w| <= {MAX_ABS_WEIGHT:g})"
    raise WeightValueError(
        f"checkpoint {where}: the weight {name!r} {what}: the run that wrote it diverged or the file is damaged. "
        "Replace the checkpoint (re-save it, or use an earlier step), or leave it out of the history."
    )


def read_weights(files: Sequence[Path], device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from every weight file, safetensors read straight onto ``device``; each tensor's
    values are checked as it is read (:func:`check_weight_values`)."""
    from safetensors import safe_open

    for path in files:
        where = f"{path.parent} ({path.name})"
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for key in f.keys():
                    tensor = f.get_tensor(key)
                    check_weight_values(key, tensor, where)
                    yield key, tensor
        else:
            for key, tensor in _load_pickled_weights(path, device).items():
                check_weight_values(key, tensor, where)
                yield key, tensor


def weight_shapes(files: Sequence[Path]) -> list[tuple[str, torch.Tensor]]:
    """(name, meta tensor of the stored shape) for every tensor in the weight files, without reading data."""
    out = []
    for path in files:
        if path.suffix == ".safetensors":
            for key, entry in safetensors_header(path).items():
                if key != "__metadata__":
                    out.append((key, torch.empty(entry["shape"], device="meta")))
        else:
            out.extend(_load_pickled_weights(path, "meta").items())
    return out
