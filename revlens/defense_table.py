"""The defenses comparison as text: one row per mode, rates with 95% Wilson intervals, paired tests against plain,
and the modes on the best harm-versus-task-cost trade-off (the Pareto front)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["TRADE_OFFS", "pareto_front", "trade_off_costs", "trade_off_fronts", "defense_table"]


def pareto_front(points: Mapping[str, Sequence[float]]) -> list[str]:
    """The names whose costs no other point beats in every one (<= in all, < in one); lower is better.

    Example:
        >>> pareto_front({"a": (0.1, 2.0), "b": (0.2, 1.0), "c": (0.3, 3.0)})
        ['a', 'b']
        >>> pareto_front({"a": (0.1, 2.0, 0.5), "b": (0.2, 1.0, 0.1), "c": (0.3, 3.0, 0.0)})
        ['a', 'b', 'c']
    """
    front = []
    for name, p in points.items():
        dominated = any(
            all(b <= a for a, b in zip(p, q)) and any(b < a for a, b in zip(p, q))
            for other, q in points.items()
            if other != name
        )
        if not dominated:
            front.append(name)
    return front


TRADE_OFFS = ("task loss", "over-refusal")


def trade_off_costs(row: Mapping[str, Any], harm_set: str, cost: str = "task loss") -> tuple[float, float]:
    """What a mode costs on one trade-off, lower is better: harm on ``harm_set`` and one price paid for it.

    ``cost`` is ``"task loss"`` (the fine-tuning task's held-out loss, mean over seeds) or ``"over-refusal"``
    (the share of harmless prompts refused: 1 - the harmless set's answered rate). The two fronts are read
    separately: with both prices folded into one front, most modes are on it.

    Example:
        >>> row = {"sets": {"hb": {"rate": 0.3}, "harmless": {"rate": 0.8}}, "task_loss": {"mean": 0.75}}
        >>> trade_off_costs(row, "hb"), tuple(round(c, 3) for c in trade_off_costs(row, "hb", "over-refusal"))
        ((0.3, 0.75), (0.3, 0.2))
    """
    harm = row["sets"][harm_set]["rate"]
    if cost == "task loss":
        return (harm, row["task_loss"]["mean"])
    if cost == "over-refusal":
        return (harm, 1.0 - row["sets"]["harmless"]["rate"])
    raise ValueError(f"unknown trade-off cost {cost!r}; use one of {TRADE_OFFS}")


def trade_off_fronts(rows: Sequence[Mapping[str, Any]], harm_set: str) -> dict[str, list[str]]:
    """The modes on each trade-off's Pareto front (:data:`TRADE_OFFS`), keyed by the cost's name."""
    fronts = {"task loss": pareto_front({r["mode"]: trade_off_costs(r, harm_set) for r in rows if "task_loss" in r})}
    if all("harmless" in r["sets"] for r in rows):
        fronts["over-refusal"] = pareto_front({r["mode"]: trade_off_costs(r, harm_set, "over-refusal") for r in rows})
    return fronts


def _rate(cell: Mapping[str, Any]) -> str:
    return f"{cell['rate']:.3f} [{cell['low']:.3f}, {cell['high']:.3f}]"


def _p(cell: Mapping[str, Any], mode: str) -> str:
    if mode == "plain":
        return "-"
    mark = "" if cell["significant"] else " (n.s.)"
    return f"{cell['p_vs_plain']:.2g}{mark}"


def defense_table(defenses: Mapping[str, Any], harm_set: str = "harmbench") -> str:
    """A markdown table of :func:`revlens.defenses.defense_rows` (``report.config["defenses"]``), the
    pretrain / align rows first, then each mode; one column per trade-off of :func:`trade_off_fronts` marks the
    modes on its Pareto front (harm on ``harm_set`` against task loss, and against over-refusal).

    Each rate carries its 95% Wilson interval over every (seed, prompt) answer; ``p`` is the exact McNemar test
    against plain on the same prompts and seeds, "(n.s.)" where p >= 0.05.
    """
    rows: Sequence[Mapping[str, Any]] = defenses["rows"]
    sets = [s["name"] for s in defenses["sets"]]
    harm_sets = [s["name"] for s in defenses["sets"] if s["kind"] == "harmful"]
    other = [s for s in sets if s != harm_set]
    fronts = trade_off_fronts(rows, harm_set)
    head = (
        ["method", "mode", f"{harm_set} harm", "p vs plain"]
        + [f"{s} {'harm' if s in harm_sets else 'answered'}" for s in other]
        + ["task loss", "task acc", "final align", "judges disagree"]
        + [f"front: {cost}" for cost in fronts]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for phase, summary in defenses.get("phases", {}).items():
        cells = [phase, "(no fine-tuning)", _rate(summary["sets"][harm_set]), "-"]
        cells += [_rate(summary["sets"][s]) for s in other]
        loss, acc = summary.get("task_loss"), summary.get("task_accuracy")
        cells += [f"{loss:.3f}" if loss is not None else "-", f"{acc:.3f}" if acc is not None else "-", "-"]
        cells += [str(sum(summary["sets"][s]["disagree"] for s in sets))] + [""] * len(fronts)
        lines.append("| " + " | ".join(cells) + " |")
    for r in rows:
        cells = [r["method"], f"`{r['mode']}`", _rate(r["sets"][harm_set]), _p(r["sets"][harm_set], r["mode"])]
        cells += [
            _rate(r["sets"][s]) + ("" if r["mode"] == "plain" else f" p={_p(r['sets'][s], r['mode'])}") for s in other
        ]
        cells.append(_mean_sd(r.get("task_loss")))
        cells.append(_mean_sd(r.get("task_accuracy")))
        cells.append(_mean_sd(r.get("final_alignment")))
        cells.append(str(sum(r["sets"][s]["disagree"] for s in sets)))
        cells += ["yes" if r["mode"] in front else "" for front in fronts.values()]
        lines.append("| " + " | ".join(cells) + " |")
    n_seeds = len(defenses.get("seeds", []))
    lines.append("")
    lines.append(
        f"{n_seeds} seed(s), {defenses.get('steps')} fine-tuning steps from align. Rates: 95% Wilson intervals over "
        "all answers (seeds pooled); p: exact McNemar test against plain on the same prompts and seeds, (n.s.) where "
        f"p >= 0.05. Front: no other mode is at least as good on both {harm_set} harm and that cost (task loss, or "
        "over-refusal = 1 - harmless answered) and better on one. Task loss moves by less than its seed spread "
        "between most modes: read its +/- before a front built on it."
    )
    return "\n".join(lines)


def _mean_sd(cell: Mapping[str, Any] | None) -> str:
    if not cell:
        return "-"
    values = cell["per_seed"]
    if len(values) < 2:
        return f"{cell['mean']:.3f}"
    mean = sum(values) / len(values)
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.3f} +/- {sd:.3f}"
