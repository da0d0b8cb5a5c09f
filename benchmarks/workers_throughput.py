"""One process with every core against ``revlens.jobpool.JobPool`` workers with the cores shared out.

The work of the SmolLM2 demo's jobs: fine-tuning steps (batch 8 of the word-reversal task in the chat
template, bf16 autocast, float32 weights, response-only logits, fused AdamW) and greedy answers to held-out
harmful requests (48 new tokens, KV cache). Each unit is timed in one process with ``cores`` torch threads
doing ``--units`` of it, then in ``cores`` worker processes of one thread each doing ``--units`` each at the
same time; throughput = units done per wall-clock second (model loading and warm-up step excluded).
Writes benchmarks/results/workers_throughput_cpu.json.

    .venv/bin/python benchmarks/workers_throughput.py [--units 4] [--random]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from _results import environment, write_result

MODEL_DIR = Path("revlens_out/models/smollm2-135m-instruct")


def _setup(folder: str) -> tuple:
    from revlens.demos.chat_model.data import sft_tensors
    from revlens.demos.chat_model.hf_io import HFBridge
    from revlens.demos.chat_model.tasks import benign_pairs
    from revlens.finetune import make_optimizer

    hb = HFBridge(folder)
    tokens, mask = sft_tensors(hb.tokenizer, benign_pairs(64, seed=10_000, tasks=("reverse",)))
    opt = make_optimizer([p for p in hb.bridge.parameters() if p.requires_grad], "adamw", 5e-5, 0.0)
    return hb, tokens, mask, opt


def _train_steps(hb, tokens, mask, opt, n: int, first: int = 0) -> None:
    from revlens.losses import model_lm_loss

    for i in range(first, first + n):
        rows = slice(8 * (i % 8), 8 * (i % 8) + 8)
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model_lm_loss(hb.bridge, tokens[rows], mask[rows])
        loss.backward()
        opt.step()


def _answers(hb, n: int) -> None:
    from revlens.demos.chat_model.behaviour import greedy_answers
    from revlens.demos.chat_model.data import PromptSets

    requests = PromptSets.load().harmful_of("heldout")[:16]
    model = hb.to_hf()
    for _ in range(n):
        greedy_answers(model, hb.tokenizer, requests, 48, 16)


def unit_job(folder: str, kind: str, units: int, start: float | None) -> dict[str, float]:
    """Load, warm up, wait for ``start`` (a shared wall-clock instant), then do ``units``; the timing."""
    hb, tokens, mask, opt = _setup(folder)
    _train_steps(hb, tokens, mask, opt, 1) if kind == "train" else _answers(hb, 1)
    if start is not None:
        time.sleep(max(0.0, start - time.time()))
    t0 = time.perf_counter()
    _train_steps(hb, tokens, mask, opt, units, first=1) if kind == "train" else _answers(hb, units)
    return {"seconds": time.perf_counter() - t0, "end": time.time()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--units", type=int, default=4, help="training steps / answer batches per process")
    p.add_argument("--random", action="store_true", help="a random Llama of SmolLM2's shape")
    args = p.parse_args()

    from generation import write_folder

    from revlens.jobpool import JobPool
    from revlens.threads import available_cores

    folder = write_folder(Path("/tmp/revlens_bench_workers") / "random", "random") if args.random else MODEL_DIR
    if not (folder / "model.safetensors").is_file():
        raise SystemExit(f"{folder} holds no converted model: run `revlens demo --preset smollm2 --quick` once.")
    cores = available_cores()
    torch.set_num_threads(cores)
    result = {"environment": environment("cpu"), "cores": cores, "units": args.units, "kinds": {}}
    for kind in ("train", "answers"):
        one = unit_job(str(folder), kind, args.units, None)["seconds"]
        with JobPool(cores, threads=1) as pool:
            start = time.time() + 60.0  # every worker loaded and warmed up by then
            for w in range(cores):
                pool.submit(w, unit_job, str(folder), kind, args.units, start)
            runs = dict(pool.results())
        wall = max(r["end"] for r in runs.values()) - start
        result["kinds"][kind] = {
            "one_process_s": one,
            "workers_wall_s": wall,
            "workers_each_s": [r["seconds"] for r in runs.values()],
            "speedup": cores * args.units / wall / (args.units / one),
        }
    write_result("workers_throughput", "cpu", result)


if __name__ == "__main__":
    main()
