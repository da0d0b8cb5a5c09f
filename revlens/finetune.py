"""A small, resumable fine-tuning loop with optional v_rev blocking, and a ReversionMonitor.

Checkpoints go to ``out_dir/finetune/<run>/step_<N>/`` (the layout `analyze` reads); the training
state (weights, optimizer, step) goes to ``out_dir/finetune/<run>/state/`` at every saved step, so an
interrupted run called again with ``resume=True`` continues and ends with the same weights.
Batches are drawn from a generator seeded by (seed, step): the order does not depend on resuming.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from revlens import directions as dirs
from revlens.checkpoints import load_revlens_checkpoint, move_quietly, save_checkpoint
from revlens.intervention import Blocking, ProbeAnchor
from revlens.losses import masked_lm_loss
from revlens.nulls import isotropic_p99
from revlens.probe import ReversionProbe

OPTIMIZERS = ("adamw", "sgd")


class ReversionMonitor:
    """Tracks alignment cos(mu_t - mu_A, v_rev) per layer during fine-tuning; warns on crossing the null.

    Build it with :meth:`from_models` (pretrain and aligned models) or directly from a probe, the
    aligned centroid and v_rev. Call :meth:`update` from any loop.
    """

    def __init__(self, probe: ReversionProbe, mu_align: torch.Tensor, v_rev: torch.Tensor,
                 null_p99: Sequence[float] | None = None):
        self.probe = probe
        self.mu_align = mu_align.double()
        self.basis = v_rev.double()[:, None, :] if v_rev.ndim == 2 else v_rev.double()
        d = self.mu_align.shape[-1]
        self.null_p99 = np.asarray(null_p99 if null_p99 is not None
                                   else [isotropic_p99(d, self.basis.shape[1])] * self.mu_align.shape[0])
        self.history: dict[int, np.ndarray] = {}
        self._warned: set[int] = set()

    @classmethod
    def from_models(cls, pretrain: Any, align: Any, prompts: Any, *, chat_template: Any = "auto",
                    system: str | None = None, **probe_kwargs: Any) -> "ReversionMonitor":
        """A monitor whose probe reads ``prompts`` like :func:`revlens.analyze` does: inside the aligned
        model's chat template when it has one (``chat_template``, ``system``: see :class:`ReversionProbe`)."""
        probe = ReversionProbe(prompts, per_example=False, chat_template=chat_template, system=system, **probe_kwargs)
        probe.use_template_of(align)
        mu_p, mu_a = probe.centroid(pretrain), probe.centroid(align)
        return cls(probe, mu_a, dirs.v_rev_mean_diff(mu_p, mu_a))

    def update(self, model: Any, step: int) -> np.ndarray:
        """Measure alignment at ``step``; warn once per layer when it first exceeds the null's p99."""
        a = dirs.alignment(dirs.drift(self.probe.centroid(model), self.mu_align), self.basis).numpy()
        self.history[int(step)] = a
        layers = self.probe.resolve_layers(model)
        for i, value in enumerate(a):
            if i not in self._warned and value > self.null_p99[i]:
                self._warned.add(i)
                warnings.warn(f"step {step}: alignment with v_rev at layer {layers[i]} is {value:.3f}, above the "
                              f"isotropic null's p99 ({self.null_p99[i]:.3f}): drift is reverting.",
                              RuntimeWarning, stacklevel=2)
        return a

    def trajectory(self) -> dict[int, list[float]]:
        return {s: a.tolist() for s, a in sorted(self.history.items())}


@dataclass
class FinetuneResult:
    losses: dict[int, float] = field(default_factory=dict)
    checkpoints: dict[int, Path] = field(default_factory=dict)
    monitor: dict[int, list[float]] = field(default_factory=dict)
    resumed_from: int = 0


def _batch_indices(n: int, batch: int, seed: int, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))
    return torch.randint(n, (batch,), generator=gen)


def _state_dir(out_dir: Path, run_name: str) -> Path:
    return out_dir / "finetune" / run_name / "state"


def _save_state(path: Path, model: Any, optimizer: torch.optim.Optimizer, step: int, losses: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_checkpoint(model, tmp / "model")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "progress.json").write_text(json.dumps({"step": step, "losses": losses}))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def _load_state(path: Path, model: Any, optimizer: torch.optim.Optimizer) -> tuple[int, dict[int, float]]:
    saved = load_revlens_checkpoint(path / "model")
    model.load_state_dict(saved.state_dict())
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    progress = json.loads((path / "progress.json").read_text())
    return int(progress["step"]), {int(k): v for k, v in progress["losses"].items()}


def make_optimizer(model: Any, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}.")


