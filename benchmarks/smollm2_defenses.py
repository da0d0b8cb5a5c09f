"""Runtime and result of the defenses comparison (`revlens demo --preset smollm2 --compare defenses`).

python benchmarks/smollm2_defenses.py --quick           # target: <= 20 min on 2 CPU cores once align is kept
python benchmarks/smollm2_defenses.py                   # full: 3 seeds, 3 strengths per method; target <= 2 h
python benchmarks/smollm2_defenses.py --from OUT [--quick]   # collect a finished run of the command above

Writes ``benchmarks/results/smollm2_defenses[_quick].json``: the phases' wall-clock seconds (``demo_timings_s``
of the run's manifest: model conversion, history with align, analysis, the comparison), each (mode, seed) job's
seconds, the machine, and the comparison's rows (rates with 95% Wilson intervals and McNemar p-values against
plain), so the README and docs tables can be regenerated from it (``--table``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from revlens.defense_table import defense_table
from revlens.demos.chat_model.pipeline import MANIFEST, Settings, run_chat_model
from revlens.report import ReversionReport


def collect(out: Path, quick: bool, wall: float | None) -> dict:
    manifest = json.loads((out / MANIFEST).read_text())
    report = ReversionReport.load(out)
    defenses = report.config["defenses"]
    runs = manifest["defenses"]["runs"]
    return {
        "quick": quick,
        "out": str(out),
        "wall_s": wall,
        "phases_s": manifest.get("demo_timings_s"),
        "history_s": manifest.get("timings_s"),
        "align_reused": manifest.get("align", {}).get("reused"),
        "job_s": {key: run.get("seconds") for key, run in runs.items()},
        "phase_job_s": {p: r.get("seconds") for p, r in manifest["defenses"]["phases"].items()},
        "workers": report.config["demo"]["workers"],
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "defenses": defenses,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--from", dest="source", default=None, help="a finished run's folder: collect it, run nothing")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--table", action="store_true", help="print the markdown table of the result file and exit")
    args = p.parse_args()
    path = Path("benchmarks/results") / f"smollm2_defenses{'_quick' if args.quick else ''}.json"
    if args.table:
        print(defense_table(json.loads(path.read_text())["defenses"]))
        return
    wall = None
    if args.source is None:
        out = Path(args.out or f"revlens_out/bench-defenses{'-quick' if args.quick else ''}")
        if out.exists() and any(out.iterdir()):
            raise SystemExit(f"{out} is not empty: a benchmark times a whole run; delete it or pass another --out.")
        t0 = time.perf_counter()
        settings = replace(Settings.quick() if args.quick else Settings(), modes=())  # as the CLI's --compare
        run_chat_model(
            out,
            preset="smollm2",
            quick=args.quick,
            settings=settings,
            progress=True,
            workers=args.workers,
            compare="defenses",
        )
        wall = time.perf_counter() - t0
    else:
        out = Path(args.source)
    result = collect(out, args.quick, wall)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(defense_table(result["defenses"]))
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
