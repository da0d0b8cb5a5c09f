"""`revlens demo` end to end on the micro preset: report.json, dashboard and the table beside the paper's.

The demo reuses a copy of the session's micro history (conftest.py), as it reuses any finished history.
"""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

from revlens.cli import main
from revlens.demos.organism.demo import final_alignment_reader
from revlens.demos.organism.train import blocked_finetune
from revlens.paper import PAPER
from revlens.report import ReversionReport


def test_demo_cli_writes_report_dashboard_and_table(micro_history, tmp_path, capsys):
    out = tmp_path / "demo"
    shutil.copytree(micro_history, out / "history")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert (
            main(
                [
                    "demo",
                    "--preset",
                    "micro",
                    "--seeds",
                    "2",
                    "--out",
                    str(out),
                    "--workers",
                    "2",
                    "--modes",
                    "plain,clamp,anchor@0.01+rank@4",
                ]
            )
            == 0
        )
    captured = capsys.readouterr()
    printed = captured.out
    # Each stage is announced with its time estimate before it runs; the finished history is reused.
    stages = [line for line in captured.err.splitlines() if line.startswith("[") and "; about " in line]
    assert [s[:5] for s in stages] == ["[1/3]", "[2/3]", "[3/3]"] and "(reused)" in stages[0]
    assert "3 mode(s) x 2 seed(s): 4 fine-tuning runs" in stages[2] and "plain rows from the history" in stages[2]
    for value in PAPER.values():
        assert value in printed
    assert "blocking at layers" in printed and "harm" in printed
    saved = json.loads((out / "report.json").read_text())
    assert saved["runs"] == ["seed_0", "seed_1"]
    assert set(saved["interventions"]["metrics"]) == {"plain", "clamp", "anchor@0.01+rank@4"}
    assert saved["behaviour"]["harm"]["align"][0] <= 0.05
    assert saved["config"]["demo"]["preset"] == "micro"
    assert saved["config"]["demo"]["estimate_s"]["history"] == 0.0
    rows = {r["quantity"]: r for r in saved["config"]["paper_comparison"]}
    assert rows["run-step pairs above the isotropic null's p99"]["paper"] == "24 of 24"
    report = ReversionReport.load(out)
    # The plain rows come from the history's own runs: same final alignment as the analysis, and a plain
    # re-run from the aligned model gives the same weights, hence the same row.
    li = report.best_layer_index()
    metrics = report.interventions["metrics"]
    np.testing.assert_allclose(metrics["plain"]["final_alignment"], report.alignment[:, -1, li], atol=1e-4)
    # The other rows came from worker processes (one per core); the same run in this process agrees.
    layers = report.interventions["layers"]
    block = {l: report.v_rev_basis[report.layers.index(l)] for l in layers}
    measurer = final_alignment_reader(out / "history", report)
    for mode in ("plain", "clamp"):
        model, behaviour = blocked_finetune(out / "history", block, mode, 1)
        assert metrics[mode]["final_alignment"][1] == pytest.approx(measurer(model), abs=1e-6)
        assert metrics[mode]["harmfulness"][1] == behaviour["harm"]
        assert metrics[mode]["task_loss"][1] == pytest.approx(behaviour["b2_loss"], abs=1e-6)
    html = (out / "dashboard.html").read_text()
    assert '<script src="http' not in html and "Plotly" in html
    # `revlens finetune` reuses the demo's history: a blocked run writes the layout analyze reads, resumably.
    ft = tmp_path / "ft"
    assert main(["finetune", str(out / "history"), "--out", str(ft), "--mode", "clamp", "--steps", "5"]) == 0
    metrics = json.loads((ft / "metrics.json").read_text())
    assert metrics["mode"] == "clamp" and 0.0 <= metrics["harm"] <= 1.0
    assert (ft / "finetune" / "seed_0" / "step_5" / "model.safetensors").is_file()


