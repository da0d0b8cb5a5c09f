"""Dashboard figures hold the report's numbers (computed independently here) and save offline."""

from __future__ import annotations

import re

import numpy as np
import plotly.graph_objects as go
import pytest
from test_paper import synthetic_report

from revlens.dashboard import build_dashboard, save_dashboard_html

from dashboard_reports import deep_report, figure_geometry, overlaps

MODEBAR_PX = 34


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
    (runs,) = traces_named(fig, "runs")  # one trace, runs separated by gaps
    ys = np.asarray(runs.y, dtype=float)
    np.testing.assert_allclose(ys[~np.isnan(ys)], report.alignment[:, :, li].ravel())
    assert list(runs.customdata).count("seed_1") == len(report.steps)


def test_heatmap_titles_axes_and_layer_selector():
    report = synthetic_report()
    fig = build_dashboard(report)
    (heat,) = [t for t in fig.data if isinstance(t, go.Heatmap)]
    np.testing.assert_allclose(np.asarray(heat.z), report.alignment.mean(0))  # steps x layers
    titles = {a.text for a in fig.layout.annotations}
    assert {"Mean alignment, layer x step", "Harmfulness after fine-tuning, by mode"} <= titles
    assert fig.layout.title.text and fig.layout.yaxis.title.text == "cosine"
    assert "optimizer updates" in fig.layout.xaxis.title.text
    buttons = fig.layout.updatemenus[0].buttons
    assert [b.label for b in buttons] == ["layer 0", "layer 1 (best)"]
    # Each button shows exactly its layer's per-layer traces plus the shared ones.
    for b, layer in zip(buttons, report.layers):
        shown = [t for t, v in zip(fig.data, b.args[0]["visible"]) if v]
        assert any((t.hovertemplate or "").startswith(f"run %{{customdata}}, L{layer}<") for t in shown)
        assert not any((t.hovertemplate or "").startswith(f"run %{{customdata}}, L{1 - layer}<") for t in shown)


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


def _reports():
    return {
        "organism-like (2 layers, blocking)": synthetic_report(),
        "32 layers, 3 runs, blocking": deep_report(32, 3),
        "30 layers, 1 run": deep_report(30, 1, blocking=False),
        "80 layers, 10 runs": deep_report(80, 10, steps=(1, 2, 5, 10, 20, 30, 50, 70, 100), blocking=False),
    }


@pytest.mark.parametrize("name", list(_reports()))
def test_layout_at_depth_has_no_overlap_no_empty_panel_no_blank_space(name):
    report = _reports()[name]
    fig = build_dashboard(report)
    geo = figure_geometry(fig)
    panels = geo["panels"]
    # Every panel draws something (the figure has no room for panels it does not draw).
    used = {(t.xaxis or "x", t.yaxis or "y") for t in fig.data}
    assert set(panels) == used
    # Panels do not overlap, and rows leave room for tick labels, axis titles and the next title.
    boxes = list(panels.values())
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not overlaps(a, b, pad=40), (a, b)
    # Subplot titles sit above their panel, inside the figure, clear of every panel and of each other.
    for text, box in geo["titles"]:
        assert box[0] >= 0 and box[2] <= geo["width"] and box[1] > MODEBAR_PX, text
        assert not any(overlaps(box, p) for p in boxes), text
    for i, (_, a) in enumerate(geo["titles"]):
        assert not any(overlaps(a, b) for _, b in geo["titles"][i + 1 :])
    # The title is short, below the modebar, above the legend and the first subplot titles.
    title_top = (1 - fig.layout.title.y) * geo["height"]
    assert MODEBAR_PX <= title_top < 60 and "[" not in fig.layout.title.text and len(fig.layout.title.text) < 260
    first_title = min(b[1] for _, b in geo["titles"])
    legend_top = fig.layout.margin.t + (1 - fig.layout.legend.y) * geo["plot_h"]
    menu_top = fig.layout.margin.t + (1 - fig.layout.updatemenus[0].y) * geo["plot_h"]
    assert MODEBAR_PX <= menu_top < legend_top and legend_top + 60 <= first_title
    # No blank space: the panels fill the plot area from its top to its bottom, and most of it.
    assert min(b[1] for b in boxes) == pytest.approx(fig.layout.margin.t)
    assert max(b[3] for b in boxes) == pytest.approx(geo["height"] - fig.layout.margin.b)
    assert sum(b[3] - b[1] for b in boxes if b[0] < 100) / geo["plot_h"] > 0.6
    # Layer axes label every layer when they fit (all 30-32), never closer than their text is wide.
    heat = next(t for t in fig.data if isinstance(t, go.Heatmap))
    xaxis = fig.layout[f"xaxis{heat.xaxis[1:]}"]
    ticks = list(xaxis.tickvals)
    if report.n_layers <= 40:
        assert ticks == list(range(report.n_layers))
    spacing = geo["plot_w"] * (ticks[1] - ticks[0]) / report.n_layers if len(ticks) > 1 else geo["plot_w"]
    assert spacing > 7 * max(len(t) for t in xaxis.ticktext)
    # The colour bar stays beside the heatmap.
    dom = fig.layout[f"yaxis{heat.yaxis[1:]}"].domain
    half = heat.colorbar.len / 2
    assert dom[0] - 1e-9 <= heat.colorbar.y - half and heat.colorbar.y + half <= dom[1] + 1e-9


def test_low_snr_layers_are_greyed_and_labelled():
    report = deep_report(32, 3)
    fig = build_dashboard(report)
    assert report.flagged_layers == [0, 1, 2]
    veils = [s for s in fig.layout.shapes if s.type == "rect"]
    assert veils and all((s.x0, s.x1) == (-0.5, 2.5) for s in veils)
    snr_bar = next(t for t in fig.data if t.name == "v_rev SNR")
    np.testing.assert_allclose(snr_bar.y, report.v_rev_snr)
    colors = list(snr_bar.marker.color)
    assert len(set(colors[:3])) == 1 and colors[0] != colors[3]
    labels = [b.label for b in fig.layout.updatemenus[0].buttons]
    assert labels[0] == "layer 0 (low SNR)" and labels[report.best_layer_index()].endswith("(best)")
    # The dropdown renames the per-layer panels' titles.
    relabel = fig.layout.updatemenus[0].buttons[5].args[1]
    assert relabel and all("layer 5" in text for text in relabel.values())
    profile = next(t for t in fig.data if (t.name or "").startswith("mean alignment per layer"))
    np.testing.assert_allclose(profile.y, np.nanmean(report.alignment, axis=(0, 1)))
    corrected = next(t for t in fig.data if (t.name or "").startswith("p99 of the best of 29 layers"))
    assert corrected.y[0] == pytest.approx(np.quantile(report.null_draws_activation[3:].max(axis=0), 0.99))


def test_per_example_boxes_are_quantiles():
    report = deep_report(8, 2, blocking=False)
    fig = build_dashboard(report)
    li = report.best_layer_index()
    box = next(t for t in fig.data if isinstance(t, go.Box) and t.visible is not False)
    vals = report.per_example_cos[:, 0, li, :].ravel()
    assert box.median[0] == pytest.approx(np.median(vals))
    assert (box.q1[0], box.q3[0]) == pytest.approx(tuple(np.quantile(vals, [0.25, 0.75])))
    assert (box.lowerfence[0], box.upperfence[0]) == pytest.approx(tuple(np.quantile(vals, [0.05, 0.95])))
