"""benchmarks/smollm2_demo.py's ``--cold``: it deletes the model's conversion (for a source name or a GGUF file)
and never a user's own HF folder."""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import smollm2_demo  # noqa: E402

from revlens import MODEL_SOURCES  # noqa: E402


def _folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def test_cold_deletes_a_source_conversion_and_a_gguf_conversion_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = MODEL_SOURCES["smollm2"]
    converted = _folder(tmp_path / source.folder)
    other = _folder(tmp_path / MODEL_SOURCES["qwen2.5-coder-0.5b"].folder)
    smollm2_demo.delete_conversion("smollm2")
    assert not converted.exists() and other.exists()

    gguf = tmp_path / "Mine-Q4.gguf"
    gguf.write_bytes(b"GGUF")
    from_gguf = _folder(tmp_path / "revlens_out" / "models" / "mine-q4")
    smollm2_demo.delete_conversion(str(gguf))
    assert not from_gguf.exists() and gguf.exists() and other.exists()

    own = _folder(tmp_path / "my_model")
    smollm2_demo.delete_conversion(str(own))
    assert own.exists()
