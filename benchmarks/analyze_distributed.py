"""`revlens analyze` over a 40-checkpoint history with 1 and 2 processes (``torchrun``, gloo on CPU).

Writes a history of a small Llama-shaped Hugging Face model (pretrain, align, 2 runs x 19 steps = 40
checkpoints, float32), then runs, alternating, ``--repeats`` times each:
- ``torchrun --standalone --nproc-per-node N benchmarks/analyze_distributed.py --worker ...`` for N in
  1, 2, every process at one torch thread (``OMP_NUM_THREADS=1``, ``threads=1``), each with an empty cache;
and records the wall time and per-rank CPU time of ``revlens.analyze(..., distributed=True)`` inside the
job (from a barrier before the call to the report on rank 0: booting the model, measuring, the barrier,
assembling the report from the cache), the wall time of the whole job (interpreter start, imports,
rendezvous), the load average around each run, and checks that the reports of 1 and 2 processes are
identical. Target: speed-up >= 1.6x with 2 processes. The busiest rank's CPU time gives the speed-up that
idle cores would show when the machine is shared.

    .venv/bin/python benchmarks/analyze_distributed.py [--hidden 256 --layers 4] [--repeats 3] [--nproc 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def write_history(root: Path, hidden: int, layers: int, runs: int, steps: int) -> int:
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_models import chat_tokenizer

    tok = chat_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 32),
        num_key_value_heads=max(1, hidden // 32),
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    folders = [root / "pretrain", root / "align"] + [
        root / "finetune" / f"seed_{r}" / f"step_{s}" for r in range(runs) for s in range(1, steps + 1)
    ]
    for folder in folders:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def worker(args: argparse.Namespace) -> None:
    """One rank: time analyze(distributed=True); rank 0 writes the timing and the report."""
    import torch

    import revlens
    from revlens import distributed
    from revlens.checkpoint_loader import bridge_classes

    torch.set_num_threads(1)
    bridge_classes()  # import TransformerLens before the clock starts: a per-process cost, counted in job_s
    ctx = distributed.init()
    distributed.barrier(ctx)
    start, cpu = time.perf_counter(), time.process_time()
    report = revlens.analyze(
        args.worker, cache_dir=Path(args.out) / "cache", threads=1, progress=False, distributed=True
    )
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    cpus = distributed.gather_objects(cpu, ctx)
    if ctx.is_main:
        report.save(args.out)
        (Path(args.out) / "timing.json").write_text(
            json.dumps({"analyze_s": elapsed, "cpu_s": cpus, "world_size": ctx.world_size})
        )
    distributed.shutdown()


def load_average() -> float:
    return os.getloadavg()[0]


def run_job(hist: Path, out: Path, nproc: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(Path(__file__).resolve()),
        "--worker",
        str(hist),
        "--out",
        str(out),
    ]
    load_before = load_average()
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    job = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{proc.stderr[-4000:]}")
    timing = json.loads((out / "timing.json").read_text())
    return {
        "nproc": nproc,
        "analyze_s": round(timing["analyze_s"], 2),
        "job_s": round(job, 2),
        "analyze_cpu_s_per_rank": [round(c, 2) for c in timing["cpu_s"]],
        "load_before": round(load_before, 2),
        "load_after": round(load_average(), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=19)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from revlens.report import ReversionReport

    from _results import environment, write_result

    with tempfile.TemporaryDirectory() as tmp:
        hist = Path(tmp) / "history"
        n_params = write_history(hist, args.hidden, args.layers, args.runs, args.steps)
        n_ckpts = 2 + args.runs * args.steps
        runs: list[dict] = []
        reports = {}
        for _ in range(args.repeats):
            for nproc in (1, args.nproc):
                out = Path(tmp) / f"out_{nproc}"
                runs.append(run_job(hist, out, nproc))
                print(json.dumps(runs[-1]), flush=True)
                reports[nproc] = ReversionReport.load(out)
        identical = all(
            np.array_equal(getattr(reports[1], f), getattr(reports[args.nproc], f), equal_nan=True)
            for f in ("alignment", "drift_norm", "per_example_cos", "null_p99_activation")
        )

    def best(nproc: int, key: str) -> float:
        return min(r[key] for r in runs if r["nproc"] == nproc)

    def median(nproc: int, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["nproc"] == nproc)

    result = {
        "benchmark": "analyze_distributed",
        "environment": environment("cpu"),
        "cores": os.cpu_count(),
        "model": {
            "arch": "LlamaForCausalLM",
            "hidden": args.hidden,
            "layers": args.layers,
            "params": n_params,
            "dtype": "float32",
        },
        "checkpoints": n_ckpts,
        "prompts": 40,
        "threads_per_process": 1,
        "nproc": args.nproc,
        "runs": runs,
        "analyze_s_best": {"1": best(1, "analyze_s"), str(args.nproc): best(args.nproc, "analyze_s")},
        "job_s_best": {"1": best(1, "job_s"), str(args.nproc): best(args.nproc, "job_s")},
        "speedup_analyze_best": round(best(1, "analyze_s") / best(args.nproc, "analyze_s"), 2),
        "speedup_analyze_median": round(median(1, "analyze_s") / median(args.nproc, "analyze_s"), 2),
        "speedup_job_best": round(best(1, "job_s") / best(args.nproc, "job_s"), 2),
        # CPU seconds on the critical path (the busiest rank): what the speed-up would be on idle cores
        "speedup_cpu_critical_path_median": round(
            statistics.median(r["analyze_cpu_s_per_rank"][0] for r in runs if r["nproc"] == 1)
            / statistics.median(max(r["analyze_cpu_s_per_rank"]) for r in runs if r["nproc"] == args.nproc),
            2,
        ),
        "reports_identical": bool(identical),
        "note": "machine shared with other jobs; load_before/load_after are the 1-minute load averages",
    }
    write_result("analyze_distributed" + (f"_{args.tag}" if args.tag else ""), "cpu", result)


if __name__ == "__main__":
    main()
