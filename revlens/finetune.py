"""A small, resumable fine-tuning loop with optional v_rev blocking, and a ReversionMonitor.

Checkpoints go to ``out_dir/finetune/<run>/step_<N>/`` (the layout `analyze` reads; the last step is always
saved), written by :func:`revlens.checkpoint_save.save_checkpoint`: revlens folders for TL-native models, Hugging
Face folders for HF architectures, adapter folders with LoRA. The training state (trainable weights,
optimizer, schedule, losses and the run's settings) goes to ``out_dir/finetune/<run>/state/`` at every saved
step, so a run interrupted and called again continues and ends with the same weights (bitwise on CPU).

A run resumes only when its recorded settings match the call's: everything that changes the trajectory
(optimizer, lr, schedule, batch, seed, data and starting-weight fingerprints, blocking, anchor, LoRA,
autocast, clipping). ``steps`` may grow (a longer run is the same run continued) unless the schedule
depends on it (``cosine``). Anything else raises :class:`FinetuneStateError` naming the differences and the
fix (``overwrite=True`` / ``--overwrite``, or another ``out_dir`` / ``run_name``).

Batches are drawn from a generator seeded by (seed, step), and each step's random state (dropout) is
seeded the same way, so neither depends on resuming.

A step whose task loss, penalty or (when clipping) gradient norm is not finite stops the run with
:class:`NonFiniteLossError` before its optimizer step, so no NaN reaches the weights, the checkpoints or the
training state. One process at a time trains into a run folder: ``<run>/.lock`` (pid, host) refuses a second
one with :class:`RunLockedError`; a lock left by a killed process is replaced with a warning.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from revlens import directions as dirs
from revlens import distributed as dist_
from revlens._util import (
    DiskFullError,
    atomic_write_json,
    naming_disk_full,
    temp_sibling,
    tensor_digest,
    weights_fingerprint,
)
from revlens.anchor import ProbeAnchor
from revlens.blocking import Blocking
from revlens.checkpoint_loader import move_quietly
from revlens.checkpoint_save import save_checkpoint
from revlens.config import FinetuneConfig
from revlens.lora import apply_lora, is_peft_wrapped, lora_config_of, lora_description
from revlens.losses import model_lm_loss, takes_logits_to_keep
from revlens.nulls import isotropic_p99
from revlens.penalties import describe_penalty
from revlens.probe import ReversionProbe
from revlens.replay import ReplayMix
from revlens.reversion_directions import ReversionDirections

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "cosine")
STATE_FORMAT = 2
LOCK_NAME = ".lock"
# Random streams are seeded with seed * _SEED_STRIDE + step (+ a small salt): that must fit a 64-bit generator.
_SEED_STRIDE = 1_000_003
_SEED_LIMIT = 2**63


class ReversionMonitor:
    """Tracks alignment cos(mu_t - mu_A, v_rev) per layer during fine-tuning; warns on crossing the null.

    Build it with :meth:`from_directions` (``report.directions()`` and the aligned model), :meth:`from_models`
    (pretrain and aligned models) or directly from a probe, the aligned centroid and v_rev. Call :meth:`update`
    from any loop.
    """

    def __init__(
        self,
        probe: ReversionProbe,
        mu_align: torch.Tensor,
        v_rev: torch.Tensor,
        null_p99: Sequence[float] | None = None,
        floor: torch.Tensor | None = None,
    ):
        self.probe = probe
        self.mu_align = mu_align.double()
        # drifts shorter than this are round-off (NaN); default from mu_align, exact when it is the raw
        # probe centroid (no control set); from_models measures the raw centroid either way
        self.floor = dirs.roundoff_floor(self.mu_align) if floor is None else floor.double()
        self.basis = v_rev.double()[:, None, :] if v_rev.ndim == 2 else v_rev.double()
        d = self.mu_align.shape[-1]
        self.null_p99 = np.asarray(
            null_p99 if null_p99 is not None else [isotropic_p99(d, self.basis.shape[1])] * self.mu_align.shape[0]
        )
        self.history: dict[int, np.ndarray] = {}
        self._warned: set[int] = set()

    @classmethod
    def from_models(
        cls,
        pretrain: Any,
        align: Any,
        prompts: Any,
        *,
        chat_template: Any = "auto",
        system: str | None = None,
        **probe_kwargs: Any,
    ) -> ReversionMonitor:
        """A monitor whose probe reads ``prompts`` like :func:`revlens.analyze` does: inside the aligned
        model's chat template when it has one (``chat_template``, ``system``: see :class:`ReversionProbe`)."""
        probe = ReversionProbe(prompts, per_example=False, chat_template=chat_template, system=system, **probe_kwargs)
        probe.use_template_of(align)
        ali = probe.measure(align)
        mu_p, mu_a = probe.centroid(pretrain), ali.centroid
        return cls(probe, mu_a, dirs.v_rev_mean_diff(mu_p, mu_a), floor=dirs.roundoff_floor(ali.probe_centroid))

    @classmethod
    def from_directions(
        cls,
        directions: ReversionDirections,
        align: Any,
        prompts: Any,
        *,
        control: Any = None,
        chat_template: Any = "auto",
        system: str | None = None,
        batch_size: int = 32,
        device: str | None = None,
    ) -> ReversionMonitor:
        """A monitor along ``directions`` (``report.directions()``: its layers, hook, readout and basis), with the
        aligned centroid measured here on ``prompts`` (and ``control`` when the directions were read on the
        contrast), read as the directions were: a different chat template or control set is refused."""
        directions.check_contrast(control, "the monitor")
        probe = directions.probe(
            prompts,
            control,
            per_example=False,
            chat_template=chat_template,
            system=system,
            batch_size=batch_size,
            device=device,
        )
        probe.use_template_of(align)
        ali = probe.measure(align)
        if isinstance(probe.prompts[0], str):
            directions.check_template(probe.rendered_template, "the monitor")
        return cls(probe, ali.centroid, directions.stacked(), floor=dirs.roundoff_floor(ali.probe_centroid))

    def update(self, model: Any, step: int) -> np.ndarray:
        """Measure alignment at ``step``; warn once per layer when it first exceeds the null's p99.

        A drift within float round-off of zero (:func:`revlens.directions.roundoff_floor`) has no direction:
        NaN, with a warning, as in :func:`revlens.analyze`."""
        values = dirs.alignment(dirs.drift(self.probe.centroid(model), self.mu_align), self.basis, self.floor)
        dirs.warn_if_zero_drift(values, f"step {step}")
        a = values.numpy()
        self.history[int(step)] = a
        layers = self.probe.resolve_layers(model)
        for i, value in enumerate(a):
            if i not in self._warned and value > self.null_p99[i]:
                self._warned.add(i)
                warnings.warn(
                    f"step {step}: alignment with v_rev at layer {layers[i]} is {value:.3f}, above the "
                    f"isotropic null's p99 ({self.null_p99[i]:.3f}): drift is reverting.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return a

    def trajectory(self) -> dict[int, list[float]]:
        return {s: a.tolist() for s, a in sorted(self.history.items())}


class FinetuneStateError(ValueError):
    """A saved fine-tuning state that this call cannot continue (other settings, or unreadable), with the fix."""


class RunLockedError(FinetuneStateError):
    """Another process is fine-tuning into the same run folder (its ``.lock`` names the pid and host)."""


class NonFiniteLossError(ValueError):
    """A step's loss (or gradient norm) was not finite; the run stopped before applying it, with the fix.

    The weights in memory are those of the previous step, and the checkpoints and training state written
    before stay valid (nothing non-finite is written)."""


@dataclass
class FinetuneResult:
    """What :func:`finetune` did: per step run, the task loss (``losses``) and learning rate (``lrs``); the
    checkpoint folders written (``checkpoints``, step -> folder); the monitor's per-layer alignment at the steps
    it read (``monitor``); the step a resumed run started from (``resumed_from``, 0 when fresh); and the
    settings recorded beside the run (``settings``, what a resume is checked against)."""

    losses: dict[int, float] = field(default_factory=dict)
    checkpoints: dict[int, Path] = field(default_factory=dict)
    monitor: dict[int, list[float]] = field(default_factory=dict)
    resumed_from: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    lrs: dict[int, float] = field(default_factory=dict)


def _batch_indices(n: int, batch: int, seed: int, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(int(seed) * _SEED_STRIDE + int(step))
    return torch.randint(n, (batch,), generator=gen)


def check_run_name(run_name: str) -> str:
    """Refuse run names that are not one plain folder name (``a/b``, ``..``, ``.``, empty)."""
    seps = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if (
        not run_name
        or run_name in (".", "..")
        or ".." in run_name
        or any(s in run_name for s in seps)
        or "\0" in run_name
    ):
        raise ValueError(
            f"run_name {run_name!r} must be one plain folder name (no path separators, no '..'): "
            "checkpoints go to out_dir/finetune/<run_name>/; e.g. run_name='seed_0'."
        )
    return run_name


def data_fingerprint(tokens: torch.Tensor, loss_mask: torch.Tensor) -> str:
    """sha256 of the token ids (int64) and the loss mask (float32)."""
    return tensor_digest(tokens.long(), loss_mask.float())


def _blocking_description(blocking: Blocking | None, coords: Mapping[int, torch.Tensor] | None) -> dict | None:
    if blocking is None:
        return None
    constant = None
    if blocking.constant is not None:
        constant = tensor_digest(*(blocking.constant[l] for l in sorted(blocking.constant)))
    return {
        "modes": sorted(blocking.modes),
        "hook": blocking.hook,
        "layers": list(blocking.layers),
        "directions": tensor_digest(*(blocking.bases[l] for l in blocking.layers)),
        "constant": constant,
        "reference_coords": None if coords is None else tensor_digest(*(coords[l] for l in sorted(coords))),
    }


def _anchor_description(anchor: Any) -> dict | None:
    """What decides the penalty term (a ProbeAnchor, KLAnchor or PenaltySum: their ``description()``)."""
    return describe_penalty(anchor)


def _cosine_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """The lr multiplier after ``step`` scheduler steps (as transformers' get_*_schedule_with_warmup)."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(params: Any, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW or SGD over ``params`` (a model's parameters or an iterable of tensors).

    AdamW is torch's fused kernel where every parameter is a floating tensor on the CPU or a CUDA device: the
    same update as the default multi-tensor one up to rounding, and on a 2-core CPU 5x faster (0.08 s against
    0.4 s a step for 135M parameters), a sixth of a small model's training step.
    """
    params = list(params.parameters()) if hasattr(params, "parameters") else list(params)
    if name == "adamw":
        fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}.")


# --- training state on disk -------------------------------------------------------------------------------
# state/<step>-<uid>/ folders (written whole under a temporary name, then renamed) and state/latest.json,
# a pointer rewritten atomically after the rename; older folders are deleted only after that. A kill at any
# moment leaves the pointer on a complete folder (the old one until the new one is in place).

_POINTER = "latest.json"


def _state_root(run_dir: Path) -> Path:
    return run_dir / "state"


def _complete_states(root: Path) -> list[tuple[int, Path]]:
    out = []
    for folder in root.iterdir() if root.is_dir() else ():
        head = folder.name.split("-", 1)[0]
        if folder.is_dir() and head.isdigit() and (folder / "progress.json").is_file():
            out.append((int(head), folder))
    return sorted(out)


def _find_state(run_dir: Path) -> Path | None:
    """The folder of the latest complete training state, or None."""
    root = _state_root(run_dir)
    if not root.is_dir():
        return None
    if (root / "progress.json").is_file():
        return root  # a state written by revlens before settings were recorded
    pointer = root / _POINTER
    if pointer.is_file():
        try:
            folder = root / json.loads(pointer.read_text())["dir"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise FinetuneStateError(
                f"{pointer} is unreadable ({err}); delete {root} or pass overwrite=True "
                "(CLI: --overwrite) to start the run over."
            ) from err
        if (folder / "progress.json").is_file():
            return folder
    states = _complete_states(root)  # killed before the first pointer was written
    return states[-1][1] if states else None


def _save_state(
    run_dir: Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    losses: dict[int, float],
    settings: dict[str, Any],
) -> Path:
    root = _state_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"{step}-{os.getpid()}-{os.urandom(4).hex()}"
    tmp = temp_sibling(root / name)
    tmp.mkdir()
    try:
        with naming_disk_full(root / name):
            from safetensors.torch import save_file

            save_file(
                {k: v.detach().to("cpu").contiguous().clone() for k, v in trainable.items()},
                str(tmp / "trainable.safetensors"),
            )
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
            (tmp / "progress.json").write_text(
                json.dumps({"format": STATE_FORMAT, "step": step, "losses": losses, "settings": settings}, indent=1)
            )
        tmp.rename(root / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_json(root / _POINTER, {"dir": name, "step": step})
    for old in root.iterdir():
        if old.name not in (name, _POINTER):
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    return root / name


def _read_progress(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "progress.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise FinetuneStateError(
            f"{folder}/progress.json is unreadable ({err}); pass overwrite=True "
            "(CLI: --overwrite) to start the run over."
        ) from err


def _load_state(
    folder: Path, trainable: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, scheduler: Any
) -> tuple[int, dict[int, float]]:
    from safetensors.torch import load_file

    progress = _read_progress(folder)
    saved = load_file(str(folder / "trainable.safetensors"))
    if set(saved) != set(trainable):
        raise FinetuneStateError(
            f"{folder} holds other trainable parameters than this model; pass overwrite=True "
            "(CLI: --overwrite) or choose another out_dir / run_name."
        )
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(saved[name])
    both = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(both["optimizer"])
    scheduler.load_state_dict(both["scheduler"])
    return int(progress["step"]), {int(k): v for k, v in progress["losses"].items()}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """``"key: saved X, now Y"`` for each differing setting (nested settings as ``key.sub``)."""
    saved, now = json.loads(json.dumps(saved)), json.loads(json.dumps(now))
    out = []
    for key in sorted(set(saved) | set(now)):
        if key == "steps" and now.get("schedule") != "cosine":
            continue
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{d}" for d in _differences(a, b)]
        elif a != b:
            out.append(f"{key}: saved {_short(a)}, now {_short(b)}")
    return out


def _refuse(run_dir: Path, what: str) -> FinetuneStateError:
    return FinetuneStateError(
        f"{run_dir} already holds {what}. Pass overwrite=True (CLI: --overwrite) to delete it and start over, "
        "or choose another out_dir (--out) or run_name."
    )


def _clear_run(run_dir: Path) -> None:
    """Delete the run's files but not this process's lock: the training state first (a run killed midway is
    then refused for its leftover checkpoints, never resumed without them), then everything else."""
    if not run_dir.is_dir():
        return
    children = sorted(run_dir.iterdir(), key=lambda p: p.name != "state")
    for child in children:
        if child.name == LOCK_NAME:
            continue
        aside = temp_sibling(child).with_suffix(".old")
        child.rename(aside)
        shutil.rmtree(aside, ignore_errors=True) if aside.is_dir() else aside.unlink(missing_ok=True)


def _resume_point(run_dir: Path, settings: dict[str, Any], steps: int, overwrite: bool) -> Path | None:
    """The state folder to resume from (None: start fresh), after refusing runs with other settings."""
    if overwrite:
        _clear_run(run_dir)
        return None
    folder = _find_state(run_dir)
    if folder is None:
        if any(run_dir.glob("step_*")):
            raise _refuse(run_dir, "checkpoints (step_*/) but no training state to resume from")
        return None
    progress = _read_progress(folder)
    if progress.get("format") != STATE_FORMAT or "settings" not in progress:
        raise _refuse(run_dir, "a run saved by an older revlens without its settings, so it cannot be resumed safely")
    diff = _differences(progress["settings"], settings)
    if diff:
        raise _refuse(run_dir, "a run with other settings (" + "; ".join(diff) + ")")
    if int(progress["step"]) > steps:
        raise _refuse(run_dir, f"a run already at step {progress['step']}, beyond steps={steps}")
    return folder


# --- one process per run folder ----------------------------------------------------------------------------
# <run>/.lock holds {"pid", "host", "start", "token", "since"}. It appears whole: written to a temporary file and
# hard-linked into place (fails if a lock exists), or created with O_CREAT | O_EXCL where links are unsupported.


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int, start: str | None) -> bool:
    """Whether process ``pid`` on this host is still the one that wrote the lock (not gone, a zombie or reused)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):
            return False  # ended; only its parent has not reaped it yet
    except (OSError, IndexError):
        pass
    now = _process_start(pid)
    return start is None or now is None or now == start


def _read_lock(path: Path) -> dict[str, Any] | None:
    """The lock's record, or None when it is gone or unreadable."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _holder(record: dict[str, Any]) -> str:
    return f"pid {record.get('pid')} on host {record.get('host')!r} (since {record.get('since', '?')})"


def _lock_is_stale(record: dict[str, Any]) -> bool:
    """True when the holder ran on this host and is gone; a lock from another host is never judged stale."""
    pid = record.get("pid")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0 or record.get("host") != socket.gethostname():
        return False
    return not _pid_alive(pid, record.get("start"))


def _create_exclusive(path: Path, text: str) -> bool:
    """Create ``path`` holding ``text`` unless it exists (False); the file never appears half-written."""
    tmp = temp_sibling(path)
    try:
        with naming_disk_full(path):
            tmp.write_text(text)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:
            pass  # no hard links on this filesystem
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _break_stale_lock(path: Path, record: dict[str, Any]) -> None:
    """Remove the stale lock ``record`` (only that one: a lock taken meanwhile by a live process is put back)."""
    aside = temp_sibling(path)
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # released or broken by another process meanwhile
    moved = _read_lock(aside)
    if moved is not None and moved.get("token") != record.get("token"):
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)  # a live process's fresh lock: restore it
    aside.unlink(missing_ok=True)
    warnings.warn(
        f"{path}: replacing the stale lock of {_holder(record)}: that process is gone (a run killed before it "
        "could remove its lock); this run resumes from the saved state as usual.",
        RuntimeWarning,
        stacklevel=3,
    )


def acquire_run_lock(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Take ``run_dir/.lock`` for this process, or raise :class:`RunLockedError` naming the holder.

    A lock whose process is gone (same host, pid not alive, a zombie, or the pid reused by a younger process)
    is replaced with a ``RuntimeWarning``. Returns the record written; give it to :func:`release_run_lock`.

    Example:
        >>> lock = acquire_run_lock(tmp / "locked" / "finetune" / "seed_0")
        >>> lock["pid"] == os.getpid(), (tmp / "locked" / "finetune" / "seed_0" / ".lock").is_file()
        (True, True)
        >>> release_run_lock(tmp / "locked" / "finetune" / "seed_0", lock)
        >>> (tmp / "locked").exists()  # the lock is gone, and so are the empty folders taking it made
        False
    """
    run_dir = Path(run_dir)
    created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]  # removed again when left empty
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "start": _process_start(os.getpid()),
        "token": uuid.uuid4().hex,
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    for _ in range(5):
        try:
            if _create_exclusive(path, json.dumps(me)):
                return {**me, "created": [str(p) for p in created]}
        except FileNotFoundError:  # the folder was removed meanwhile (left empty by a run that ended): again
            run_dir.mkdir(parents=True, exist_ok=True)
            continue
        record = _read_lock(path)
        if record is None:
            if not path.exists():
                continue  # released between our attempt and the read
            raise RunLockedError(
                f"{path} exists but is unreadable (being written, or left empty by a killed run); if no "
                f"`revlens finetune` is running on {run_dir}, delete {path} and rerun."
            )
        if not _lock_is_stale(record):
            raise _held(run_dir, path, record)
        _break_stale_lock(path, record)
    raise RunLockedError(f"could not take {path}: other processes keep taking it; run one fine-tuning per run folder.")


def _held(run_dir: Path, path: Path, record: dict[str, Any]) -> RunLockedError:
    return RunLockedError(
        f"{run_dir} is being fine-tuned by another process: {path} is held by {_holder(record)}. Wait for it to "
        "end, or choose another out_dir (--out) or run_name (--run-name); if that process is no longer running "
        f"(e.g. on another host), delete {path} and rerun."
    )


def release_run_lock(run_dir: str | os.PathLike, lock: Mapping[str, Any]) -> None:
    """Remove ``run_dir/.lock`` if it is still ``lock`` (this process's), and the folders that taking it made,
    when they are empty."""
    run_dir = Path(run_dir)
    path = run_dir / LOCK_NAME
    record = _read_lock(path)
    if record is not None and record.get("token") == lock.get("token"):
        path.unlink(missing_ok=True)
    for folder in reversed(sorted(lock.get("created", ()), key=len)):
        with contextlib.suppress(OSError):
            Path(folder).rmdir()  # only when empty


def check_run_unlocked(run_dir: str | os.PathLike) -> None:
    """Raise :class:`RunLockedError` when a live process holds ``run_dir/.lock`` (before deleting a run)."""
    path = Path(run_dir) / LOCK_NAME
    record = _read_lock(path)
    if record is not None and not _lock_is_stale(record):
        raise _held(Path(run_dir), path, record)


def _check_seed(seed: int, steps: int) -> None:
    """Every random stream's seed (seed * _SEED_STRIDE + step + a salt) must fit a 64-bit generator."""
    limit = (_SEED_LIMIT - 1 - 2 * steps - 16) // _SEED_STRIDE
    if isinstance(seed, bool) or int(seed) != seed or abs(int(seed)) > limit:
        raise ValueError(
            f"seed must be a whole number of magnitude at most {limit} (random streams are seeded with "
            f"seed * {_SEED_STRIDE} + step, which must fit in 64 bits), got {seed!r}; choose a smaller seed."
        )


def _check_finite(
    step: int,
    task: float,
    penalty: float | None,
    grad_norm: float | None,
    settings: Mapping[str, Any],
    run_name: str,
    run_dir: Path | None,
    last_saved: int | None,
    ctx: Any,
) -> None:
    """Raise :class:`NonFiniteLossError` (on every rank) when this step's numbers are not all finite."""
    bad_penalty = penalty is not None and not math.isfinite(penalty)
    if ctx.active and penalty is not None:  # every rank decides alike (task loss and gradients are reduced)
        bad_penalty = dist_.all_reduce_sum(1.0 if bad_penalty else 0.0, ctx) > 0
    if math.isfinite(task) and not bad_penalty and (grad_norm is None or math.isfinite(grad_norm)):
        return
    lr = settings.get("lr")
    lower_lr = f"the learning rate (e.g. lr={lr / 10:g}, --lr {lr / 10:g})"
    if bad_penalty:
        what = f"penalty on the probe prompts is {penalty} (task loss {task:.4g})"
        fix = f"lower the penalty weight (anchor@W, contrast@W, kl@W in the spec) or {lower_lr}"
    elif not math.isfinite(task):
        what = f"task loss is {task}"
        fix = (
            "the starting weights or the data already give it: check the model (e.g. load and evaluate it) or "
            "train in a wider dtype (--dtype float32, no autocast)"
            if step == 1
            else f"lower {lower_lr}, or clip the gradient (max_grad_norm / --max-grad-norm)"
        )
    else:
        what = f"gradient norm is {grad_norm} (task loss {task:.4g})"
        fix = f"lower {lower_lr} or the penalty weight, or train in a wider dtype (no autocast)"
    spec = settings.get("spec") or _spec_fallback(settings)
    weights = "the starting weights" if step == 1 else f"the weights after step {step - 1}"
    raise NonFiniteLossError(
        f"fine-tuning run {run_name!r} stopped at step {step}: the {what} with blocking spec {spec!r} and "
        f"lr {lr:g}. That update was not applied (the model keeps {weights}). Fix: {fix}; "
        f"{_rerun_with_other_settings(run_dir, last_saved)}."
    )


def _rerun_with_other_settings(run_dir: Path | None, last_saved: int | None) -> str:
    """How to rerun a stopped run with the fix: the same settings stop at the same step, and the saved state resumes
    only with its own settings, so a rerun with other settings starts over (``overwrite``) or in another folder."""
    if run_dir is None or last_saved is None:
        return "then rerun (nothing was saved, so the rerun starts afresh)"
    return (
        f"the same settings would stop here again and the saved state resumes only with its own, so rerun with the "
        f"fix and overwrite=True (--overwrite) to start {run_dir} over, or under another run_name (--run-name) to "
        f"keep its checkpoints and state up to step {last_saved}"
    )


def _spec_fallback(settings: Mapping[str, Any]) -> str:
    """What the settings say about blocking when no spec= named it: hook modes and penalty weights."""
    blocking, anchor = settings.get("blocking"), settings.get("anchor")
    if blocking is None and anchor is None and "replay" not in settings:
        return "plain"
    weights: list[str] = []

    def collect(d: Any) -> None:
        if isinstance(d, dict):
            weights.extend(f"{k}={v:g}" for k, v in d.items() if k.endswith("weight") and isinstance(v, (int, float)))
            for v in d.values():
                collect(v)
        elif isinstance(d, list):
            for v in d:
                collect(v)

    collect(anchor)
    parts = ([f"hooks {'+'.join(blocking['modes'])}"] if blocking else []) + (
        [f"penalty {', '.join(weights)}"] if weights else []
    )
    return f"not recorded (pass spec= to finetune): {'; '.join(parts) or 'replay'}"


def _check_weights_finite(trainable: Mapping[str, torch.Tensor], step: int, run_name: str) -> None:
    """Before saving step ``step``: refuse non-finite weights (an update that overflowed from a finite loss)."""
    bad = [name for name, p in trainable.items() if not bool(torch.isfinite(p.detach()).all())]
    if bad:
        raise NonFiniteLossError(
            f"fine-tuning run {run_name!r} stopped at step {step}: its loss was finite but the update made "
            f"{len(bad)} parameter(s) non-finite (first: {bad[0]}), so step {step} is not saved (earlier "
            "checkpoints and training state stay valid). Fix: lower the learning rate or clip the gradient "
            "(max_grad_norm / --max-grad-norm), then rerun with overwrite=True (--overwrite) to start the run over, "
            "or under another run_name (--run-name) to keep the earlier checkpoints (a saved run resumes only with "
            "its own settings)."
        )


@contextlib.contextmanager
def _seeded(seed: int, step: int, device: torch.device):
    """Run the block with the global random state seeded by (seed, step), restoring it afterwards."""
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    )
    with torch.random.fork_rng(devices=devices):
        value = int(seed) * _SEED_STRIDE + int(step) + 7
        torch.random.default_generator.manual_seed(value)
        for index in devices:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(value)
        yield


def finetune(
    model: Any,
    tokens: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    config: FinetuneConfig | None = None,
    blocking: Blocking | None = None,
    anchor: ProbeAnchor | None = None,
    replay: ReplayMix | None = None,
    monitor: ReversionMonitor | None = None,
    on_step: Callable[[int, Any], None] | None = None,
    **settings: Any,
) -> FinetuneResult:
    """Fine-tune ``model`` in place on ``tokens`` ``[n, seq]`` with ``loss_mask`` ``[n, seq]``.

    Each optimizer step averages ``grad_accum`` micro-batches of ``batch_size`` rows drawn with
    replacement by a generator seeded with (seed, step). With ``blocking``, clamp coordinates
    are precomputed once from its reference model for every row of ``tokens``; with ``anchor``,
    its penalty on the probe prompts is added to every step's loss (``losses`` record the task loss).

    Args:
        model: a TransformerBridge (TL-native or a Hugging Face architecture).
        tokens, loss_mask: the training rows ``[n, seq]`` and which tokens count in the loss.
        config: a :class:`~revlens.config.FinetuneConfig`: the optimisation (steps, lr, optimizer, batch_size,
            grad_accum, weight_decay, seed, warmup_steps, schedule, max_grad_norm, autocast_dtype), the
            checkpoints (save_steps, out_dir, run_name, resume, overwrite), LoRA, the spec and ``distributed``.
        blocking, anchor: v_rev blocking hooks and a penalty on the probe prompts (a
            :class:`~revlens.anchor.ProbeAnchor`, :class:`~revlens.penalties.KLAnchor` or their
            :class:`~revlens.penalties.PenaltySum`; both act on the adapted model when ``lora`` is set), as
            :func:`revlens.build_defense` builds them.
        replay: a :class:`~revlens.replay.ReplayMix`: ``replay.rows`` rows of every micro-batch come from its
            data (safety-data replay); ``losses`` then record the mixed batches' loss.
        monitor: a :class:`ReversionMonitor` read at ``monitor_steps`` (default: ``save_steps``).
        on_step: called as ``on_step(step, model)`` after each optimizer step.
        **settings: fields of :class:`~revlens.config.FinetuneConfig` that replace the config's (each documented
            there).

    Checkpoints of ``save_steps`` (and the last step) go to ``out_dir/finetune/<run_name>/step_<N>/`` with the
    training state; a run called again with the same settings resumes (``resume``; ``overwrite`` starts over).
    With ``lora``, LoRA adapters (:func:`revlens.lora.apply_lora`, initialised with ``seed``) train instead of
    every weight, and checkpoints are adapter folders. ``warmup_steps`` and ``schedule`` follow transformers'
    ``get_*_schedule_with_warmup`` (a ``LambdaLR``). Under a ``torchrun`` job (``distributed``, default: when one
    is running) the ``batch_size * grad_accum`` rows of each step are the same as in one process; their
    micro-batches are dealt across ranks (:func:`revlens.distributed.step_micro_batches`) and the gradients
    summed, so the weights equal a one-process run's up to float summation order (dropout aside: each rank's
    random stream restarts at every step). Blocking hooks act per rank on its micro-batches; the anchor
    penalty is computed on every rank and counted once (scaled by 1/world_size). Rank 0 alone writes
    checkpoints and state (``out_dir`` must be shared by all nodes) and runs ``monitor``.
    Returns:
        :class:`FinetuneResult`: task loss and learning rate per step run, checkpoint folders, monitor
        readings, the step resumed from and the settings recorded with the state.
    Raises:
        NonFiniteLossError: a step's task loss, penalty or (with ``max_grad_norm``) gradient norm is not finite;
            raised before that step's update, so the weights and everything saved are the last finite ones.
        RunLockedError: another live process holds ``out_dir/finetune/<run_name>/.lock`` (a lock left by a
            process that is gone is replaced, with a warning); the lock is held until this call returns.
        FinetuneStateError: the saved state was written with other settings (see ``resume``, ``overwrite``).

    Example:
        >>> student = revlens.load_checkpoint(f"{ckpts}/align")  # a fresh copy: finetune trains it in place
        >>> tokens = torch.randint(0, 20, (8, 6), generator=torch.Generator().manual_seed(0))
        >>> result = finetune(student, tokens, torch.ones_like(tokens), steps=4, lr=1e-3, batch_size=4,
        ...                   schedule="cosine", warmup_steps=1, max_grad_norm=1.0, save_steps=[2],
        ...                   out_dir=f"{tmp}/finetune_example", progress=False)
        >>> sorted(result.checkpoints), len(result.losses), result.lrs[1] < result.lrs[2]  # warm-up, then cosine
        ([2, 4], 4, True)
        >>> saved = revlens.load_checkpoint(result.checkpoints[4])  # the last step, as analyze reads it
        >>> all(torch.equal(a, b) for a, b in zip(saved.parameters(), student.parameters()))
        True
    """
    cfg = FinetuneConfig.of(config, settings)
    _check_settings(tokens, loss_mask, cfg)
    ctx = dist_.context(cfg.distributed)
    out = None if cfg.out_dir is None else Path(cfg.out_dir)
    run_dir = None if out is None else out / "finetune" / cfg.run_name
    lock = None
    if run_dir is not None:
        dist_.check_shared_folder(out, ctx, "out_dir")
        lock = dist_.on_main(lambda: acquire_run_lock(run_dir), ctx, "locking the run folder")
    try:
        parts = _Parts(blocking, anchor, replay, monitor, on_step)
        return _finetune_locked(model, tokens, loss_mask, cfg, parts, ctx=ctx, out=out, run_dir=run_dir)
    finally:
        if lock is not None and ctx.is_main:
            release_run_lock(run_dir, lock)


@dataclass
class _Parts:
    """The objects :func:`finetune` trains with besides its settings."""

    blocking: Blocking | None
    anchor: Any
    replay: ReplayMix | None
    monitor: ReversionMonitor | None
    on_step: Callable[[int, Any], None] | None


def _check_settings(tokens: torch.Tensor, loss_mask: torch.Tensor, cfg: FinetuneConfig) -> None:
    """Refuse data and settings :func:`finetune` cannot run, naming the fix."""
    if tokens.ndim != 2 or tokens.shape != loss_mask.shape:
        raise ValueError(
            f"tokens and loss_mask must both be [n, seq]; got {tuple(tokens.shape)} and {tuple(loss_mask.shape)}."
        )
    steps = cfg.steps
    if steps < 1 or cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise ValueError("steps, batch_size and grad_accum must be >= 1.")
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {cfg.schedule!r}; choose one of {SCHEDULES}.")
    if not 0 <= cfg.warmup_steps <= steps:
        raise ValueError(f"warmup_steps must be between 0 and steps={steps}, got {cfg.warmup_steps}.")
    if cfg.max_grad_norm is not None and not cfg.max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 (or None for no clipping), got {cfg.max_grad_norm}.")
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose one of {OPTIMIZERS}.")
    check_run_name(cfg.run_name)
    bad = [s for s in cfg.save_steps if not 1 <= s <= steps]
    if bad:
        raise ValueError(f"save_steps {bad} fall outside 1..{steps}.")
    if cfg.save_steps and cfg.out_dir is None:
        raise ValueError("save_steps needs an out_dir to write checkpoints to.")
    _check_seed(cfg.seed, steps)


def _finetune_locked(
    model: Any,
    tokens: torch.Tensor,
    loss_mask: torch.Tensor,
    cfg: FinetuneConfig,
    parts: _Parts,
    *,
    ctx: Any,
    out: Path | None,
    run_dir: Path | None,
) -> FinetuneResult:
    """:func:`finetune` once its arguments are checked and (with ``run_dir``) the run folder is locked."""
    steps, seed = cfg.steps, cfg.seed
    move_quietly(model, ctx.device if ctx.active and cfg.device is None else cfg.device)
    dev = next(model.parameters()).device
    dist_.broadcast_parameters([t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()], ctx)
    start_weights = weights_fingerprint(model)
    if cfg.lora is not None:
        with _seeded(seed, 0, dev):
            apply_lora(model, cfg.lora)
        move_quietly(model, dev)
    n = tokens.shape[0]
    if parts.replay is not None:
        parts.replay.step_indices(n, cfg.batch_size, cfg.grad_accum, seed, 1)  # checks that task rows remain
        tokens, loss_mask = parts.replay.combined(tokens, loss_mask)
    blocking = parts.blocking
    coords = blocking.reference_coords(tokens) if blocking is not None and blocking.needs_coords else None
    settings = _settings_record(model, tokens, loss_mask, cfg, parts, coords, start_weights)
    dist_.check_same(settings, ctx, "the fine-tuning settings")
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError("the model has no trainable parameters (every requires_grad is False).")
    opt = make_optimizer(trainable.values(), cfg.optimizer, cfg.learning_rate, cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: _cosine_factor(i, cfg.warmup_steps, steps, cfg.schedule)
    )
    result = FinetuneResult(settings=settings)
    start = 0
    if run_dir is not None:
        folder = dist_.on_main(
            lambda: _resume_point(run_dir, settings, steps, cfg.overwrite), ctx, "checking the saved state"
        )
        if folder is not None and cfg.resume:
            start, result.losses = _load_state(folder, trainable, opt, scheduler)
            result.resumed_from = start
    last_saved = start if start > 0 else None
    save_set = set(cfg.save_steps) | ({steps} if out is not None else set())
    watch = set(cfg.save_steps if cfg.monitor_steps is None else cfg.monitor_steps)
    batch = _Batches(tokens, loss_mask, n, cfg, parts, coords, ctx, dev, takes_logits_to_keep(model))
    model.train()
    bar = tqdm(
        range(start + 1, steps + 1),
        desc=f"finetune {cfg.run_name}",
        disable=not (cfg.progress and ctx.is_main),
        leave=False,
    )
    for step in bar:
        opt.zero_grad(set_to_none=True)
        total, penalty_value = batch.backward(model, step)
        dist_.all_reduce_gradients(trainable.values(), ctx)
        total = dist_.all_reduce_sum(total, ctx)
        grad_norm = None
        if cfg.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(list(trainable.values()), cfg.max_grad_norm))
        # before the optimizer step: a non-finite loss or gradient stops the run with the weights untouched
        _check_finite(step, total, penalty_value, grad_norm, settings, cfg.run_name, run_dir, last_saved, ctx)
        result.lrs[step] = float(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
        result.losses[step] = total
        bar.set_postfix(loss=f"{total:.4f}")
        if parts.on_step is not None:
            parts.on_step(step, model)
        if parts.monitor is not None and step in watch and ctx.is_main:
            result.monitor[step] = parts.monitor.update(model, step).tolist()
            model.train()
        if step in save_set and run_dir is not None:

            def save(step: int = step) -> Path:
                _check_weights_finite(trainable, step, cfg.run_name)
                path = save_checkpoint(model, run_dir / f"step_{step}")
                try:
                    _save_state(run_dir, step, trainable, opt, scheduler, result.losses, settings)
                except DiskFullError:  # no checkpoint without its state: a rerun resumes from the last state
                    shutil.rmtree(path, ignore_errors=True)
                    raise
                return path

            result.checkpoints[step] = dist_.on_main(save, ctx, f"saving step {step}")
            last_saved = step
    if run_dir is not None:
        for step in sorted(save_set):
            if (run_dir / f"step_{step}").is_dir():
                result.checkpoints.setdefault(step, run_dir / f"step_{step}")
    model.eval()
    return result


def _settings_record(
    model: Any,
    tokens: torch.Tensor,
    loss_mask: torch.Tensor,
    cfg: FinetuneConfig,
    parts: _Parts,
    coords: Mapping[int, torch.Tensor] | None,
    start_weights: str,
) -> dict[str, Any]:
    """Everything that changes the trajectory, recorded with the training state: a resume must match it."""
    lora = cfg.lora
    settings = {
        "optimizer": cfg.optimizer,
        "lr": cfg.learning_rate,
        "weight_decay": float(cfg.weight_decay),
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "seed": int(cfg.seed),
        "steps": int(cfg.steps),
        "schedule": cfg.schedule,
        "warmup_steps": int(cfg.warmup_steps),
        "max_grad_norm": None if cfg.max_grad_norm is None else float(cfg.max_grad_norm),
        "autocast_dtype": None if cfg.autocast_dtype is None else str(cfg.autocast_dtype).removeprefix("torch."),
        "data": data_fingerprint(tokens, loss_mask),
        "start_weights": start_weights,
        "lora": lora_description(
            lora if lora is not None else lora_config_of(model) if is_peft_wrapped(model) else None
        ),
        "blocking": _blocking_description(parts.blocking, coords),
        "anchor": _anchor_description(parts.anchor),
    }
    if parts.replay is not None:
        settings["replay"] = parts.replay.description()
    if cfg.spec is not None:
        settings["spec"] = str(cfg.spec)
    return settings


class _Batches:
    """One optimizer step's forward and backward passes: the seeded rows of the step in micro-batches (dealt across
    ranks), under the blocking hooks and autocast, then the penalty; gradients accumulate in the model."""

    def __init__(
        self,
        tokens: torch.Tensor,
        loss_mask: torch.Tensor,
        n_task: int,
        cfg: FinetuneConfig,
        parts: _Parts,
        coords: Mapping[int, torch.Tensor] | None,
        ctx: Any,
        dev: torch.device,
        keep_logits: bool,
    ):
        self.tokens, self.loss_mask, self.cfg, self.parts, self.coords = tokens, loss_mask, cfg, parts, coords
        self.n_task = n_task  # rows of the task data (replay rows follow them in tokens)
        self.ctx, self.dev, self.keep_logits = ctx, dev, keep_logits

    def autocast(self) -> Any:
        dtype = self.cfg.autocast_dtype
        return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=self.dev.type, dtype=dtype)

    def backward(self, model: Any, step: int) -> tuple[float, float | None]:
        """The step's task loss (mean over its micro-batches) and penalty, their gradients accumulated."""
        cfg, parts, ctx, dev = self.cfg, self.parts, self.ctx, self.dev
        blocking, n = parts.blocking, self.n_task
        idx = (
            _batch_indices(n, cfg.batch_size * cfg.grad_accum, cfg.seed, step)
            if parts.replay is None
            else parts.replay.step_indices(n, cfg.batch_size, cfg.grad_accum, cfg.seed, step)
        )
        total = 0.0
        with _seeded(cfg.seed, step, dev):
            for micro in dist_.step_micro_batches(idx, cfg.batch_size, ctx):
                x, m = self.tokens[micro].to(dev), self.loss_mask[micro].to(dev)
                if blocking is None:
                    with self.autocast():
                        loss = model_lm_loss(model, x, m, self.keep_logits)
                else:
                    coords = self.coords
                    blocking.set_batch(coords=None if coords is None else {l: c[micro] for l, c in coords.items()})
                    with blocking.applied(model), self.autocast():
                        loss = model_lm_loss(model, x, m, self.keep_logits)
                (loss / cfg.grad_accum).backward()
                total += loss.item() / cfg.grad_accum
            penalty_value = None
            if parts.anchor is not None:
                with self.autocast():
                    penalty = parts.anchor.penalty(model, step)
                penalty_value = float(penalty.detach() if torch.is_tensor(penalty) else penalty)
                if math.isfinite(penalty_value):
                    (penalty * dist_.replicated_loss_scale(ctx) if ctx.active else penalty).backward()
        return total, penalty_value
