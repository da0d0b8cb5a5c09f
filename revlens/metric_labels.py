"""What tables and figures call each fine-tuning metric: a real model's plain words, or the organism's own names.

The model organism measures its fine-tuning task as "B2" and the harmless requests it should keep answering as
"B1"; a real model (the chat-model pipeline) has a task loss and harmless prompts answered. Reports say which they hold
in ``config["demo"]["preset"]``.
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


def metric_labels(config: Mapping[str, Any]) -> dict[str, str]:
    """The words for each metric in prose, titles and axes: :data:`REAL_MODEL_LABELS` for a real model, the
    organism's (``B2 loss``, ``B1 retention``) otherwise.

    Example:
        >>> metric_labels({"demo": {"preset": "smollm2"}})["task_loss"], metric_labels({})["task_loss"]
        ('task loss', 'B2 loss')
    """
    return dict(REAL_MODEL_LABELS if is_real_model(config) else ORGANISM_LABELS)


def harmless_set(config: Mapping[str, Any]) -> str:
    """The name of the held-out prompts ``b1_retention`` counts: ``harmless`` (real model) or ``B1`` (organism)."""
    return _HARMLESS_SET[is_real_model(config)]


def table_labels(report: Any) -> dict[str, str] | None:
    """The intervention table's column names for ``report``: plain words for a real-model (SmolLM2) report, None
    (the organism's metric names) otherwise."""
    return dict(REAL_MODEL_LABELS) if is_real_model(report.config) else None
