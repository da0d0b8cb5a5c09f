"""`analyze`: the one-call measurement of drift along v_rev over a training history."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from revlens import directions as dirs
from revlens import distributed as dist_
from revlens import nulls, selection
from revlens._util import atomic_save_tensors, weights_fingerprint
from revlens.checkpoint_format import CheckpointError
from revlens.checkpoint_loader import CheckpointLoader, CheckpointRef
from revlens.config import AnalyzeConfig
from revlens.devices import check_device
from revlens.history import History, check_same_architecture
from revlens.probe import ProbeResult, ReversionProbe
from revlens.prompts import (  # noqa: F401  (re-exported: the prompt-file API lived here)
    DEFAULT_CONTROL,
    DEFAULT_PROMPTS,
    default_control,
    default_prompts,
    load_prompt_file,
)
from revlens.report import ReversionReport
from revlens.reversion_directions import models_fingerprint, rendering_of
from revlens.threads import ThreadPolicy

CACHE_FORMAT = 2
HASHED_FILE_BYTES = 16 * 2**20  # checkpoint files up to this size are keyed on their content
EXTREME_READOUT = 1e10  # |readout| beyond this: corrupt or diverged weights (healthy models stay below ~1e5)


def _key_value(obj: Any) -> Any:
    """An exact, JSON-ready stand-in for one cache-key setting: tensors become a hash of their values."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        return {"tensor_sha256": hashlib.sha256(data).hexdigest(), "shape": list(t.shape), "dtype": str(t.dtype)}
    if isinstance(obj, Mapping):
        return {str(k): _key_value(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_key_value(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return repr(obj)


def cache_key(settings: Mapping[str, Any]) -> str:
    """A digest of every setting that changes a checkpoint's readouts (prompts, layers, hook, dtype...).

    Token-id prompts are keyed on their values (a sha256 of each tensor's bytes, with its shape), never
    on their printed form, which torch abbreviates beyond 1,000 elements.
    """
    text = json.dumps({"format": CACHE_FORMAT, "settings": _key_value(dict(settings))}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _source_label(source: Any) -> str:
    return str(source) if isinstance(source, (str, Path)) else "<in-memory>"


def _fingerprint(ref: CheckpointRef) -> str | None:
    """What identifies a checkpoint's version: the digest of its folder's :func:`checkpoint_stamp`, or of an
    in-memory model's weights (None when neither can be read)."""
    source = ref.source
    if isinstance(source, (str, os.PathLike)):
        if not Path(source).exists():
            return None
        return hashlib.sha256(json.dumps(checkpoint_stamp(source)).encode()).hexdigest()[:16]
    return weights_fingerprint(source) if hasattr(source, "named_parameters") else None


def checkpoint_stamp(source: str | os.PathLike) -> list[Any]:
    """What identifies one version of a checkpoint on disk: every (non-hidden) file in its folder.

    Each file contributes its name and size, and its content's sha256 when it is at most
    ``HASHED_FILE_BYTES`` (configs, tokenizers, small weights), else its modification time in ns. A
    LoRA adapter folder also carries the stamp of the local base model its ``adapter_config.json`` names.
    """
    path = Path(source)
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    stamp: list[Any] = []
    for f in files:
        st = f.stat()
        if st.st_size <= HASHED_FILE_BYTES:
            stamp.append([f.name, st.st_size, hashlib.sha256(f.read_bytes()).hexdigest()])
        else:
            stamp.append([f.name, st.st_size, st.st_mtime_ns])
    adapter = path / "adapter_config.json"
    if path.is_dir() and adapter.is_file():
        try:
            base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        except (ValueError, AttributeError):
            base = None
        if isinstance(base, str) and Path(base).is_dir() and Path(base).resolve() != path.resolve():
            stamp.append(["base", base, checkpoint_stamp(base)])
    return stamp


class _MeasurementCache:
    """Per-checkpoint probe results on disk, so an interrupted analysis resumes where it stopped.

    ``root/<cache_key(settings)>/<checkpoint label>-<stamp digest>.safetensors``: one folder per set of
    settings that changes the numbers, one file per checkpoint version (:func:`checkpoint_stamp`). An
    entry that cannot be read, or whose shapes do not fit this measurement, is a miss: measured again,
    with a warning that names the file. Writes are atomic with unique temporary names, so concurrent
    analyses sharing one cache never see half a file and the last writer wins whole.
    """

    def __init__(
        self,
        root: str | Path | None,
        settings: Mapping[str, Any],
        *,
        n_prompts: int | None = None,
        n_layers: int | None = None,
        control: bool = False,
    ):
        self.root = None
        self.n_prompts, self.n_layers, self.control = n_prompts, n_layers, control
        self._entries: dict[str, Path | None] = {}
        self._shape: tuple[tuple[int, int], str] | None = None  # (n_layers, d_model), where it came from
        if root is not None:
            self.root = Path(root) / cache_key(settings)[:16]
            self.root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _name(ref: CheckpointRef) -> str:
        return ref.label.replace("/", "__")

    def _path(self, ref: CheckpointRef) -> Path | None:
        """The entry of the checkpoint's current version (stamped once, before it is loaded)."""
        if self.root is None or not isinstance(ref.source, (str, os.PathLike)):
            return None
        if ref.label not in self._entries:
            try:
                stamp = checkpoint_stamp(ref.source)
            except OSError:
                stamp = None  # unreadable: loading it will raise the real error
            digest = None if stamp is None else hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:16]
            self._entries[ref.label] = None if digest is None else self.root / f"{self._name(ref)}-{digest}.safetensors"
        return self._entries[ref.label]

    def _problem(self, t: Mapping[str, torch.Tensor]) -> str | None:
        """Why tensors read from an entry cannot serve this measurement, or None."""
        for name in ("centroid", "probe_centroid", "n_prompts", "per_example"):
            if name not in t:
                return f"has no {name!r} tensor"
        if self.control and "control_centroid" not in t:
            return "has no 'control_centroid' tensor"
        c = t["centroid"]
        if c.ndim != 2 or not c.is_floating_point():
            return f"holds a centroid of shape {tuple(c.shape)} ({c.dtype}), not [n_layers, d_model]"
        n_layers, d_model = c.shape
        n = int(t["n_prompts"].reshape(-1)[0]) if t["n_prompts"].numel() == 1 else -1
        expected = {
            "probe_centroid": (n_layers, d_model),
            "control_centroid": (n_layers, d_model),
            "per_example": (n, n_layers, d_model),
            "covariance": (n_layers, d_model, d_model),
        }
        for name, shape in expected.items():
            if name in t and tuple(t[name].shape) != shape:
                return f"holds {name} of shape {tuple(t[name].shape)}, expected {shape}"
        if self.n_prompts is not None and n != self.n_prompts:
            return f"was measured on {n} prompts, this probe set has {self.n_prompts}"
        if self.n_layers is not None and n_layers != self.n_layers:
            return f"holds {n_layers} layers, this measurement reads {self.n_layers}"
        if self._shape is not None and (n_layers, d_model) != self._shape[0]:
            return f"holds readouts of shape {(n_layers, d_model)}, {self._shape[1]} gave {self._shape[0]}"
        return None

    def get(self, ref: CheckpointRef) -> ProbeResult | None:
        """The cached result of this version of ``ref``, or None (a miss) when absent, corrupt or stale."""
        path = self._path(ref)
        if path is None or not path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                t = {k: f.get_tensor(k) for k in f.keys()}
            problem = self._problem(t)
        except Exception as err:  # safetensors raises its own error types for truncated or garbled files
            problem = f"cannot be read ({type(err).__name__}: {err})"
        if problem is not None:
            warnings.warn(
                f"cache entry {path} for {ref.label} {problem}; measuring the checkpoint again.",
                RuntimeWarning,
                stacklevel=4,
            )
            return None
        result = ProbeResult(
            t["centroid"].double(),
            t["probe_centroid"].double(),
            t["control_centroid"].double() if "control_centroid" in t else None,
            t["per_example"].float(),
            t["covariance"].double() if "covariance" in t else None,
            int(t["n_prompts"].reshape(-1)[0]),
        )
        self._note_shape(ref, result, f"{ref.label} (cache file {path})")
        return result

    def _note_shape(self, ref: CheckpointRef, result: ProbeResult, where: str) -> None:
        shape = tuple(result.centroid.shape)
        if self._shape is None:
            self._shape = (shape, where)
        elif shape != self._shape[0]:
            raise CheckpointError(
                f"checkpoint {ref.label} gives readouts of shape {list(shape)} [n_layers, d_model] but "
                f"{self._shape[1]} gave {list(self._shape[0])}: every checkpoint of a history must share one "
                "architecture (delete a cache file named here if its checkpoint was replaced)."
            )

    def put(self, ref: CheckpointRef, result: ProbeResult) -> None:
        """Check a fresh result's shape against earlier ones and store it (atomically) for later runs."""
        self._note_shape(ref, result, ref.label)
        path = self._path(ref)
        if path is None:
            return
        tensors = {
            "centroid": result.centroid.clone(),
            "probe_centroid": result.probe_centroid.clone(),
            "n_prompts": torch.tensor([result.n_prompts]),
        }
        for name in ("control_centroid", "per_example", "covariance"):
            value = getattr(result, name)
            if value is not None:
                tensors[name] = value.clone().contiguous()
        atomic_save_tensors(
            tensors, path, metadata={"checkpoint": ref.label, "revlens_cache_format": str(CACHE_FORMAT)}
        )
        for old in path.parent.glob(f"{self._name(ref)}-*.safetensors"):
            if old != path and old.stem.rsplit("-", 1)[0] == self._name(ref):
                old.unlink(missing_ok=True)  # an earlier version of this checkpoint


def _readout_health(result: ProbeResult) -> tuple[torch.Tensor, float]:
    """(per layer: is any readout NaN/inf?, the largest finite |readout|) of one measurement."""
    bad = torch.zeros(result.centroid.shape[0], dtype=torch.bool)
    peak = 0.0
    for t in (result.centroid, result.probe_centroid, result.control_centroid, result.per_example, result.covariance):
        if t is None:
            continue
        per_layer = t.transpose(0, 1) if t is result.per_example else t
        finite = torch.isfinite(per_layer).reshape(per_layer.shape[0], -1)
        bad |= ~finite.all(dim=1)
        if t is not result.covariance and finite.any():
            peak = max(peak, float(per_layer.reshape(per_layer.shape[0], -1)[finite].abs().max()))
    return bad, peak


def _check_readouts(ref: CheckpointRef, result: ProbeResult, layer_ids: Sequence[int], fatal: bool) -> torch.Tensor:
    """Name a checkpoint whose readouts are NaN/inf (an error when ``fatal``) or absurdly large (a warning).

    Returns the per-layer mask of non-finite readouts.
    """
    bad, peak = _readout_health(result)
    if bad.any():
        layers = [layer_ids[i] for i in torch.nonzero(bad).flatten().tolist()]
        what = (
            f"{ref.label}: its readouts are NaN or infinite at layer(s) {layers}: the checkpoint holds "
            "NaN/inf weights, or its activations overflow their dtype"
        )
        if fatal:
            raise CheckpointError(
                f"{what}. v_rev cannot be measured; check each weight tensor with "
                "torch.isfinite and replace the checkpoint."
            )
        warnings.warn(
            f"{what}. Its alignment and drift there are NaN, and report.config['non_finite'] lists it.",
            RuntimeWarning,
            stacklevel=3,
        )
    if peak > EXTREME_READOUT:
        warnings.warn(
            f"{ref.label}: readouts reach |h| = {peak:.3g}, far beyond any healthy model (below ~1e5): "
            "its weights are probably corrupt or diverged; its numbers are reported but are unlikely to "
            "mean anything.",
            RuntimeWarning,
            stacklevel=3,
        )
    return bad


def _distributed_context(distributed: bool, history: History, cache_dir: Any, device_map: Any) -> dist_.DistContext:
    """This process's rank in the torchrun job (a world of one unless ``distributed``), after checking that
    the ranks can hand their measurements over through the cache."""
    if not distributed:
        return dist_.DistContext()
    if cache_dir is None:
        raise ValueError(
            "distributed analysis needs cache_dir: ranks hand their measurements over through it. "
            "Give a folder on a filesystem every rank sees."
        )
    in_memory = [ref.label for ref in history if not isinstance(ref.source, (str, Path))]
    if in_memory:
        raise ValueError(
            f"distributed analysis reads checkpoints from disk; {in_memory[:3]} are in-memory models. "
            "Save them with save_checkpoint, or analyze them in one process."
        )
    ctx = dist_.init()
    if device_map is not None and ctx.local_world_size > 1:
        raise ValueError(
            f"device_map={device_map!r} spreads each checkpoint over all GPUs of a node, but "
            f"{ctx.local_world_size} ranks run on this node: start one rank per node "
            "(torchrun --nproc-per-node 1 --nnodes N)."
        )
    dist_.check_shared_folder(cache_dir, ctx)
    dist_.check_same([ref.label for ref in history], ctx, "the history's checkpoints")
    return ctx


def _measure_shard(history: History, ctx: dist_.DistContext, cache: _MeasurementCache, measure: Any, bar: Any) -> None:
    """The distributed pre-pass of :func:`analyze`: this rank measures its share of the checkpoints that the
    cache lacks, then waits for the others, so that the sequential pass finds every measurement cached.

    Rank 0 lists the missing checkpoints (before anyone writes) and deals them round robin. Each is
    measured with the same ``measure(ref)`` call the sequential pass makes, so nothing is measured twice.
    """
    missing = [i for i, ref in enumerate(history) if cache.get(ref) is None] if ctx.is_main else None
    missing = dist_.broadcast_object(missing, ctx)
    refs = list(history)
    mine = dist_.shard(missing, ctx)
    bar.reset(total=len(mine))
    bar.set_description(f"revlens analyze (rank {ctx.rank}/{ctx.world_size})")
    error = None
    try:
        for i in mine:
            measure(refs[i])
    except Exception as err:  # noqa: BLE001  every rank must hear of it, or the others wait until the timeout
        error = err
    dist_.raise_if_any_failed(error, ctx, "measuring checkpoints")
    bar.reset(total=len(history))
    bar.set_description("revlens analyze")


_WORKER: dict[str, Any] = {}


def _init_measure_worker(
    probe: ReversionProbe, cache_args: tuple[Any, ...], cache_kwargs: dict[str, Any], loader_args: tuple[Any, ...]
) -> None:
    _WORKER.update(
        probe=probe, cache=_MeasurementCache(*cache_args, **cache_kwargs), loader=CheckpointLoader(*loader_args)
    )


def _measure_job(ref: CheckpointRef) -> str:
    """A worker's job: measure one checkpoint into the cache (its loader keeps the booted model between jobs)."""
    model = _WORKER["loader"].load(ref)
    _WORKER["cache"].put(ref, _WORKER["probe"].measure(model))
    return ref.label


def _measure_in_workers(
    history: History, cache: _MeasurementCache, workers: int, threads: int | None, bar: Any, *init: Any
) -> None:
    """The ``workers`` pre-pass of :func:`analyze`: the checkpoints the cache lacks are measured by worker
    processes (:class:`revlens.jobpool.JobPool`, the cores shared out as torch threads) into the cache, so
    that the sequential pass finds every measurement cached; like the distributed pre-pass, nothing is
    measured twice."""
    from revlens.jobpool import JobPool

    missing = [ref for ref in history if cache.get(ref) is None]
    if len(missing) < 2:
        return
    bar.reset(total=len(missing))
    bar.set_description(f"revlens analyze ({min(workers, len(missing))} workers)")
    with JobPool(min(workers, len(missing)), threads, initializer=_init_measure_worker, initargs=init) as pool:
        for ref in missing:
            pool.submit(ref.label, _measure_job, ref)
        for _ in pool.results():
            bar.update(1)
    bar.reset(total=len(history))
    bar.set_description("revlens analyze")


def analyze(
    ckpts: Any,
    prompts: Any = None,
    *,
    control: Any = None,
    config: AnalyzeConfig | None = None,
    **settings: Any,
) -> ReversionReport:
    """Measure v_rev and the alignment of fine-tuning drift with it, layer by layer.

    Args:
        ckpts: a :class:`History`, a folder laid out as ``pretrain/ align/ finetune/<run>/step_<N>/``,
            or ``{"pretrain": src, "align": src, "finetune": {run: {step: src}}}``.
        prompts: the probe set (default: the packaged ``harmful_requests.txt``).
        control: an optional control set; alignment is then measured on the contrast readout.
        config: an :class:`~revlens.config.AnalyzeConfig` (default: its defaults).
        **settings: fields of :class:`~revlens.config.AnalyzeConfig` that replace the config's: ``layers``,
            ``hook``, ``readout``, ``estimator``, ``k``, ``batch_size``, ``device``, ``null_samples``, ``seed``,
            ``cache_dir``, ``progress``, ``dtype``, ``device_map``, ``base``, ``threads``, ``chat_template``,
            ``system``, ``distributed``, ``workers`` (each documented there).

    With ``cache_dir``, a rerun after an interruption measures only what is missing: an entry is keyed on every
    setting that changes the numbers and on the checkpoint's files (docs, "Reliability"). String prompts are read
    inside the aligned checkpoint's chat template when its tokenizer has one (``chat_template="auto"``), for every
    checkpoint alike. ``distributed=True`` inside a ``torchrun`` job splits the checkpoints across ranks (see
    :func:`_measure_shard`; every rank returns the same report: write it from rank 0); ``workers=N`` measures
    them in N CPU processes; both need ``cache_dir``, and the numbers are the same up to float rounding.

    Readouts that are NaN/inf raise a :class:`CheckpointError` for pretrain or align; for a fine-tuning
    checkpoint they warn, leave its numbers NaN and list it in ``report.config["non_finite"]``.

    Checkpoints are loaded one at a time; at most one model is in memory. Checkpoints that share the
    first one's architecture have their weights copied into the model already booted.

    Returns:
        A :class:`ReversionReport`: v_rev per layer, alignment / drift / p-values per run x step x layer,
        the nulls' p99; ``report.config`` holds the recorded settings (:meth:`AnalyzeConfig.recorded`) and what
        was measured (prompt counts, contrast, chat template, non-finite checkpoints, model fingerprint).

    Example:
        >>> report = revlens.analyze(ckpts, prompts, layers=[0, 1], cache_dir=tmp / "analyze" / "cache",
        ...                          progress=False)  # real runs: revlens.default_prompts(), control=...
        >>> report.alignment.shape  # runs x steps x layers
        (2, 2, 2)
        >>> round(float(report.alignment[0, 1, 0]), 3)  # seed_0, step 2, layer 0: drift 0.6 u + 0.8 w, v_rev = u
        0.6
        >>> report.save(tmp / "analyze" / "report").name
        'report.json'
    """
    cfg = AnalyzeConfig.of(config, settings)
    run = _validate(ckpts, prompts, control, cfg)
    readouts = _measure(run)
    return _assemble(run, readouts, _nulls(readouts, cfg))


@dataclass
class _Run:
    """What :func:`analyze` measures with: the settings, the history, the probe, the cache, where models load."""

    cfg: AnalyzeConfig
    history: History
    ctx: dist_.DistContext
    probe: ReversionProbe
    cache: _MeasurementCache
    cache_args: tuple[Any, Any]
    cache_kwargs: dict[str, Any]
    loader_args: tuple[Any, ...]
    policy: ThreadPolicy
    progress: bool


@dataclass
class _Readouts:
    """What the measuring pass of :func:`analyze` found: v_rev and the per run x step x layer arrays."""

    pre: ProbeResult
    ali: ProbeResult
    basis: torch.Tensor
    layers: list[int]
    v_rev_norm: np.ndarray
    alignment: np.ndarray
    alignment_per_example: np.ndarray
    drift_norm: np.ndarray
    per_example_cos: np.ndarray
    non_finite: list[str]


def _validate(ckpts: Any, prompts: Any, control: Any, cfg: AnalyzeConfig) -> _Run:
    """Check the settings against the history and the job, and set up the probe, the cache and the loader."""
    check_device(cfg.device)
    cache_dir = cfg.cache_dir
    if cache_dir is not None and Path(cache_dir).exists() and not Path(cache_dir).is_dir():
        raise ValueError(f"cache_dir {cache_dir} is a file; give a folder (it is created if missing).")
    policy = ThreadPolicy(cfg.threads)
    history = History.coerce(ckpts, cfg.base)
    ctx = _distributed_context(cfg.distributed, history, cache_dir, cfg.device_map)
    if cfg.workers > 1:
        in_memory = [ref.label for ref in history if not isinstance(ref.source, (str, os.PathLike))]
        if cache_dir is None or in_memory or ctx.active:
            raise ValueError(
                f"workers={cfg.workers} needs cache_dir (the workers hand their measurements over through it), "
                "checkpoints on disk"
                + (f" ({in_memory[:3]} are in-memory models)" if in_memory else "")
                + " and no distributed job (under torchrun the ranks are the workers); or use workers=1."
            )
    device = cfg.device
    if ctx.active and device is None and cfg.device_map is None:
        device = ctx.device
    probe = ReversionProbe(
        default_prompts() if prompts is None else prompts,
        layers=cfg.layers,
        hook=cfg.hook,
        readout=cfg.readout,
        control=control,
        batch_size=cfg.batch_size,
        device=device,
        per_example=True,
        chat_template=cfg.chat_template,
        system=cfg.system,
    )
    probe.use_template_of(history.align.source)
    cache_settings = {
        "prompts": probe.prompts,
        "control": probe.control,
        "layers": probe.layers,
        "hook": cfg.hook,
        "readout": cfg.readout,
        "dtype": str(cfg.dtype),
        "base": None if cfg.base is None else str(cfg.base),
        "chat_template": probe.chat_template,
        "system": cfg.system,
    }
    cache_kwargs = {
        "n_prompts": probe.n_prompts,
        "n_layers": None if probe.layers is None else len(probe.layers),
        "control": probe.control is not None,
    }
    return _Run(
        cfg=cfg,
        history=history,
        ctx=ctx,
        probe=probe,
        cache=_MeasurementCache(cache_dir, cache_settings, **cache_kwargs),
        cache_args=(cache_dir, cache_settings),
        cache_kwargs=cache_kwargs,
        loader_args=(device, cfg.dtype, cfg.device_map, cfg.base if cfg.base is not None else history.base),
        policy=policy,
        progress=cfg.progress and ctx.is_main,
    )


class _Measurer:
    """``measure(ref)``: one checkpoint's probe result, from the cache or loaded and measured (then cached), with
    the progress bar; it notes the first model's layers and refuses a later one of another architecture."""

    def __init__(self, run: _Run):
        self.run = run
        self.bar = tqdm(total=len(run.history), desc="revlens analyze", disable=not run.progress, unit="ckpt")
        self.loader = CheckpointLoader(*run.loader_args)
        self.reference: dict[str, Any] = {}

    def __call__(self, ref: CheckpointRef, covariance: bool = False) -> ProbeResult:
        cached = self.run.cache.get(ref)
        if cached is not None and (cached.covariance is not None or not covariance):
            self.bar.update(1)
            return cached
        model = self.loader.load(ref)
        self.run.policy.fit(model)
        if "model_cfg" not in self.reference:
            self.reference["model_cfg"] = SimpleNamespace(
                cfg=SimpleNamespace(d_model=model.cfg.d_model, n_layers=model.cfg.n_layers)
            )
            self.reference["layers"] = self.run.probe.resolve_layers(model)
        else:
            check_same_architecture(self.reference["model_cfg"], model, ref.label, "the first checkpoint")
        result = self.run.probe.measure(model, covariance=covariance)
        del model
        self.run.cache.put(ref, result)
        self.bar.update(1)
        return result


def _measure(run: _Run) -> _Readouts:
    """Every checkpoint's readouts: first the missing ones by the torchrun ranks or the worker processes (into the
    cache), then in this process (from the cache, or measured here) v_rev and the drift of every checkpoint."""
    measure = _Measurer(run)
    run.policy.start()
    try:
        if run.ctx.active:
            _measure_shard(run.history, run.ctx, run.cache, measure, measure.bar)
        elif run.cfg.workers > 1:
            init = (run.probe, run.cache_args, run.cache_kwargs, run.loader_args)
            _measure_in_workers(run.history, run.cache, run.cfg.workers, run.cfg.threads, measure.bar, *init)
        return _drift(run, measure)
    finally:
        measure.bar.close()
        run.policy.restore()


def _drift(run: _Run, measure: _Measurer) -> _Readouts:
    """v_rev from pretrain and align, then each fine-tuning checkpoint's drift from align and its alignment."""
    history, probe, cfg = run.history, run.probe, run.cfg
    pre = measure(history.pretrain)
    layer_ids = measure.reference.get("layers") or probe.layers or list(range(pre.centroid.shape[0]))
    _check_readouts(history.pretrain, pre, layer_ids, fatal=True)
    ali = measure(history.align)
    _check_readouts(history.align, ali, layer_ids, fatal=True)
    basis = dirs.estimate_v_rev(cfg.estimator, pre.centroid, ali.centroid, pre.per_example, ali.per_example, cfg.k)
    v_rev_norm = (pre.centroid - ali.centroid).norm(dim=-1).numpy()
    if np.any(v_rev_norm == 0):
        warnings.warn(
            "pretrain and align centroids coincide at some layer: v_rev is undefined (NaN) there.",
            RuntimeWarning,
            stacklevel=4,
        )
    n_layers = pre.centroid.shape[0]
    noise = dirs.roundoff_floor(ali.probe_centroid)
    undefined = torch.isnan(basis).flatten(1).any(dim=1)  # layers without v_rev: NaN is not zero drift
    runs, steps = history.runs, history.steps
    shape = (len(runs), len(steps), n_layers)
    out = _Readouts(
        pre=pre,
        ali=ali,
        basis=basis,
        layers=[],
        v_rev_norm=v_rev_norm,
        alignment=np.full(shape, np.nan),
        alignment_per_example=np.full(shape, np.nan),
        drift_norm=np.full(shape, np.nan),
        per_example_cos=np.full(shape + (probe.n_prompts,), np.nan),
        non_finite=[],
    )
    for ri, run_name in enumerate(runs):
        for step, ref in sorted(history.finetune[run_name].items()):
            si = steps.index(step)
            res = measure(ref)
            bad = _check_readouts(ref, res, layer_ids, fatal=False)
            if bad.any():
                out.non_finite.append(ref.label)
            delta = dirs.drift(res.centroid, ali.centroid)
            a = dirs.alignment(delta, basis, noise).masked_fill(bad, float("nan"))
            dirs.warn_if_zero_drift(a[~bad & ~undefined], ref.label)
            out.alignment[ri, si] = a.numpy()
            out.drift_norm[ri, si] = delta.norm(dim=-1).masked_fill(bad, float("nan")).numpy()
            ex = dirs.alignment(res.per_example.double() - ali.per_example.double(), basis, noise)
            ex = ex.masked_fill(bad[None, :], float("nan"))
            out.per_example_cos[ri, si] = ex.T.numpy()
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                out.alignment_per_example[ri, si] = np.nanmean(ex.numpy(), axis=0)
    out.layers = list(measure.reference.get("layers", probe.layers or list(range(n_layers))))
    return out


def _nulls(readouts: _Readouts, cfg: AnalyzeConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The isotropic null's p99 per layer, and the activation-space null's Monte Carlo draws and p99, drawn from
    the aligned model's per-example readouts (no d x d covariance)."""
    basis, ali = readouts.basis, readouts.ali
    n_layers, d_model = ali.centroid.shape
    null_iso = np.full(n_layers, nulls.isotropic_p99(d_model, cfg.k))
    null_draws = np.full((n_layers, cfg.null_samples), np.nan, dtype=np.float32)
    null_act = np.full(n_layers, np.nan)
    for l in range(n_layers):
        if not torch.isnan(basis[l]).any():
            draws = nulls.activation_null_draws_from_readouts(
                ali.per_example[:, l], basis[l].double(), cfg.null_samples, cfg.seed + l
            ).numpy()
            null_draws[l] = draws
            null_act[l] = np.quantile(draws, 0.99) if np.isfinite(draws).all() else np.nan
    return null_iso, null_draws, null_act


def _assemble(run: _Run, r: _Readouts, null: tuple[np.ndarray, np.ndarray, np.ndarray]) -> ReversionReport:
    """The report: the arrays, the nulls, and ``config`` = the recorded settings and what was measured."""
    cfg, probe, history = run.cfg, run.probe, run.history
    null_iso, null_draws, null_act = null
    d_model = r.ali.centroid.shape[1]
    config = {
        **cfg.recorded(),
        "contrast": probe.control is not None,
        "n_prompts": probe.n_prompts,
        "n_control": 0 if probe.control is None else len(probe.control),
        "non_finite": r.non_finite,
        "chat_template": probe.chat_template_used,
        "template_digest": rendering_of(probe),
        "checkpoints": {
            "pretrain": _source_label(history.pretrain.source),
            "align": _source_label(history.align.source),
        },
        "models_fingerprint": models_fingerprint(_fingerprint(history.pretrain), _fingerprint(history.align)),
    }
    return ReversionReport(
        layers=r.layers,
        runs=history.runs,
        steps=history.steps,
        d_model=int(d_model),
        v_rev=r.basis[:, 0, :].float(),
        v_rev_basis=r.basis.float(),
        alignment=r.alignment,
        alignment_per_example=r.alignment_per_example,
        per_example_cos=r.per_example_cos,
        drift_norm=r.drift_norm,
        p_value=nulls.isotropic_p_value(r.alignment, d_model, cfg.k),
        null_p99=null_iso,
        null_p99_activation=null_act,
        v_rev_norm=r.v_rev_norm,
        config=config,
        v_rev_snr=selection.v_rev_snr(r.pre.per_example, r.ali.per_example),
        null_draws_activation=null_draws,
    )
