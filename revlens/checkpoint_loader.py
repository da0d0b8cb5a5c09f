"""Load checkpoints as TransformerBridges, offline: :func:`load_checkpoint` one at a time, a :class:`CheckpointLoader`
for many (booting only when the architecture changes), a :class:`CheckpointRef` for one named by its place in a
history.

A checkpoint source is one of
- an in-memory ``TransformerBridge``;
- a revlens checkpoint folder (``config.json`` with ``"revlens_format"``, ``model.safetensors``,
  tokenizer files), written by :func:`revlens.checkpoint_save.save_checkpoint`;
- a local Hugging Face model folder (``config.json`` with ``model_type``, single or sharded weights,
  tokenizer files), read with ``AutoModelForCausalLM.from_pretrained`` in its own dtype and wrapped by
  ``TransformerBridge.boot_transformers``;
- a PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``), merged onto its
  base model with peft (``pip install revlens[peft]``).

What a folder is comes from :mod:`revlens.checkpoint_folder`; its weights are read and checked by
:mod:`revlens.checkpoint_format` (never unpickled; NaN, inf and absurd values refused).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from revlens.checkpoint_folder import CheckpointSpec, describe_checkpoint, load_tokenizer
from revlens.checkpoint_format import (
    CheckpointError,
    check_weight_values,
    first_line,
    read_weights,
    resolve_dtype,
    weight_shapes,
)


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


def bridge_classes():
    """TransformerLens' ``TransformerBridge`` and ``TransformerBridgeConfig`` (importing them loads TransformerLens)."""
    import transformer_lens.model_bridge.sources.native  # noqa: F401  (attaches boot_native)
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge, TransformerBridgeConfig


def boot_native_model(
    config: Mapping[str, Any], tokenizer: Any = None, device: str | None = None, dtype: torch.dtype | None = None
):
    """Build a randomly initialised TL-native TransformerBridge from a config dict."""
    TransformerBridge, TransformerBridgeConfig = bridge_classes()
    cfg = TransformerBridgeConfig.from_dict(dict(config))
    return TransformerBridge.boot_native(cfg, tokenizer=tokenizer, device=device, dtype=dtype)


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


def _from_pretrained(spec: CheckpointSpec, device: str | torch.device | None, device_map: Any):
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
        raise CheckpointError(
            f"transformers could not load {folder} ({first_line(err)}); check that config.json matches the weights "
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


def _boot_hf(spec: CheckpointSpec, device: str | torch.device | None, device_map: Any):
    """Boot an HF or adapter spec; returns the bridge and the HF tensors by their saved names (for swaps)."""
    TransformerBridge, _ = bridge_classes()
    if device is None and device_map is None:
        from transformer_lens.utilities import get_device

        device = get_device()
    hf_model = _from_pretrained(spec, device, device_map)
    live = hf_model.state_dict(keep_vars=True)  # the bridge wraps these same tensors
    if spec.tokenizer_folder is None:
        raise CheckpointError(f"{spec.folder} has no tokenizer files; save the tokenizer into it.")
    tokenizer = load_tokenizer(spec.tokenizer_folder)
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


def _boot_revlens(spec: CheckpointSpec, device: str | torch.device | None):
    tokenizer = load_tokenizer(spec.tokenizer_folder) if spec.tokenizer_folder is not None else None
    state = dict(read_weights(spec.files))
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
    spec = describe_checkpoint(Path(folder), dtype, None)
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
    spec = describe_checkpoint(Path(folder), dtype, base)
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
        >>> for ref in revlens.History.from_dir(ckpts):  # booted once, then weights copied in
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
        spec = describe_checkpoint(Path(source), self.dtype, self.base)
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

    def _swap(self, spec: CheckpointSpec) -> bool:
        """Copy ``spec``'s weights into the live model; False (nothing changed) when they do not fit it."""
        assert self._live is not None
        if spec.kind == "adapter":
            merged = _from_pretrained(spec, "cpu" if self.device_map is not None else self.device, None).state_dict()
            return _copy_into(self._live, merged.items(), check_only=True) and _copy_into(
                self._live, merged.items(), check_only=False
            )
        names = weight_shapes(spec.files)
        if not _copy_into(self._live, names, check_only=True):
            return False
        if spec.kind == "revlens":
            state = dict(read_weights(spec.files, _device_of(self.model)))
            _check_shapes(state, self._live, f"{spec.folder}/{spec.files[0].name}")
            self.model.load_state_dict(state)
            return True
        return _copy_into(self._live, read_weights(spec.files, _device_of(self.model)), check_only=False)


def _device_of(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


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
