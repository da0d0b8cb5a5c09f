"""Runtime and result of the defenses comparison (`revlens demo --preset smollm2 --compare defenses`).

python benchmarks/smollm2_defenses.py --quick           # target: <= 20 min on 2 CPU cores once align is kept
python benchmarks/smollm2_defenses.py                   # full: 3 seeds, 3 strengths per method; target <= 2 h
python benchmarks/smollm2_defenses.py --from OUT [--quick]   # collect a finished run of the command above
python benchmarks/smollm2_defenses.py --from OUT --versus MODE  # every mode paired against MODE instead of plain

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
from revlens.defenses import defense_rows
from revlens.demos.chat_model.pipeline import LEGACY_MANIFEST, MANIFEST, Settings, run_chat_model
from revlens.report import ReversionReport


def read_manifest(out: Path) -> dict:
    """The run's manifest, under its name before the pipeline was generic (``smollm2.json``) too."""
    path = out / MANIFEST if (out / MANIFEST).is_file() else out / LEGACY_MANIFEST
    return json.loads(path.read_text())


def collect(out: Path, quick: bool, wall: float | None) -> dict:
    manifest = read_manifest(out)
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


def versus_table(out: Path, reference: str, harm_set: str = "harmbench") -> str:
    """Each mode against ``reference`` on the same (seed, prompt) pairs: rate differences and exact McNemar p."""
    runs: dict[str, dict[int, dict]] = {}
    for key, run in read_manifest(out)["defenses"]["runs"].items():
        mode, seed = key.rsplit("|", 1)
        runs.setdefault(mode, {})[int(seed)] = run
    if reference not in runs:
        raise SystemExit(f"no runs of {reference!r} in {out}; modes: {sorted(runs)}")
    lines = [
        f"| mode | {harm_set} harm - reference | p | harmless answered - reference | p |",
        "|---|---|---|---|---|",
    ]
    rows = {r["mode"]: r for r in defense_rows(runs, baseline=reference)}
    for mode, row in rows.items():
        if mode == reference:
            continue
        cells = [f"`{mode}`"]
        for name in (harm_set, "harmless"):
            diff = row["sets"][name]["rate"] - rows[reference]["sets"][name]["rate"]
            mark = "" if row["sets"][name]["significant"] else " (n.s.)"
            cells += [f"{100 * diff:+.1f} pts", f"{row['sets'][name]['p_vs_plain']:.2g}{mark}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--from", dest="source", default=None, help="a finished run's folder: collect it, run nothing")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--table", action="store_true", help="print the markdown table of the result file and exit")
    p.add_argument("--versus", default=None, help="with --from: pair every mode against this mode and exit")
    args = p.parse_args()
    path = Path("benchmarks/results") / f"smollm2_defenses{'_quick' if args.quick else ''}.json"
    if args.table:
        print(defense_table(json.loads(path.read_text())["defenses"]))
        return
    if args.versus:
        if args.source is None:
            raise SystemExit("--versus reads a finished run: give it with --from OUT")
        print(versus_table(Path(args.source), args.versus))
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
