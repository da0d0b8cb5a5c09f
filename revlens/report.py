"""ReversionReport: what `analyze` measured, with summaries, JSON + tensor persistence."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from revlens._util import atomic_save_tensors, atomic_write_json
from revlens.nulls import exceedance_count

REPORT_JSON = "report.json"
REPORT_TENSORS = "tensors.safetensors"


def mean_std(values: Any) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1 when n>1) ignoring NaN."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        return float("nan"), float("nan")
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return float(arr.mean()), std


def fmt_pm(values: Any, digits: int = 3, scale: float = 1.0, suffix: str = "") -> str:
    m, s = mean_std(np.asarray(values, dtype=np.float64) * scale)
    return f"{m:.{digits}f}{suffix} +/- {s:.{digits}f}{suffix}"


@dataclass
class ReversionReport:
    """Layer-wise alignment of fine-tuning drift with v_rev, and its null models.

    Array axes: ``alignment``, ``alignment_per_example``, ``drift_norm`` and ``p_value`` are
    ``[n_runs, n_steps, n_layers]`` (NaN where a run has no checkpoint at that step);
    ``per_example_cos`` is ``[n_runs, n_steps, n_layers, n_prompts]``; ``v_rev`` is
    ``[n_layers, d_model]`` with unit rows and ``v_rev_basis`` ``[n_layers, k, d_model]``.
    """

    layers: list[int]
    runs: list[str]
    steps: list[int]
    d_model: int
    v_rev: torch.Tensor
    v_rev_basis: torch.Tensor
    alignment: np.ndarray
    alignment_per_example: np.ndarray
    per_example_cos: np.ndarray
    drift_norm: np.ndarray
    p_value: np.ndarray
    null_p99: np.ndarray
    null_p99_activation: np.ndarray
    v_rev_norm: np.ndarray
    config: dict[str, Any] = field(default_factory=dict)
    behaviour: dict[str, Any] | None = None
    interventions: dict[str, Any] | None = None

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def best_layer_index(self) -> int:
        """Index (into ``layers``) of the layer with the highest mean alignment over runs and steps."""
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            per_layer = np.nanmean(self.alignment, axis=(0, 1))
        if np.all(np.isnan(per_layer)):
            return 0
        return int(np.nanargmax(per_layer))

    @property
    def best_layer(self) -> int:
        return self.layers[self.best_layer_index()]

    def exceedance(self, layer_index: int | None = None, null: str = "isotropic") -> tuple[int, int]:
        """(run-step pairs whose alignment exceeds the null's p99, pairs measured) at one layer."""
        li = self.best_layer_index() if layer_index is None else layer_index
        threshold = self.null_p99[li] if null == "isotropic" else self.null_p99_activation[li]
        return exceedance_count(self.alignment[:, :, li], threshold)

    def step_summary(self, layer_index: int | None = None) -> list[dict[str, Any]]:
        """Per step at one layer: mean and std over runs of alignment and drift norm."""
        li = self.best_layer_index() if layer_index is None else layer_index
        rows = []
        for si, step in enumerate(self.steps):
            am, asd = mean_std(self.alignment[:, si, li])
            dm, dsd = mean_std(self.drift_norm[:, si, li])
            rows.append({"step": step, "alignment_mean": am, "alignment_std": asd,
                         "drift_norm_mean": dm, "drift_norm_std": dsd})
        return rows

    def summary(self) -> str:
        """A text table: alignment mean +/- std over runs per step and layer, nulls, exceedances."""
        lines = [
            f"revlens report: {len(self.runs)} run(s) x {len(self.steps)} step(s), layers {self.layers}, "
            f"hook {self.config.get('hook')}, readout {self.config.get('readout')}, "
            f"estimator {self.config.get('estimator')}, contrast {self.config.get('contrast')}",
            "alignment cos(drift, v_rev), mean +/- std over runs",
        ]
        header = "step  " + "".join(f"{'L' + str(l):>18}" for l in self.layers)
        lines.append(header)
        for si, step in enumerate(self.steps):
            cells = []
            for li in range(self.n_layers):
                m, s = mean_std(self.alignment[:, si, li])
                cells.append(f"{m:>+9.3f} +/- {s:.3f}" if not math.isnan(m) else f"{'nan':>18}")
            lines.append(f"{step:<6}" + "".join(f"{c:>18}" for c in cells))
        lines.append("null p99 (isotropic)  " + " ".join(f"L{l}={v:.3f}" for l, v in zip(self.layers, self.null_p99)))
        lines.append(
            "null p99 (activation) " + " ".join(f"L{l}={v:.3f}" for l, v in zip(self.layers, self.null_p99_activation))
        )
        li = self.best_layer_index()
        iso, n = self.exceedance(li, "isotropic")
        act, _ = self.exceedance(li, "activation")
        lines.append(
            f"most aligned layer L{self.layers[li]}: {iso}/{n} run-step pairs above the isotropic p99, "
            f"{act}/{n} above the activation-space p99"
        )
        if self.config.get("non_finite"):
            bad = self.config["non_finite"]
            lines.append(f"non-finite readouts (NaN/inf, left out of the figures above): {len(bad)} checkpoint(s): "
                         + ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else ""))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"ReversionReport(layers={self.layers}, runs={self.runs}, steps={self.steps}, "
                f"best_layer={self.best_layer})")

    def to_dict(self) -> dict[str, Any]:
        """Everything but the direction tensors, as JSON-ready lists (NaN as null)."""
        li = self.best_layer_index()
        iso, n = self.exceedance(li, "isotropic")
        act, _ = self.exceedance(li, "activation")
        return {
            "layers": self.layers,
            "runs": self.runs,
            "steps": self.steps,
            "d_model": self.d_model,
            "config": self.config,
            "alignment": _nan_to_none(self.alignment),
            "alignment_per_example": _nan_to_none(self.alignment_per_example),
            "per_example_cos": _nan_to_none(self.per_example_cos),
            "drift_norm": _nan_to_none(self.drift_norm),
            "p_value": _nan_to_none(self.p_value),
            "null_p99": _nan_to_none(self.null_p99),
            "null_p99_activation": _nan_to_none(self.null_p99_activation),
            "v_rev_norm": _nan_to_none(self.v_rev_norm),
            "best_layer": self.layers[li],
            "exceedance": {"isotropic": iso, "activation": act, "pairs": n},
            "step_summary": _nan_to_none(self.step_summary(li)),
            "behaviour": _nan_to_none(self.behaviour),
            "interventions": _nan_to_none(self.interventions),
        }

    def save(self, directory: str | Path) -> Path:
        """Write ``report.json`` and ``tensors.safetensors`` (v_rev and its basis) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_save_tensors({"v_rev": self.v_rev.float().clone(), "v_rev_basis": self.v_rev_basis.float().clone()},
                            directory / REPORT_TENSORS)
        return atomic_write_json(directory / REPORT_JSON, self.to_dict(), indent=1)

    @classmethod
    def load(cls, directory: str | Path) -> "ReversionReport":
        """Read a report written by :meth:`save`."""
        from safetensors.torch import load_file

        directory = Path(directory)
        path = directory / REPORT_JSON
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; write a report with report.save(directory).")
        d = json.loads(path.read_text())
        tensors = load_file(str(directory / REPORT_TENSORS))
        arr = lambda key: np.asarray(_none_to_nan(d[key]), dtype=np.float64)  # noqa: E731
        return cls(
            layers=d["layers"], runs=d["runs"], steps=d["steps"], d_model=d["d_model"],
            v_rev=tensors["v_rev"], v_rev_basis=tensors["v_rev_basis"],
            alignment=arr("alignment"), alignment_per_example=arr("alignment_per_example"),
            per_example_cos=arr("per_example_cos"), drift_norm=arr("drift_norm"), p_value=arr("p_value"),
            null_p99=arr("null_p99"), null_p99_activation=arr("null_p99_activation"),
            v_rev_norm=arr("v_rev_norm"), config=d.get("config", {}),
            behaviour=d.get("behaviour"), interventions=d.get("interventions"),
        )

    def dashboard(self, **kwargs: Any):
        """Interactive Plotly dashboard of this report (see :mod:`revlens.dashboard`)."""
        from revlens.dashboard import build_dashboard

        return build_dashboard(self, **kwargs)

    def save_html(self, path: str | Path, **kwargs: Any) -> Path:
        """Write the dashboard as one self-contained, offline HTML file."""
        from revlens.dashboard import save_dashboard_html

        return save_dashboard_html(self, path, **kwargs)


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return _nan_to_none(obj.tolist())
    if isinstance(obj, torch.Tensor):
        return _nan_to_none(obj.tolist())
    if isinstance(obj, dict):
        return {str(k): _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return None if math.isnan(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _none_to_nan(obj: Any) -> Any:
    if isinstance(obj, list):
        return [_none_to_nan(v) for v in obj]
    return float("nan") if obj is None else obj
