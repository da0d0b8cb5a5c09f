"""The paper's anchor table (Poppi & Lukas 2026, abstract) and our table beside it."""

from __future__ import annotations

import numpy as np

from revlens.metric_labels import metric_labels, tracked_behaviours
from revlens.report import ReversionReport, fmt_pm

# Quoted from the paper's abstract (SCIENCE.md, "The paper's headline numbers"): citations, not results.
PAPER = {
    "alignment_step1": "0.429 +/- 0.052",
    "alignment_step20": "0.647 +/- 0.021",
    "pairs_above_p99": "24 of 24",
    "final_alignment_plain": "0.648 +/- 0.009",
    "final_alignment_blocked": "-0.211 +/- 0.021",
    "harm_plain_to_blocked": "19.0% +/- 4.0% -> 8.5% +/- 1.5%",
    "task_cost": '"little"',
}


def _step_values(report: ReversionReport, step: int, layer_index: int) -> np.ndarray | None:
    if step not in report.steps:
        return None
    return report.alignment[:, report.steps.index(step), layer_index]


def ours(report: ReversionReport, blocked_mode: str | None = None) -> dict[str, str]:
    """Our measured value for each row of the anchor table (``n/a`` where not measured)."""
    li = report.best_layer_index()
    row: dict[str, str] = {}
    first = min(report.steps)
    a1 = _step_values(report, first, li)
    row["alignment_step1"] = fmt_pm(a1) + ("" if first == 1 else f" (step {first})")
    a20 = _step_values(report, 20, li)
    row["alignment_step20"] = "n/a" if a20 is None else fmt_pm(a20)
    above, pairs = report.exceedance(li, "isotropic")
    above_act, _ = report.exceedance(li, "activation")
    row["pairs_above_p99"] = f"{above} of {pairs} (activation-space null: {above_act} of {pairs})"
    last = max(report.steps)
    row["final_alignment_plain"] = fmt_pm(_step_values(report, last, li)) + ("" if last == 100 else f" (T={last})")
    row["final_alignment_blocked"] = "n/a"
    row["harm_plain_to_blocked"] = "n/a"
    row["task_cost"] = "n/a"
    iv = report.interventions
    if iv and blocked_mode is None:
        blocked_mode = iv.get("best_mode")
    if iv and blocked_mode and blocked_mode in iv.get("metrics", {}):
        plain, blocked = iv["metrics"]["plain"], iv["metrics"][blocked_mode]
        steps = iv.get("steps", 100)  # fine-tuning steps of the compared runs, named when not the paper's 100
        at = "" if steps == 100 else f"T={steps}"
        row["final_alignment_blocked"] = (
            f"{fmt_pm(blocked['final_alignment'])} ({', '.join(filter(None, [blocked_mode, at]))})"
        )
        row["harm_plain_to_blocked"] = (
            f"{fmt_pm(plain['harmfulness'], 1, 100, '%')} -> {fmt_pm(blocked['harmfulness'], 1, 100, '%')}"
            + (f" ({at})" if at else "")
        )
        pl, bl = np.asarray(plain["task_loss"], float), np.asarray(blocked["task_loss"], float)
        loss = metric_labels(report.config)["task_loss"]  # "task loss" (real model) or "B2 loss" (organism)
        row["task_cost"] = f"{loss} {fmt_pm(bl - pl, 4)} ({100 * (bl.mean() / pl.mean() - 1):+.1f}%)"
    elif report.behaviour and tracked_behaviours(report.config)["harmfulness"]["key"] in report.behaviour:
        harm = report.behaviour[tracked_behaviours(report.config)["harmfulness"]["key"]]
        row["harm_plain_to_blocked"] = f"plain: {fmt_pm(harm.get('final', []), 1, 100, '%')}; blocked: n/a"
    return row


LABELS = {
    "alignment_step1": "alignment after the first update",
    "alignment_step20": "alignment by step 20",
    "pairs_above_p99": "run-step pairs above the isotropic null's p99",
    "final_alignment_plain": "final alignment at T=100, plain fine-tuning",
    "final_alignment_blocked": "final alignment at T=100, v_rev blocked",
    "harm_plain_to_blocked": "harmfulness, plain -> blocked",
    "task_cost": "task cost of blocking",
}


def comparison_rows(report: ReversionReport, blocked_mode: str | None = None) -> list[dict[str, str]]:
    """Rows ``{quantity, paper, revlens}`` of the anchor table. The behaviour row names the behaviour the report
    tracks (:func:`revlens.metric_labels.tracked_behaviours`: harmfulness, or e.g. forget recall, beside the paper's
    harmfulness, which it then says)."""
    mine = ours(report, blocked_mode)
    tracked = metric_labels(report.config)["harmfulness"]
    labels = dict(LABELS, harm_plain_to_blocked=f"{tracked}, plain -> blocked")
    paper = dict(PAPER)
    if tracked != "harmfulness":
        paper["harm_plain_to_blocked"] += " (harmfulness)"
    return [{"quantity": labels[k], "paper": paper[k], "revlens": mine[k]} for k in PAPER]


def comparison_table(report: ReversionReport, blocked_mode: str | None = None) -> str:
    """The anchor table as aligned text: quantity | paper | revlens."""
    rows = comparison_rows(report, blocked_mode)
    w0 = max(len(r["quantity"]) for r in rows)
    w1 = max(len(r["paper"]) for r in rows)
    head = f"{'quantity':<{w0}} | {'paper':<{w1}} | revlens (layer L{report.best_layer})"
    lines = [head, "-" * len(head)]
    lines += [f"{r['quantity']:<{w0}} | {r['paper']:<{w1}} | {r['revlens']}" for r in rows]
    return "\n".join(lines)
