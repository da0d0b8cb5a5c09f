"""`analyze`: the one-call measurement of drift along v_rev over a training history."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from revlens import directions as dirs
from revlens import nulls
from revlens._util import atomic_save_tensors
from revlens.checkpoints import CheckpointRef, History, check_same_architecture
from revlens.probe import ProbeResult, ReversionProbe
from revlens.report import ReversionReport

from revlens.prompts import (  # noqa: F401  (re-exported: the prompt-file API lived here)
    DEFAULT_CONTROL, DEFAULT_PROMPTS, default_control, default_prompts, load_prompt_file,
)


class _MeasurementCache:
    """Per-checkpoint probe results on disk, so an interrupted analysis resumes where it stopped."""

    def __init__(self, root: Path | None, key: dict[str, Any]):
        self.root = None
        if root is not None:
            digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
            self.root = Path(root) / digest
            self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, ref: CheckpointRef) -> Path:
        """One file per checkpoint version: the name carries the weights' size and modification time,
        so a checkpoint rewritten in place is measured again."""
        assert self.root is not None
        stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(Path(ref.source).glob("*.safetensors"))]
        digest = hashlib.sha256(repr(stamp).encode()).hexdigest()[:12]
        return self.root / f"{ref.label.replace('/', '__')}-{digest}.safetensors"

    def get(self, ref: CheckpointRef) -> ProbeResult | None:
        if self.root is None or not isinstance(ref.source, (str, Path)) or not self._path(ref).is_file():
            return None
        from safetensors.torch import load_file

        t = load_file(str(self._path(ref)))
        return ProbeResult(t["centroid"], t["probe_centroid"], t.get("control_centroid"), t.get("per_example"),
                           t.get("covariance"), int(t["n_prompts"].item()))

    def put(self, ref: CheckpointRef, result: ProbeResult) -> None:
        if self.root is None or not isinstance(ref.source, (str, Path)):
            return
        tensors = {"centroid": result.centroid.clone(), "probe_centroid": result.probe_centroid.clone(),
                   "n_prompts": torch.tensor([result.n_prompts])}
        for name in ("control_centroid", "per_example", "covariance"):
            value = getattr(result, name)
            if value is not None:
                tensors[name] = value.clone().contiguous()
        atomic_save_tensors(tensors, self._path(ref))


def analyze(
    ckpts: Any,
    prompts: Any = None,
    *,
    control: Any = None,
    layers: Sequence[int] | None = None,
    hook: str = "resid_post",
    readout: str = "last",
    estimator: str = "mean_diff",
    k: int = 1,
    batch_size: int = 32,
    device: str | None = None,
    null_samples: int = 20_000,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    chat_template: Any = "auto",
    system: str | None = None,
) -> ReversionReport:
    """Measure v_rev and the alignment of fine-tuning drift with it, layer by layer.

    Args:
        ckpts: a :class:`History`, a folder laid out as ``pretrain/ align/ finetune/<run>/step_<N>/``,
            or ``{"pretrain": src, "align": src, "finetune": {run: {step: src}}}``.
        prompts: the probe set (default: the packaged ``harmful_requests.txt``).
        control: an optional control set; alignment is then measured on the contrast readout.
        layers, hook, readout, batch_size, device: see :class:`ReversionProbe`.
        estimator: ``mean_diff`` (default), ``per_example`` or ``pca`` (rank ``k`` subspace).
        null_samples, seed: Monte Carlo draws and seed of the activation-space null.
        cache_dir: where per-checkpoint measurements are kept, so a rerun after an interruption
            only measures what is missing.
        chat_template, system: how string prompts are read (see :class:`ReversionProbe`): ``"auto"``
            reads each request inside the aligned checkpoint's chat template when its tokenizer has one,
            for every checkpoint alike; ``report.config`` records whether a template was used.

    Checkpoints are loaded one at a time; at most one model is in memory.
    """
    history = History.coerce(ckpts)
    if estimator != "pca" and k != 1:
        raise ValueError(f"k={k} needs estimator='pca'; mean_diff and per_example give one direction.")
    prompts = default_prompts() if prompts is None else prompts
    probe = ReversionProbe(prompts, layers=layers, hook=hook, readout=readout, control=control,
                           batch_size=batch_size, device=device, per_example=True, chat_template=chat_template,
                           system=system)
    probe.use_template_of(history.align.source)
    cache = _MeasurementCache(cache_dir, {"prompts": [str(p) for p in probe.prompts],
                                          "control": None if probe.control is None else [str(p) for p in probe.control],
                                          "layers": layers, "hook": hook, "readout": readout,
                                          "chat_template": probe.chat_template, "system": system})
    bar = tqdm(total=len(history), desc="revlens analyze", disable=not progress, unit="ckpt")

    reference: dict[str, Any] = {}

    def measure(ref: CheckpointRef, covariance: bool = False) -> ProbeResult:
        cached = cache.get(ref)
        if cached is not None and (cached.covariance is not None or not covariance):
            bar.update(1)
            return cached
        model = ref.load(device)
        if "model_cfg" not in reference:
            reference["model_cfg"] = model
            reference["layers"] = probe.resolve_layers(model)
        else:
            check_same_architecture(reference["model_cfg"], model, ref.label, "the first checkpoint")
        result = probe.measure(model, covariance=covariance)
        del model
        cache.put(ref, result)
        bar.update(1)
        return result

    try:
        pre = measure(history.pretrain)
        ali = measure(history.align, covariance=True)
        basis = dirs.estimate_v_rev(estimator, pre.centroid, ali.centroid, pre.per_example, ali.per_example, k)
        v_rev_norm = (pre.centroid - ali.centroid).norm(dim=-1).numpy()
        if np.any(v_rev_norm == 0):
            warnings.warn("pretrain and align centroids coincide at some layer: v_rev is undefined (NaN) there.",
                          RuntimeWarning, stacklevel=2)
        n_layers, d_model = pre.centroid.shape
        noise = dirs.ROUNDOFF * ali.probe_centroid.norm(dim=-1)
        runs, steps = history.runs, history.steps
        shape = (len(runs), len(steps), n_layers)
        align_arr = np.full(shape, np.nan)
        align_ex = np.full(shape, np.nan)
        drift_norm = np.full(shape, np.nan)
        per_example_cos = np.full(shape + (probe.n_prompts,), np.nan)
        for ri, run in enumerate(runs):
            for step, ref in sorted(history.finetune[run].items()):
                si = steps.index(step)
                res = measure(ref)
                delta = dirs.drift(res.centroid, ali.centroid)
                a = dirs.alignment(delta, basis, noise)
                dirs.warn_if_zero_drift(a, ref.label)
                align_arr[ri, si] = a.numpy()
                drift_norm[ri, si] = delta.norm(dim=-1).numpy()
                ex = dirs.alignment(res.per_example.double() - ali.per_example.double(), basis, noise)
                per_example_cos[ri, si] = ex.T.numpy()
                with np.errstate(all="ignore"), warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    align_ex[ri, si] = np.nanmean(ex.numpy(), axis=0)
    finally:
        bar.close()

    null_iso = np.full(n_layers, nulls.isotropic_p99(d_model, k))
    null_act = np.array([
        nulls.activation_null_quantile(ali.covariance[l], basis[l].double(), 0.99, null_samples, seed + l)
        if not torch.isnan(basis[l]).any() else np.nan
        for l in range(n_layers)
    ])
    config = {"hook": hook, "readout": readout, "estimator": estimator, "k": k,
              "contrast": control is not None, "n_prompts": probe.n_prompts,
              "n_control": 0 if probe.control is None else len(probe.control),
              "batch_size": batch_size, "null_samples": null_samples, "seed": seed,
              "chat_template": probe.chat_template_used, "system": system,
              "checkpoints": {"pretrain": str(history.pretrain.source) if isinstance(history.pretrain.source, (str, Path)) else "<in-memory>",
                              "align": str(history.align.source) if isinstance(history.align.source, (str, Path)) else "<in-memory>"}}
    return ReversionReport(
        layers=list(reference.get("layers", probe.layers or list(range(n_layers)))),
        runs=runs, steps=steps, d_model=int(d_model),
        v_rev=basis[:, 0, :].float(), v_rev_basis=basis.float(),
        alignment=align_arr, alignment_per_example=align_ex, per_example_cos=per_example_cos,
        drift_norm=drift_norm, p_value=nulls.isotropic_p_value(align_arr, d_model, k),
        null_p99=null_iso, null_p99_activation=null_act, v_rev_norm=v_rev_norm, config=config,
    )
