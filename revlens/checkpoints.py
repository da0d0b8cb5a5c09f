"""Checkpoints and training histories: load every phase as a TransformerBridge, lazily, offline.

A checkpoint source is one of
- an in-memory ``TransformerBridge``;
- a revlens checkpoint folder (``config.json`` with ``"revlens_format"``, ``model.safetensors``,
  tokenizer files), written by :func:`save_checkpoint`;
- a local Hugging Face model folder (``config.json`` with ``model_type``, weights, tokenizer files),
  booted with ``TransformerBridge.boot_transformers`` and a tokenizer read from the same folder.

Weights are read with safetensors or ``torch.load(..., weights_only=True)``: never unpickled.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Union

import torch

from revlens._util import replace_dir, temp_sibling

REVLENS_FORMAT = 1
PHASES = ("pretrain", "align", "finetune")
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint or history that revlens cannot use, with the reason and the fix."""


def _bridge_classes():
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    import transformer_lens.model_bridge.sources.native  # noqa: F401  (attaches boot_native)

    return TransformerBridge, TransformerBridgeConfig


def boot_native_model(config: Mapping[str, Any], tokenizer: Any = None, device: str | None = None):
    """Build a randomly initialised TL-native TransformerBridge from a config dict."""
    TransformerBridge, TransformerBridgeConfig = _bridge_classes()
    cfg = TransformerBridgeConfig.from_dict(dict(config))
    return TransformerBridge.boot_native(cfg, tokenizer=tokenizer, device=device)


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


def save_checkpoint(model: Any, path: str | os.PathLike, *, metadata: Mapping[str, Any] | None = None,
                    base: str | os.PathLike | None = None) -> Path:
    """Write a TransformerBridge as a folder that :func:`load_checkpoint` (and other tools) read.

    - TL-native bridge: a revlens folder, ``config.json`` (the TransformerBridgeConfig plus
      ``revlens_format``), ``model.safetensors`` and the tokenizer's files;
    - Hugging Face-architecture bridge: a standard HF folder (``config.json``, ``model.safetensors`` in the
      model's dtype, tokenizer with its chat template) that ``AutoModelForCausalLM.from_pretrained`` loads;
    - peft-wrapped bridge (:func:`revlens.lora.apply_lora`): a LoRA adapter folder (``adapter_config.json``,
      ``adapter_model.safetensors``) whose ``base_model_name_or_path`` is ``base`` (default: the local folder
      the model was loaded from).
    Files are written to a temporary folder and renamed into place, so an interrupted save never leaves a
    half-written checkpoint. ``metadata`` is recorded in revlens folders only.

    Example:
        >>> save_checkpoint(model, "ckpts/finetune/seed_0/step_100")  # doctest: +SKIP
    """
    path = Path(path)
    tmp = temp_sibling(path)
    tmp.mkdir(parents=True)
    try:
        _write_checkpoint(model, tmp, metadata, base)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return replace_dir(tmp, path)


def _write_checkpoint(model: Any, folder: Path, metadata: Mapping[str, Any] | None,
                      base: str | os.PathLike | None) -> None:
    from safetensors.torch import save_file

    from revlens import hf_writer
    from revlens.lora import is_peft_wrapped

    architecture = getattr(model.cfg, "architecture", None)
    if architecture not in (None, "TransformerLensNative"):
        if getattr(model, "original_model", None) is None:
            raise CheckpointError(f"cannot save a bridge of architecture {architecture!r} without its "
                                  "original_model (the Hugging Face module).")
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


def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    names = {p.name for p in folder.iterdir()}
    if not names & {"tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model"}:
        raise CheckpointError(
            f"{folder} has no tokenizer files (tokenizer.json / tokenizer_config.json / vocab.json): "
            "revlens loads offline and will not fetch one from a hub. Save the tokenizer into the "
            "folder with tokenizer.save_pretrained(folder)."
        )
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def _read_config(folder: Path) -> dict[str, Any]:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(
            f"{folder} has no config.json: it is neither a revlens checkpoint "
            "(save one with revlens.save_checkpoint) nor a Hugging Face model folder."
        )
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({err}); re-save the checkpoint.") from err


def _load_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    st = folder / "model.safetensors"
    if st.is_file():
        try:
            return load_file(str(st))
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(
                f"{st} is corrupt or truncated ({err}); re-save the checkpoint."
            ) from err
    pt = folder / "model.pt"
    if pt.is_file():
        return torch.load(str(pt), map_location="cpu", weights_only=True)
    raise CheckpointError(f"{folder} has no model.safetensors; re-save it with revlens.save_checkpoint.")


def load_revlens_checkpoint(folder: str | os.PathLike, device: str | None = None):
    """Load a folder written by :func:`save_checkpoint` as a TransformerBridge."""
    folder = Path(folder)
    config = _read_config(folder)
    if "revlens_format" not in config:
        raise CheckpointError(f"{folder}/config.json is not a revlens checkpoint config.")
    tokenizer = _load_tokenizer(folder) if _has_tokenizer(folder) else None
    state = _load_state(folder)
    model = boot_native_model(config["bridge_config"], tokenizer=tokenizer)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{folder}/model.safetensors does not match its config.json "
            f"(missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}); re-save the checkpoint."
        )
    return move_quietly(model, device).eval()


