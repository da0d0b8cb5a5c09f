"""`revlens demo --preset tiny`: train (or reuse) the organism, analyze it, compare blocking modes, print the
paper's table.

Three stages, each announced with a time estimate and shown with a progress bar: history (train or reuse
the organism), analysis (measure drift along v_rev), blocking (fine-tune again per mode and seed).
"""

from __future__ import annotations

import functools
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from revlens import (
    BlockingSpec,
    ReversionProbe,
    ReversionReport,
    analyze,
    comparison_rows,
    comparison_table,
    default_workers,
    fmt_pm,
    load_revlens_checkpoint,
)
from revlens.demos.comparison import FinalAlignment, compare_blocking, intervention_table, mode_cost
from revlens.demos.organism import World, analysis_kwargs, behaviour_summary, build_history
from revlens.demos.organism.presets import Preset, get_preset
from revlens.demos.organism.train import blocked_finetune, preset_of, read_manifest

ALL_MODES = (
    "plain",
    "project",
    "clamp",
    "grad",
    "clamp+grad",
    "anchor@0.1",
    "contrast@1",
    "anchor@0.1+contrast@1",
    "anchor@0.003+rank@64",
    "anchor@0.003+contrast@0.1+rank@64",
)
# The modes that tell the story: no blocking, a hook mode (no effect on harm), the best anchor (cuts it).
DEFAULT_MODES = ("plain", "clamp", "anchor@0.003+contrast@0.1+rank@64")
MODE_SETS = {"all": ALL_MODES, "default": DEFAULT_MODES}


def final_alignment_reader(history_dir: Path, report: ReversionReport) -> FinalAlignment:
    """Final alignment as the report measures it on this organism: its probe, control and readout, at its layers."""
    kw = analysis_kwargs(World(seed=read_manifest(history_dir)["world_seed"]))
    probe = ReversionProbe(
        kw["prompts"], control=kw["control"], readout=kw["readout"], layers=list(report.layers), per_example=False
    )
    return FinalAlignment.of(report, probe, load_revlens_checkpoint(history_dir / "align"))


def _row(alignment: float, behaviour: dict[str, Any]) -> dict[str, float]:
    return {
        "final_alignment": alignment,
        "harmfulness": behaviour["harm"],
        "task_loss": behaviour["b2_loss"],
        "task_accuracy": behaviour["b2_acc"],
        "b1_retention": behaviour["b1_retention"],
    }


def _run(history_dir: Path, block: dict[int, Any], measure: FinalAlignment, mode: str, seed: int) -> dict[str, float]:
    """One blocked run of the organism and its row (a :data:`~revlens.demos.comparison.BlockedRun`)."""
    model, behaviour = blocked_finetune(history_dir, block, mode, seed)
    return _row(measure(model), behaviour)


def _history_plain_row(history_dir: Path, seed: int, measure: FinalAlignment) -> dict[str, float] | None:
    """The plain row of a seed from the history itself: its last fine-tuning checkpoint is the model a plain
    re-run produces (same data, seed and steps; tests/test_demo.py checks it), and its behaviour is recorded."""
    manifest = read_manifest(history_dir)
    steps = preset_of(manifest).finetune_steps
    run = manifest.get("finetune", {}).get(f"seed_{seed}", {})
    ckpt = history_dir / "finetune" / f"seed_{seed}" / f"step_{steps}"
    behaviour = run.get("behaviour", {}).get(str(steps))
    if not run.get("complete") or behaviour is None or not (ckpt / "config.json").is_file():
        return None
    return _row(measure(load_revlens_checkpoint(ckpt)), behaviour)


def organism_blocking(
    history_dir: Path,
    report: ReversionReport,
    modes: Sequence[str],
    seeds: Sequence[int],
    layers: Sequence[int] | None = None,
    progress: bool = True,
    *,
    workers: int = 1,
    reuse_plain: bool = True,
) -> dict[str, Any]:
    """The organism's blocking comparison (:func:`revlens.demos.comparison.compare_blocking`): fine-tune from the
    aligned model once per mode and seed; behaviour and final alignment, no hooks at eval.

    Final alignment is measured exactly as the report measures it (same probe, control and v_rev),
    at the report's most aligned layer.

    Args:
        history_dir, report: an organism history and its report (``analyze(history, **analysis_kwargs(world))``).
        modes, seeds: the runs, one per mode and seed (modes follow :class:`revlens.BlockingSpec`).
        layers: where hooks and anchors act (default: the report's most aligned layer).
        workers: processes that run the fine-tuning runs side by side (one torch thread each when > 1);
            the rows do not depend on it.
        reuse_plain: take the ``plain`` rows from the history's own fine-tuning runs (identical weights)
            instead of training them again.

    Returns:
        ``{"modes", "seeds", "layers", "metrics": {mode: {metric: [per seed]}}, "best_mode"}``.
    """
    history_dir = Path(history_dir)
    layers = [report.best_layer] if layers is None else list(layers)
    block = {l: report.v_rev_basis[report.layers.index(l)] for l in layers}
    measure = final_alignment_reader(history_dir, report)
    plain = {s: _history_plain_row(history_dir, s, measure) for s in seeds} if reuse_plain and "plain" in modes else {}
    summary = compare_blocking(
        report,
        modes,
        seeds,
        measure,
        functools.partial(_run, history_dir, block),
        done={("plain", s): row for s, row in plain.items() if row is not None},
        workers=workers,
        threads=1,  # the organism's operations are too small to split
        progress=progress,
    )
    return {**summary, "layers": layers}


