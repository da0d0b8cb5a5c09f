"""Synthetic reports at real depth (30-80 layers, 1-10 runs) for the dashboard and browser tests."""

from __future__ import annotations

import numpy as np
import torch

from revlens.demos.organism.demo import ALL_MODES
from revlens.report import ReversionReport

MODES = list(ALL_MODES)  # the demo's full blocking table: ten mode names of every length


def deep_report(
    n_layers: int = 32,
    n_runs: int = 3,
    steps: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100),
    n_prompts: int = 40,
    d: int = 576,
    blocking: bool = True,
    seed: int = 0,
) -> ReversionReport:
    """Signal grows with depth and peaks at 80% of the layers; the first three layers' v_rev is noise (flagged)."""
    rng = np.random.default_rng(seed)
    depth = np.linspace(0, 1, n_layers)
    peak = 0.65 * np.exp(-((depth - 0.8) ** 2) / 0.05)
    shape = (n_runs, len(steps), n_layers)
    ramp = 1 - np.exp(-np.asarray(steps, float) / 5)[None, :, None]
    alignment = np.clip(peak[None, None, :] * (0.6 + 0.4 * ramp) + rng.normal(0, 0.04, shape), -1, 1)
    per_example = np.clip(alignment[..., None] + rng.normal(0, 0.2, shape + (n_prompts,)), -1, 1)
    snr = np.r_[[0.9, 1.4, 2.2], np.geomspace(5, 300, n_layers - 3)]
    draws = rng.normal(0, 0.08, (n_layers, 4000)).astype(np.float32)
    v = torch.eye(n_layers, d)
    interventions = None
    if blocking:
        metrics = {}
        for i, mode in enumerate(MODES):
            harm = [1.0, 1.0, 1.0] if i < 5 else list(np.clip(rng.uniform(0.0, 0.5, 3), 0, 1))
            metrics[mode] = {
                "harmfulness": harm,
                "final_alignment": list(rng.uniform(-0.1, 0.8, 3)),
                "task_loss": list(rng.uniform(0.025, 0.045, 3)),
                "b1_retention": list(rng.uniform(0.8, 0.95, 3)),
            }
        interventions = {"modes": MODES, "seeds": [0, 1, 2], "best_mode": MODES[-1], "metrics": metrics}
    return ReversionReport(
        layers=list(range(n_layers)),
        runs=[f"seed_{i}" for i in range(n_runs)],
        steps=list(steps),
        d_model=d,
        v_rev=v,
        v_rev_basis=v[:, None].clone(),
        alignment=alignment,
        alignment_per_example=alignment,
        per_example_cos=per_example,
        drift_norm=np.abs(rng.normal(1, 0.2, shape)) * np.asarray(steps)[None, :, None] ** 0.5,
        p_value=np.zeros(shape),
        null_p99=np.full(n_layers, 0.097),
        null_p99_activation=np.quantile(draws, 0.99, axis=1),
        v_rev_norm=np.geomspace(0.01, 80, n_layers),
        v_rev_snr=snr,
        null_draws_activation=draws,
        config={"hook": "resid_post", "readout": "last", "estimator": "mean_diff", "contrast": True},
        interventions=interventions,
    )


def figure_geometry(fig, width: int = 1284) -> dict:
    """Pixel boxes (x0, y0, x1, y1 from the top-left of the figure) of every panel and subplot title.

    ``width`` is the figure's rendered width (a 1300 px window minus the page's 8 px body margins).
    """
    lay = fig.layout
    height, m = lay.height, lay.margin
    plot_w, plot_h = width - m.l - m.r, height - m.t - m.b

    def px(xd, yd):
        return (m.l + xd[0] * plot_w, m.t + (1 - yd[1]) * plot_h, m.l + xd[1] * plot_w, m.t + (1 - yd[0]) * plot_h)

    panels = {}
    for row in fig._grid_ref:
        for cell in row:
            if cell is None:
                continue
            xa, ya = (lay[k] for k in cell[0].layout_keys)
            ref = cell[0].trace_kwargs
            panels[(ref["xaxis"], ref["yaxis"])] = px(xa.domain, ya.domain)
    titles = []
    for ann in lay.annotations:
        if ann.xref == "paper" and ann.yref == "paper" and ann.yanchor == "bottom":
            x = m.l + ann.x * plot_w
            y = m.t + (1 - ann.y) * plot_h
            w = 7.0 * len(ann.text)
            titles.append((ann.text, (x - w / 2, y - 20, x + w / 2, y)))
    return {"width": width, "height": height, "panels": panels, "titles": titles, "plot_h": plot_h, "plot_w": plot_w}


def overlaps(a: tuple, b: tuple, pad: float = 0.0) -> bool:
    return a[0] < b[2] + pad and b[0] < a[2] + pad and a[1] < b[3] + pad and b[1] < a[3] + pad
