"""ReversionReport: what `analyze` measured, with summaries, tidy tables, and JSON + safetensors persistence."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from revlens import selection as sel
from revlens._util import atomic_save_tensors, atomic_write_json, file_sha256
from revlens.blocking_spec import InterventionError
from revlens.nulls import exceedance_count
from revlens.reversion_directions import ReversionDirections
from revlens.subspace import reversion_subspace

REPORT_JSON = "report.json"
REPORT_TENSORS = "tensors.safetensors"
REPORT_FORMAT = 2  # 1 (implicit): arrays inside report.json; 2: arrays in tensors.safetensors

# Arrays kept in tensors.safetensors, with the axes they must have ("R" runs, "S" steps, "L" layers,
# "P" prompts, "N" null draws, "D" d_model, "K" subspace rank).
_ARRAY_AXES = {
    "alignment": "RSL",
    "alignment_per_example": "RSL",
    "drift_norm": "RSL",
    "p_value": "RSL",
    "per_example_cos": "RSLP",
    "null_p99": "L",
    "null_p99_activation": "L",
    "v_rev_norm": "L",
    "v_rev_snr": "L",
}
_SUMMARY_NEIGHBOURS = 2


def mean_std(values: Any) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1 when n>1) ignoring NaN."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        return float("nan"), float("nan")
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return float(arr.mean()), std


def fmt_pm(values: Any, digits: int = 3, scale: float = 1.0, suffix: str = "", signed: bool = False) -> str:
    """``"mean +/- std"`` of ``values * scale`` (NaN ignored); the mean alone when one value was measured (there
    is no spread to show), ``"n/a"`` when none was. ``signed`` prints the mean's sign (``+0.600``)."""
    arr = np.asarray(values, dtype=np.float64).reshape(-1) * scale
    m, s = mean_std(arr)
    if np.isnan(m):
        return "n/a"
    mean = f"{m:{'+' if signed else ''}.{digits}f}{suffix}"
    if int(np.count_nonzero(~np.isnan(arr))) == 1:
        return mean
    return f"{mean} +/- {s:.{digits}f}{suffix}"


def _fmt_p(p: float) -> str:
    return "n/a" if p is None or not np.isfinite(p) else f"{p:.2g}"


def _layer_list(layers: Sequence[int], limit: int = 12) -> str:
    text = ", ".join(f"L{l}" for l in layers[:limit])
    return text + (f", ... ({len(layers)} in all)" if len(layers) > limit else "")


def _layer_span(layers: Sequence[int]) -> str:
    if not layers:
        return "no layers"
    if list(layers) == list(range(layers[0], layers[0] + len(layers))) and len(layers) > 2:
        return f"{len(layers)} layers (L{layers[0]}-L{layers[-1]})"
    return f"{len(layers)} layer(s) ({_layer_list(layers, 8)})"


