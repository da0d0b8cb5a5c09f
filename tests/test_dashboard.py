"""Dashboard figures hold the report's numbers (computed independently here) and save offline."""

from __future__ import annotations

import re

import numpy as np
import plotly.graph_objects as go
import pytest

from revlens.dashboard import build_dashboard, save_dashboard_html

from test_paper import synthetic_report


def traces_named(fig: go.Figure, prefix: str, visible_only: bool = True) -> list:
    return [t for t in fig.data if (t.name or "").startswith(prefix) and (t.visible is not False or not visible_only)]


def test_trajectory_mean_band_and_null_lines():
    report = synthetic_report()
    fig = build_dashboard(report)
    li = report.best_layer_index()
    (mean,) = traces_named(fig, "mean over")
    np.testing.assert_allclose(mean.y, report.alignment[:, :, li].mean(0))
    np.testing.assert_allclose(mean.customdata, report.alignment[:, :, li].std(0, ddof=1))
    (band,) = traces_named(fig, "mean +/- std")
    upper = np.asarray(band.y[: len(report.steps)])
    np.testing.assert_allclose(upper, report.alignment[:, :, li].mean(0) + report.alignment[:, :, li].std(0, ddof=1))
    (iso,) = traces_named(fig, "isotropic null p99")
    (act,) = traces_named(fig, "activation-space null p99")
    assert list(iso.y) == [report.null_p99[li]] * 2 and list(act.y) == [report.null_p99_activation[li]] * 2
    assert len(traces_named(fig, "run ")) == len(report.runs)


def test_heatmap_titles_axes_and_layer_selector():
    report = synthetic_report()
    fig = build_dashboard(report)
    (heat,) = [t for t in fig.data if isinstance(t, go.Heatmap)]
    np.testing.assert_allclose(np.asarray(heat.z), report.alignment.mean(0).T)
    titles = {a.text for a in fig.layout.annotations}
    assert {"Mean alignment, layer x step", "Harmfulness after fine-tuning, by mode"} <= titles
    assert fig.layout.title.text and fig.layout.yaxis.title.text == "cosine"
    assert "optimizer updates" in fig.layout.xaxis.title.text
    buttons = fig.layout.updatemenus[0].buttons
    assert [b.label for b in buttons] == ["layer 0", "layer 1"]
    # Each button shows exactly its layer's per-layer traces plus the shared ones.
    for b, layer in zip(buttons, report.layers):
        shown = [t for t, v in zip(fig.data, b.args[0]["visible"]) if v]
        assert any((t.hovertemplate or "").startswith(f"run seed_0, L{layer}") for t in shown)
        assert not any((t.hovertemplate or "").startswith(f"run seed_0, L{1 - layer}") for t in shown)


def test_intervention_panel_has_error_bars_and_only_when_present():
    report = synthetic_report()
    fig = build_dashboard(report)
    bars = [t for t in fig.data if isinstance(t, go.Bar)]
    harm = next(b for b in bars if b.name == "harmfulness")
    assert list(harm.x) == report.interventions["modes"]
    np.testing.assert_allclose(harm.y, [60.0, 10.0])
    np.testing.assert_allclose(harm.error_y.array, [10.0, 10.0])
    report.interventions = None
    assert not [t for t in build_dashboard(report).data if isinstance(t, go.Bar)]


def test_themes_and_bad_layer():
    report = synthetic_report()
    assert build_dashboard(report, theme="dark").layout.paper_bgcolor == "#111111"
    with pytest.raises(ValueError, match="was not analysed"):
        build_dashboard(report, layer=7)
    with pytest.raises(ValueError, match="unknown theme"):
        build_dashboard(report, theme="neon")


def test_html_is_self_contained(tmp_path):
    path = save_dashboard_html(synthetic_report(), tmp_path / "d.html")
    html = path.read_text()
    assert not re.search(r"<script[^>]*\ssrc=", html), "no script may load from a file or the network"
    assert len(html) > 1_000_000 and "Plotly.newPlot" in html  # plotly.js is embedded
    assert synthetic_report().save_html(tmp_path / "e.html").is_file()
