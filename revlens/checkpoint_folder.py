"""What a checkpoint folder is, resolved without booting a model: a :class:`CheckpointSpec`.

:func:`describe_checkpoint` reads a folder's ``config.json`` (or ``adapter_config.json``), finds and checks its weight
files (:mod:`revlens.checkpoint_format`), its dtype and its tokenizer folder, and gives the key that decides whether
a later checkpoint's weights can be copied into a live model of this one. A LoRA adapter's config is refused unless
it accounts for every saved LoRA weight (its ``target_modules`` and ranks), and its base folder is found.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from revlens.checkpoint_format import (
    CheckpointError,
    check_weight_files,
    first_line,
    hf_weight_files,
    read_json,
    resolve_dtype,
    shard_keys,
    stored_dtype,
    weight_shapes,
)

# The folder names of a run's steps: revlens' step_<N>, the Hugging Face Trainer's checkpoint-<N>.
STEP_DIR = re.compile(r"^(?:step_|checkpoint-)(\d+)$")


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


def _read_config(folder: Path) -> dict[str, Any]:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(
            f"{folder} has no config.json: it is neither a revlens checkpoint "
            "(save one with revlens.save_checkpoint), a Hugging Face model folder (save_pretrained) "
            "nor a PEFT adapter folder (adapter_config.json)."
        )
    return read_json(cfg_path)


def _has_tokenizer(folder: Path) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    return any((folder / n).exists() for n in names)


# Files that hold a tokenizer's vocabulary (tokenizer_config.json and special_tokens_map.json do not).
_VOCAB_PATTERNS = ("tokenizer.json", "vocab.json", "vocab.txt", "*.model", "*.tiktoken")


def _has_vocabulary(folder: Path) -> bool:
    return any(next(folder.glob(pattern), None) is not None for pattern in _VOCAB_PATTERNS)


def load_tokenizer(folder: Path):
    """The tokenizer saved in ``folder``, offline; CheckpointError naming the folder when its files are missing
    (no vocabulary beside ``tokenizer_config.json``: a Trainer checkpoint) or unreadable."""
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
        raise CheckpointError(
            f"the tokenizer files in {folder} cannot be loaded ({first_line(err)}); save the tokenizer again with "
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


@dataclass(frozen=True)
class CheckpointSpec:
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
    config = read_json(path)
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
    for key in shard_keys(weights):
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
    for name, tensor in weight_shapes([weights]):
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


def describe_checkpoint(
    folder: Path, dtype: str | torch.dtype | None, base: str | os.PathLike | None
) -> CheckpointSpec:
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
        check_weight_files(files[:1])
        _check_adapter_targets(folder / "adapter_config.json", adapter_config, files[0])
        _check_adapter_ranks(folder / "adapter_config.json", adapter_config, files[0])
        base_folder = _adapter_base(folder, adapter_config, base)
        base_spec = describe_checkpoint(base_folder, dtype, None)
        if base_spec.kind != "hf":
            raise CheckpointError(f"the base {base_folder} of the adapter {folder} is not a Hugging Face model folder.")
        tok = folder if _has_tokenizer(folder) else base_spec.tokenizer_folder
        return CheckpointSpec("adapter", folder, tuple(files[:1]), base_spec.dtype, tok, base_spec.config, base_folder)
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
        counts = check_weight_files(files)
        return CheckpointSpec(
            "revlens",
            folder,
            tuple(files),
            wanted or stored_dtype(counts, {}),
            folder if _has_tokenizer(folder) else None,
            dict(config["bridge_config"]),
        )
    if "model_type" not in config:
        raise CheckpointError(
            f"{folder}/config.json has neither model_type (a Hugging Face model folder) nor revlens_format "
            "and bridge_config (a revlens checkpoint); re-save it with save_pretrained() or revlens.save_checkpoint."
        )
    files = hf_weight_files(folder)
    counts = check_weight_files(files)
    tok = folder
    if not _has_tokenizer(folder) and STEP_DIR.match(folder.name) and _has_tokenizer(folder.parent):
        tok = folder.parent  # a Trainer checkpoint-N without tokenizer files: the output_dir's tokenizer
    return CheckpointSpec("hf", folder, tuple(files), wanted or stored_dtype(counts, config), tok, config)
