"""The chat-model pipeline's default worker count: as many processes as fit in the available memory at
``worker_memory_bytes`` each, an estimate that must cover one training process of each real model (its measured
peak), so a 24 GiB machine trains Qwen2.5-Coder-0.5B in one process and SmolLM2 in two."""

from __future__ import annotations

from revlens import default_workers
from revlens.demos.chat_model.pipeline import worker_memory_bytes

GiB = 2**30
# Measured: the converted folders' model.safetensors (float32) and the peak resident memory of one training
# process: Qwen, one align-like step at batch 8 (benchmarks/results/qwen_align_step_cpu.json); SmolLM2, its
# blocked runs (the largest jobs, worker_memory_bytes' docstring).
QWEN = {"weights": 2_520_702_368, "peak": 13.8 * GiB}
SMOLLM2 = {"weights": 538_090_408, "peak": 4.6e9}
IDLE_24_GIB = 22 * GiB  # available on a 24 GiB machine with nothing else running


def model_folder(tmp_path, name: str, weights: int):
    folder = tmp_path / name
    folder.mkdir()
    with open(folder / "model.safetensors", "wb") as f:
        f.truncate(weights)  # sparse: the estimate reads the file's size only
    return folder


def test_each_worker_is_budgeted_at_least_its_models_training_peak(tmp_path):
    for name, model in (("qwen", QWEN), ("smollm2", SMOLLM2)):
        assert worker_memory_bytes(model_folder(tmp_path, name, model["weights"])) >= model["peak"], name


def test_a_24_gib_machine_runs_one_qwen_worker_and_two_smollm2_workers(tmp_path):
    qwen = worker_memory_bytes(model_folder(tmp_path, "qwen", QWEN["weights"]))
    smollm2 = worker_memory_bytes(model_folder(tmp_path, "smollm2", SMOLLM2["weights"]))
    assert default_workers(cores=2, bytes_per_worker=qwen, available_bytes=IDLE_24_GIB) == 1
    assert 2 * QWEN["peak"] > IDLE_24_GIB  # two Qwen training processes would not fit
    assert default_workers(cores=2, bytes_per_worker=smollm2, available_bytes=IDLE_24_GIB) == 2