@dataclass
class ReversionReport:
    """Layer-wise alignment of fine-tuning drift with v_rev, and its null models.

    Array axes: ``alignment``, ``alignment_per_example``, ``drift_norm`` and ``p_value`` are
    ``[n_runs, n_steps, n_layers]`` (NaN where a run has no checkpoint at that step);
    ``per_example_cos`` is ``[n_runs, n_steps, n_layers, n_prompts]``; ``v_rev`` is
    ``[n_layers, d_model]`` with unit rows and ``v_rev_basis`` ``[n_layers, k, d_model]``;
    ``v_rev_snr`` ``[n_layers]`` is the signal-to-noise of mu(P) - mu(A) (:func:`revlens.selection.v_rev_snr`;
    NaN when unknown) and ``null_draws_activation`` ``[n_layers, n_draws]`` the activation-space null's
    Monte Carlo alignments (independent per layer), or None.

    Layers whose SNR is below ``snr_threshold`` are *flagged*: v_rev is mostly noise there. They are
    left out of the best-layer choice unless ``include_flagged=True`` (or set ``snr_threshold=0``).

    Args:
        layers, runs, steps, d_model: the analysed layers, fine-tuning runs and steps, and the width.
        v_rev, v_rev_basis, v_rev_norm, v_rev_snr: the direction (or rank-k basis) per layer, the length of
            mu(P) - mu(A) and its signal-to-noise.
        alignment, alignment_per_example, per_example_cos, drift_norm, p_value: the measurements (axes above).
        null_p99, null_p99_activation, null_draws_activation: the isotropic and activation-space nulls.
        config, behaviour, interventions: the settings used, and optional behaviour / blocking results.
        snr_threshold: the SNR below which a layer is flagged.
    Reports come from :func:`revlens.analyze` or :meth:`load`; build one by hand only to test.

    Returns:
        Its methods give the views: :meth:`summary` (a text table), :meth:`to_dataframe` (long format,
        one row per run x step x layer), :meth:`selection` (the layer-selection test), :meth:`save` (a
        folder: report.json + tensors.safetensors), :meth:`dashboard` / ``save_html`` (plotly figures).

    Example:
        >>> report = revlens.analyze(ckpts, prompts, progress=False)
        >>> print(report.summary().splitlines()[0])
        revlens report: 2 run(s) x 2 step(s), 2 layer(s) (L0, L1), d_model 16
        >>> test = report.selection()
        >>> test.layer, test.pairs, test.above["isotropic_p99"]
        (0, 4, 4)
        >>> report.to_dataframe().groupby("layer").alignment.mean().round(2)
        layer
        0    0.72
        1    0.64
        Name: alignment, dtype: float64
        >>> report.save(tmp / "report_class").name
        'report.json'
        >>> ReversionReport.load(tmp / "report_class").layers
        [0, 1]
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
    v_rev_snr: np.ndarray | None = None
    null_draws_activation: np.ndarray | None = None
    snr_threshold: float = sel.DEFAULT_SNR_THRESHOLD

    def __post_init__(self) -> None:
        if self.v_rev_snr is None:
            self.v_rev_snr = np.full(len(self.layers), np.nan)
        self.v_rev_snr = np.asarray(self.v_rev_snr, dtype=np.float64)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def k(self) -> int:
        """Rank of the v_rev basis (1 for a single direction)."""
        return int(self.v_rev_basis.shape[1]) if self.v_rev_basis.ndim == 3 else 1

    @property
    def flagged(self) -> np.ndarray:
        """``[n_layers]`` bool: v_rev's signal-to-noise is below ``snr_threshold`` (NaN SNR is not flagged)."""
        with np.errstate(invalid="ignore"):
            return np.asarray(self.v_rev_snr < self.snr_threshold, bool)

    @property
    def flagged_layers(self) -> list[int]:
        return [l for l, f in zip(self.layers, self.flagged) if f]

    def _eligible(self, include_flagged: bool = False) -> np.ndarray:
        return np.ones(self.n_layers, bool) if include_flagged else ~self.flagged

    def best_layer_index(self, include_flagged: bool = False) -> int:
        """Index (into ``layers``) of the layer with the highest mean alignment over runs and steps.

        Flagged (low-SNR) layers are left out unless ``include_flagged``; if every layer is flagged,
        all are considered.
        """
        eligible = self._eligible(include_flagged)
        if not (eligible & np.isfinite(sel.layer_means(self.alignment))).any():
            eligible = np.ones(self.n_layers, bool)
        return sel.choose_layer(self.alignment, eligible)

    @property
    def best_layer(self) -> int:
        return self.layers[self.best_layer_index()]

    def directions(self, layers: Sequence[int] | None = None, rank: int | None = None) -> ReversionDirections:
        """The directions this report measured, with how they were read: what blocking, the anchor, the monitor and
        the Trainer callback take.

        Args:
            layers: analysed layers to take (default: all; ``[report.best_layer]`` for the most aligned one).
            rank: None for the report's own basis (v_rev, or the rank-K basis of ``estimator="pca"``); k for the
                rank-k reversion subspace, the first k rows of a PCA basis of rank >= k
                (:func:`revlens.subspace.reversion_subspace`; to measure a larger one, use
                :meth:`ReversionDirections.from_models` with ``rank=k``).

        Returns:
            A :class:`~revlens.reversion_directions.ReversionDirections` with the report's hook, readout, contrast,
            chat template digest and model fingerprint.

        Example:
            >>> directions = report.directions(layers=[report.best_layer])
            >>> directions.layers, tuple(directions.bases[0].shape), directions.estimator
            ([0], (1, 16), 'mean_diff')
        """
        layers = list(self.layers) if layers is None else [int(l) for l in layers]
        missing = [l for l in layers if l not in self.layers]
        if missing or not layers:
            raise InterventionError(
                f"layers {missing or layers} were not analysed; the report has layers {self.layers}."
            )
        cfg = self.config
        if rank is None:
            bases = {l: self.v_rev_basis[self.layers.index(l)] for l in layers}
        else:
            bases = reversion_subspace(self, rank, layers=layers)
        contrast = cfg.get("contrast")
        return ReversionDirections(
            bases,
            hook=cfg.get("hook", "resid_post"),
            readout=cfg.get("readout", "last"),
            estimator=cfg.get("estimator", "mean_diff") if rank is None else "pca",
            contrast=None if contrast is None else bool(contrast),
            chat_template=cfg.get("template_digest"),
            models=cfg.get("models_fingerprint"),
            checkpoints=cfg.get("checkpoints"),
            n_prompts=cfg.get("n_prompts"),
        )

    def selection(
        self,
        select_on: str | Sequence[str] | None = None,
        alpha: float = sel.DEFAULT_ALPHA,
        include_flagged: bool = False,
    ) -> sel.SelectionTest:
        """Test the best layer against "no layer aligned", corrected for choosing it (:mod:`revlens.selection`).

        Args:
            select_on: run name(s) to choose the layer on; the other runs are tested (no correction).
            alpha: level of the corrected thresholds (0.01: p99).
            include_flagged: let low-SNR layers compete (they count in the correction too).

        Returns:
            A :class:`revlens.selection.SelectionTest`.
        """
        return sel.selection_test(
            self.alignment,
            self.layers,
            self.runs,
            self.d_model,
            self.k,
            eligible=self._eligible(include_flagged),
            null_draws_activation=self.null_draws_activation,
            select_on=select_on,
            alpha=alpha,
        )

    def exceedance(self, layer_index: int | None = None, null: str = "isotropic") -> tuple[int, int]:
        """(run-step pairs whose alignment exceeds the null's p99, pairs measured) at one layer (no correction)."""
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
            rows.append(
                {"step": step, "alignment_mean": am, "alignment_std": asd, "drift_norm_mean": dm, "drift_norm_std": dsd}
            )
        return rows

    def _shown_layer_indices(self, best: int) -> list[int]:
        if self.n_layers <= 2 * _SUMMARY_NEIGHBOURS + 1:
            return list(range(self.n_layers))
        lo = min(max(0, best - _SUMMARY_NEIGHBOURS), self.n_layers - 2 * _SUMMARY_NEIGHBOURS - 1)
        return list(range(lo, lo + 2 * _SUMMARY_NEIGHBOURS + 1))

    def _summary_table(self) -> tuple[list[str], list[list[str]]]:
        """Header and rows (step rows, then per-layer rows) of the table around the best layer."""
        best = self.best_layer_index()
        shown = self._shown_layer_indices(best)
        head = ["step"] + [
            f"L{self.layers[li]}" + ("*" if li == best else "") + ("!" if self.flagged[li] else "") for li in shown
        ]
        rows = []
        for si, step in enumerate(self.steps):
            cells = []
            for li in shown:
                cell = fmt_pm(self.alignment[:, si, li], signed=True)  # one run: the value alone, no "+/- 0.000"
                cells.append("nan" if cell == "n/a" else cell)
            rows.append([str(step)] + cells)
        rows.append(["null p99 iso"] + [f"{self.null_p99[li]:.3f}" for li in shown])
        rows.append(["null p99 act"] + [f"{self.null_p99_activation[li]:.3f}" for li in shown])
        rows.append(["v_rev SNR"] + [f"{self.v_rev_snr[li]:.3g}" for li in shown])
        return head, rows

    def _summary_parts(self) -> tuple[list[str], list[str], list[list[str]], list[str]]:
        """(intro lines, table header, table rows, closing lines) of :meth:`summary`."""
        best = self.best_layer_index()
        test = self.selection()
        head, rows = self._summary_table()
        cfg = self.config
        intro = [
            (
                f"revlens report: {len(self.runs)} run(s) x {len(self.steps)} step(s), {_layer_span(self.layers)}, "
                f"d_model {self.d_model}"
            ),
            (
                f"hook {cfg.get('hook')}, readout {cfg.get('readout')}, estimator {cfg.get('estimator')}, "
                f"contrast {cfg.get('contrast')}"
            ),
            "alignment cos(drift, v_rev), "
            + ("mean +/- std over runs" if len(self.runs) > 1 else "one run")
            + ", at the best layer (*) and its neighbours"
            + (" (! = low SNR)" if any(self.flagged[li] for li in self._shown_layer_indices(best)) else ""),
        ]
        iso, n = self.exceedance(best, "isotropic")
        act, _ = self.exceedance(best, "activation")
        thr = test.thresholds
        act_max = (
            "activation max n/a"
            if test.above.get("activation_max") is None
            else f"{test.above['activation_max']}/{n} above activation max {thr['activation_max']:.3f}"
        )
        pv = test.p_value
        notes = [
            (
                f"best layer L{self.layers[best]}: {iso}/{n} run-step pairs above its isotropic p99, "
                f"{act}/{n} above its activation-space p99 (per-layer nulls, no correction)"
            ),
            (
                f"corrected for choosing 1 of {test.m} layers: {test.above['bonferroni']}/{n} above Bonferroni p99 "
                f"{thr['bonferroni']:.3f}, {test.above['sidak']}/{n} above Sidak {thr['sidak']:.3f}, {act_max}"
            ),
            (
                f"p-value of L{self.layers[best]}'s mean alignment ({test.mean_alignment:+.3f}), "
                "null 'no layer aligned': "
                f"{_fmt_p(pv['bonferroni'])} Bonferroni, {_fmt_p(pv['sidak'])} Sidak, "
                f"{_fmt_p(pv['activation_max'])} activation max"
            ),
        ]
        flagged = self.flagged_layers
        if flagged:
            note = " (every layer is flagged: the best is chosen among all)" if len(flagged) == self.n_layers else ""
            notes.append(
                f"low-SNR layers (v_rev SNR < {self.snr_threshold:g}, excluded from the choice){note}: "
                f"{_layer_list(flagged)}"
            )
        if self.config.get("non_finite"):
            bad = self.config["non_finite"]
            notes.append(
                f"non-finite readouts (NaN/inf, left out of the figures above): {len(bad)} checkpoint(s): "
                + ", ".join(bad[:5])
                + (", ..." if len(bad) > 5 else "")
            )
        notes.append("every layer: report.to_dataframe(); per prompt: report.per_prompt_dataframe()")
        return intro, head, rows, notes

    def summary(self) -> str:
        """A text summary that stays narrow at any depth: the best layer and its neighbours, the counts,
        the selection-corrected p-values and the flagged layers (every layer: :meth:`to_dataframe`)."""
        intro, head, rows, notes = self._summary_parts()
        w0 = max(len(r[0]) for r in [head] + rows)
        table = [f"{r[0]:<{w0}}" + "".join(f"{c:>18}" for c in r[1:]) for r in [head] + rows]
        return "\n".join(_wrap(line, 120) for line in intro + table + notes)

    def _repr_html_(self) -> str:
        intro, head, rows, notes = self._summary_parts()
        esc = html.escape
        cells = "".join(f"<th>{esc(h)}</th>" for h in head)
        body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
        return (
            f"<div><p>{'<br>'.join(esc(x) for x in intro)}</p><table><thead><tr>{cells}</tr></thead>"
            f"<tbody>{body}</tbody></table><p>{'<br>'.join(esc(x) for x in notes)}</p></div>"
        )

    def __repr__(self) -> str:
        return (
            f"ReversionReport(layers={_layer_span(self.layers)}, runs={self.runs}, steps={self.steps}, "
            f"best_layer={self.best_layer})"
        )

    def to_dataframe(self):
        """Every run x step x layer as one row (long format, pandas).

        Columns: run, step, layer, alignment, alignment_per_example, drift_norm, p_value (exact isotropic),
        p_value_bonferroni / p_value_sidak (corrected for choosing one of the competing layers), null_p99,
        null_p99_activation, v_rev_norm, v_rev_snr, low_snr, best_layer. NaN where not measured.

        Example:
            >>> df = report.to_dataframe()
            >>> df.shape  # 2 runs x 2 steps x 2 layers
            (8, 15)
            >>> df.pivot_table(index="step", columns="layer", values="alignment").round(2)  # mean over runs
            layer     0     1
            step
            1      0.65  0.56
            2      0.79  0.72
        """
        import pandas as pd

        r, s, n_l = self.alignment.shape
        idx = np.indices((r, s, n_l)).reshape(3, -1)
        m = int(max(1, (self._eligible() & np.isfinite(sel.layer_means(self.alignment))).sum()))
        p = self.p_value.reshape(-1)

        def per_layer(x: Any) -> np.ndarray:
            return np.asarray(x, dtype=np.float64)[idx[2]]

        return pd.DataFrame(
            {
                "run": np.asarray(self.runs, dtype=object)[idx[0]],
                "step": np.asarray(self.steps, dtype=np.int64)[idx[1]],
                "layer": np.asarray(self.layers, dtype=np.int64)[idx[2]],
                "alignment": self.alignment.reshape(-1),
                "alignment_per_example": self.alignment_per_example.reshape(-1),
                "drift_norm": self.drift_norm.reshape(-1),
                "p_value": p,
                "p_value_bonferroni": np.where(np.isnan(p), np.nan, sel.bonferroni(p, m)),
                "p_value_sidak": np.where(np.isnan(p), np.nan, sel.sidak(p, m)),
                "null_p99": per_layer(self.null_p99),
                "null_p99_activation": per_layer(self.null_p99_activation),
                "v_rev_norm": per_layer(self.v_rev_norm),
                "v_rev_snr": per_layer(self.v_rev_snr),
                "low_snr": self.flagged[idx[2]],
                "best_layer": idx[2] == self.best_layer_index(),
            }
        )

    def per_prompt_dataframe(self):
        """Per-prompt alignment, long format: run, step, layer, prompt (index into the probe set), cos."""
        import pandas as pd

        shape = self.per_example_cos.shape
        idx = np.indices(shape).reshape(4, -1)
        return pd.DataFrame(
            {
                "run": np.asarray(self.runs, dtype=object)[idx[0]],
                "step": np.asarray(self.steps, dtype=np.int64)[idx[1]],
                "layer": np.asarray(self.layers, dtype=np.int64)[idx[2]],
                "prompt": idx[3],
                "cos": self.per_example_cos.reshape(-1),
            }
        )

    def _scalars(self) -> dict[str, Any]:
        li = self.best_layer_index()
        iso, n = self.exceedance(li, "isotropic")
        act, _ = self.exceedance(li, "activation")
        return {
            "layers": self.layers,
            "runs": self.runs,
            "steps": self.steps,
            "d_model": self.d_model,
            "config": self.config,
            "snr_threshold": self.snr_threshold,
            "best_layer": self.layers[li],
            "flagged_layers": self.flagged_layers,
            "exceedance": {"isotropic": iso, "activation": act, "pairs": n},
            "selection": _nan_to_none(self.selection().to_dict()),
            "step_summary": _nan_to_none(self.step_summary(li)),
            "behaviour": _nan_to_none(self.behaviour),
            "interventions": _nan_to_none(self.interventions),
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything but the direction tensors and null draws, as JSON-ready lists (NaN as null)."""
        out = self._scalars()
        for name in _ARRAY_AXES:
            out[name] = _nan_to_none(getattr(self, name))
        return out

    def _arrays(self) -> dict[str, torch.Tensor]:
        tensors = {"v_rev": self.v_rev.float().clone(), "v_rev_basis": self.v_rev_basis.float().clone()}
        for name in _ARRAY_AXES:
            dtype = torch.float32 if name == "per_example_cos" else torch.float64
            # a copy: two fields may hold one array, and safetensors refuses tensors that share memory
            tensors[name] = torch.tensor(np.asarray(getattr(self, name), dtype=np.float64)).to(dtype)
        if self.null_draws_activation is not None:
            tensors["null_draws_activation"] = torch.as_tensor(np.asarray(self.null_draws_activation, np.float32))
        return tensors

    def save(self, directory: str | Path) -> Path:
        """Write ``report.json`` (summary, config, scalars) and ``tensors.safetensors`` (every array).

        ``report.json`` records each array's shape (``arrays``) and dtype (``array_dtypes``) and the sha256 of
        ``tensors.safetensors`` (``tensors_sha256``), so :meth:`load` refuses a tensors file from another run.

        Returns:
            The path of ``report.json``.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = self._arrays()
        atomic_save_tensors(tensors, directory / REPORT_TENSORS)
        header = {
            "format": REPORT_FORMAT,
            **self._scalars(),
            "summary": self.summary(),
            "arrays": {name: list(t.shape) for name, t in tensors.items()},
            "array_dtypes": {name: _dtype_name(t.dtype) for name, t in tensors.items()},
            "tensors_sha256": file_sha256(directory / REPORT_TENSORS),
        }
        return atomic_write_json(directory / REPORT_JSON, header, indent=1)

    @classmethod
    def load(cls, directory: str | Path) -> ReversionReport:
        """Read a report written by :meth:`save`: this format, or the older one with arrays in report.json.

        Every array's shape is checked against the report's runs, steps, layers and d_model, its dtype against
        the one ``report.json`` records (older reports: floating point), and the file against the recorded
        sha256 (reports saved before the digest existed are read without it); a ``tensors.safetensors`` from
        another report is refused with an error that names the file. A malformed field of ``report.json``
        (``format``, ``layers``, ``steps``, ``runs``, ``d_model``) is a one-line error naming it.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        path = directory / REPORT_JSON
        tpath = directory / REPORT_TENSORS
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; write a report with report.save(directory).")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON ({err}); the report is damaged: rerun the analysis.") from err
        if not isinstance(d, dict) or not {"layers", "runs", "steps", "d_model"} <= set(d):
            raise ValueError(f"{path} is not a revlens report (it lacks layers/runs/steps/d_model).")
        fmt = _check_header(d, path)
        if not tpath.is_file():
            raise FileNotFoundError(
                f"{tpath} is missing: a report needs both {REPORT_JSON} and {REPORT_TENSORS} "
                "(copy both files together)."
            )
        try:
            tensors = load_file(str(tpath))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{tpath} cannot be read as safetensors ({err}); the report is damaged.") from err
        _check_dtypes(tensors, d.get("array_dtypes"), path, tpath)
        arrays: dict[str, np.ndarray] = {}
        for name in _ARRAY_AXES:
            if fmt >= 2:
                if name not in tensors:
                    if name == "v_rev_snr":
                        continue
                    raise ValueError(
                        f"{tpath} lacks the array {name!r} that {path} (format {fmt}) needs: the two "
                        "files come from different reports or the tensors file is damaged."
                    )
                arrays[name] = tensors[name].double().numpy()
            elif name in d:
                arrays[name] = np.asarray(_none_to_nan(d[name]), dtype=np.float64)
            elif name != "v_rev_snr":
                raise ValueError(
                    f"{path} has neither a format number nor the array {name!r}: it was not written "
                    "by ReversionReport.save and cannot be read."
                )
        for name in ("v_rev", "v_rev_basis"):
            if name not in tensors:
                raise ValueError(f"{tpath} lacks {name!r}: it is not the tensors file of a revlens report.")
        report = cls(
            layers=list(d["layers"]),
            runs=list(d["runs"]),
            steps=list(d["steps"]),
            d_model=int(d["d_model"]),
            v_rev=tensors["v_rev"],
            v_rev_basis=tensors["v_rev_basis"],
            config=d.get("config", {}),
            behaviour=d.get("behaviour"),
            interventions=d.get("interventions"),
            null_draws_activation=(
                tensors["null_draws_activation"].numpy() if "null_draws_activation" in tensors else None
            ),
            snr_threshold=float(d.get("snr_threshold", sel.DEFAULT_SNR_THRESHOLD)),
            **{name: arrays.get(name) for name in _ARRAY_AXES},
        )
        report._check_shapes(path, tpath, arrays_in_tensors=fmt >= 2)
        digest = d.get("tensors_sha256")  # last: the shape and dtype errors above say more when they apply
        if digest is not None and digest != file_sha256(tpath):
            raise ValueError(
                f"{tpath} is not the tensors file {path} was saved with (its sha256 differs from the "
                f"tensors_sha256 recorded in {REPORT_JSON}): the two files come from different runs, or one was "
                f"edited. Copy {REPORT_JSON} and {REPORT_TENSORS} together from one report.save(), or rerun the "
                "analysis."
            )
        return report

    def _check_shapes(self, json_path: Path, tensors_path: Path, arrays_in_tensors: bool) -> None:
        """Raise ValueError, naming the file, when an array does not fit the report's runs/steps/layers/d_model."""
        sizes = {
            "R": len(self.runs),
            "S": len(self.steps),
            "L": self.n_layers,
            "D": self.d_model,
            "K": self.k,
            "P": self.per_example_cos.shape[-1] if self.per_example_cos.ndim == 4 else -1,
        }
        n_prompts = self.config.get("n_prompts")
        if isinstance(n_prompts, int) and sizes["P"] != -1 and n_prompts != sizes["P"]:
            sizes["P"] = n_prompts
        where = (
            f"a report with {sizes['R']} run(s) x {sizes['S']} step(s) x {sizes['L']} layer(s), "
            f"d_model={sizes['D']} ({json_path.name})"
        )
        expected = {name: tuple(sizes[a] for a in axes) for name, axes in _ARRAY_AXES.items()}
        expected["v_rev"] = (sizes["L"], sizes["D"])
        expected["v_rev_basis"] = (sizes["L"], sizes["K"], sizes["D"])
        if self.null_draws_activation is not None:
            expected["null_draws_activation"] = (sizes["L"], np.shape(self.null_draws_activation)[-1])
        for name, shape in expected.items():
            got = tuple(np.shape(getattr(self, name)))
            if got != shape:
                source = tensors_path if arrays_in_tensors or name not in _ARRAY_AXES else json_path
                raise ValueError(
                    f"{source}: {name!r} has shape {got}, but {where} needs {shape}; the files come "
                    f"from different reports (another d_model or other layers?). Copy {REPORT_JSON} and "
                    f"{REPORT_TENSORS} together from one report.save()."
                )

    def dashboard(self, **kwargs: Any):
        """Interactive Plotly dashboard of this report (see :mod:`revlens.dashboard`)."""
        from revlens.dashboard import build_dashboard

        return build_dashboard(self, **kwargs)

    def save_html(self, path: str | Path, **kwargs: Any) -> Path:
        """Write the dashboard as one self-contained, offline HTML file."""
        from revlens.dashboard import save_dashboard_html

        return save_dashboard_html(self, path, **kwargs)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_header(d: dict[str, Any], path: Path) -> int:
    """The report format of a parsed ``report.json``, after checking the fields every report has; a bad field
    is a one-line ValueError that names it."""
    fmt = d.get("format", 1)
    if _is_int(fmt) and fmt > REPORT_FORMAT:
        raise ValueError(
            f"{path} has report format {fmt}, newer than this revlens reads ({REPORT_FORMAT}); upgrade revlens."
        )
    if fmt not in range(1, REPORT_FORMAT + 1) or not _is_int(fmt):
        raise ValueError(
            f"{path}: field 'format' is {fmt!r}, not a report format this revlens knows (1 to {REPORT_FORMAT}); "
            "the file was not written by ReversionReport.save or was edited: rerun the analysis."
        )
    fields = {
        "layers": (lambda v: isinstance(v, list) and all(_is_int(x) and x >= 0 for x in v), "a list of layer numbers"),
        "steps": (lambda v: isinstance(v, list) and all(_is_int(x) for x in v), "a list of integer steps"),
        "runs": (lambda v: isinstance(v, list) and all(isinstance(x, (str, int)) for x in v), "a list of run names"),
        "d_model": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    }
    for name, (ok, what) in fields.items():
        if not ok(d[name]):
            raise ValueError(
                f"{path}: field {name!r} is {_short(d[name])}, not {what}; the file was edited or not written by "
                "ReversionReport.save: rerun the analysis (or fix the field)."
            )
    return fmt


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_dtypes(tensors: dict[str, torch.Tensor], recorded: Any, json_path: Path, tensors_path: Path) -> None:
    """Refuse arrays whose dtype is not the one ``report.json`` recorded (older reports: not floating point)."""
    recorded = recorded if isinstance(recorded, dict) else {}
    for name, tensor in tensors.items():
        want = recorded.get(name)
        got = _dtype_name(tensor.dtype)
        if want is not None and got != want:
            problem = f"{json_path} records {want}"
        elif want is None and not tensor.is_floating_point():
            problem = "a report's arrays are floating point"
        else:
            continue
        raise ValueError(
            f"{tensors_path}: array {name!r} has dtype {got}, but {problem}; the tensors file does not belong to "
            f"{json_path.name} (another run, or rewritten). Copy {REPORT_JSON} and {REPORT_TENSORS} together from "
            "one report.save(), or rerun the analysis."
        )


def _wrap(line: str, width: int) -> str:
    """Wrap a prose line at ``width`` (continuation lines indented); table lines are never this wide."""
    if len(line) <= width:
        return line
    import textwrap

    return "\n".join(textwrap.wrap(line, width, subsequent_indent="    ", break_on_hyphens=False))


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
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def _none_to_nan(obj: Any) -> Any:
    if isinstance(obj, list):
        return [_none_to_nan(v) for v in obj]
    return float("nan") if obj is None else obj
