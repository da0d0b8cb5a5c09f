"""Where the chat-model pipeline gets its model: the one call site of the model conversion.

:func:`model_folder` takes what ``revlens demo --model`` / ``--preset`` name (a source name, a ``.gguf`` file or a
Hugging Face folder) and returns an HF folder through :func:`revlens.ensure_model` (the offline sources, pinned by
sha256, converted once).
"""

from __future__ import annotations

import os
from pathlib import Path

from revlens import MODEL_SOURCES, ModelNotFoundError, conversion_folder, ensure_model

SOURCES = tuple(MODEL_SOURCES)


def model_folder(source_or_path: str | os.PathLike) -> Path:
    """An HF model folder for a source name (``"smollm2"``, ``"qwen2.5-coder-0.5b"``), a ``.gguf`` file (converted
    once into ``revlens_out/models/<file stem>``) or an HF folder (used as it is).

    Raises:
        ModelNotFoundError: the source is not installed or not known, or the path does not exist (the message
            names the fix).
    """
    if not (isinstance(source_or_path, str) and source_or_path in SOURCES) and not Path(source_or_path).exists():
        raise ModelNotFoundError(
            f"{source_or_path} is neither a model source ({', '.join(SOURCES)}) nor an existing HF folder or .gguf "
            "file; give one of those."
        )
    return ensure_model(source_or_path)


def is_converted(source_or_path: str | os.PathLike) -> bool:
    """Whether :func:`model_folder` returns a converted copy (kept under ``revlens_out/models``, where align is kept
    beside it for every run) rather than the user's own folder."""
    return conversion_folder(source_or_path) is not None