def parse_modes(text: str) -> list[str]:
    """The ``--modes`` list: comma-separated modes (:meth:`revlens.BlockingSpec.parse`), where ``all``
    stands for :data:`ALL_MODES` (the README's full table) and ``default`` for :data:`DEFAULT_MODES`;
    duplicates are dropped, ``''`` is no blocking.

    Example:
        >>> parse_modes("default,anchor@0.003+random@64")
        ['plain', 'clamp', 'anchor@0.003+contrast@0.1+rank@64', 'anchor@0.003+random@64']
    """
    modes: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        for mode in MODE_SETS.get(part, (part,) if part else ()):
            BlockingSpec.parse(mode)  # a typo fails here, before any training
            if mode not in modes:
                modes.append(mode)
    return modes


# Seconds per training step (batch 32) of the tiny preset with one torch thread on this project's 2-core CPU
# machine (its CPU time, measured while another job shared the machine: about the wall time on an idle core),
# and the fixed cost per step in units of n_layers * d_model**2 (fitted on micro, tiny and small); the other
# costs are in steps of the same preset.
_TINY_STEP_S = 0.060
_STEP_OVERHEAD_UNITS = 19_000
_EVAL_STEPS = 6  # evaluate_behaviour: greedy answers to the held-out prompts
_MEASURE_STEPS = 3  # one checkpoint loaded and read by the probe
_ALIGN_FRACTION = 0.15  # the calibrated alignment phase stops early (tiny: 90 of 600 steps)
_WORKER_START_S = 5.0  # a worker process imports torch and TransformerLens


def _step_seconds(p: Preset) -> float:
    tiny = get_preset("tiny")

    def units(q: Preset) -> float:
        return (_STEP_OVERHEAD_UNITS + q.n_layers * q.d_model**2) * q.batch_size * q.n_ctx

    return _TINY_STEP_S * units(p) / units(tiny)


def estimate_seconds(
    preset: str | Preset, seeds: int, modes: Sequence[str], *, history_done: bool = False, workers: int = 1
) -> dict[str, float]:
    """Rough wall-clock seconds of each demo stage on idle CPU cores, one torch thread per process
    (``history``, ``analysis``, ``blocking``), as :func:`run_demo` runs them: the ``plain`` rows come from the
    history, the other runs are spread over ``workers`` processes (on at least that many cores).

    Calibrated on the tiny preset (README, "demo runtime"); other presets scale with the work per step.
    Meant for the announcement before each stage, not for decisions.

    Example:
        >>> est = estimate_seconds("tiny", 3, DEFAULT_MODES)
        >>> 60 < sum(est.values()) < 180
        True
    """
    p = get_preset(preset)
    step = _step_seconds(p)
    n_ckpt = 2 + seeds * len(p.save_steps)
    history = (
        0.0
        if history_done
        else step
        * (p.pretrain_steps + _ALIGN_FRACTION * p.align_max_steps + seeds * p.finetune_steps + _EVAL_STEPS * n_ckpt)
    )
    analysis = step * _MEASURE_STEPS * n_ckpt
    runs = [
        step
        * (
            p.finetune_steps * mode_cost(m)
            + _EVAL_STEPS
            + _MEASURE_STEPS
            + (2 * _MEASURE_STEPS if BlockingSpec.parse(m).subspace else 0)
        )
        for m in modes
        if m != "plain"
    ]
    parallel = max(1, min(workers, seeds * len(runs)))
    blocking = (
        seeds * sum(runs) / parallel + (max(runs) if parallel > 1 else 0.0) / 2 + _WORKER_START_S * (parallel > 1)
        if runs
        else 0.0
    ) + seeds * step * _MEASURE_STEPS * ("plain" in modes)
    return {"history": history, "analysis": analysis, "blocking": blocking}


def _fmt_seconds(seconds: float) -> str:
    seconds = max(1, round(seconds))
    return f"{seconds} s" if seconds < 90 else f"{seconds // 60} min {seconds % 60:02d} s"


