"""The demos' one blocking comparison (:func:`compare_blocking`) and what it is made of: how a blocked run's final
alignment is read (:class:`FinalAlignment`), the order the runs go in, the mode that blocks v_rev at little cost,
the relative cost of a blocked step, and the table of modes (the organism's metric names, or plain words for a real
chat model). Each demo passes in what is its own: how a blocked run trains and what it measures."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from revlens import (
    BlockingSpec,
    JobPool,
    ReversionProbe,
    ReversionReport,
    alignment,
    drift,
    fmt_pm,
    roundoff_floor,
)

TASK_LOSS_TOLERANCE = 0.05  # a blocking mode "costs little" if its task loss is within 5% of plain's


@dataclass(frozen=True)
class FinalAlignment:
    """A model's alignment with v_rev read exactly as the report reads it: the report's probe (and control)
    prompts at its layers, its v_rev basis, the aligned model's centroid and the round-off floor (a drift within
    float round-off of zero has no direction: NaN, as in :func:`revlens.analyze`); ``model -> float`` at the
    report's most aligned layer. Picklable: worker processes receive it whole.

    Build it with :meth:`of`; both demos' blocking comparisons and the defenses comparison read final alignment
    with it.
    """

    probe: ReversionProbe
    mu_align: torch.Tensor
    basis: torch.Tensor
    floor: torch.Tensor
    layers: tuple[int, ...]
    layer_index: int

    @classmethod
    def of(cls, report: ReversionReport, probe: ReversionProbe, align: Any) -> FinalAlignment:
        """``probe`` reads the report's prompts (and control) at ``report.layers`` (``per_example=False``);
        ``align`` is the aligned model, read once here."""
        measured = probe.measure(align)
        return cls(
            probe,
            measured.centroid,
            report.v_rev_basis.double(),
            roundoff_floor(measured.probe_centroid),
            tuple(report.layers),
            report.best_layer_index(),
        )

    @property
    def layer(self) -> int:
        """The layer read: the report's most aligned one."""
        return self.layers[self.layer_index]

    def per_layer(self, model: Any) -> np.ndarray:
        """Alignment at every one of the report's layers."""
        return alignment(drift(self.probe.centroid(model), self.mu_align), self.basis, self.floor).numpy()

    def __call__(self, model: Any) -> float:
        return float(self.per_layer(model)[self.layer_index])


Row = Mapping[str, float]
# ``run(measure, mode, seed) -> row``: one blocked fine-tuning run of a demo and its row of the table.
BlockedRun = Callable[[FinalAlignment, str, int], Row]


