"""Checkpoints and training histories: load every phase as a TransformerBridge, lazily, offline.

A checkpoint source is one of
- an in-memory ``TransformerBridge``;
- a revlens checkpoint folder (``config.json`` with ``"revlens_format"``, ``model.safetensors``,
  tokenizer files), written by :func:`save_checkpoint`;
- a local Hugging Face model folder (``config.json`` with ``model_type``, single or sharded weights,
  tokenizer files), read with ``AutoModelForCausalLM.from_pretrained`` in its own dtype and wrapped by
  ``TransformerBridge.boot_transformers``;
- a PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``), merged onto its
  base model with peft (``pip install revlens[peft]``).

Histories are read from ``pretrain/ align/ finetune/<run>/step_<N>/`` (Hugging Face Trainer
``checkpoint-<N>/`` folders count as step N) or from a Trainer output folder. A
:class:`CheckpointLoader` boots the first checkpoint and copies each later checkpoint's weights into
the live model when the architecture is the same.

Weights are read with safetensors or ``torch.load(..., weights_only=True)``: never unpickled. Every floating
tensor is checked as it is read (NaN, inf, or |w| above ``MAX_ABS_WEIGHT``: :class:`WeightValueError`, naming the
tensor and the checkpoint); a sharded folder's index is checked against its shards' headers, and a single weight
file beside an index of the same format is refused (the two could be read differently).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from revlens._util import naming_disk_full, replace_dir, temp_sibling

REVLENS_FORMAT = 1
PHASES = ("pretrain", "align", "finetune")
_STEP_DIR = re.compile(r"^(?:step_|checkpoint-)(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint or history that revlens cannot use, with the reason and the fix."""


class WeightValueError(CheckpointError):
    """A checkpoint whose weights hold NaN/inf or absurdly large values (a diverged run or a damaged file)."""


# Largest |w| accepted in a floating weight tensor. Healthy models stay far below (random init and trained
# language models: |w| < 1e3; old GPT-2 files hold the buffer masked_bias = -1e4); a diverged run or a damaged
# file does not.
MAX_ABS_WEIGHT = 1e6


@contextlib.contextmanager
def quiet_hf_progress() -> Iterator[None]:
    """Silence transformers' own progress bars (``Loading weights``, one line per model load) inside the block,
    then restore them; revlens' own tqdm bars are untouched. (The GGUF converter's one-off de-quantisation bar
    uses tqdm directly and still shows.)

    Example:
        >>> with quiet_hf_progress():  # around AutoModelForCausalLM.from_pretrained(folder), for example
        ...     loaded = load_checkpoint(f"{ckpts}/align")
        >>> loaded.cfg.n_layers
        2
    """
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if was_enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _bridge_classes():
    import transformer_lens.model_bridge.sources.native  # noqa: F401  (attaches boot_native)
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge, TransformerBridgeConfig


def boot_native_model(
    config: Mapping[str, Any], tokenizer: Any = None, device: str | None = None, dtype: torch.dtype | None = None
):
    """Build a randomly initialised TL-native TransformerBridge from a config dict."""
    TransformerBridge, TransformerBridgeConfig = _bridge_classes()
    cfg = TransformerBridgeConfig.from_dict(dict(config))
    return TransformerBridge.boot_native(cfg, tokenizer=tokenizer, device=device, dtype=dtype)


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
        >>> load_checkpoint(path).cfg.d_model
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
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
)
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "torch_dtype", "dtype")
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


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); re-save the checkpoint.") from err


def _read_config(folder: Path) -> dict[str, Any]:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(
            f"{folder} has no config.json: it is neither a revlens checkpoint "
            "(save one with revlens.save_checkpoint), a Hugging Face model folder (save_pretrained) "
            "nor a PEFT adapter folder (adapter_config.json)."
        )
    return _read_json(cfg_path)


def _has_tokenizer(folder: Path) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    return any((folder / n).exists() for n in names)


# Files that hold a tokenizer's vocabulary (tokenizer_config.json and special_tokens_map.json do not).
_VOCAB_PATTERNS = ("tokenizer.json", "vocab.json", "vocab.txt", "*.model", "*.tiktoken")


def _has_vocabulary(folder: Path) -> bool:
    return any(next(folder.glob(pattern), None) is not None for pattern in _VOCAB_PATTERNS)


def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    if not _has_tokenizer(folder):
        raise CheckpointError(
            f"{folder} has no tokenizer files (tokenizer.json / tokenizer_config.json / vocab.json): "
            "revlens loads offline and will not fetch one from a hub. Save the tokenizer into the "
            "folder with tokenizer.save_pretrained(folder)."
        )
    if not _has_vocabulary(folder):
        present = [n for n in ("tokenizer_config.json", "special_tokens_map.json") if (folder / n).is_file()]
        raise CheckpointError(
            f"{folder} has {' and '.join(present) or 'tokenizer settings'} but no tokenizer.json (nor vocab.json "
            "+ merges.txt, vocab.txt or tokenizer.model): the tokenizer's vocabulary is missing. Copy "
            "tokenizer.json from the model this checkpoint was trained from, or save the whole tokenizer into the "
            "folder with tokenizer.save_pretrained(folder)."
        )
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"the tokenizer files in {folder} cannot be loaded ({first}); save the tokenizer again with "
            "tokenizer.save_pretrained(folder)."
        ) from err


