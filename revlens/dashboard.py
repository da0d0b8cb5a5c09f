"""Interactive Plotly dashboard of a ReversionReport, for Jupyter or as one self-contained HTML file.

Panels: alignment per step (mean +/- std over runs, runs faint, null p99 lines); a layer x step
heatmap; drift norm per step; the per-example alignment distribution; and, when the report has
them, the blocking modes compared (harmfulness, final alignment, task loss, error bars = std over
seeds). A dropdown switches the per-layer panels between layers.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from revlens._util import atomic_write_text

THEMES = {
    # Transparent backgrounds and mid-grey text read on both light and dark Jupyter themes.
    "auto": {"template": "plotly_white", "paper": "rgba(0,0,0,0)", "plot": "rgba(0,0,0,0)", "font": "#808080",
             "grid": "rgba(128,128,128,0.25)"},
    "light": {"template": "plotly_white", "paper": "white", "plot": "white", "font": "#222222",
              "grid": "rgba(128,128,128,0.25)"},
    "dark": {"template": "plotly_dark", "paper": "#111111", "plot": "#111111", "font": "#e0e0e0",
             "grid": "rgba(200,200,200,0.2)"},
}
RUN_COLOR = "rgba(31,119,180,0.25)"
MEAN_COLOR = "rgb(31,119,180)"
BAND_COLOR = "rgba(31,119,180,0.2)"
ISO_COLOR = "rgb(214,39,40)"
ACT_COLOR = "rgb(255,127,14)"
MODE_COLORS = ("#7f7f7f", "#1f77b4", "#2ca02c", "#9467bd", "#d62728", "#8c564b", "#e377c2", "#17becf",
               "#bcbd22", "#ff7f0e")


def _mean_std(x: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(x, axis=axis)
        n = np.sum(~np.isnan(x), axis=axis)
        std = np.where(n > 1, np.nanstd(x, axis=axis, ddof=1) if x.shape[axis] > 1 else 0.0, 0.0)
    return mean, np.nan_to_num(std)


def _layer_traces(report: Any, li: int, visible: bool) -> list[tuple[go.BaseTraceType, int, int]]:
    """Traces of one layer for the trajectory (1,1), drift (2,1) and per-example (2,2) panels."""
    steps = report.steps
    layer = report.layers[li]
    out: list[tuple[go.BaseTraceType, int, int]] = []
    a = report.alignment[:, :, li]
    mean, std = _mean_std(a)
    for ri, run in enumerate(report.runs):
        out.append((go.Scatter(x=steps, y=a[ri], mode="lines", line=dict(color=RUN_COLOR, width=1),
                               name=f"run {run}", legendgroup="runs", showlegend=(ri == 0 and visible),
                               visible=visible,
                               hovertemplate=f"run {run}, L{layer}<br>step %{{x}}<br>cos %{{y:.4f}}<extra></extra>"),
                    1, 1))
    out.append((go.Scatter(x=steps + steps[::-1], y=list(mean + std) + list((mean - std)[::-1]), fill="toself", mode="lines",
                           fillcolor=BAND_COLOR, line=dict(width=0), hoverinfo="skip", name="mean +/- std",
                           legendgroup="band", showlegend=visible, visible=visible), 1, 1))
    out.append((go.Scatter(x=steps, y=mean, mode="lines+markers", line=dict(color=MEAN_COLOR, width=3),
                           name=f"mean over {len(report.runs)} runs", legendgroup="mean", showlegend=visible,
                           visible=visible, customdata=std,
                           hovertemplate=f"L{layer} step %{{x}}<br>mean %{{y:.4f}} +/- %{{customdata:.4f}}<extra></extra>"),
                1, 1))
    for value, color, label in ((report.null_p99[li], ISO_COLOR, "isotropic null p99"),
                                (report.null_p99_activation[li], ACT_COLOR, "activation-space null p99")):
        if not math.isnan(float(value)):
            out.append((go.Scatter(x=[steps[0], steps[-1]], y=[value, value], mode="lines",
                                   line=dict(color=color, dash="dash"), name=label, legendgroup=label,
                                   showlegend=visible, visible=visible,
                                   hovertemplate=f"{label}: {float(value):.4f}<extra></extra>"), 1, 1))
    dmean, dstd = _mean_std(report.drift_norm[:, :, li])
    out.append((go.Scatter(x=steps, y=dmean, mode="lines+markers", line=dict(color=MEAN_COLOR),
                           error_y=dict(type="data", array=dstd, visible=True), name="drift norm",
                           showlegend=False, visible=visible,
                           hovertemplate=f"L{layer} step %{{x}}<br>||drift|| %{{y:.4g}}<extra></extra>"), 2, 1))
    per_ex = report.per_example_cos[:, :, li, :]
    xs, ys = [], []
    for si, step in enumerate(steps):
        vals = per_ex[:, si, :].ravel()
        vals = vals[~np.isnan(vals)]
        xs += [str(step)] * len(vals)
        ys += vals.tolist()
    out.append((go.Box(x=xs, y=ys, name="per-example cos", marker=dict(color=MEAN_COLOR, size=3),
                       boxpoints="outliers", showlegend=False, visible=visible,
                       hovertemplate=f"L{layer} step %{{x}}<br>cos %{{y:.4f}}<extra></extra>"), 2, 2))
    return out


def _intervention_traces(iv: dict[str, Any]) -> list[tuple[go.BaseTraceType, int, int]]:
    modes = iv["modes"]
    panels = (("harmfulness", 3, 1, 100.0), ("final_alignment", 4, 1, 1.0), ("task_loss", 5, 1, 1.0),
              ("b1_retention", 6, 1, 100.0))
    out = []
    for metric, row, col, scale in panels:
        means, stds, texts = [], [], []
        for mode in modes:
            vals = np.asarray(iv["metrics"][mode].get(metric, []), dtype=float) * scale
            m, s = _mean_std(vals[None, :], axis=1) if vals.size else (np.array([np.nan]), np.array([0.0]))
            means.append(float(m[0]))
            stds.append(float(s[0]))
            texts.append(", ".join(f"{v:.3f}" for v in vals))
        out.append((go.Bar(x=modes, y=means, error_y=dict(type="data", array=stds, visible=True),
                           marker_color=[MODE_COLORS[i % len(MODE_COLORS)] for i in range(len(modes))],
                           customdata=np.stack([stds, texts], axis=1), showlegend=False, name=metric,
                           hovertemplate="%{x}<br>mean %{y:.3f} +/- %{customdata[0]:.3f}<br>per seed: "
                                         "%{customdata[1]}<extra></extra>"), row, col))
    return out


def build_dashboard(report: Any, layer: int | None = None, theme: str = "auto") -> go.Figure:
    """One Plotly figure with every view; ``layer`` picks the per-layer panels (default: most aligned)."""
    if theme not in THEMES:
        raise ValueError(f"unknown theme {theme!r}; choose one of {sorted(THEMES)}.")
    style = THEMES[theme]
    layer = report.best_layer if layer is None else layer
    if layer not in report.layers:
        raise ValueError(f"layer {layer} was not analysed; the report has layers {report.layers}.")
    iv = report.interventions
    rows = 6 if iv else 2  # the by-mode panels span both columns, so long mode names fit
    titles = ["Alignment cos(drift, v_rev) per step", "Mean alignment, layer x step",
              "Drift norm ||mu_t - mu_A|| per step", "Per-example alignment per step"]
    if iv:
        titles += ["Harmfulness after fine-tuning, by mode", "Final alignment at the last step, by mode",
                   "Fine-tuning task loss (held-out), by mode", "B1 retention, by mode"]
    specs = [[{}, {}], [{}, {}]] + [[{"colspan": 2}, None]] * (rows - 2)
    fig = make_subplots(rows=rows, cols=2, subplot_titles=titles, specs=specs, horizontal_spacing=0.1,
                        vertical_spacing=0.07 if iv else 0.14,
                        row_heights=[1.25, 1.25, 1, 1, 1, 1] if iv else None)
    per_layer_counts = []
    for li, l in enumerate(report.layers):
        traces = _layer_traces(report, li, visible=(l == layer))
        per_layer_counts.append(len(traces))
        for trace, r, c in traces:
            fig.add_trace(trace, row=r, col=c)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        heat = np.nanmean(report.alignment, axis=0).T
    fig.add_trace(go.Heatmap(z=heat, x=[str(s) for s in report.steps], y=[f"L{l}" for l in report.layers],
                             colorscale="RdBu", zmid=0, zmin=-1, zmax=1,
                             colorbar=dict(title="cos", len=0.2 if iv else 0.45, y=0.9 if iv else 0.8),
                             hovertemplate="%{y} step %{x}<br>mean cos %{z:.4f}<extra></extra>"), row=1, col=2)
    n_fixed = 1
    if iv:
        for trace, r, c in _intervention_traces(iv):
            fig.add_trace(trace, row=r, col=c)
            n_fixed += 1
    buttons = []
    for li, l in enumerate(report.layers):
        visible = []
        for lj, count in enumerate(per_layer_counts):
            visible += [lj == li] * count
        visible += [True] * n_fixed
        buttons.append(dict(label=f"layer {l}", method="update", args=[{"visible": visible}]))
    fig.update_layout(
        updatemenus=[dict(buttons=buttons, active=report.layers.index(layer), x=0.0, xanchor="left", y=1.08,
                          yanchor="bottom", direction="down", showactive=True)],
        title=dict(text=f"revlens: fine-tuning drift along v_rev ({len(report.runs)} runs, layers "
                        f"{report.layers}; readout {report.config.get('readout', '?')}, contrast "
                        f"{report.config.get('contrast', '?')})", x=0.5, y=0.995, yanchor="top"),
        template=style["template"], paper_bgcolor=style["paper"], plot_bgcolor=style["plot"],
        font=dict(color=style["font"]), height=2200 if iv else 760, margin=dict(t=110, l=70, r=40, b=90),
        legend=dict(orientation="h", x=0.0, y=-0.05 if iv else -0.1),
    )
    fig.update_xaxes(gridcolor=style["grid"], zerolinecolor=style["grid"])
    fig.update_yaxes(gridcolor=style["grid"], zerolinecolor=style["grid"])
    step_label = "fine-tuning step (optimizer updates)"
    log_ticks = dict(type="log", tickmode="array", tickvals=report.steps, ticktext=[str(s) for s in report.steps])
    fig.update_xaxes(title_text=step_label, row=1, col=1, **log_ticks)
    fig.update_yaxes(title_text="cosine", row=1, col=1)
    fig.update_xaxes(title_text=step_label, row=1, col=2)
    fig.update_yaxes(title_text="layer", row=1, col=2)
    fig.update_xaxes(title_text=step_label, row=2, col=1, **log_ticks)
    fig.update_yaxes(title_text="L2 norm (activation units)", row=2, col=1)
    fig.update_xaxes(title_text=step_label, row=2, col=2)
    fig.update_yaxes(title_text="cosine (per prompt)", row=2, col=2)
    if iv:
        fig.update_yaxes(title_text="% of harmful prompts", row=3, col=1)
        fig.update_yaxes(title_text="cosine", row=4, col=1)
        fig.update_yaxes(title_text="cross-entropy (nats/token)", row=5, col=1)
        fig.update_yaxes(title_text="% of held-out B1 prompts", row=6, col=1)
        p99 = float(report.null_p99[report.best_layer_index()])
        fig.add_hline(y=p99, line=dict(color=ISO_COLOR, dash="dash"), row=4, col=1,
                      annotation_text=f"isotropic p99 {p99:.3f}", annotation_position="top right")
        modes = iv["modes"]
        wrapped = [m.replace("+", "+<br>") if len(m) > 10 else m for m in modes]
        for r in (3, 4, 5, 6):
            fig.update_xaxes(title_text="blocking mode", tickmode="array", tickvals=modes, ticktext=wrapped,
                             tickangle=0, row=r, col=1)
    return fig


def save_dashboard_html(report: Any, path: str | Path, layer: int | None = None, theme: str = "light") -> Path:
    """Write the dashboard as ONE self-contained HTML file (plotly.js embedded: works offline)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = build_dashboard(report, layer=layer, theme=theme)
    html = fig.to_html(include_plotlyjs=True, full_html=True, config={"displaylogo": False})
    return atomic_write_text(path, html)