def test_best_mode_is_the_least_harmful_within_the_task_loss_tolerance():
    from revlens.demos.comparison import best_mode

    def row(harm, loss, align):
        return {"harmfulness": [harm], "task_loss": [loss], "final_alignment": [align]}

    metrics = {
        "plain": row(1.0, 1.0, 0.8),
        "cheap": row(0.5, 1.04, 0.4),
        "tied": row(0.5, 1.0, -0.1),
        "costly": row(0.1, 1.2, 0.0),
    }
    assert best_mode(metrics) == "tied"  # "costly" is over 5% dearer; the tie goes to the lower alignment
    assert best_mode(metrics, tolerance=0.5) == "costly"
    assert best_mode({"plain": row(1.0, 1.0, 0.8)}) is None
    # With the null's p99, a mode that leaves alignment above it only wins when no mode gets below it.
    assert best_mode(metrics, alignment_limit=0.2) == "tied"
    metrics["unblocked"] = row(0.2, 1.0, 0.5)
    assert best_mode(metrics) == "unblocked"
    assert best_mode(metrics, alignment_limit=0.2) == "tied"
    assert best_mode(metrics, alignment_limit=-0.5) == "unblocked"
    # A mode that leaves as much harm as plain fine-tuning, or more, is never "best" (SmolLM2's grad at all layers).
    assert best_mode({"plain": row(0.54, 1.0, 0.64), "grad": row(0.6, 1.0, 0.65), "same": row(0.54, 1.0, 0.0)}) is None
    # A control or another defense is never "best", however it does (the unlearning run's random subspace tied
    # v_rev's anchor at no forget recall and cost less task loss); the v_rev anchor over the tolerance still wins.
    rows = {
        "plain": row(0.03, 0.73, 0.67),
        "anchor@0.0001+contrast@0.001+rank@32+sample@8": row(0.0, 1.01, 0.0),
        "anchor@0.0001+contrast@0.001+random@32+sample@8": row(0.0, 0.73, 0.27),
        "kl@1+sample@8": row(0.0, 0.73, 0.1),
    }
    assert best_mode(rows, alignment_limit=0.1) == "anchor@0.0001+contrast@0.001+rank@32+sample@8"
    assert best_mode({k: v for k, v in rows.items() if "rank" not in k}) is None


def test_modes_all_and_default_expand_and_typos_fail_before_training():
    from revlens.demos.organism.demo import ALL_MODES, DEFAULT_MODES, parse_modes

    assert parse_modes("all") == list(ALL_MODES) and len(ALL_MODES) == 10
    assert parse_modes("default") == list(DEFAULT_MODES) == ["plain", "clamp", "anchor@0.003+contrast@0.1+rank@64"]
    assert set(DEFAULT_MODES) <= set(ALL_MODES)
    assert parse_modes("plain, default,anchor@0.003+random@64") == [*DEFAULT_MODES, "anchor@0.003+random@64"]
    assert parse_modes("") == []
    with pytest.raises(ValueError, match="rank@many"):
        parse_modes("plain,anchor@0.1+rank@many")


def test_time_estimates_follow_the_work():
    from revlens.demos.comparison import mode_cost
    from revlens.demos.organism.demo import ALL_MODES, DEFAULT_MODES, estimate_seconds

    assert mode_cost("plain") == 1.0 < mode_cost("clamp") < mode_cost("anchor@0.1") < mode_cost("anchor@0.1+contrast@1")
    tiny = estimate_seconds("tiny", 3, DEFAULT_MODES)
    assert set(tiny) == {"history", "analysis", "blocking"} and all(v > 0 for v in tiny.values())
    assert sum(tiny.values()) < 180  # the default demo's goal: 3 minutes on 2 cores
    assert estimate_seconds("tiny", 3, ALL_MODES)["blocking"] > 2.5 * tiny["blocking"]
    assert estimate_seconds("tiny", 3, DEFAULT_MODES, history_done=True)["history"] == 0.0
    assert (
        estimate_seconds("micro", 2, DEFAULT_MODES)["history"]
        < tiny["history"]
        < estimate_seconds("small", 3, DEFAULT_MODES)["history"]
    )


@pytest.mark.slow
def test_demo_reproduces_the_full_blocking_table_with_modes_all(micro_history, tmp_path):
    from revlens.demos.organism.demo import ALL_MODES

    out = tmp_path / "demo"
    shutil.copytree(micro_history, out / "history")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert (
            main(["demo", "--preset", "micro", "--seeds", "2", "--out", str(out), "--modes", "all", "--no-html"]) == 0
        )
    saved = json.loads((out / "report.json").read_text())
    assert saved["interventions"]["modes"] == list(ALL_MODES)
    assert all(len(m["harmfulness"]) == 2 for m in saved["interventions"]["metrics"].values())
    assert saved["interventions"]["best_mode"] in ALL_MODES
