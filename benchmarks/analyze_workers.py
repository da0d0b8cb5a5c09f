"""``revlens.analyze`` on one process against ``workers=N`` worker processes (``revlens.jobpool.JobPool``).

The SmolLM2 demo's history (pretrain, align, 3 seeds x 8 checkpoints of SmolLM2-135M-Instruct, float32):
the demo's probe (45 harmful requests in the chat template, contrast with 45 harmless ones, all 30 layers,
last token of ``resid_post``), each variant on a fresh cache. The reports must agree (alignment to 1e-6:
another thread count sums in another order). Writes benchmarks/results/analyze_workers_cpu.json.

    .venv/bin/python benchmarks/analyze_workers.py [--history revlens_out/bench-smollm2/history] [--workers 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from _results import environment, write_result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--history", default="revlens_out/bench-smollm2/history")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()

    from revlens import analyze
    from revlens.demos.chat_model.data import PromptSets
    from revlens.demos.chat_model.hf_io import HFBridge
    from revlens.demos.chat_model.pipeline import _Context, probe_sets

    history = Path(args.history)
    if not (history / "align" / "config.json").is_file():
        raise SystemExit(f"{history} is not a SmolLM2 demo history: run `revlens demo --preset smollm2` first.")
    ctx = _Context(history.parent, history / "pretrain", None, PromptSets.load())
    harmful, harmless = probe_sets(ctx, HFBridge(history / "align").tokenizer)
    result = {"environment": environment("cpu"), "history": str(history), "variants": {}}
    reports = {}
    for workers in (1, args.workers):
        with tempfile.TemporaryDirectory() as cache, warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            t0 = time.perf_counter()
            reports[workers] = analyze(
                history, harmful, control=harmless, cache_dir=cache, workers=workers, progress=False
            )
            result["variants"][f"workers={workers}"] = {"seconds": time.perf_counter() - t0}
    one, many = reports[1], reports[args.workers]
    result["checkpoints"] = 2 + len(one.runs) * len(one.steps)
    result["max_alignment_difference"] = float(np.nanmax(np.abs(one.alignment - many.alignment)))
    assert result["max_alignment_difference"] < 1e-6, "the reports disagree"
    result["speedup"] = (
        result["variants"]["workers=1"]["seconds"] / result["variants"][f"workers={args.workers}"]["seconds"]
    )
    write_result("analyze_workers", "cpu", result)


if __name__ == "__main__":
    main()