def _tokenizer_digest(folder: Path | None) -> str:
    if folder is None:
        return ""
    h = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        if (folder / name).is_file():
            h.update(name.encode() + b"\0" + (folder / name).read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Weight files: safetensors (header validated without reading the data), or weights-only pickles.


def _safetensors_header(path: Path) -> dict[str, Any]:
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


def _hf_weight_files(folder: Path) -> list[Path]:
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


def _shard_keys(path: Path) -> list[str]:
    """The tensor names one weight file holds, read from its header (safetensors) or as meta tensors (.bin)."""
    if path.suffix == ".safetensors":
        return [k for k in _safetensors_header(path) if k != "__metadata__"]
    return list(_load_pickled_weights(path, "meta"))


def _indexed_shards(folder: Path, index: Path) -> list[Path]:
    """The shards an index names, after checking that every tensor is where the index says and nowhere else."""
    data = _read_json(index)
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
        for key in _shard_keys(path):
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
                    for key in _shard_keys(path)
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


def _check_weight_files(files: Sequence[Path]) -> dict[str, int]:
    """Validate every weight file; return the element count per floating safetensors dtype."""
    counts: dict[str, int] = {}
    for path in files:
        if path.suffix == ".safetensors":
            for key, entry in _safetensors_header(path).items():
                if key != "__metadata__" and entry["dtype"] in _SAFETENSORS_DTYPES:
                    counts[entry["dtype"]] = counts.get(entry["dtype"], 0) + math.prod(entry["shape"])
        else:
            _load_pickled_weights(path, "meta" if path.stat().st_size else None)
    return counts


def _checkpoint_dtype(counts: Mapping[str, int], config: Mapping[str, Any]) -> torch.dtype:
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


def _read_weights(files: Sequence[Path], device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
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


# ---------------------------------------------------------------------------------------------------------
# What a checkpoint folder is, before anything is booted.


@dataclass(frozen=True)
class _Spec:
    """A checkpoint folder resolved: its kind, weight files, dtype and the key that decides weight swaps."""

    kind: str  # "revlens" | "hf" | "adapter"
    folder: Path
    files: tuple[Path, ...]
    dtype: torch.dtype
    tokenizer_folder: Path | None
    config: dict[str, Any]
    base: Path | None = None  # adapters: the base model folder

    @property
    def swap_key(self) -> str:
        """Checkpoints with one key share architecture, dtype and tokenizer: weights swap in place."""
        family = "revlens" if self.kind == "revlens" else "hf"
        config = {k: v for k, v in self.config.items() if k not in _VOLATILE_CONFIG_KEYS}
        return json.dumps(
            [family, config, str(self.dtype), _tokenizer_digest(self.tokenizer_folder)], sort_keys=True, default=str
        )


def _is_adapter(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file()


_ADAPTER_HINT = "re-save the adapter with peft_model.save_pretrained(folder)"


def _read_adapter_config(folder: Path) -> dict[str, Any]:
    """``adapter_config.json``, refused unless it is a JSON object describing a LoRA adapter with its targets:
    without ``target_modules`` peft falls back to its default targets for the architecture and silently drops
    the adapter's weights for every other module."""
    path = folder / "adapter_config.json"
    config = _read_json(path)
    if not isinstance(config, Mapping):
        raise CheckpointError(
            f"{path} holds a JSON {type(config).__name__}, not an object of LoRA settings (peft_type, r, lora_alpha, "
            f"target_modules, ...); {_ADAPTER_HINT}."
        )
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise CheckpointError(
            f"{path} has peft_type={peft_type!r}, but revlens merges LoRA adapters only (peft_type 'LORA'). Merge "
            "the adapter into its base with peft (model.merge_and_unload()) and save the full model with "
            "save_pretrained(), or fix peft_type if the adapter is LoRA."
        )
    targets = config.get("target_modules")
    if not targets or not isinstance(targets, (str, list)) or not all(isinstance(t, str) for t in targets):
        raise CheckpointError(
            f"{path} has target_modules={targets!r}: peft would fall back to its default targets and silently drop "
            'the adapter\'s weights for other modules. List the adapted modules (e.g. "target_modules": ["q_proj", '
            f'"v_proj"], the module names in the adapter\'s weights) or {_ADAPTER_HINT}.'
        )
    return dict(config)


def _check_adapter_targets(config_path: Path, config: Mapping[str, Any], weights: Path) -> None:
    """Every LoRA module in the adapter's weights must be one of ``target_modules`` (a list; a regular expression
    is left to peft), else peft would load the adapter without those weights."""
    targets = config["target_modules"]
    if isinstance(targets, str):
        return
    modules = set()
    for key in _shard_keys(weights):
        for marker in (".lora_A", ".lora_B"):
            if marker in key:
                modules.add(key.split(marker, 1)[0])
    stray = sorted(m for m in modules if not any(m == t or m.endswith("." + t) for t in targets))
    if stray:
        raise CheckpointError(
            f"{weights} holds LoRA weights for {stray[:3]}{' ...' if len(stray) > 3 else ''}, which the "
            f"target_modules {sorted(targets)} of {config_path} do not name: peft would drop them. Add their module "
            f"names to target_modules, or {_ADAPTER_HINT}."
        )


# Where a LoRA weight keeps its rank: lora_A (and lora_embedding_A) rows, lora_B (and lora_embedding_B) columns.
_LORA_RANK_AXIS = {".lora_A.": 0, ".lora_embedding_A": 0, ".lora_B.": 1, ".lora_embedding_B": 1}


def _configured_rank(config: Mapping[str, Any], module: str) -> tuple[Any, str]:
    """The rank peft gives ``module``: its ``rank_pattern`` entry (matched as peft does), else ``r``; and where
    that number is written."""
    patterns = config.get("rank_pattern") or {}
    for pattern, rank in patterns.items() if isinstance(patterns, Mapping) else ():
        try:
            if pattern == module or re.match(rf"(.*\.)?({pattern})$", module):
                return rank, f"rank_pattern[{pattern!r}]={rank!r}"
        except re.error:
            continue
    return config.get("r"), f"r={config.get('r')!r}"


def _check_adapter_ranks(config_path: Path, config: Mapping[str, Any], weights: Path) -> None:
    """Every LoRA weight's rank must be the one the config gives its module (``r`` or ``rank_pattern``), else
    peft fails to load it with a size mismatch that reads like a wrong base model."""
    for name, tensor in _weight_names([weights]):
        axis = next((a for marker, a in _LORA_RANK_AXIS.items() if marker in name), None)
        if axis is None or tensor.dim() < 2:
            continue
        module = re.split(r"\.lora_(?:embedding_)?[AB]", name, maxsplit=1)[0].removeprefix("base_model.model.")
        expected, written = _configured_rank(config, module)
        if tensor.shape[axis] != expected:
            raise CheckpointError(
                f"{weights} holds LoRA weights of rank {tensor.shape[axis]} ({name} has shape {list(tensor.shape)}), "
                f"but {config_path} gives that module {written}: the config and the weights come from different "
                f"saves. Set the rank in {config_path.name} to {tensor.shape[axis]} if the weights are right, or "
                f"{_ADAPTER_HINT}."
            )


def _adapter_base(folder: Path, adapter_config: Mapping[str, Any], base: str | os.PathLike | None) -> Path:
    named = adapter_config.get("base_model_name_or_path")
    if named:
        for candidate in (Path(named), folder / named):
            if (candidate / "config.json").is_file():
                return candidate
    if base is not None:
        if not (Path(base) / "config.json").is_file():
            raise CheckpointError(f"the base model folder {base} given for the adapter {folder} has no config.json.")
        return Path(base)
    raise CheckpointError(
        f"{folder} is a LoRA adapter on {named!r}, which is not a local folder: give the base model's folder "
        "with base=PATH (History(..., base=PATH), analyze(..., base=PATH), revlens analyze --base PATH)."
    )


def _describe(folder: Path, dtype: str | torch.dtype | None, base: str | os.PathLike | None) -> _Spec:
    """Resolve a checkpoint folder without booting it; raises CheckpointError naming problem and fix."""
    if not folder.exists():
        raise CheckpointError(f"checkpoint path {folder} does not exist.")
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint path {folder} is a file; give the folder that holds config.json.")
    wanted = resolve_dtype(dtype)
    if _is_adapter(folder) and not (folder / "config.json").is_file():
        adapter_config = _read_adapter_config(folder)
        files = [p for p in (folder / "adapter_model.safetensors", folder / "adapter_model.bin") if p.is_file()]
        if not files:
            raise CheckpointError(
                f"{folder} has adapter_config.json but no adapter_model.safetensors; "
                "save the adapter with peft_model.save_pretrained(folder)."
            )
        _check_weight_files(files[:1])
        _check_adapter_targets(folder / "adapter_config.json", adapter_config, files[0])
        _check_adapter_ranks(folder / "adapter_config.json", adapter_config, files[0])
        base_folder = _adapter_base(folder, adapter_config, base)
        base_spec = _describe(base_folder, dtype, None)
        if base_spec.kind != "hf":
            raise CheckpointError(f"the base {base_folder} of the adapter {folder} is not a Hugging Face model folder.")
        tok = folder if _has_tokenizer(folder) else base_spec.tokenizer_folder
        return _Spec("adapter", folder, tuple(files[:1]), base_spec.dtype, tok, base_spec.config, base_folder)
    config = _read_config(folder)
    if "revlens_format" in config:
        if not isinstance(config.get("bridge_config"), Mapping):
            raise CheckpointError(
                f"{folder}/config.json says revlens_format but has no bridge_config (the model's "
                "TransformerBridgeConfig); re-save the checkpoint with revlens.save_checkpoint."
            )
        files = [p for p in (folder / "model.safetensors", folder / "model.pt") if p.is_file()][:1]
        if not files:
            raise CheckpointError(f"{folder} has no model.safetensors; re-save it with revlens.save_checkpoint.")
        counts = _check_weight_files(files)
        return _Spec(
            "revlens",
            folder,
            tuple(files),
            wanted or _checkpoint_dtype(counts, {}),
            folder if _has_tokenizer(folder) else None,
            dict(config["bridge_config"]),
        )
    if "model_type" not in config:
        raise CheckpointError(
            f"{folder}/config.json has neither model_type (a Hugging Face model folder) nor revlens_format "
            "and bridge_config (a revlens checkpoint); re-save it with save_pretrained() or revlens.save_checkpoint."
        )
    files = _hf_weight_files(folder)
    counts = _check_weight_files(files)
    tok = folder
    if not _has_tokenizer(folder) and _STEP_DIR.match(folder.name) and _has_tokenizer(folder.parent):
        tok = folder.parent  # a Trainer checkpoint-N without tokenizer files: the output_dir's tokenizer
    return _Spec("hf", folder, tuple(files), wanted or _checkpoint_dtype(counts, config), tok, config)


# ---------------------------------------------------------------------------------------------------------
# Booting.


def _import_peft():
    try:
        import peft
    except ImportError:
        raise CheckpointError(
            "this checkpoint is a PEFT (LoRA) adapter folder and loading it needs peft: pip install revlens[peft]"
        ) from None
    return peft


def _from_pretrained(spec: _Spec, device: str | torch.device | None, device_map: Any):
    """The plain Hugging Face model of an HF or adapter spec (adapters merged onto their base)."""
    from transformers import AutoModelForCausalLM

    folder = spec.base if spec.kind == "adapter" else spec.folder
    peft = _import_peft() if spec.kind == "adapter" else None
    kwargs: dict[str, Any] = {"dtype": spec.dtype, "local_files_only": True}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        with quiet_hf_progress():
            model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    except (RuntimeError, ValueError, OSError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"transformers could not load {folder} ({first}); check that config.json matches the weights "
            "(e.g. intermediate_size, hidden_size, vocab_size) or re-save the model with save_pretrained()."
        ) from err
    if peft is not None:
        try:
            with quiet_hf_progress():
                model = peft.PeftModel.from_pretrained(model, str(spec.folder), is_trainable=False).merge_and_unload()
        except (RuntimeError, ValueError, KeyError) as err:
            lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
            first = next((line for line in lines if "size mismatch" in line), lines[0])  # the shapes, if named
            raise CheckpointError(
                f"the adapter {spec.folder} does not fit its base {folder} ({first}); give the base it was trained on "
                "(base=PATH / --base PATH)."
            ) from err
    where = f"{spec.folder} (merged onto its base {folder})" if peft is not None else str(folder)
    seen: set[tuple[str, int]] = set()
    for name, tensor in model.state_dict().items():
        if (str(tensor.device), tensor.data_ptr()) not in seen:  # tied weights once
            seen.add((str(tensor.device), tensor.data_ptr()))
            check_weight_values(name, tensor, where)
    if device_map is None and device is not None:
        model = model.to(device)
    return model.eval()


def _boot_hf(spec: _Spec, device: str | torch.device | None, device_map: Any):
    """Boot an HF or adapter spec; returns the bridge and the HF tensors by their saved names (for swaps)."""
    TransformerBridge, _ = _bridge_classes()
    if device is None and device_map is None:
        from transformer_lens.utilities import get_device

        device = get_device()
    hf_model = _from_pretrained(spec, device, device_map)
    live = hf_model.state_dict(keep_vars=True)  # the bridge wraps these same tensors
    if spec.tokenizer_folder is None:
        raise CheckpointError(f"{spec.folder} has no tokenizer files; save the tokenizer into it.")
    tokenizer = _load_tokenizer(spec.tokenizer_folder)
    bridge = TransformerBridge.boot_transformers(
        str(spec.base or spec.folder), hf_model=hf_model, tokenizer=tokenizer, dtype=spec.dtype
    )
    return bridge.eval(), live


def _check_shapes(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: weights {tuple(state[k].shape)} vs config {tuple(expected[k].shape)}"
        for k in state
        if k in expected and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{source} does not match its config.json ("
            + "; ".join(
                filter(
                    None,
                    [
                        f"shape mismatch {wrong[:3]}" if wrong else "",
                        f"missing {missing[:4]}" if missing else "",
                        f"unexpected {unexpected[:4]}" if unexpected else "",
                    ],
                )
            )
            + "): fix bridge_config in config.json (e.g. d_mlp, d_model) or re-save the checkpoint."
        )


def _boot_revlens(spec: _Spec, device: str | torch.device | None):
    tokenizer = _load_tokenizer(spec.tokenizer_folder) if spec.tokenizer_folder is not None else None
    state = dict(_read_weights(spec.files))
    try:
        model = boot_native_model(spec.config, tokenizer=tokenizer, dtype=spec.dtype)
    except (TypeError, ValueError, KeyError, AssertionError) as err:
        raise CheckpointError(
            f"{spec.folder}/config.json has an unusable bridge_config ({err}); "
            "re-save the checkpoint with revlens.save_checkpoint."
        ) from err
    _check_shapes(state, model.state_dict(), f"{spec.folder}/{spec.files[0].name}")
    model.load_state_dict(state)
    return move_quietly(model, device).eval()


def load_revlens_checkpoint(
    folder: str | os.PathLike, device: str | None = None, dtype: str | torch.dtype | None = "auto"
):
    """Load a folder written by :func:`save_checkpoint` as a TransformerBridge."""
    spec = _describe(Path(folder), dtype, None)
    if spec.kind != "revlens":
        raise CheckpointError(f"{folder}/config.json is not a revlens checkpoint config.")
    return _boot_revlens(spec, device)


def move_quietly(model: Any, device: str | torch.device | None):
    """Move a model to ``device`` only when it is elsewhere (TransformerLens prints on every move)."""
    if device is None:
        return model
    current = next(model.parameters()).device
    wanted = torch.device(device)
    if wanted != current and not (wanted.type == current.type and wanted.index is None):
        model.to(device)
    return model


def load_hf_folder(
    folder: str | os.PathLike,
    device: str | None = None,
    dtype: str | torch.dtype | None = "auto",
    device_map: Any = None,
    base: str | os.PathLike | None = None,
):
    """Boot a local Hugging Face model folder (or a LoRA adapter folder, merged) offline, with its tokenizer."""
    spec = _describe(Path(folder), dtype, base)
    if spec.kind == "revlens":
        raise CheckpointError(f"{folder} is a revlens checkpoint, not a Hugging Face folder; use load_checkpoint.")
    return _boot_hf(spec, device, device_map)[0]


def _check_placement(device: Any, device_map: Any) -> None:
    if device is not None and device_map is not None:
        raise CheckpointError(
            f"give device ({device!r}) or device_map ({device_map!r}), not both: device_map "
            "places the model itself (device_map='auto' spreads it over the visible GPUs)."
        )


def load_checkpoint(
    source: Any,
    device: str | None = None,
    dtype: str | torch.dtype | None = "auto",
    device_map: Any = None,
    base: str | os.PathLike | None = None,
):
    """Load one checkpoint as a TransformerBridge, offline.

    Args:
        source: a TransformerBridge (returned as is, moved to ``device``), a :class:`CheckpointRef`, a
            revlens checkpoint folder, a local Hugging Face model folder (single or sharded safetensors,
            or weights-only ``pytorch_model.bin``), or a PEFT LoRA adapter folder (merged onto its base).
        device: where the model goes (default: TransformerLens' pick, CUDA when available).
        dtype: ``"auto"`` keeps the checkpoint's own dtype (read from the safetensors headers, else
            config.json); ``"float32"``, ``"bfloat16"``, ``"float16"`` or a torch.dtype casts.
        device_map: passed to ``from_pretrained`` (``"auto"`` spreads a model larger than one GPU over
            all visible GPUs); exclusive with ``device``. Hugging Face folders only.
        base: the base model folder of a LoRA adapter whose ``base_model_name_or_path`` is not a local folder.

    Returns:
        The model as a TransformerBridge, in eval mode.

    Example:
        >>> step_1 = load_checkpoint(f"{ckpts}/finetune/seed_0/step_1", dtype="bfloat16")
        >>> step_1.cfg.d_model, next(step_1.parameters()).dtype
        (16, torch.bfloat16)

        A LoRA adapter folder whose base is not a local folder names it:
        ``load_checkpoint("runs/sft/checkpoint-500", base="models/base")``.
    """
    _check_placement(device, device_map)
    if hasattr(source, "run_with_cache") and hasattr(source, "cfg"):
        model = move_quietly(source, device)
        wanted = resolve_dtype(dtype)
        return model if wanted is None or next(model.parameters()).dtype == wanted else model.to(wanted)
    if isinstance(source, CheckpointRef):
        return source.load(device, dtype, device_map, base)
    return CheckpointLoader(device, dtype, device_map, base).load(source)


class CheckpointLoader:
    """Loads checkpoints one after another, booting a model only when the architecture changes.

    The first checkpoint is booted (``from_pretrained`` + ``TransformerBridge.boot_transformers``, or
    a TL-native bridge). Each later checkpoint with the same config, dtype and tokenizer has its
    weights read straight onto the device and copied into the live model in place (a TransformerBridge
    wraps the Hugging Face modules themselves and keeps no processed copy of the weights); anything
    else is booted afresh. LoRA adapters are merged on their base with peft, then copied in.

    The returned model is the loader's live model: it is only valid until the next :meth:`load`.

    Example:
        >>> loader = CheckpointLoader(dtype="auto")
        >>> for ref in History.from_dir(ckpts):  # booted once, then weights copied in
        ...     live = loader.load(ref)
        ...     print(ref.label, live is loader.model)
        pretrain True
        align True
        finetune/seed_0/step_1 True
        finetune/seed_0/step_2 True
        finetune/seed_1/step_1 True
        finetune/seed_1/step_2 True
    """

    def __init__(
        self,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = "auto",
        device_map: Any = None,
        base: str | os.PathLike | None = None,
    ):
        _check_placement(device, device_map)
        resolve_dtype(dtype)
        self.device, self.dtype, self.device_map, self.base = device, dtype, device_map, base
        self.model: Any = None
        self._key: str | None = None
        self._live: dict[str, torch.Tensor] | None = None
        self.boots = 0
        self.swaps = 0

    def load(self, source: Any):
        """The model of ``source`` (see :func:`load_checkpoint`), reusing the live model when possible."""
        if isinstance(source, CheckpointRef):
            try:
                return self._load(source.source)
            except CheckpointError as err:
                raise CheckpointError(f"[{source.label}] {err}") from err
        return self._load(source)

    def _load(self, source: Any):
        if hasattr(source, "run_with_cache") and hasattr(source, "cfg"):
            return load_checkpoint(source, self.device, self.dtype)
        if not isinstance(source, (str, os.PathLike)):
            raise CheckpointError(
                f"cannot load a checkpoint from {type(source).__name__}: give a TransformerBridge, a revlens "
                "checkpoint folder, a local Hugging Face model folder or a LoRA adapter folder."
            )
        spec = _describe(Path(source), self.dtype, self.base)
        if spec.kind == "revlens" and self.device_map is not None:
            raise CheckpointError(
                f"device_map applies to Hugging Face folders; {spec.folder} is a TL-native "
                "revlens checkpoint: load it on one device with device=."
            )
        if self.model is not None and spec.swap_key == self._key:
            try:
                swapped = self._swap(spec)
            except BaseException:
                self.model = self._live = self._key = None  # possibly half-copied: never reuse it
                raise
            if swapped:
                self.swaps += 1
                return self.model
        self.model = self._live = self._key = None  # at most one model in memory
        if spec.kind == "revlens":
            self.model = _boot_revlens(spec, self.device)
            self._live = self.model.state_dict(keep_vars=True)
        else:
            self.model, self._live = _boot_hf(spec, self.device, self.device_map)
        self._key = spec.swap_key
        self.boots += 1
        return self.model

    def _swap(self, spec: _Spec) -> bool:
        """Copy ``spec``'s weights into the live model; False (nothing changed) when they do not fit it."""
        assert self._live is not None
        if spec.kind == "adapter":
            merged = _from_pretrained(spec, "cpu" if self.device_map is not None else self.device, None).state_dict()
            return _copy_into(self._live, merged.items(), check_only=True) and _copy_into(
                self._live, merged.items(), check_only=False
            )
        names = _weight_names(spec.files)
        if not _copy_into(self._live, names, check_only=True):
            return False
        if spec.kind == "revlens":
            state = dict(_read_weights(spec.files, _device_of(self.model)))
            _check_shapes(state, self._live, f"{spec.folder}/{spec.files[0].name}")
            self.model.load_state_dict(state)
            return True
        return _copy_into(self._live, _read_weights(spec.files, _device_of(self.model)), check_only=False)


def _device_of(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _weight_names(files: Sequence[Path]) -> list[tuple[str, torch.Tensor]]:
    """(name, meta tensor of the stored shape) for every tensor in the weight files, without reading data."""
    out = []
    for path in files:
        if path.suffix == ".safetensors":
            for key, entry in _safetensors_header(path).items():
                if key != "__metadata__":
                    out.append((key, torch.empty(entry["shape"], device="meta")))
        else:
            out.extend(_load_pickled_weights(path, "meta").items())
    return out


def _copy_into(live: Mapping[str, torch.Tensor], tensors: Any, *, check_only: bool) -> bool:
    """Copy named tensors into ``live`` in place. With ``check_only``, only check that they cover every
    live tensor (tied tensors once) with matching shapes and nothing more."""
    if any(t.device.type == "meta" for t in live.values()):
        return False  # offloaded by accelerate: no storage to copy into
    covered: set[int] = set()
    with torch.no_grad():
        for name, value in tensors:
            target = live.get(name)
            if target is None or target.shape != value.shape:
                return False
            covered.add(id(target))
            if not check_only:
                target.copy_(value)
    return all(id(t) in covered or _aliased(t, live, covered) for t in live.values())


def _aliased(tensor: torch.Tensor, live: Mapping[str, torch.Tensor], covered: set[int]) -> bool:
    """True when ``tensor`` shares storage with a covered tensor (tied embeddings)."""
    if tensor.device.type == "meta":
        return False
    ptr = tensor.data_ptr()
    return any(id(t) in covered and t.data_ptr() == ptr for t in live.values())


@dataclass(frozen=True)
class CheckpointRef:
    """A checkpoint named by its place in the history; loaded only when asked."""

    phase: str
    source: Any
    run: str | None = None
    step: int | None = None

    @property
    def label(self) -> str:
        if self.phase == "finetune":
            return f"finetune/{self.run}/step_{self.step}"
        return self.phase

    def load(
        self,
        device: str | None = None,
        dtype: str | torch.dtype | None = "auto",
        device_map: Any = None,
        base: str | os.PathLike | None = None,
    ):
        """Load this checkpoint (see :func:`load_checkpoint`); errors name the checkpoint."""
        try:
            return load_checkpoint(self.source, device, dtype, device_map, base)
        except CheckpointError as err:
            raise CheckpointError(f"[{self.label}] {err}") from err


def _is_checkpoint_dir(path: Path) -> bool:
    return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()


# Folders a run holds that are known not to be checkpoints: revlens.finetune's resume state, TensorBoard logs.
_NOT_CHECKPOINTS = {"state", "runs"}


def _read_run(run_dir: Path, *, warn_all: bool = True) -> dict[int, Path]:
    """The ``step_<N>/`` and ``checkpoint-<N>/`` folders of one run; warns on every other folder skipped
    (but the known ``state/`` and ``runs/``) and refuses two folders with one step number."""
    steps: dict[int, Path] = {}
    for path in sorted(run_dir.iterdir()):
        m = _STEP_DIR.match(path.name)
        reason = None
        if path.is_symlink() and not path.exists():
            reason = f"a broken symlink (to {os.readlink(path)})"
        elif not path.is_dir():
            continue
        elif m is None:
            if not warn_all or path.name in _NOT_CHECKPOINTS:
                continue
            reason = "its name is not step_<N> or checkpoint-<N> with an integer N"
        elif not _is_checkpoint_dir(path):
            reason = "it has no config.json (or adapter_config.json for a LoRA adapter)"
        if reason is not None:
            warnings.warn(f"skipping {path}: {reason}.", RuntimeWarning, stacklevel=3)
            continue
        step = int(m.group(1))
        if step in steps:
            raise CheckpointError(
                f"{steps[step].name} and {path.name} in {run_dir} are both step {step}; keep one of them "
                "(rename or remove the other)."
            )
        steps[step] = path
    return dict(sorted(steps.items()))


@dataclass
class History:
    """A training history: the pretrain witness, the aligned model, and fine-tuning runs.

    ``finetune`` maps a run name (a seed) to ``{step: checkpoint}``. When ``pretrain`` or
    ``align`` has several checkpoints, the last is the phase's representative. ``base`` is the
    base model folder for LoRA adapter checkpoints whose own ``base_model_name_or_path`` is not
    a local folder.
    """

    pretrain: CheckpointRef
    align: CheckpointRef
    finetune: dict[str, dict[int, CheckpointRef]] = field(default_factory=dict)
    base: str | os.PathLike | None = None

    @property
    def runs(self) -> list[str]:
        return list(self.finetune)

    @property
    def steps(self) -> list[int]:
        return sorted({s for steps in self.finetune.values() for s in steps})

    def __iter__(self) -> Iterator[CheckpointRef]:
        yield self.pretrain
        yield self.align
        for run in self.finetune.values():
            yield from (run[s] for s in sorted(run))

    def __len__(self) -> int:
        return 2 + sum(len(r) for r in self.finetune.values())

    def loader(
        self, device: str | None = None, dtype: str | torch.dtype | None = "auto", device_map: Any = None
    ) -> CheckpointLoader:
        """A :class:`CheckpointLoader` for this history's checkpoints (with its ``base``)."""
        return CheckpointLoader(device, dtype, device_map, self.base)

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any], base: str | os.PathLike | None = None) -> History:
        """Build from ``{"pretrain": src, "align": src, "finetune": {run: {step: src}}}``."""
        for phase in PHASES:
            if phase not in spec or spec[phase] is None:
                raise CheckpointError(
                    f"the history has no {phase!r} phase; give "
                    '{"pretrain": src, "align": src, "finetune": {run: {step: src}}}.'
                )
        pretrain, align = spec["pretrain"], spec["align"]
        if isinstance(pretrain, (list, tuple)):
            pretrain = pretrain[-1]
        if isinstance(align, (list, tuple)):
            align = align[-1]
        finetune = spec["finetune"]
        if not isinstance(finetune, Mapping) or not finetune:
            raise CheckpointError("the 'finetune' phase is empty; give {run_name: {step: checkpoint}}.")
        runs: dict[str, dict[int, CheckpointRef]] = {}
        for run, steps in finetune.items():
            if not isinstance(steps, Mapping) or not steps:
                raise CheckpointError(f"fine-tuning run {run!r} has no checkpoints; give {{step: checkpoint}}.")
            runs[str(run)] = {int(s): CheckpointRef("finetune", src, str(run), int(s)) for s, src in steps.items()}
        return cls(CheckpointRef("pretrain", pretrain), CheckpointRef("align", align), runs, base)

    @classmethod
    def from_dir(cls, root: str | os.PathLike, base: str | os.PathLike | None = None) -> History:
        """Read the layout ``pretrain/``, ``align/``, ``finetune/<run>/step_<N>/``.

        Hugging Face Trainer output is read too: ``finetune/<run>/checkpoint-<N>/`` is step N. Every
        folder skipped under ``finetune/`` is named in a RuntimeWarning; two folders with one step
        number (``step_5`` and ``step_05``, or ``step_5`` and ``checkpoint-5``) are refused.

        Example:
            >>> history = History.from_dir(ckpts)  # LoRA adapters on a remote base: base="models/Llama-3.2-1B"
            >>> history.runs, history.steps, len(history)
            (['seed_0', 'seed_1'], [1, 2], 6)
        """
        root = Path(root)
        if not root.exists():
            raise CheckpointError(f"history folder {root} does not exist.")
        if not root.is_dir():
            raise CheckpointError(f"history path {root} is not a folder.")
        for phase in PHASES:
            if not (root / phase).is_dir():
                raise CheckpointError(
                    f"{root} has no {phase}/ folder; expected pretrain/, align/ and "
                    "finetune/<run>/step_<N>/ (or checkpoint-<N>/, as the Hugging Face Trainer writes)."
                )
        finetune: dict[str, dict[int, Path]] = {}
        for run_dir in sorted((root / "finetune").iterdir()):
            if run_dir.is_symlink() and not run_dir.exists():
                warnings.warn(f"skipping {run_dir}: a broken symlink.", RuntimeWarning, stacklevel=2)
                continue
            if not run_dir.is_dir():
                continue
            steps = _read_run(run_dir)
            if steps:
                finetune[run_dir.name] = steps
            else:
                warnings.warn(
                    f"skipping {run_dir}: it holds no step_<N>/ or checkpoint-<N>/ checkpoint.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        if not finetune:
            raise CheckpointError(f"{root}/finetune/ holds no <run>/step_<N>/ (or checkpoint-<N>/) checkpoint folders.")
        return cls.from_dict({"pretrain": root / "pretrain", "align": root / "align", "finetune": finetune}, base)

    @classmethod
    def from_trainer(
        cls,
        output_dir: str | os.PathLike,
        *,
        pretrain: Any,
        align: Any,
        run: str | None = None,
        base: str | os.PathLike | None = None,
    ) -> History:
        """A history whose one fine-tuning run is a Hugging Face Trainer ``output_dir``.

        Its ``checkpoint-<N>/`` folders (full weights or LoRA adapters) are the steps; only model
        weights are read (never optimizer.pt, rng_state.pth or training_args.bin).

        Args:
            output_dir: the Trainer's output folder.
            pretrain, align: the base (pretrained) model and its aligned (instruct) model.
            run: the run's name (default: the output folder's name).
            base: base model folder for adapters whose ``base_model_name_or_path`` is not local.

        Example:
            >>> _ = save_checkpoint(model, tmp / "trainer" / "sft" / "checkpoint-5")  # as the Trainer saves
            >>> history = History.from_trainer(tmp / "trainer" / "sft", pretrain=f"{ckpts}/pretrain",
            ...                                align=f"{ckpts}/align")
            >>> history.runs, history.steps
            (['sft'], [5])
        """
        output_dir = Path(output_dir)
        if not output_dir.is_dir():
            raise CheckpointError(f"Trainer output folder {output_dir} does not exist or is not a folder.")
        steps = _read_run(output_dir, warn_all=False)
        if not steps:
            raise CheckpointError(
                f"{output_dir} holds no checkpoint-<N>/ folders; train with save_strategy='steps' "
                "(or 'epoch') so the Trainer writes them."
            )
        return cls.from_dict({"pretrain": pretrain, "align": align, "finetune": {run or output_dir.name: steps}}, base)

    @classmethod
    def coerce(cls, ckpts: Any, base: str | os.PathLike | None = None) -> History:
        """Accept a History, a folder in the standard layout, or a dict spec."""
        if isinstance(ckpts, History):
            return ckpts
        if isinstance(ckpts, (str, os.PathLike)):
            return cls.from_dir(ckpts, base)
        if isinstance(ckpts, Mapping):
            return cls.from_dict(ckpts, base)
        raise CheckpointError(
            f"cannot read a training history from {type(ckpts).__name__}: give a History, a folder "
            "laid out as pretrain/ align/ finetune/<run>/step_<N>/, or a dict."
        )


def check_same_architecture(reference: Any, model: Any, label: str, reference_label: str = "align") -> None:
    """Raise when ``model`` differs from ``reference`` in d_model or n_layers."""
    for attr in ("d_model", "n_layers"):
        a, b = getattr(reference.cfg, attr), getattr(model.cfg, attr)
        if a != b:
            raise CheckpointError(
                f"checkpoint {label} has {attr}={b} but {reference_label} has {attr}={a}: every "
                "checkpoint of a history must share one architecture."
            )
