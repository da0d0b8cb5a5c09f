"""What tables and figures call each fine-tuning metric: a real model's plain words, or the organism's own names.

The model organism measures its fine-tuning task as "B2" and the harmless requests it should keep answering as
"B1"; a real model (the chat-model pipeline) has a task loss and harmless prompts answered. Reports say which they hold
in ``config["demo"]["preset"]``.

The blocking table's two behaviour columns keep the organism's keys (``harmfulness``: what fine-tuning brings
back, lower is better; ``b1_retention``: what the shallow phase must keep, higher is better) whatever they hold:
a report records the behaviours they track in ``config["tracked_behaviours"]`` (the unlearning setting: forget
recall and retain recall), and a report without that record (the organism's, older runs) tracks harm.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# The intervention table's column names for a real model (the organism's tables show the metric names).
REAL_MODEL_LABELS = {
    "final_alignment": "final alignment",
    "harmfulness": "harmfulness",
    "task_loss": "task loss",
    "task_accuracy": "task accuracy",
    "b1_retention": "harmless answered",
}
ORGANISM_LABELS = {
    **REAL_MODEL_LABELS,
    "task_loss": "B2 loss",
    "task_accuracy": "B2 accuracy",
    "b1_retention": "B1 retention",
}
# The held-out prompt set that ``b1_retention`` counts answers on.
_HARMLESS_SET = {True: "harmless", False: "B1"}


def is_real_model(config: Mapping[str, Any]) -> bool:
    """True for a real chat model's report config: the chat-model pipeline's (``config["demo"]["pipeline"] ==
    "chat_model"``, any model) or an older SmolLM2 demo's (``config["demo"]["preset"] == "smollm2"``)."""
    demo = config.get("demo") if isinstance(config, Mapping) else None
    return isinstance(demo, Mapping) and (demo.get("pipeline") == "chat_model" or demo.get("preset") == "smollm2")


def tracked_behaviours(config: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """What the blocking table's behaviour columns hold: ``{"harmfulness": ..., "b1_retention": ...}``, each
    ``{"key": the metric's key in report.behaviour, "name": its name in tables, "prompts": what its rate counts}``;
    ``config["tracked_behaviours"]`` when the report records it, else harm and harmless answered (B1 retention
    for the organism).

    Example:
        >>> tracked_behaviours({})["harmfulness"]["name"]
        'harmfulness'
        >>> recorded = {"harmfulness": {"key": "forget_recall", "name": "forget recall", "prompts": "forget items"}}
        >>> tracked_behaviours({"tracked_behaviours": recorded})["harmfulness"]["name"]
        'forget recall'
    """
    real = is_real_model(config)
    kept = "held-out harmless prompts" if real else "held-out B1 prompts"
    default = {
        "harmfulness": {"key": "harm", "name": "harmfulness", "prompts": "harmful prompts"},
        "b1_retention": {
            "key": "harmless_answered" if real else "b1_retention",
            "name": (REAL_MODEL_LABELS if real else ORGANISM_LABELS)["b1_retention"],
            "prompts": kept,
        },
    }
    recorded = config.get("tracked_behaviours") if isinstance(config, Mapping) else None
    recorded = recorded if isinstance(recorded, Mapping) else {}
    return {slot: {**default[slot], **dict(recorded.get(slot) or {})} for slot in default}


def metric_labels(config: Mapping[str, Any]) -> dict[str, str]:
    """The words for each metric in prose, titles and axes: :data:`REAL_MODEL_LABELS` for a real model, the
    organism's (``B2 loss``, ``B1 retention``) otherwise; the behaviour columns named as the report's
    :func:`tracked_behaviours` name them.

    Example:
        >>> metric_labels({"demo": {"preset": "smollm2"}})["task_loss"], metric_labels({})["task_loss"]
        ('task loss', 'B2 loss')
        >>> unlearning = {"harmfulness": {"name": "forget recall"}, "b1_retention": {"name": "retain recall"}}
        >>> metric_labels({"demo": {"pipeline": "chat_model"}, "tracked_behaviours": unlearning})["harmfulness"]
        'forget recall'
    """
    labels = dict(REAL_MODEL_LABELS if is_real_model(config) else ORGANISM_LABELS)
    return labels | {slot: t["name"] for slot, t in tracked_behaviours(config).items()}


def harmless_set(config: Mapping[str, Any]) -> str:
    """The name of the held-out prompts ``b1_retention`` counts: ``harmless`` (real model) or ``B1`` (organism)."""
    return _HARMLESS_SET[is_real_model(config)]


def table_labels(report: Any) -> dict[str, str] | None:
    """The intervention table's column names for ``report``: plain words for a real-model report (its tracked
    behaviours' names), None (the organism's metric names) otherwise."""
    return metric_labels(report.config) if is_real_model(report.config) else None