def move_quietly(model: Any, device: str | torch.device | None):
    """Move a model to ``device`` only when it is elsewhere (TransformerLens prints on every move)."""
    if device is None:
        return model
    current = next(model.parameters()).device
    if torch.device(device) != current and not (torch.device(device).type == current.type and torch.device(device).index is None):
        model.to(device)
    return model


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / n).exists() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))


def load_hf_folder(folder: str | os.PathLike, device: str | None = None, dtype: torch.dtype = torch.float32):
    """Boot a local Hugging Face model folder offline, with the tokenizer saved in it."""
    TransformerBridge, _ = _bridge_classes()
    folder = Path(folder)
    config = _read_config(folder)
    if "model_type" not in config:
        raise CheckpointError(f"{folder}/config.json has no model_type: not a Hugging Face model folder.")
    has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))
    if not has_weights:
        raise CheckpointError(f"{folder} has no weight files (*.safetensors); save the model with save_pretrained().")
    for st in folder.glob("*.safetensors"):
        _check_safetensors_header(st)
    tokenizer = _load_tokenizer(folder)
    model = TransformerBridge.boot_transformers(str(folder), tokenizer=tokenizer, device=device, dtype=dtype)
    return model.eval()


def _check_safetensors_header(path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as err:
        raise CheckpointError(f"{path} is corrupt or truncated ({err}); re-save the model.") from err


def load_checkpoint(source: Any, device: str | None = None):
    """Load one checkpoint source (bridge, revlens folder or HF folder) as a TransformerBridge."""
    if hasattr(source, "run_with_cache") and hasattr(source, "cfg"):
        return move_quietly(source, device)
    if isinstance(source, CheckpointRef):
        return source.load(device)
    if not isinstance(source, (str, os.PathLike)):
        raise CheckpointError(
            f"cannot load a checkpoint from {type(source).__name__}: give a TransformerBridge, "
            "a revlens checkpoint folder or a local Hugging Face model folder."
        )
    folder = Path(source)
    if not folder.exists():
        raise CheckpointError(f"checkpoint path {folder} does not exist.")
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint path {folder} is a file; give the folder that holds config.json.")
    config = _read_config(folder)
    if "revlens_format" in config:
        return load_revlens_checkpoint(folder, device)
    return load_hf_folder(folder, device)


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

    def load(self, device: str | None = None):
        try:
            return load_checkpoint(self.source, device)
        except CheckpointError as err:
            raise CheckpointError(f"[{self.label}] {err}") from err


Source = Union[str, os.PathLike, Any]


@dataclass
class History:
    """A training history: the pretrain witness, the aligned model, and fine-tuning runs.

    ``finetune`` maps a run name (a seed) to ``{step: checkpoint}``. When ``pretrain`` or
    ``align`` has several checkpoints, the last is the phase's representative.
    """

    pretrain: CheckpointRef
    align: CheckpointRef
    finetune: dict[str, dict[int, CheckpointRef]] = field(default_factory=dict)

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

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> "History":
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
            runs[str(run)] = {
                int(s): CheckpointRef("finetune", src, str(run), int(s)) for s, src in steps.items()
            }
        return cls(CheckpointRef("pretrain", pretrain), CheckpointRef("align", align), runs)

    @classmethod
    def from_dir(cls, root: str | os.PathLike) -> "History":
        """Read the layout ``pretrain/``, ``align/``, ``finetune/<run>/step_<N>/``."""
        root = Path(root)
        if not root.exists():
            raise CheckpointError(f"history folder {root} does not exist.")
        if not root.is_dir():
            raise CheckpointError(f"history path {root} is not a folder.")
        for phase in PHASES:
            if not (root / phase).is_dir():
                raise CheckpointError(
                    f"{root} has no {phase}/ folder; expected pretrain/, align/ and "
                    "finetune/<run>/step_<N>/ (revlens demo writes this layout)."
                )
        finetune: dict[str, dict[int, Path]] = {}
        for run_dir in sorted(p for p in (root / "finetune").iterdir() if p.is_dir()):
            steps = {}
            for step_dir in run_dir.iterdir():
                m = _STEP_DIR.match(step_dir.name)
                if m and step_dir.is_dir() and (step_dir / "config.json").is_file():
                    steps[int(m.group(1))] = step_dir
            if steps:
                finetune[run_dir.name] = dict(sorted(steps.items()))
        if not finetune:
            raise CheckpointError(f"{root}/finetune/ holds no <run>/step_<N>/ checkpoint folders.")
        return cls.from_dict({"pretrain": root / "pretrain", "align": root / "align", "finetune": finetune})

    @classmethod
    def coerce(cls, ckpts: Any) -> "History":
        """Accept a History, a folder in the standard layout, or a dict spec."""
        if isinstance(ckpts, History):
            return ckpts
        if isinstance(ckpts, (str, os.PathLike)):
            return cls.from_dir(ckpts)
        if isinstance(ckpts, Mapping):
            return cls.from_dict(ckpts)
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
