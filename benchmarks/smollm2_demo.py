"""Runtime of the SmolLM2 demo (`revlens demo --preset smollm2`): per phase, written to benchmarks/results/.

python benchmarks/smollm2_demo.py --quick            # target: <= 10 min on 2 CPU cores
python benchmarks/smollm2_demo.py                    # full: 3 seeds x 100 steps, full blocking list
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from revlens.smollm2.pipeline import run_smollm2_demo


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or f"revlens_out/bench-smollm2{'-quick' if args.quick else ''}")
    t0 = time.perf_counter()
    report = run_smollm2_demo(out, quick=args.quick)
    result = {
        "quick": args.quick,
        "wall_s": time.perf_counter() - t0,
        "phases_s": report.config["demo"]["timings_s"],
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "note": "phases are skipped when their output exists: run on an empty --out for a cold figure",
    }
    path = Path("benchmarks/results") / f"smollm2_demo{'_quick' if args.quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