def finetune(
    model: Any,
    tokens: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    steps: int,
    lr: float,
    optimizer: str = "adamw",
    batch_size: int = 32,
    grad_accum: int = 1,
    weight_decay: float = 0.0,
    seed: int = 0,
    blocking: Blocking | None = None,
    anchor: ProbeAnchor | None = None,
    save_steps: Sequence[int] = (),
    out_dir: str | Path | None = None,
    run_name: str = "seed_0",
    device: str | None = None,
    monitor: ReversionMonitor | None = None,
    monitor_steps: Sequence[int] | None = None,
    resume: bool = True,
    progress: bool = True,
    on_step: Callable[[int, Any], None] | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` in place on ``tokens`` ``[n, seq]`` with ``loss_mask`` ``[n, seq]``.

    Each optimizer step averages ``grad_accum`` micro-batches of ``batch_size`` rows drawn with
    replacement by a generator seeded with (seed, step). With ``blocking``, clamp coordinates
    are precomputed once from its reference model for every row of ``tokens``; with ``anchor``,
    its penalty on the probe prompts is added to every step's loss (``losses`` record the task loss).
    """
    if tokens.ndim != 2 or tokens.shape != loss_mask.shape:
        raise ValueError(f"tokens and loss_mask must both be [n, seq]; got {tuple(tokens.shape)} and "
                         f"{tuple(loss_mask.shape)}.")
    if steps < 1 or batch_size < 1 or grad_accum < 1:
        raise ValueError("steps, batch_size and grad_accum must be >= 1.")
    bad = [s for s in save_steps if not 1 <= s <= steps]
    if bad:
        raise ValueError(f"save_steps {bad} fall outside 1..{steps}.")
    if save_steps and out_dir is None:
        raise ValueError("save_steps needs an out_dir to write checkpoints to.")
    move_quietly(model, device)
    dev = next(model.parameters()).device
    opt = make_optimizer(model, optimizer, lr, weight_decay)
    result = FinetuneResult()
    start = 0
    out = None if out_dir is None else Path(out_dir)
    if out is not None and resume and _state_dir(out, run_name).is_dir():
        start, result.losses = _load_state(_state_dir(out, run_name), model, opt)
        result.resumed_from = start
    coords = None
    if blocking is not None and blocking.needs_coords:
        coords = blocking.reference_coords(tokens)
    n = tokens.shape[0]
    save_set = set(save_steps)
    watch = set(save_steps if monitor_steps is None else monitor_steps)
    model.train()
    bar = tqdm(range(start + 1, steps + 1), desc=f"finetune {run_name}", disable=not progress, leave=False)
    for step in bar:
        opt.zero_grad(set_to_none=True)
        idx = _batch_indices(n, batch_size * grad_accum, seed, step)
        total = 0.0
        for micro in idx.split(batch_size):
            x, m = tokens[micro].to(dev), loss_mask[micro].to(dev)
            if blocking is None:
                loss = masked_lm_loss(model(x), x, m)
            else:
                blocking.set_batch(coords=None if coords is None else {l: c[micro] for l, c in coords.items()})
                with blocking.applied(model):
                    loss = masked_lm_loss(model(x), x, m)
            (loss / grad_accum).backward()
            total += loss.item() / grad_accum
        if anchor is not None:
            anchor.penalty(model, step).backward()
        opt.step()
        result.losses[step] = total
        bar.set_postfix(loss=f"{total:.4f}")
        if on_step is not None:
            on_step(step, model)
        if monitor is not None and step in watch:
            result.monitor[step] = monitor.update(model, step).tolist()
            model.train()
        if step in save_set and out is not None:
            result.checkpoints[step] = save_checkpoint(model, out / "finetune" / run_name / f"step_{step}")
            _save_state(_state_dir(out, run_name), model, opt, step, result.losses)
    for step in save_steps:
        if out is not None:
            result.checkpoints.setdefault(step, out / "finetune" / run_name / f"step_{step}")
    if not math.isfinite(result.losses.get(steps, 0.0)):
        warnings.warn("fine-tuning loss is not finite at the last step; lower the learning rate.", RuntimeWarning)
    model.eval()
    return result


def add_cli(sub: Any) -> None:
    """`revlens finetune`: fine-tune the organism's aligned model with a blocking mode."""
    p = sub.add_parser("finetune", help="fine-tune an organism history's aligned model, optionally blocking v_rev",
                       description="Fine-tune HISTORY_DIR/align on the organism's benign task, writing "
                                   "finetune/<run>/step_<N>/ under --out (resumes when interrupted).")
    p.add_argument("history_dir", help="a history written by `revlens demo` (pretrain/, align/, organism.json)")
    p.add_argument("--out", required=True)
    p.add_argument("--mode", default="plain", help="plain, project, clamp, grad, anchor@W, contrast@W, sample@K, rank@K, "
                   "random@K[@DRAW], joined by '+' (clamp+grad, anchor@0.003+contrast@0.1+rank@64)")
    p.add_argument("--layers", default=None, help="comma-separated layers to block (default: all layers)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--device", default=None)
    p.set_defaults(func=_run_cli)


def _run_cli(args: Any) -> int:
    from revlens.organism.train import finetune_from_history

    layers = None if args.layers is None else [int(x) for x in args.layers.split(",")]
    metrics = finetune_from_history(Path(args.history_dir), Path(args.out), mode=args.mode, layers=layers,
                                    seed=args.seed, steps=args.steps, device=args.device)
    print(json.dumps(metrics, indent=1))
    return 0
