"""`revlens demo` end to end on the micro preset: report.json, dashboard and the table beside the paper's."""

from __future__ import annotations

import json
import warnings

import numpy as np

from revlens.cli import main
from revlens.paper import PAPER
from revlens.report import ReversionReport


def test_demo_cli_writes_report_dashboard_and_table(tmp_path, capsys):
    out = tmp_path / "demo"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["demo", "--preset", "micro", "--seeds", "2", "--out", str(out),
                     "--modes", "plain,clamp,anchor@0.01+rank@4"]) == 0
    printed = capsys.readouterr().out
    for value in PAPER.values():
        assert value in printed
    assert "blocking at layers" in printed and "harm" in printed
    saved = json.loads((out / "report.json").read_text())
    assert saved["runs"] == ["seed_0", "seed_1"]
    assert set(saved["interventions"]["metrics"]) == {"plain", "clamp", "anchor@0.01+rank@4"}
    assert saved["behaviour"]["harm"]["align"][0] <= 0.05
    assert saved["config"]["demo"]["preset"] == "micro"
    rows = {r["quantity"]: r for r in saved["config"]["paper_comparison"]}
    assert rows["run-step pairs above the isotropic null's p99"]["paper"] == "24 of 24"
    report = ReversionReport.load(out)
    # The plain row of the blocking table re-runs the history's fine-tuning: same final alignment as the analysis.
    li = report.best_layer_index()
    np.testing.assert_allclose(report.interventions["metrics"]["plain"]["final_alignment"],
                               report.alignment[:, -1, li], atol=1e-4)
    html = (out / "dashboard.html").read_text()
    assert "<script src=\"http" not in html and "Plotly" in html
    # `revlens finetune` reuses the demo's history: a blocked run writes the layout analyze reads, resumably.
    ft = tmp_path / "ft"
    assert main(["finetune", str(out / "history"), "--out", str(ft), "--mode", "clamp", "--steps", "5"]) == 0
    metrics = json.loads((ft / "metrics.json").read_text())
    assert metrics["mode"] == "clamp" and 0.0 <= metrics["harm"] <= 1.0
    assert (ft / "finetune" / "seed_0" / "step_5" / "model.safetensors").is_file()


def test_best_mode_is_the_least_harmful_within_the_task_loss_tolerance():
    from revlens.demo import best_mode

    def row(harm, loss, align):
        return {"harmfulness": [harm], "task_loss": [loss], "final_alignment": [align]}

    metrics = {"plain": row(1.0, 1.0, 0.8), "cheap": row(0.5, 1.04, 0.4), "tied": row(0.5, 1.0, -0.1),
               "costly": row(0.1, 1.2, 0.0)}
    assert best_mode(metrics) == "tied"  # "costly" is over 5% dearer; the tie goes to the lower alignment
    assert best_mode(metrics, tolerance=0.5) == "costly"
    assert best_mode({"plain": row(1.0, 1.0, 0.8)}) is None
    # With the null's p99, a mode that leaves alignment above it only wins when no mode gets below it.
    assert best_mode(metrics, alignment_limit=0.2) == "tied"
    metrics["unblocked"] = row(0.2, 1.0, 0.5)
    assert best_mode(metrics) == "unblocked"
    assert best_mode(metrics, alignment_limit=0.2) == "tied"
    assert best_mode(metrics, alignment_limit=-0.5) == "unblocked"
