"""Runtime of the chat-model pipeline (`revlens demo --preset smollm2`, or any `--preset` / `--model`): per phase,
written to benchmarks/results/.

python benchmarks/smollm2_demo.py --quick --cold          # the first run, nothing kept; target: <= 10 min on 2 cores
python benchmarks/smollm2_demo.py --quick --fresh-align   # the model's conversion kept, align trained in the run
python benchmarks/smollm2_demo.py                         # full: 3 seeds x 100 steps, full blocking list
python benchmarks/smollm2_demo.py --quick --model DIR_OR_GGUF [--preset qwen2.5-coder-0.5b]  # another model
python benchmarks/smollm2_demo.py --preset smollm2-unlearn --quick --fresh-align  # the unlearning setting, cold;
                                                          # targets: <= 15 min (--quick), <= 75 min (full) on 2 cores

``--out`` must be empty (a resumed run would time only what was left). Refusal training (align) is kept
once beside the converted model and shared by every run with the same align settings; the result records
whether this run trained it (``align_trained``) and how long it took, so the figure with and without it
can both be read. ``history_s.finetune_runs`` is the wall-clock of every seed's training and evaluations
(side by side on ``workers`` processes); ``job_s`` the seconds of each seed's jobs.
``--fresh-align`` deletes the kept shallow phase of the preset's kind (refusal training, or unlearning) first,
leaving the other kind's; ``--cold`` also deletes the model's conversion from its offline source (GGUF), so nothing
is kept, as on a fresh checkout, and writes ``<stem>_cold.json`` (``smollm2_demo_quick_cold.json``) beside the
other result files. ``calibration`` records how align's checks were scored and, for the
teacher-forced score, how often it agreed with the generated answers. An unlearning run (``--preset
smollm2-unlearn``, file ``smollm2_unlearn_demo[_quick].json``) also records what it measured, for
docs/results/unlearning.md: recall as shipped, unlearned and along fine-tuning (95% Wilson intervals), the
alignment at the best layer per step with the nulls' p99, and the blocking rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from revlens import ReversionReport, conversion_folder
from revlens.demos.chat_model.pipeline import ALIGN_RECORD, MANIFEST, run_chat_model
from revlens.demos.chat_model.recipe import PRESETS

ALIGNED = Path("revlens_out/models/aligned")
STEMS = {"smollm2": "smollm2_demo", "smollm2-unlearn": "smollm2_unlearn_demo"}


def delete_kept_phase(phase: str) -> None:
    """Delete the kept shallow phases of ``phase``'s kind under revlens_out/models/aligned (a refusal run's record
    names no phase)."""
    for record in ALIGNED.glob(f"*/{ALIGN_RECORD}"):
        kept = json.loads(record.read_text())["settings"]["settings"].get("phase", "refusal")
        if kept == phase:
            shutil.rmtree(record.parent)


def delete_conversion(source: str) -> None:
    """Delete the converted HF folder of an offline source name or a ``.gguf`` file (a user's HF folder is never
    touched: it is not a conversion)."""
    folder = conversion_folder(source)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def measured(report, manifest: dict) -> dict:
    """What a run measured: the tracked behaviour (an unlearning run's recall, a refusal run's harm and harmless
    answers) as shipped, after the shallow phase and at the end, along fine-tuning; the shallow phase's record; the
    alignment trajectory at the best layer with the nulls; the selection test; the blocking rows; the paper table."""
    li = report.best_layer_index()
    b = report.behaviour
    unlearning = "forget_recall" in b
    kind, phase = ("recall", "unlearn") if unlearning else ("behaviour", "align")
    tracked = ("forget_recall", "retain_recall") if unlearning else ("harm", "refused_exact", "harmless_answered")
    return {
        kind: {k: {p: b[k][p] for p in ("pretrain", "align", "final")} for k in tracked},
        f"{kind}_along": b["along"],
        phase: {k: v for k, v in manifest["align"].items() if k not in ("losses", "folder")},
        "best_layer": report.best_layer,
        "steps": report.steps,
        "alignment_best_layer": {run: report.alignment[r, :, li].tolist() for r, run in enumerate(report.runs)},
        "null_p99": {"isotropic": float(report.null_p99[li]), "activation": float(report.null_p99_activation[li])},
        "pairs_above_p99": {k: list(report.exceedance(li, k)) for k in ("isotropic", "activation")},
        "selection": report.selection().to_dict(),
        "blocking": report.interventions,
        "paper_comparison": report.config["paper_comparison"],
    }


def run_summary(report: ReversionReport, out: Path, wall: float) -> dict[str, Any]:
    """A finished run's timings (per phase, per history step, per job), align's steps and calibration, and the
    machine (``benchmarks/gpu_real_model.py`` records the same)."""
    manifest = json.loads((out / MANIFEST).read_text())
    history = manifest["timings_s"]
    align_trained = not report.config["demo"]["align"].get("reused", False)
    return {
        "quick": report.config["demo"]["quick"],
        "wall_s": wall,
        "phases_s": report.config["demo"]["timings_s"],
        "history_s": {
            "pretrain_eval": history.get("pretrain_eval"),
            "align": history.get("align"),
            "finetune_runs": history.get("finetune_runs"),
        },
        "job_s": {run: r["seconds"] for run, r in manifest["finetune"].items()},
        "align_trained": align_trained,
        "wall_without_align_training_s": wall - (history.get("align", 0.0) if align_trained else 0.0),
        "align_steps": manifest["align"]["trained_steps"],
        "calibration": manifest["align"].get("calibration", {"method": "generate"}),
        "model": report.config["demo"]["model"],
        "threads": torch.get_num_threads(),
        "workers": report.config["demo"]["workers"],
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_after": os.getloadavg(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--preset", default=None, help="a chat-model preset (default smollm2 without --model)")
    p.add_argument("--model", default=None, help="an HF chat-model folder or a .gguf file")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the main process")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: one per core, at most 4)")
    p.add_argument("--fresh-align", action="store_true", help="delete the kept align first")
    p.add_argument(
        "--cold", action="store_true", help="delete the kept align and the model's conversion first (nothing kept)"
    )
    p.add_argument(
        "--retabulate",
        action="store_true",
        help="a run finished in --out (resumed since after a change to its tables, or made with `revlens demo`): "
        "read what it measured into the result file, keeping the timings already there",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.preset or (Path(args.model).stem if args.model else "smollm2")
    out = Path(args.out or f"revlens_out/bench-{name}{'-quick' if args.quick else ''}")
    stem = STEMS.get(name, f"chat_model_demo_{name}")
    path = Path("benchmarks/results") / f"{stem}{'_quick' if args.quick else ''}{'_cold' if args.cold else ''}.json"
    if args.retabulate:
        report = ReversionReport.load(out)
        if path.is_file():
            result = json.loads(path.read_text())
        else:  # a run made with `revlens demo` (e.g. with its own --modes): its own phase timings, not this script's
            result = run_summary(report, out, report.config["demo"]["timings_s"]["total"])
            result["wall_from"] = "the run's own timings_s (a `revlens demo` run, not timed by this script)"
            for unknown in ("threads", "load_average_after"):  # this process's, not the run's
                result[unknown] = None
            result["phase"] = report.config["demo"]["phase"]
        result["measured"] = measured(report, json.loads((out / MANIFEST).read_text()))
        path.write_text(json.dumps(result, indent=1))
        print(f"{path}: measured read again from {out}")
        return
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty: a benchmark times a whole run; delete it or pass another --out.")
    if args.fresh_align or args.cold:
        delete_kept_phase(PRESETS[args.preset].recipe.phase if args.preset else "refusal")
    if args.cold:
        delete_conversion(args.model or PRESETS[args.preset or "smollm2"].source)
    t0 = time.perf_counter()
    report = run_chat_model(
        out, model=args.model, preset=args.preset, quick=args.quick, progress=True, workers=args.workers
    )
    wall = time.perf_counter() - t0
    result = run_summary(report, out, wall)
    result["phase"] = report.config["demo"]["phase"]
    result["cold"] = args.cold  # nothing kept: the conversion and the shallow phase ran in this run
    manifest = json.loads((out / MANIFEST).read_text())
    if result["phase"] == "unlearn":
        result["calibration"] = {"method": manifest["align"]["method"], "targets": manifest["align"]["targets"]}
    result["measured"] = measured(report, manifest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