def _announce(stage: int, name: str, what: str, seconds: float, progress: bool) -> None:
    if progress:
        print(f"[{stage}/3] {name}: {what}; about {_fmt_seconds(seconds)}", file=sys.stderr, flush=True)


def run_demo(
    preset: str = "tiny",
    seeds: int = 3,
    out: str | Path = "revlens_out/demo",
    *,
    modes: Sequence[str] = DEFAULT_MODES,
    block_layers: Sequence[int] | None = None,
    device: str | None = None,
    html: bool = True,
    progress: bool = True,
    workers: int | None = None,
) -> ReversionReport:
    """The whole pipeline on the organism; writes ``report.json`` (+ ``dashboard.html``) under ``out``.

    ``workers``: processes for the blocking runs (default: one per CPU core, at most 4; 1 on a GPU).

    Before each stage it prints (to stderr, with ``progress``) what the stage does and a time estimate
    (:func:`estimate_seconds`, rescaled by how fast the history trained when it did).

    Example:
        >>> report = run_demo("micro", seeds=2, out="demo_micro", modes=["plain", "clamp"])  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    out = Path(out)
    p = get_preset(preset)
    history_dir = out / "history"
    runs = read_manifest(history_dir).get("finetune", {})
    reused = all(runs.get(f"seed_{s}", {}).get("complete") for s in range(seeds))
    if workers is None:
        on_gpu = (device or p.device) != "cpu" and _cuda_available()
        workers = default_workers(on_gpu)
    est = estimate_seconds(p, seeds, modes, history_done=reused, workers=workers)
    t0 = time.perf_counter()
    _announce(
        1,
        "history",
        f"preset {p.name}, {seeds} fine-tuning seed(s) in {history_dir}" + (" (reused)" if reused else ""),
        est["history"],
        progress,
    )
    parts = [[]] + [[s] for s in range(seeds)]  # pretrain + align, then one fine-tuning run per seed
    for part in tqdm(parts, desc="[1/3] history", unit="part", disable=not progress):
        history = build_history(p, part, history_dir, device=device, progress=progress)
    t_build = time.perf_counter() - t0
    speed = min(4.0, max(0.25, t_build / est["history"])) if est["history"] > 10 else 1.0
    world = World(seed=read_manifest(history)["world_seed"])
    n_ckpt = 2 + seeds * len(p.save_steps)
    _announce(2, "analysis", f"{n_ckpt} checkpoints", speed * est["analysis"], progress)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        report = analyze(history, **analysis_kwargs(world), cache_dir=out / "cache", progress=progress)
    report.behaviour = behaviour_summary(history)
    t_analyze = time.perf_counter() - t0 - t_build
    if modes:
        layers = block_layers if block_layers is not None else preset_of(read_manifest(history)).block_layers
        layers = list(layers) if layers else list(report.layers)  # default: every analysed layer
        n_runs = (len(modes) - ("plain" in modes)) * seeds
        _announce(
            3,
            "blocking",
            f"{len(modes)} mode(s) x {seeds} seed(s): {n_runs} fine-tuning runs at layers "
            f"{layers} in {min(workers, max(n_runs, 1))} process(es)"
            + (", plain rows from the history" if "plain" in modes else ""),
            speed * est["blocking"],
            progress,
        )
        report.interventions = organism_blocking(
            history, report, modes, list(range(seeds)), layers, progress, workers=workers
        )
    report.config["demo"] = {
        "preset": p.name,
        "seeds": seeds,
        "modes": list(modes),
        "workers": workers,
        "timings_s": {
            "history": t_build,
            "analyze": t_analyze,
            "blocking": time.perf_counter() - t0 - t_build - t_analyze,
            "total": time.perf_counter() - t0,
        },
        "estimate_s": est,
    }
    report.config["paper_comparison"] = comparison_rows(report)
    report.save(out)
    if html:
        report.save_html(out / "dashboard.html")
    return report


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def print_demo(report: ReversionReport) -> None:
    b = report.behaviour or {}
    print(report.summary())
    print()
    if b:
        print("behaviour (exact judge, held-out prompts; final = after the last fine-tuning step):")
        for metric in ("harm", "harm_exact", "b1_retention", "b2_loss", "b2_acc"):
            row = b[metric]
            print(
                f"  {metric:<13} pretrain {row['pretrain'][0]:.3f}  align {row['align'][0]:.3f}  "
                f"final {fmt_pm(row['final'])}  per seed {[round(v, 3) for v in row['final']]}"
            )
        print(f"  alignment phase stopped after {b.get('align_steps')} steps (harm target)")
        print()
    if report.interventions:
        print(intervention_table(report.interventions))
        print()
    print(comparison_table(report))
