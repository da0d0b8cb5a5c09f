"""Interactive Plotly dashboard of a ReversionReport, for Jupyter or as one self-contained HTML file.

Panels, top to bottom: at the chosen layer, alignment per step (mean +/- std over runs, runs faint,
null p99 lines) and drift norm per step; the per-example alignment distribution and v_rev's
signal-to-noise per layer; every layer's mean alignment beside its nulls and the selection-corrected
threshold; a step x layer heatmap; and, when the report has them, the blocking modes compared
(harmfulness, final alignment, task loss, harmless prompts answered -- the organism's B2 loss and B1 retention;
or the behaviours the report tracks instead, e.g. forget and retain recall; error bars = std over seeds, none with
one seed). A dropdown
switches the per-layer panels between layers. Layers whose v_rev is noise (low SNR) are greyed.

The layout is computed in pixels from what is drawn (rows, layers, steps), so it reads the same at
3 layers and at 80, and the figure is exactly as tall as its panels.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from plotly.colors import get_colorscale
from plotly.subplots import make_subplots

from revlens._util import atomic_write_text
from revlens.metric_labels import metric_labels, tracked_behaviours

THEMES = {
    # Transparent backgrounds and mid-grey text read on both light and dark Jupyter themes.
    "auto": {
        "template": "plotly_white",
        "paper": "rgba(0,0,0,0)",
        "plot": "rgba(0,0,0,0)",
        "font": "#808080",
        "grid": "rgba(128,128,128,0.25)",
    },
    "light": {
        "template": "plotly_white",
        "paper": "white",
        "plot": "white",
        "font": "#222222",
        "grid": "rgba(128,128,128,0.25)",
    },
    "dark": {
        "template": "plotly_dark",
        "paper": "#111111",
        "plot": "#111111",
        "font": "#e0e0e0",
        "grid": "rgba(200,200,200,0.2)",
    },
}
RUN_COLOR = "rgba(31,119,180,0.25)"
MEAN_COLOR = "rgb(31,119,180)"
BAND_COLOR = "rgba(31,119,180,0.2)"
ISO_COLOR = "rgb(214,39,40)"
ACT_COLOR = "rgb(255,127,14)"
MODE_COLORS = (
    "#7f7f7f",
    "#1f77b4",
    "#2ca02c",
    "#9467bd",
    "#d62728",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
    "#ff7f0e",
)


def _sentence(words: str) -> str:
    return words[:1].upper() + words[1:]


def _hover_per_point(with_spread: str, without: str, counts: Any) -> str | list[str]:
    """The hover template of each point: ``with_spread`` (mean +/- std) where two or more values were measured,
    ``without`` (the mean alone: no spread was measured) elsewhere; one string when all points agree."""
    templates = [with_spread if int(n) > 1 else without for n in counts]
    return templates[0] if len(set(templates)) == 1 else templates


def _mean_std(x: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(x, axis=axis)
        n = np.sum(~np.isnan(x), axis=axis)
        std = np.where(n > 1, np.nanstd(x, axis=axis, ddof=1) if x.shape[axis] > 1 else 0.0, 0.0)
    return mean, np.nan_to_num(std)


FLAG_COLOR = "rgba(150,150,150,0.75)"
FLAG_SHADE = "rgba(150,150,150,0.18)"
SELECT_COLOR = "rgb(148,103,189)"

# Pixel layout: the modebar owns the top ~34 px; the title sits below it, the legend below the title.
TITLE_TOP_PX = 40
LEGEND_TOP_PX = 96
LEGEND_PX = 70  # room for three lines of legend entries
SUBTITLE_PX = 34  # a subplot title above its panel
GAP_PX = 92  # between rows: tick labels + axis title of the row above, subplot title of the row below
GAP_MODES_PX = 100  # the by-mode rows have wrapped (three-line) tick labels and no axis title
MARGIN = {"l": 70, "r": 80, "b": 100}
MAX_FULL_TICKS = 40  # layer labels on a full-width axis
MAX_HALF_TICKS = 16


def _tr(kind: str, **props: Any) -> dict[str, Any]:
    """A trace as a plain dict: the figure is built once, unvalidated, so 80 layers x 10 runs stay fast."""
    return {"type": kind, **props}


def _layer_ticks(n: int, max_ticks: int) -> list[int]:
    """Indices to label: every layer when they fit, else every 2nd, 5th, 10th... (always the first)."""
    for step in (1, 2, 5, 10, 20, 50):
        if math.ceil(n / step) <= max_ticks:
            return list(range(0, n, step))
    return list(range(0, n, math.ceil(n / max_ticks)))


def _flag_runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs [i, j] of consecutive flagged layer indices."""
    out, start = [], None
    for i, f in enumerate(list(flags) + [False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            out.append((start, i - 1))
            start = None
    return out


def _per_example_box(report: Any, li: int, visible: bool) -> dict[str, Any]:
    """Precomputed quartiles (whiskers 5-95%) per step: the figure stays small at any number of prompts."""
    xs, q1, med, q3, lo, hi, mean = [], [], [], [], [], [], []
    for si, step in enumerate(report.steps):
        vals = report.per_example_cos[:, si, li, :].ravel()
        vals = vals[np.isfinite(vals)]
        if not vals.size:
            continue
        qs = np.quantile(vals, [0.05, 0.25, 0.5, 0.75, 0.95])
        xs.append(str(step))
        lo.append(qs[0])
        q1.append(qs[1])
        med.append(qs[2])
        q3.append(qs[3])
        hi.append(qs[4])  # noqa: E702
        mean.append(float(vals.mean()))
    return _tr(
        "box",
        x=xs,
        q1=q1,
        median=med,
        q3=q3,
        lowerfence=lo,
        upperfence=hi,
        mean=mean,
        name="per-example cos",
        marker={"color": MEAN_COLOR},
        showlegend=False,
        visible=visible,
        hoverinfo="y",
    )


def _layer_traces(report: Any, li: int, visible: bool, rows: dict[str, tuple[int, int]]) -> list[tuple[dict, int, int]]:
    """Traces of one layer for the trajectory, drift and per-example panels."""
    traj = rows["trajectory"]
    out = [(trace, *traj) for trace in _trajectory_traces(report, li, visible)]
    out += [(trace, *traj) for trace in _null_lines(report, li, visible)]
    out.append((_drift_trace(report, li, visible), *rows["drift"]))
    out.append((_per_example_box(report, li, visible), *rows["per_example"]))
    return out


def _trajectory_traces(report: Any, li: int, visible: bool) -> list[dict[str, Any]]:
    """One layer's alignment per step: every run (one trace, runs separated by gaps), mean +/- std band, mean."""
    steps = report.steps
    layer = report.layers[li]
    a = report.alignment[:, :, li]
    mean, std = _mean_std(a)
    run_x, run_y, run_name = [], [], []
    for ri, run in enumerate(report.runs):
        run_x += list(steps) + [None]
        run_y += list(a[ri]) + [None]
        run_name += [run] * len(steps) + [""]
    runs = _tr(
        "scatter",
        x=run_x,
        y=run_y,
        mode="lines",
        line={"color": RUN_COLOR, "width": 1},
        name="runs (one line each)",
        legendgroup="runs",
        showlegend=visible,
        visible=visible,
        customdata=run_name,
        connectgaps=False,
        hovertemplate=f"run %{{customdata}}, L{layer}<br>step %{{x}}<br>cos %{{y:.4f}}<extra></extra>",
    )
    band = _tr(
        "scatter",
        x=steps + steps[::-1],
        y=list(mean + std) + list((mean - std)[::-1]),
        fill="toself",
        mode="lines",
        fillcolor=BAND_COLOR,
        line={"width": 0},
        hoverinfo="skip",
        name="mean +/- std",
        legendgroup="band",
        showlegend=visible,
        visible=visible,
    )
    mean_line = _tr(
        "scatter",
        x=steps,
        y=mean,
        mode="lines+markers",
        line={"color": MEAN_COLOR, "width": 3},
        name=f"mean over {len(report.runs)} runs",
        legendgroup="mean",
        showlegend=visible,
        visible=visible,
        customdata=std,
        hovertemplate=_hover_per_point(
            f"L{layer} step %{{x}}<br>mean %{{y:.4f}} +/- %{{customdata:.4f}}<extra></extra>",
            f"L{layer} step %{{x}}<br>mean %{{y:.4f}}<extra></extra>",
            np.sum(~np.isnan(a), axis=0),
        ),
    )
    return [runs, band, mean_line]


def _null_lines(report: Any, li: int, visible: bool) -> list[dict[str, Any]]:
    """One layer's isotropic and activation-space null p99 across the steps (each left out when NaN)."""
    steps = report.steps
    out = []
    for value, color, label in (
        (report.null_p99[li], ISO_COLOR, "isotropic null p99"),
        (report.null_p99_activation[li], ACT_COLOR, "activation-space null p99"),
    ):
        if not math.isnan(float(value)):
            out.append(
                _tr(
                    "scatter",
                    x=[steps[0], steps[-1]],
                    y=[value, value],
                    mode="lines",
                    line={"color": color, "dash": "dash"},
                    name=label,
                    legendgroup=label,
                    showlegend=visible,
                    visible=visible,
                    hovertemplate=f"{label}: {float(value):.4f}<extra></extra>",
                )
            )
    return out


def _drift_trace(report: Any, li: int, visible: bool) -> dict[str, Any]:
    """One layer's drift norm per step (mean over runs, error bars the std)."""
    dmean, dstd = _mean_std(report.drift_norm[:, :, li])
    return _tr(
        "scatter",
        x=report.steps,
        y=dmean,
        mode="lines+markers",
        line={"color": MEAN_COLOR},
        error_y={"type": "data", "array": dstd, "visible": True},
        name="drift norm",
        showlegend=False,
        visible=visible,
        hovertemplate=f"L{report.layers[li]} step %{{x}}<br>||drift|| %{{y:.4g}}<extra></extra>",
    )


def _overview_traces(report: Any, rows: dict[str, tuple[int, int]], selection: Any) -> list[tuple[dict, int, int]]:
    """Every-layer panels: v_rev SNR, mean alignment per layer with nulls, the step x layer heatmap."""
    labels = [f"L{l}" for l in report.layers]
    out = [(trace, *rows["snr"]) for trace in _snr_traces(report, labels)]
    out += [(trace, *rows["profile"]) for trace in _profile_traces(report, labels)]
    out += [(trace, *rows["profile"]) for trace in _selection_traces(report, selection)]
    out.append((_heatmap_trace(report, labels), *rows["heatmap"]))
    return out


def _snr_traces(report: Any, labels: list[str]) -> list[dict[str, Any]]:
    """v_rev's signal-to-noise per layer (its norm when SNR was not measured), and the flagging threshold."""
    n = report.n_layers
    snr = np.asarray(report.v_rev_snr, dtype=np.float64)
    have_snr = bool(np.isfinite(snr).any())
    values = snr if have_snr else np.asarray(report.v_rev_norm, dtype=np.float64)
    shown = np.where(np.isfinite(values), values, np.nan)
    out = [
        _tr(
            "scatter",
            x=list(range(n)),
            y=shown,
            mode="lines+markers",
            marker={"color": [FLAG_COLOR if f else MEAN_COLOR for f in report.flagged], "size": 7},
            line={"color": "rgba(31,119,180,0.35)"},
            customdata=np.stack([labels, np.asarray(report.v_rev_norm, float)], axis=1),
            name="v_rev SNR" if have_snr else "||mu_P - mu_A||",
            showlegend=False,
            hovertemplate=(
                "%{customdata[0]}<br>"
                + ("SNR %{y:.3g}" if have_snr else "norm %{y:.4g}")
                + "<br>||mu_P - mu_A|| %{customdata[1]:.4g}<extra></extra>"
            ),
        )
    ]
    if have_snr:
        out.append(
            _tr(
                "scatter",
                x=[-0.5, n - 0.5],
                y=[report.snr_threshold] * 2,
                mode="lines",
                line={"color": FLAG_COLOR, "dash": "dot"},
                name=f"SNR threshold {report.snr_threshold:g}",
                showlegend=False,
                hovertemplate="flag below SNR %{y:.3g}<extra></extra>",
            )
        )
    return out


def _profile_traces(report: Any, labels: list[str]) -> list[dict[str, Any]]:
    """Mean alignment per layer over every run-step pair (low-SNR layers grey), and each layer's null p99s."""
    x = list(range(report.n_layers))
    flags = report.flagged
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        per_layer = np.nanmean(report.alignment, axis=(0, 1))
        spread = np.nanstd(report.alignment, axis=(0, 1))
    out = [
        _tr(
            "scatter",
            x=x,
            y=per_layer,
            mode="lines+markers",
            marker={"color": [FLAG_COLOR if f else MEAN_COLOR for f in flags], "size": 7},
            line={"color": "rgba(31,119,180,0.5)"},
            error_y={"type": "data", "array": spread},
            name="mean alignment per layer (all run-step pairs)",
            legendgroup="profile",
            customdata=np.stack([labels, ["low SNR" if f else "" for f in flags]], axis=1),
            hovertemplate="%{customdata[0]} %{customdata[1]}<br>mean cos %{y:.4f}<extra></extra>",
        )
    ]
    for values, color, label in (
        (report.null_p99, ISO_COLOR, "isotropic null p99"),
        (report.null_p99_activation, ACT_COLOR, "activation-space null p99"),
    ):
        seg_x = [v for i in x for v in (i - 0.45, i + 0.45, None)]  # one threshold segment per layer
        seg_y = [v for y in np.asarray(values, float) for v in (y, y, None)]
        out.append(
            _tr(
                "scatter",
                x=seg_x,
                y=seg_y,
                mode="lines",
                line={"color": color, "dash": "dash"},
                name=f"per layer: {label}",
                legendgroup=label,
                showlegend=False,
                hovertemplate=f"{label}: %{{y:.4f}}<extra></extra>",
            )
        )
    return out


def _selection_traces(report: Any, selection: Any) -> list[dict[str, Any]]:
    """The selection-corrected p99 across the profile panel, and a legend entry for greyed layers (if any)."""
    n = report.n_layers
    thr = selection.thresholds
    corrected = thr.get("activation_max", thr.get("sidak"))
    which = "activation-space max" if "activation_max" in thr else "isotropic, Sidak"
    out = [
        _tr(
            "scatter",
            x=[-0.5, n - 0.5],
            y=[corrected] * 2,
            mode="lines",
            line={"color": SELECT_COLOR, "dash": "dashdot"},
            name=f"p99 of the best of {selection.m} layers ({which})",
            legendgroup="selection",
            hovertemplate="selection-corrected p99 %{y:.4f}<extra></extra>",
        )
    ]
    if np.any(report.flagged):
        out.append(
            _tr(
                "scatter",
                x=[None],
                y=[None],
                mode="markers",
                marker={"color": FLAG_COLOR, "symbol": "square", "size": 12},
                name=f"low-SNR layer (v_rev SNR < {report.snr_threshold:g}): greyed",
            )
        )
    return out


def _heatmap_trace(report: Any, labels: list[str]) -> dict[str, Any]:
    """Mean alignment over runs, step x layer."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        heat = np.nanmean(report.alignment, axis=0)
    return _tr(
        "heatmap",
        z=heat,
        x=list(range(report.n_layers)),
        y=[str(s) for s in report.steps],
        colorscale=get_colorscale("RdBu"),
        zmid=0,
        zmin=-1,
        zmax=1,
        customdata=np.broadcast_to(np.asarray(labels, dtype=object), heat.shape),
        colorbar={"title": {"text": "cos"}},
        name="mean alignment",
        hovertemplate="%{customdata} step %{y}<br>mean cos %{z:.4f}<extra></extra>",
    )


def _plan(report: Any, iv: dict[str, Any] | None) -> tuple[list[tuple[str, str | None, int]], int]:
    """Rows as (left panel, right panel or None for full width, height in px), and the gap below each."""
    n_steps = len(report.steps)
    rows = [
        ("trajectory", "drift", 320),
        ("per_example", "snr", 280),
        ("profile", None, 260),
        ("heatmap", None, int(min(420, max(160, 24 * n_steps + 40)))),
    ]
    if iv:
        rows += [
            ("harmfulness", None, 220),
            ("final_alignment", None, 220),
            ("task_loss", None, 220),
            ("b1_retention", None, 220),
        ]
    return rows, GAP_MODES_PX if iv else GAP_PX


def build_dashboard(report: Any, layer: int | None = None, theme: str = "auto") -> go.Figure:
    """One Plotly figure with every view; ``layer`` picks the per-layer panels (default: the best layer).

    Args:
        report: a :class:`revlens.ReversionReport`.
        layer: the layer shown in the per-layer panels first (a dropdown switches).
        theme: ``auto`` (transparent, reads on light and dark Jupyter), ``light`` or ``dark``.

    Returns:
        A ``plotly.graph_objects.Figure`` whose height fits its panels (width follows the page).

    Example:
        >>> fig = report.dashboard()  # build_dashboard(report)
        >>> type(fig).__name__, fig.layout.height > 0
        ('Figure', True)
        >>> report.save_html(tmp / "dashboard" / "dashboard.html").name  # one offline HTML file
        'dashboard.html'
    """
    if theme not in THEMES:
        raise ValueError(f"unknown theme {theme!r}; choose one of {sorted(THEMES)}.")
    style = THEMES[theme]
    layer = report.best_layer if layer is None else layer
    if layer not in report.layers:
        raise ValueError(f"layer {layer} was not analysed; the report has layers {report.layers}.")
    selection = report.selection()
    iv = report.interventions
    plan, gap = _plan(report, iv)
    names = _panel_names(report)
    rows, titles, specs = _grid_cells(plan, names, layer)
    row_px = [h for *_, h in plan]
    plot_px = sum(row_px) + gap * (len(plan) - 1)
    top = LEGEND_TOP_PX + LEGEND_PX + SUBTITLE_PX
    height = top + plot_px + MARGIN["b"]
    grid_kw = {
        "rows": len(plan),
        "cols": 2,
        "subplot_titles": titles,
        "specs": specs,
        "horizontal_spacing": 0.09,
        "vertical_spacing": gap / plot_px,
        "row_heights": row_px,
    }
    refs = _axis_refs(make_subplots(**grid_kw), rows)
    data, per_layer_counts, n_fixed = _placed_traces(report, layer, rows, refs, selection, iv)
    fig = go.Figure(data=data, _validate=False)
    make_subplots(figure=fig, **grid_kw)
    _style_axes(fig, report, rows, iv, style, refs)
    _grey_flagged(fig, report, rows, refs)
    buttons = _layer_buttons(report, titles, names, plan, per_layer_counts, n_fixed)
    plot_top_frac = lambda px: 1 + (top - px) / plot_px  # noqa: E731  (pixels from the top -> paper y)
    fig.update_layout(
        updatemenus=[_layer_menu(buttons, report.layers.index(layer), plot_top_frac(TITLE_TOP_PX))],
        title=_title(report, selection, height),
        template=pio.templates[style["template"]],
        paper_bgcolor=style["paper"],
        plot_bgcolor=style["plot"],
        font={"color": style["font"]},
        height=height,
        margin={**MARGIN, "t": top},
        legend={
            "orientation": "h",
            "x": 0.0,
            "xanchor": "left",
            "y": plot_top_frac(LEGEND_TOP_PX),
            "yanchor": "top",
            "bgcolor": "rgba(0,0,0,0)",
        },
    )
    _fit_colorbar(fig, rows)
    return fig


def _panel_names(report: Any) -> dict[str, str]:
    """Each panel's subplot title (``{layer}`` filled with the layer shown)."""
    return {
        "trajectory": "Alignment cos(drift, v_rev) per step, layer {layer}",
        "drift": "Drift norm ||mu_t - mu_A|| per step, layer {layer}",
        "per_example": "Per-example alignment per step, layer {layer} (box 25-75%, whiskers 5-95%)",
        "snr": (
            "v_rev signal-to-noise per layer: ||mu_P - mu_A|| / standard error"
            if np.isfinite(np.asarray(report.v_rev_snr, float)).any()
            else "||mu_P - mu_A|| per layer (signal-to-noise not measured)"
        ),
        "profile": "Mean alignment per layer, nulls and the selection-corrected p99",
        "heatmap": "Mean alignment, layer x step",
        "harmfulness": _sentence(metric_labels(report.config)["harmfulness"]) + " after fine-tuning, by mode",
        "final_alignment": "Final alignment at the last step, by mode",
        "task_loss": "Fine-tuning task loss (held-out), by mode",
        "b1_retention": _sentence(metric_labels(report.config)["b1_retention"]) + ", by mode",
    }


def _grid_cells(
    plan: list[tuple[str, str | None, int]], names: dict[str, str], layer: int
) -> tuple[dict[str, tuple[int, int]], list[str], list[list[dict | None]]]:
    """Each panel's (row, col), the subplot titles in grid order, and the grid's specs (full-width or halves)."""
    rows: dict[str, tuple[int, int]] = {}
    titles, specs = [], []
    for r, (left, right, _) in enumerate(plan, start=1):
        rows[left] = (r, 1)
        titles.append(names[left].format(layer=layer))
        if right is None:
            specs.append([{"colspan": 2}, None])
        else:
            rows[right] = (r, 2)
            titles.append(names[right].format(layer=layer))
            specs.append([{}, {}])
    return rows, titles, specs


def _axis_refs(grid: go.Figure, rows: dict[str, tuple[int, int]]) -> dict[tuple[int, int], tuple[str, str]]:
    """The (x, y) axis names (``x3``, ``y3``) of each panel's cell."""
    refs = {}
    for r, c in rows.values():
        sub = grid.get_subplot(r, c)
        refs[(r, c)] = (sub.xaxis.plotly_name.replace("axis", ""), sub.yaxis.plotly_name.replace("axis", ""))
    return refs


def _placed_traces(
    report: Any,
    layer: int,
    rows: dict[str, tuple[int, int]],
    refs: dict[tuple[int, int], tuple[str, str]],
    selection: Any,
    iv: dict[str, Any] | None,
) -> tuple[list[dict[str, Any]], list[int], int]:
    """Every trace on its panel's axes (each layer's in turn, then the fixed ones), the number of traces of each
    layer, and the number of fixed traces."""
    per_layer_counts, batch = [], []
    for li, l in enumerate(report.layers):
        traces = _layer_traces(report, li, visible=(l == layer), rows=rows)
        per_layer_counts.append(len(traces))
        batch += traces
    fixed = _overview_traces(report, rows, selection) + (_intervention_traces(iv, rows) if iv else [])
    batch += fixed
    data = [{**trace, "xaxis": refs[(r, c)][0], "yaxis": refs[(r, c)][1]} for trace, r, c in batch]
    return data, per_layer_counts, len(fixed)


def _layer_buttons(
    report: Any,
    titles: list[str],
    names: dict[str, str],
    plan: list[tuple[str, str | None, int]],
    per_layer_counts: list[int],
    n_fixed: int,
) -> list[dict[str, Any]]:
    """One dropdown entry per layer: show its traces (and the fixed ones), rename the per-layer panels' titles."""
    per_layer_titles = [i for i, t in enumerate(titles) if "layer {layer}" in names[_panel_of(i, plan)]]
    buttons = []
    flags = report.flagged
    for li, l in enumerate(report.layers):
        visible = []
        for lj, count in enumerate(per_layer_counts):
            visible += [lj == li] * count
        visible += [True] * n_fixed
        relabel = {f"annotations[{i}].text": names[_panel_of(i, plan)].format(layer=l) for i in per_layer_titles}
        tag = " (best)" if li == report.best_layer_index() else (" (low SNR)" if flags[li] else "")
        buttons.append({"label": f"layer {l}{tag}", "method": "update", "args": [{"visible": visible}, relabel]})
    return buttons


def _layer_menu(buttons: list[dict[str, Any]], active: int, y: float) -> dict[str, Any]:
    """The layer dropdown, top right at paper height ``y``."""
    return {
        "buttons": buttons,
        "active": active,
        "x": 1.0,
        "xanchor": "right",
        "y": y,
        "yanchor": "top",
        "direction": "down",
        "showactive": True,
    }


def _title(report: Any, selection: Any, height: int) -> dict[str, Any]:
    """The figure's title, with a subtitle of what was measured and the best layer's corrected p-value."""
    n = report.n_layers
    best = report.best_layer
    pv = selection.p_value.get("activation_max")
    if pv is None or not np.isfinite(pv):
        pv = selection.p_value.get("sidak")
    subtitle = (
        f"{len(report.runs)} run(s) x {len(report.steps)} step(s), {n} layer(s) "
        f"(L{report.layers[0]}-L{report.layers[-1]}), best L{best} "
        f"(p = {pv:.2g} for the best of {selection.m}); readout {report.config.get('readout', '?')}, "
        f"contrast {report.config.get('contrast', '?')}"
        + (f"; {len(report.flagged_layers)} low-SNR layer(s) greyed" if report.flagged_layers else "")
    )
    return {
        "text": f"revlens: fine-tuning drift along v_rev<br><span style='font-size:12px'>{subtitle}</span>",
        "x": 0.0,
        "xref": "paper",
        "xanchor": "left",
        "y": 1 - TITLE_TOP_PX / height,
        "yanchor": "top",
    }


def _fit_colorbar(fig: go.Figure, rows: dict[str, tuple[int, int]]) -> None:
    """Set the heatmap's colour bar beside the heatmap, as tall as it."""
    heat_axis = fig.get_subplot(*rows["heatmap"]).yaxis
    dom = heat_axis.domain
    fig.update_traces(
        selector={"type": "heatmap"},
        colorbar={"len": dom[1] - dom[0], "y": (dom[0] + dom[1]) / 2, "yanchor": "middle", "x": 1.01, "thickness": 14},
    )


def _panel_of(title_index: int, plan: list[tuple[str, str | None, int]]) -> str:
    panels = [p for left, right, _ in plan for p in ((left,) if right is None else (left, right))]
    return panels[title_index]


def _style_axes(
    fig: go.Figure,
    report: Any,
    rows: dict[str, tuple[int, int]],
    iv: Any,
    style: dict,
    refs: dict[tuple[int, int], tuple[str, str]],
) -> None:
    fig.update_xaxes(gridcolor=style["grid"], zerolinecolor=style["grid"])
    fig.update_yaxes(gridcolor=style["grid"], zerolinecolor=style["grid"])
    step_label = "fine-tuning step (optimizer updates)"
    log_ticks = {
        "type": "log",
        "tickmode": "array",
        "tickvals": report.steps,
        "ticktext": [str(s) for s in report.steps],
    }
    fig.update_xaxes(title_text=step_label, row=rows["trajectory"][0], col=rows["trajectory"][1], **log_ticks)
    fig.update_yaxes(title_text="cosine", row=rows["trajectory"][0], col=rows["trajectory"][1])
    fig.update_xaxes(title_text=step_label, row=rows["drift"][0], col=rows["drift"][1], **log_ticks)
    fig.update_yaxes(title_text="L2 norm (activation units)", row=rows["drift"][0], col=rows["drift"][1])
    fig.update_xaxes(title_text=step_label, type="category", row=rows["per_example"][0], col=rows["per_example"][1])
    fig.update_yaxes(title_text="cosine (per prompt)", row=rows["per_example"][0], col=rows["per_example"][1])
    n = report.n_layers
    labels = [f"L{l}" for l in report.layers]
    for panel, max_ticks in (("snr", MAX_HALF_TICKS), ("profile", MAX_FULL_TICKS), ("heatmap", MAX_FULL_TICKS)):
        ticks = _layer_ticks(n, max_ticks)
        fig.update_xaxes(
            title_text="layer",
            tickmode="array",
            tickvals=ticks,
            ticktext=[labels[i] for i in ticks],
            range=[-0.5, n - 0.5],
            tickangle=0,
            row=rows[panel][0],
            col=rows[panel][1],
        )
    snr = np.asarray(report.v_rev_snr, float)
    snr_log = bool(np.isfinite(snr).any())
    shown = snr if snr_log else np.asarray(report.v_rev_norm, float)
    shown = shown[np.isfinite(shown) & (shown > 0)]
    decades = {"dtick": 1} if shown.size and shown.max() / shown.min() > 100 else {}  # long ranges: decades only
    fig.update_yaxes(
        title_text="SNR (log)" if snr_log else "L2 norm (log)",
        type="log",
        row=rows["snr"][0],
        col=rows["snr"][1],
        **decades,
    )
    fig.update_yaxes(title_text="cosine", row=rows["profile"][0], col=rows["profile"][1])
    fig.update_yaxes(title_text="step", type="category", row=rows["heatmap"][0], col=rows["heatmap"][1])
    if iv:
        tracked = tracked_behaviours(report.config)
        for panel, label in (
            ("harmfulness", f"% of {tracked['harmfulness']['prompts']}"),
            ("final_alignment", "cosine"),
            ("task_loss", "cross-entropy (nats/token)"),
            ("b1_retention", f"% of {tracked['b1_retention']['prompts']}"),
        ):
            fig.update_yaxes(title_text=label, row=rows[panel][0], col=rows[panel][1])
        p99 = float(report.null_p99[report.best_layer_index()])
        xref, yref = refs[rows["final_alignment"]]
        fig.add_shape(
            type="line",
            xref=f"{xref} domain",
            x0=0,
            x1=1,
            yref=yref,
            y0=p99,
            y1=p99,
            line={"color": ISO_COLOR, "dash": "dash"},
        )
        fig.add_annotation(
            xref=f"{xref} domain",
            x=1,
            xanchor="right",
            yref=yref,
            y=p99,
            yanchor="bottom",
            text=f"isotropic p99 {p99:.3f}",
            showarrow=False,
            bgcolor="rgba(128,128,128,0.15)",
        )
        modes = iv["modes"]
        wrapped = [m.replace("+", "+<br>") if len(m) > 10 else m for m in modes]
        for panel in ("harmfulness", "final_alignment", "task_loss", "b1_retention"):
            fig.update_xaxes(tickmode="array", tickvals=modes, ticktext=wrapped, tickangle=0, row=rows[panel][0], col=1)


def _grey_flagged(
    fig: go.Figure, report: Any, rows: dict[str, tuple[int, int]], refs: dict[tuple[int, int], tuple[str, str]]
) -> None:
    """Grey out low-SNR layers: a light band on the per-layer panels, an opaque veil on the heatmap."""
    shapes = []
    for i, j in _flag_runs(report.flagged):
        for panel, color in (("snr", FLAG_SHADE), ("profile", FLAG_SHADE), ("heatmap", FLAG_COLOR)):
            xref, yref = refs[rows[panel]]
            shapes.append(
                {
                    "type": "rect",
                    "xref": xref,
                    "yref": f"{yref} domain",
                    "x0": i - 0.5,
                    "x1": j + 0.5,
                    "y0": 0,
                    "y1": 1,
                    "fillcolor": color,
                    "line": {"width": 0},
                    "layer": "above" if panel == "heatmap" else "below",
                }
            )
    fig.update_layout(shapes=list(fig.layout.shapes) + shapes)


def _intervention_traces(iv: dict[str, Any], rows: dict[str, tuple[int, int]]) -> list[tuple[dict, int, int]]:
    modes = iv["modes"]
    out = []
    scales = (("harmfulness", 100.0), ("final_alignment", 1.0), ("task_loss", 1.0), ("b1_retention", 100.0))
    for metric, scale in scales:
        means, stds, texts, counts = [], [], [], []
        for mode in modes:
            vals = np.asarray(iv["metrics"][mode].get(metric, []), dtype=float) * scale
            m, s = _mean_std(vals[None, :], axis=1) if vals.size else (np.array([np.nan]), np.array([0.0]))
            means.append(float(m[0]))
            stds.append(float(s[0]))
            texts.append(", ".join(f"{v:.3f}" for v in vals))
            counts.append(int(np.count_nonzero(~np.isnan(vals))))
        out.append(
            (
                _tr(
                    "bar",
                    x=modes,
                    y=means,
                    error_y={"type": "data", "array": stds, "visible": True},
                    marker={"color": [MODE_COLORS[i % len(MODE_COLORS)] for i in range(len(modes))]},
                    customdata=np.stack([stds, texts], axis=1),
                    showlegend=False,
                    name=metric,
                    hovertemplate=_hover_per_point(
                        "%{x}<br>mean %{y:.3f} +/- %{customdata[0]:.3f}<br>per seed: %{customdata[1]}<extra></extra>",
                        "%{x}<br>mean %{y:.3f}<br>per seed: %{customdata[1]}<extra></extra>",
                        counts,
                    ),
                ),
                *rows[metric],
            )
        )
    return out


def _cost_axis(rows: list[dict[str, Any]], cost: str) -> tuple[list[float], list[float]]:
    """x values (and their seed spread) of one trade-off panel: task loss, or over-refusal in percent."""
    if cost == "task loss":
        return (
            [r["task_loss"]["mean"] for r in rows],
            [
                float(np.std(r["task_loss"]["per_seed"], ddof=1)) if len(r["task_loss"]["per_seed"]) > 1 else 0.0
                for r in rows
            ],
        )
    return [100 * (1 - r["sets"]["harmless"]["rate"]) for r in rows], [0.0] * len(rows)


def defense_figure(defenses: dict[str, Any], harm_set: str = "harmbench", theme: str = "light") -> go.Figure:
    """Harm against what it costs, for every mode of a defenses comparison (``report.config["defenses"]``).

    One panel per trade-off of :func:`revlens.defense_table.trade_off_fronts`: x the task loss (mean over seeds,
    with the seeds' spread, log scale), then the over-refusal (harmless prompts refused, %); y the harm rate on
    ``harm_set`` with its 95% Wilson interval. One colour per method, the strengths joined by a line, the
    pretrain and align models as reference lines, and each panel's Pareto front outlined.

    Args:
        defenses: the comparison (:func:`revlens.defenses.defense_rows` rows plus ``phases``, ``sets``).
        harm_set: the harmful set on the y axis (``harmbench`` or ``heldout``).
        theme: ``light``, ``dark`` or ``auto``.

    Returns:
        A ``plotly.graph_objects.Figure``.
    """
    from revlens.defense_table import trade_off_fronts

    style = THEMES[theme]
    rows = [r for r in defenses["rows"] if "task_loss" in r]
    fronts = trade_off_fronts(rows, harm_set)
    titles = {
        "task loss": "task loss (held-out benign task, log scale)",
        "over-refusal": "harmless prompts refused (%)",
    }
    fig = make_subplots(rows=1, cols=len(fronts), shared_yaxes=True, horizontal_spacing=0.06)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for col, (cost, front) in enumerate(fronts.items(), start=1):
        for i, method in enumerate(methods):
            mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["task_loss"]["mean"])
            cells = [r["sets"][harm_set] for r in mine]
            x, sd = _cost_axis(mine, cost)
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=[100 * c["rate"] for c in cells],
                    error_y={
                        "type": "data",
                        "symmetric": False,
                        "array": [100 * (c["high"] - c["rate"]) for c in cells],
                        "arrayminus": [100 * (c["rate"] - c["low"]) for c in cells],
                    },
                    error_x={"type": "data", "array": sd, "visible": any(sd)},
                    mode="lines+markers",
                    name=method,
                    legendgroup=method,
                    showlegend=col == 1,
                    marker={
                        "size": 10,
                        "color": MODE_COLORS[i % len(MODE_COLORS)],
                        "line": {"width": [3 if r["mode"] in front else 0 for r in mine], "color": style["font"]},
                    },
                    text=[r["mode"] for r in mine],
                    hovertemplate="%{text}<br>" + cost + " %{x:.3f}<br>harm %{y:.1f}%<extra>" + method + "</extra>",
                ),
                row=1,
                col=col,
            )
        # log scale: a collapsed task (loss 5+) sits beside modes that differ by hundredths
        fig.update_xaxes(title_text=titles[cost], type="log" if cost == "task loss" else "linear", row=1, col=col)
    for phase, summary in defenses.get("phases", {}).items():
        rate = 100 * summary["sets"][harm_set]["rate"]
        fig.add_hline(y=rate, line_dash="dot", annotation_text=f"{phase} {rate:.0f}%", line_color=style["font"])
    fig.update_yaxes(title_text=f"harm on {harm_set} (%)", row=1, col=1)
    fig.update_layout(
        title=f"Harm on {harm_set} (95% Wilson) against its costs after {defenses.get('steps')} steps; "
        "outlined: on that panel's best trade-off",
        template=style["template"],
        paper_bgcolor=style["paper"],
        plot_bgcolor=style["plot"],
        font={"color": style["font"]},
        height=520,
    )
    return fig


def save_dashboard_html(report: Any, path: str | Path, layer: int | None = None, theme: str = "light") -> Path:
    """Write the dashboard as ONE self-contained HTML file (plotly.js embedded: works offline); a report with a
    defenses comparison (``report.config["defenses"]``) gets its harm-versus-task-cost figure below."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = build_dashboard(report, layer=layer, theme=theme)
    html = fig.to_html(include_plotlyjs=True, full_html=True, config={"displaylogo": False})
    defenses = (report.config or {}).get("defenses")
    if defenses:
        extra = defense_figure(defenses, theme=theme).to_html(include_plotlyjs=False, full_html=False)
        html = html.replace("</body>", extra + "\n</body>", 1)
    return atomic_write_text(path, html)