def compare_blocking(
    report: ReversionReport,
    modes: Sequence[str],
    seeds: Sequence[int],
    measure: FinalAlignment,
    run: BlockedRun,
    *,
    done: Mapping[tuple[str, int], Row] | None = None,
    record: Callable[[tuple[str, int], Row], None] | None = None,
    mode_of: Callable[[str], str] = lambda label: label,
    workers: int = 1,
    threads: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune once per mode and seed with that mode's blocking, and tabulate the rows: the demos' one blocking
    comparison.

    The demo passes in what is its own. ``run(measure, mode, seed)`` trains one blocked run from the aligned model
    and returns its row: ``final_alignment`` (``measure(model)``, evaluated without hooks), ``harmfulness``,
    ``task_loss`` and the demo's other metrics. ``done`` holds rows that are not run again (the organism's plain
    rows from its history, a resumed run's finished rows); ``record`` sees each new row as it arrives (a resumable
    manifest). The runs go dearest first (:func:`costliest_first`, a label's mode being ``mode_of(label)``) on
    ``workers`` processes with ``threads`` torch threads each (default: the cores shared out); ``run`` and
    ``measure`` travel to each worker once, so both must pickle. The rows do not depend on ``workers``.

    Returns:
        :func:`blocking_summary` of the rows: ``{"modes", "seeds", "metrics", "best_mode"}``.
    """
    from tqdm.auto import tqdm

    rows = dict(done or {})
    jobs = costliest_first([(m, s) for m in modes for s in seeds if (m, s) not in rows], mode_of)
    if workers > 1 and len(jobs) > 1:
        pool = JobPool(min(workers, len(jobs)), threads=threads, initializer=_worker_init, initargs=(run, measure))
        job: Callable[[str, int], Row] = _worker_run
    else:
        pool, job = JobPool(1), functools.partial(run, measure)
    with pool:
        for mode, seed in jobs:
            pool.submit((mode, seed), job, mode, seed)
        for key, row in tqdm(pool.results(), total=len(jobs), desc="blocking", unit="run", disable=not progress):
            rows[key] = row
            if record is not None:
                record(key, row)
    return blocking_summary(rows, modes, seeds, report)


_WORKER: dict[str, Any] = {}


def _worker_init(run: BlockedRun, measure: FinalAlignment) -> None:
    _WORKER.update(run=run, measure=measure)


def _worker_run(mode: str, seed: int) -> Row:
    return _WORKER["run"](_WORKER["measure"], mode, seed)


def costliest_first(jobs: Sequence[tuple[str, int]], mode_of: Any = lambda label: label) -> list[tuple[str, int]]:
    """``(label, seed)`` jobs ordered by :func:`mode_cost` of their mode (``mode_of(label)``), the dearest first,
    so parallel workers finish together; ``plain`` rows last (they usually train nothing)."""
    return sorted(jobs, key=lambda job: 0.0 if job[0] == "plain" else -mode_cost(mode_of(job[0])))


def blocking_summary(
    rows: Mapping[tuple[str, int], Mapping[str, float]],
    modes: Sequence[str],
    seeds: Sequence[int],
    report: ReversionReport,
) -> dict[str, Any]:
    """A blocking comparison's table from its rows (``(mode, seed) -> {metric: value}``): ``{"modes", "seeds",
    "metrics": {mode: {metric: [per seed]}}, "best_mode"}``, the best mode judged against the null's p99 at the
    report's most aligned layer (:func:`best_mode`)."""
    metrics = {m: {k: [rows[(m, s)][k] for s in seeds] for k in (rows[(m, seeds[0])] if seeds else ())} for m in modes}
    return {
        "modes": list(modes),
        "seeds": list(seeds),
        "metrics": metrics,
        "best_mode": best_mode(metrics, alignment_limit=float(report.null_p99[report.best_layer_index()])),
    }


def split_label(label: str) -> tuple[str, str]:
    """``"grad@best"`` -> ("grad", "best"); a label without an ``@best`` / ``@all`` suffix acts at every analysed
    layer: (label, "all")."""
    mode, _, where = label.rpartition("@")
    if where in ("best", "all") and mode:
        return mode, where
    return label, "all"


def blocks_v_rev(label: str) -> bool:
    """Whether a blocking label acts along v_rev (or its rank-k reversion subspace) with hooks or an anchor.

    The controls (``random@K``, ``harmpca@K``), the refusal direction, the full-rank anchor and the other defenses
    (``kl``, ``replay``, ``safelora``) do not, so none of them may stand as "v_rev blocked" in the paper's table,
    however well it does. A label that is not a blocking string (a caller's own name) counts as blocking v_rev.
    A ``@best`` / ``@all`` suffix (where the chat model's pipeline blocks) is read past.

    Example:
        >>> blocks_v_rev("anchor@0.0001+contrast@0.001+rank@32+sample@8"), blocks_v_rev("grad@best")
        (True, True)
        >>> blocks_v_rev("anchor@0.0001+random@32"), blocks_v_rev("kl@1+sample@8"), blocks_v_rev("plain")
        (False, False, False)
    """
    mode = split_label(label)[0]
    if mode == "plain":
        return False
    try:
        spec = BlockingSpec.parse(mode)
    except ValueError:
        return True
    if spec.subspace is not None and spec.subspace[0] != "rank":
        return False
    return bool(spec.hooks or spec.anchor or spec.contrast)


