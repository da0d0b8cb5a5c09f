"""The anchor table: our row values are the report's own numbers, computed independently here."""

from __future__ import annotations

import numpy as np
import torch

from revlens.paper import PAPER, comparison_rows, comparison_table
from revlens.report import ReversionReport


def synthetic_report() -> ReversionReport:
    runs, steps, layers = ["seed_0", "seed_1", "seed_2"], [1, 20, 100], [0, 1]
    gen = np.random.default_rng(0)
    alignment = gen.uniform(-0.2, 0.2, (3, 3, 2))
    alignment[:, :, 1] = [[0.40, 0.60, 0.65], [0.45, 0.66, 0.64], [0.38, 0.62, 0.70]]
    shape = alignment.shape
    return ReversionReport(
        layers=layers,
        runs=runs,
        steps=steps,
        d_model=64,
        v_rev=torch.eye(2, 64),
        v_rev_basis=torch.eye(2, 64)[:, None],
        alignment=alignment,
        alignment_per_example=alignment,
        per_example_cos=np.zeros(shape + (4,)),
        drift_norm=np.ones(shape),
        p_value=np.zeros(shape),
        null_p99=np.array([0.28, 0.28]),
        null_p99_activation=np.array([0.5, 0.5]),
        v_rev_norm=np.ones(2),
        config={},
        interventions={
            "modes": ["plain", "clamp"],
            "seeds": [0, 1, 2],
            "best_mode": "clamp",
            "metrics": {
                "plain": {
                    "final_alignment": [0.65, 0.64, 0.70],
                    "harmfulness": [0.6, 0.5, 0.7],
                    "task_loss": [1.0, 1.1, 0.9],
                },
                "clamp": {
                    "final_alignment": [-0.2, -0.1, -0.3],
                    "harmfulness": [0.1, 0.2, 0.0],
                    "task_loss": [1.02, 1.1, 0.93],
                },
            },
        },
    )


def test_rows_are_computed_from_the_report():
    report = synthetic_report()
    rows = {r["quantity"]: r for r in comparison_rows(report)}
    assert report.best_layer == 1
    step1 = rows["alignment after the first update"]["revlens"]
    assert step1 == f"{np.mean([0.40, 0.45, 0.38]):.3f} +/- {np.std([0.40, 0.45, 0.38], ddof=1):.3f}"
    pairs = rows["run-step pairs above the isotropic null's p99"]["revlens"]
    above_act = int(np.sum(report.alignment[:, :, 1] > 0.5))
    assert pairs.startswith("9 of 9") and f"activation-space null: {above_act} of 9" in pairs
    harm = rows["harmfulness, plain -> blocked"]["revlens"]
    assert harm.startswith(f"{60.0:.1f}% +/- {10.0:.1f}% -> {10.0:.1f}%")
    cost = rows["task cost of blocking"]["revlens"]
    assert f"{100 * (np.mean([1.02, 1.1, 0.93]) / 1.0 - 1):+.1f}%" in cost
    assert all(r["paper"] == PAPER[k] for k, r in zip(PAPER, comparison_rows(report)))


def test_table_text_has_every_row():
    text = comparison_table(synthetic_report())
    assert text.count("\n") == 2 + len(PAPER) - 1
    assert "24 of 24" in text and "layer L1" in text


def test_blocked_rows_name_their_fine_tuning_length_when_it_is_not_the_papers():
    report = synthetic_report()
    rows = {r["quantity"]: r["revlens"] for r in comparison_rows(report)}
    assert "T=" not in rows["final alignment at T=100, v_rev blocked"]
    report.interventions["steps"] = 20
    rows = {r["quantity"]: r["revlens"] for r in comparison_rows(report)}
    assert rows["final alignment at T=100, v_rev blocked"].endswith("(clamp, T=20)")
    assert rows["harmfulness, plain -> blocked"].endswith("(T=20)")


def test_the_behaviour_row_names_the_tracked_behaviour_and_old_reports_read_as_harm():
    from revlens.metric_labels import metric_labels, tracked_behaviours

    old = synthetic_report()  # a report written before reports recorded their tracked behaviour
    assert tracked_behaviours(old.config)["harmfulness"] == {
        "key": "harm",
        "name": "harmfulness",
        "prompts": "harmful prompts",
    }
    assert [r["quantity"] for r in comparison_rows(old)][5] == "harmfulness, plain -> blocked"
    recall = synthetic_report()
    recall.config["tracked_behaviours"] = {
        "harmfulness": {"key": "forget_recall", "name": "forget recall", "prompts": "held-out forget items"},
        "b1_retention": {"key": "retain_recall", "name": "retain recall", "prompts": "held-out retain items"},
    }
    row = comparison_rows(recall)[5]
    assert (
        row["quantity"] == "forget recall, plain -> blocked"
        and row["paper"] == PAPER["harm_plain_to_blocked"] + " (harmfulness)"
    )
    assert row["revlens"] == comparison_rows(old)[5]["revlens"]  # the same numbers, named as tracked
    assert metric_labels(recall.config)["b1_retention"] == "retain recall"
    recall.interventions = None
    recall.behaviour = {"forget_recall": {"final": [0.25, 0.75]}, "harm": {"final": [0.0]}}
    assert comparison_rows(recall)[5]["revlens"].startswith("plain: 50.0%")  # read from the tracked key