def best_mode(
    metrics: dict[str, dict[str, list[float]]],
    tolerance: float = TASK_LOSS_TOLERANCE,
    alignment_limit: float | None = None,
) -> str | None:
    """The v_rev-blocking mode (:func:`blocks_v_rev`: never a control or another defense) with the lowest mean
    harmfulness among those whose mean task loss is within
    ``tolerance`` of plain fine-tuning's (all blocked modes if none is, or without a plain row) and, given
    ``alignment_limit`` (the null's p99), whose mean final alignment is below it (if any is): the mode
    that blocks v_rev at little cost. Ties go to the lower final alignment. With a plain row, a mode must
    leave less harm than plain fine-tuning to count: None when no mode does (nothing is "best")."""
    blocked = [m for m in metrics if blocks_v_rev(m)]
    if "plain" in metrics:
        plain_harm = round(float(np.mean(metrics["plain"]["harmfulness"])), 9)
        blocked = [m for m in blocked if round(float(np.mean(metrics[m]["harmfulness"])), 9) < plain_harm]
        limit = (1 + tolerance) * np.mean(metrics["plain"]["task_loss"])
        blocked = [m for m in blocked if np.mean(metrics[m]["task_loss"]) <= limit] or blocked
    if alignment_limit is not None:
        blocked = [m for m in blocked if np.mean(metrics[m]["final_alignment"]) < alignment_limit] or blocked
    if not blocked:
        return None
    return min(
        blocked,
        key=lambda m: (
            round(float(np.mean(metrics[m]["harmfulness"])), 9),
            float(np.mean(metrics[m]["final_alignment"])),
        ),
    )


def intervention_table(interventions: dict[str, Any], labels: dict[str, str] | None = None) -> str:
    """Per mode: mean +/- std over seeds (the mean alone with one seed) of final alignment, harmfulness, task
    loss/accuracy (the organism's B2) and harmless prompts answered (its B1 retention); or, for a report that tracks
    other behaviours, those (``labels`` name them: forget recall, retain recall).

    ``labels`` renames the columns (:func:`table_labels` of the report); by default they are the metric names.
    """
    cols = ("final_alignment", "harmfulness", "task_loss", "task_accuracy", "b1_retention")
    names = {c: (labels or {}).get(c, c) for c in cols}
    w = max(12, *(len(m) + 2 for m in interventions["modes"]))
    head = f"{'mode':<{w}}" + "".join(f"{names[c]:>22}" for c in cols)
    lines = [
        f"blocking at layers {interventions['layers']}, seeds {interventions['seeds']} (T = fine-tuning steps)",
        head,
        "-" * len(head),
    ]
    for mode in interventions["modes"]:
        m = interventions["metrics"][mode]
        lines.append(f"{mode:<{w}}" + "".join(f"{fmt_pm(m[c], 3):>22}" for c in cols))
    lines.append(
        f"per seed {names['harmfulness']}: "
        + "; ".join(
            f"{mode}: {', '.join(f'{v:.2f}' for v in interventions['metrics'][mode]['harmfulness'])}"
            for mode in interventions["modes"]
        )
    )
    return "\n".join(lines)


def mode_cost(mode: str) -> float:
    """A blocked fine-tuning step's cost relative to a plain one (benchmarks/intervention_overhead.py): hooks
    add a few percent each, the anchor a forward and backward pass over the probe prompts, the contrast
    term one more over the control prompts."""
    spec = BlockingSpec.parse(mode)
    cost = 1.0 + 0.05 * len(spec.hooks)
    if spec.anchor or spec.contrast:
        cost += 1.0 + (1.1 if spec.contrast else 0.0)
    return cost
