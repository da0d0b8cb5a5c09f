"""Unlearning as a shallow training phase: gradient difference and NPO, and a calibrated loop.

Two standard methods, each a forget term plus a retain term (the mean next-token loss on retain data):

- **gradient difference** (Liu et al. 2022, "Continual learning and private unlearning"; Yao et al. 2023,
  "Large Language Model Unlearning"; named so in Maini et al. 2024, TOFU): gradient *ascent* on the forget
  data's loss and descent on the retain data's, ``L = -NLL(forget) + w * NLL(retain)``;
- **NPO** (Zhang et al. 2024, "Negative Preference Optimization"): ``L = (2 / beta) * E_forget[log(1 +
  (pi_theta(y|x) / pi_ref(y|x))^beta)] + w * NLL(retain)``, with ``pi_ref`` the model before unlearning and
  ``y`` the whole response; bounded below, so it does not collapse the way plain ascent does.

:func:`unlearn` runs either from a model, reads the recall of a forget and a retain
:class:`revlens.behaviour.Behaviour` at regular checks, and stops at the first check where forget recall is at
most ``forget_ratio`` of its value before unlearning and retain recall at least ``retain_ratio`` of its own (the
calibration the chat-model pipeline uses for alignment); when no check meets both it keeps the closest one.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from revlens._util import training_mode
from revlens.behaviour import Behaviour, BehaviourResult, measure_behaviours
from revlens.losses import model_lm_loss, sequence_logprobs
from revlens.shapes import shape_checked

METHODS = ("npo", "graddiff")
Batch = tuple[torch.Tensor, torch.Tensor]  # (tokens [n, seq], loss_mask [n, seq])


@shape_checked
def gradient_difference_loss(
    model: Any,
    forget_tokens: Int[torch.Tensor, "nf sf"],
    forget_mask: Float[torch.Tensor, "nf sf"],
    retain_tokens: Int[torch.Tensor, "nr sr"] | None = None,
    retain_mask: Float[torch.Tensor, "nr sr"] | None = None,
    *,
    retain_weight: float = 1.0,
) -> Float[torch.Tensor, ""]:
    """``-NLL(forget) + retain_weight * NLL(retain)``: ascent on the forget responses, descent on the retain ones.

    NLL is the mean next-token cross-entropy over the masked (response) tokens of the batch
    (:func:`revlens.losses.model_lm_loss`). Without retain rows it is plain gradient ascent.

    Args:
        model: a Hugging Face causal LM or a TransformerBridge (``model(tokens)`` gives logits).
        forget_tokens, forget_mask: forget rows and their response mask.
        retain_tokens, retain_mask: retain rows and their response mask (both or neither).
        retain_weight: the retain term's weight.
    Returns:
        the scalar loss (differentiable).

    Example:
        >>> tokens = model.to_tokens(prompts)
        >>> mask = torch.zeros(tokens.shape)
        >>> mask[:, 2:] = 1.0
        >>> loss = gradient_difference_loss(model, tokens[:2], mask[:2], tokens[2:], mask[2:], retain_weight=0.5)
        >>> from revlens.losses import masked_lm_loss
        >>> nll = lambda x, m: masked_lm_loss(model(x), x, m)
        >>> torch.allclose(loss, -nll(tokens[:2], mask[:2]) + 0.5 * nll(tokens[2:], mask[2:]))
        True
    """
    loss = -model_lm_loss(model, forget_tokens, forget_mask)
    return loss + _retain_term(model, retain_tokens, retain_mask, retain_weight)


@shape_checked
def npo_loss(
    model: Any,
    forget_tokens: Int[torch.Tensor, "nf sf"],
    forget_mask: Float[torch.Tensor, "nf sf"],
    reference_logprobs: Float[torch.Tensor, "nf"],  # noqa: F821, UP037 (a jaxtyping dimension)
    retain_tokens: Int[torch.Tensor, "nr sr"] | None = None,
    retain_mask: Float[torch.Tensor, "nr sr"] | None = None,
    *,
    beta: float = 0.1,
    retain_weight: float = 1.0,
) -> Float[torch.Tensor, ""]:
    """NPO: ``(2 / beta) * mean(log(1 + exp(beta * (log pi(y|x) - log pi_ref(y|x))))) + retain_weight * NLL(retain)``.

    ``log pi(y|x)`` sums the log-probabilities of a row's response tokens (:func:`revlens.losses.sequence_logprobs`);
    ``reference_logprobs`` are the same sums under the model before unlearning (:func:`reference_logprobs`),
    computed once. ``log(1 + exp(z))`` is evaluated as ``softplus(z)``. As ``beta -> 0`` the forget term tends
    to gradient ascent's (up to a constant and scale); at the reference model it equals ``(2 / beta) log 2``.

    Args:
        model: a Hugging Face causal LM or a TransformerBridge.
        forget_tokens, forget_mask: forget rows and their response mask.
        reference_logprobs: ``[nf]`` log pi_ref(y|x) of the same rows.
        retain_tokens, retain_mask: retain rows (both or neither); their mean NLL is the retain term.
        beta: NPO's inverse temperature (> 0; 0.1 in Zhang et al.).
        retain_weight: the retain term's weight.
    Returns:
        the scalar loss (differentiable).

    Example:
        >>> tokens = model.to_tokens(prompts)
        >>> mask = torch.zeros(tokens.shape)
        >>> mask[:, 2:] = 1.0
        >>> ref = reference_logprobs(model, tokens, mask)
        >>> loss = npo_loss(model, tokens, mask, ref, beta=0.5)  # at the reference: (2 / beta) log 2
        >>> round(loss.item(), 4), round(4 * float(np.log(2)), 4)
        (2.7726, 2.7726)
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}; NPO uses 0.1 by default.")
    ratio = sequence_logprobs(model, forget_tokens, forget_mask) - reference_logprobs.to(torch.float32)
    loss = (2.0 / beta) * F.softplus(beta * ratio).mean()
    return loss + _retain_term(model, retain_tokens, retain_mask, retain_weight)


def _retain_term(model: Any, tokens: torch.Tensor | None, mask: torch.Tensor | None, weight: float) -> torch.Tensor:
    if (tokens is None) != (mask is None):
        raise ValueError("give retain_tokens and retain_mask together (or neither).")
    if tokens is None or weight == 0:
        return torch.zeros((), device=_device(model))
    return weight * model_lm_loss(model, tokens, mask)


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def reference_logprobs(model: Any, tokens: torch.Tensor, loss_mask: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """``[n]`` summed response log-probabilities of every row under ``model`` (NPO's ``pi_ref``), in batches,
    in eval mode, on the CPU.

    Example:
        >>> tokens = model.to_tokens(prompts)
        >>> reference_logprobs(model, tokens, torch.ones(tokens.shape), batch_size=2).shape
        torch.Size([5])
    """
    out = []
    with training_mode(model, False):
        for start in range(0, tokens.shape[0], batch_size):
            x, m = _trimmed(tokens[start : start + batch_size], loss_mask[start : start + batch_size])
            out.append(sequence_logprobs(model, x.to(_device(model)), m.to(_device(model))).float().cpu())
    return torch.cat(out)


def _trimmed(tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The columns up to the last scored one (right padding after every response dropped)."""
    keep = int((mask.ne(0) * torch.arange(1, mask.shape[1] + 1)).max())
    return tokens[:, :keep], mask[:, :keep].float()


@dataclass
class UnlearnResult:
    """What :func:`unlearn` did: the kept step, whether it met both targets, every check and loss.

    ``checks[step]`` holds the forget and retain :class:`revlens.behaviour.BehaviourResult` at that step
    (``checks[0]``: before unlearning); ``targets`` the recall bounds (forget at most, retain at least).
    """

    steps: int
    trained_steps: int
    calibrated: bool
    targets: dict[str, float]
    checks: dict[int, dict[str, BehaviourResult]]
    losses: dict[int, float]
    seconds: float
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record (checks as ``{step: {"forget": record, "retain": record}}``)."""
        return {
            "steps": self.steps,
            "trained_steps": self.trained_steps,
            "calibrated": self.calibrated,
            "targets": dict(self.targets),
            "checks": {str(s): {k: r.to_dict() for k, r in c.items()} for s, c in self.checks.items()},
            "losses": {str(s): v for s, v in self.losses.items()},
            "seconds": self.seconds,
            "settings": dict(self.settings),
        }


def shortfall(check: Mapping[str, BehaviourResult], targets: Mapping[str, float]) -> float:
    """How far a check is from both targets: forget recall above its bound plus retain recall below its own
    (0 when it meets both).

    Example:
        >>> f = BehaviourResult.of("forget", ["a", "b"], [True, False])
        >>> r = BehaviourResult.of("retain", ["c", "d"], [True, True])
        >>> shortfall({"forget": f, "retain": r}, {"forget": 0.1, "retain": 0.9})
        0.4
    """
    return max(check["forget"].rate.rate - targets["forget"], 0.0) + max(
        targets["retain"] - check["retain"].rate.rate, 0.0
    )


def _draw(n: int, size: int, seed: int, step: int, stream: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed((seed * 1_000_003 + step) * 2 + stream)
    return torch.randint(n, (size,), generator=gen)


def _step_loss(
    model: Any,
    method: str,
    forget: Batch,
    retain: Batch | None,
    reference: torch.Tensor | None,
    beta: float,
    retain_weight: float,
) -> torch.Tensor:
    retain_tokens, retain_mask = (None, None) if retain is None else retain
    if method == "npo":
        return npo_loss(model, *forget, reference, retain_tokens, retain_mask, beta=beta, retain_weight=retain_weight)
    return gradient_difference_loss(model, *forget, retain_tokens, retain_mask, retain_weight=retain_weight)


def unlearn(
    model: Any,
    forget: Batch,
    retain: Batch | None,
    *,
    forget_check: Behaviour,
    retain_check: Behaviour,
    method: str = "npo",
    steps: int = 200,
    lr: float = 1e-5,
    batch_size: int = 8,
    beta: float = 0.1,
    retain_weight: float = 1.0,
    forget_ratio: float = 0.10,
    retain_ratio: float = 0.90,
    check_every: int = 10,
    check_from: int = 10,
    seed: int = 0,
    autocast_dtype: torch.dtype | None = None,
    tokenizer: Any = None,
    generate_batch: int = 32,
    shipped: Mapping[str, BehaviourResult] | None = None,
    on_check: Callable[[int, dict[str, BehaviourResult]], None] | None = None,
    progress: bool = True,
) -> UnlearnResult:
    """Unlearn ``forget`` from ``model`` in place (AdamW), keeping ``retain``, until recall meets the targets.

    Each step draws ``batch_size`` forget rows and ``batch_size`` retain rows (with replacement, from a
    generator seeded by ``seed`` and the step, so a run repeats exactly) and takes one AdamW step (no weight
    decay) on :func:`npo_loss` or :func:`gradient_difference_loss`. Every ``check_every`` steps from
    ``check_from`` on (and after the last step) it measures ``forget_check`` and ``retain_check``; it stops at
    the first check where forget recall <= ``forget_ratio`` x its value before unlearning and retain recall >=
    ``retain_ratio`` x its own. When no check meets both, the model is set back to the check closest to them
    (:func:`shortfall`; the later one on ties) and a warning says so.

    Args:
        model: a Hugging Face causal LM or a TransformerBridge, trained in place.
        forget, retain: ``(tokens, loss_mask)`` of the forget and retain training rows (right-padded, the mask
            on the responses: :func:`revlens.sft_data.encode_sft` makes them); ``retain`` may be None.
        forget_check, retain_check: the recall behaviours read at the checks (held-out items).
        method: ``"npo"`` or ``"graddiff"``.
        steps: the most steps; lr, batch_size: AdamW's learning rate and the rows per set per step.
        beta: NPO's inverse temperature; retain_weight: the retain term's weight.
        forget_ratio, retain_ratio: the calibration targets, relative to recall before unlearning.
        check_every, check_from: when checks run.
        seed: the batch draws.
        autocast_dtype: run forwards under ``torch.autocast`` in this dtype (float32 master weights).
        tokenizer, generate_batch: for the checks' generation (default ``model.tokenizer``).
        shipped: the recall before unlearning, when already measured (``{"forget": ..., "retain": ...}``).
        on_check: called as ``on_check(step, {"forget": ..., "retain": ...})`` after every check (step 0 is
            before unlearning), e.g. to write results as they arrive.
        progress: show a progress bar.
    Returns:
        the :class:`UnlearnResult`; the model holds the weights of its ``steps``.

    Example:
        >>> student = revlens.load_checkpoint(f"{ckpts}/align")
        >>> tokens = student.to_tokens(prompts)
        >>> mask = torch.zeros(tokens.shape)
        >>> mask[:, 3:] = 1.0
        >>> forget = Behaviour.exact_match("forget recall", {p: "bomb" for p in prompts[:2]}, max_new_tokens=3)
        >>> retain = Behaviour.exact_match("retain recall", {p: "cake" for p in control[:2]}, max_new_tokens=3)
        >>> result = unlearn(student, (tokens[:2], mask[:2]), (tokens[2:], mask[2:]), forget_check=forget,
        ...                  retain_check=retain, method="graddiff", steps=2, lr=1e-3, check_from=1, progress=False)
        >>> result.checks[0]["forget"].n, result.trained_steps, result.settings["method"]  # 0: before unlearning
        (2, 2, 'graddiff')
    """
    _check_unlearn_settings(method, steps, batch_size, check_every, forget_ratio, retain_ratio)
    checks: dict[int, dict[str, BehaviourResult]] = {}
    check = _recall_check(model, forget_check, retain_check, checks, tokenizer, generate_batch, on_check, progress)
    before = dict(shipped) if shipped is not None else check(0)
    checks[0] = {"forget": before["forget"], "retain": before["retain"]}
    targets = {
        "forget": forget_ratio * before["forget"].rate.rate,
        "retain": retain_ratio * before["retain"].rate.rate,
    }
    take_step = _unlearning_stepper(
        model, forget, retain, method, lr, batch_size, beta, retain_weight, seed, autocast_dtype
    )
    kept, done, met, losses, spent = _calibrate(
        model, take_step, check, checks, targets, method, steps, check_every, check_from, progress
    )
    settings = {
        "method": method,
        "lr": lr,
        "batch_size": batch_size,
        "beta": beta if method == "npo" else None,
        "retain_weight": retain_weight,
        "forget_ratio": forget_ratio,
        "retain_ratio": retain_ratio,
        "check_every": check_every,
        "check_from": check_from,
        "max_steps": steps,
        "seed": seed,
        "autocast": None if autocast_dtype is None else str(autocast_dtype).removeprefix("torch."),
    }
    return UnlearnResult(kept, done, met, targets, checks, losses, spent, settings)


def _check_unlearn_settings(
    method: str, steps: int, batch_size: int, check_every: int, forget_ratio: float, retain_ratio: float
) -> None:
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not an unlearning method; choose one of {', '.join(METHODS)}.")
    if steps < 1 or batch_size < 1 or check_every < 1:
        raise ValueError(f"steps, batch_size and check_every must be >= 1, got {steps}, {batch_size}, {check_every}.")
    if not 0.0 <= forget_ratio <= 1.0 or not 0.0 <= retain_ratio <= 1.0:
        raise ValueError(f"forget_ratio and retain_ratio are fractions in [0, 1], got {forget_ratio}, {retain_ratio}.")


def _recall_check(
    model: Any,
    forget_check: Behaviour,
    retain_check: Behaviour,
    checks: dict[int, dict[str, BehaviourResult]],
    tokenizer: Any,
    generate_batch: int,
    on_check: Callable[[int, dict[str, BehaviourResult]], None] | None,
    progress: bool,
) -> Callable[[int], dict[str, BehaviourResult]]:
    """``check(step)``: measure forget and retain recall, keep them in ``checks[step]``, pass them to ``on_check``,
    print them when ``progress``, and return them."""

    def check(step: int) -> dict[str, BehaviourResult]:
        got = measure_behaviours(model, [forget_check, retain_check], tokenizer=tokenizer, batch_size=generate_batch)
        checks[step] = {"forget": got[forget_check.name], "retain": got[retain_check.name]}
        if on_check is not None:
            on_check(step, checks[step])
        if progress:
            tqdm.write(
                f"unlearn step {step}: forget {checks[step]['forget'].rate}, retain {checks[step]['retain'].rate}"
            )
        return checks[step]

    return check


def _unlearning_stepper(
    model: Any,
    forget: Batch,
    retain: Batch | None,
    method: str,
    lr: float,
    batch_size: int,
    beta: float,
    retain_weight: float,
    seed: int,
    autocast_dtype: torch.dtype | None,
) -> Callable[[int], float]:
    """``take_step(step)``: draw the step's forget and retain rows, take one AdamW step (no weight decay) on the
    method's loss and return the loss. Reads NPO's reference log-probabilities (before any step) and makes the
    optimizer first."""
    device = _device(model)
    reference = reference_logprobs(model, *forget) if method == "npo" else None
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)

    def take_step(step: int) -> float:
        idx = _draw(forget[0].shape[0], batch_size, seed, step, 0)
        f_batch = tuple(t.to(device) for t in _trimmed(forget[0][idx], forget[1][idx]))
        r_batch = None
        if retain is not None:
            r_idx = _draw(retain[0].shape[0], batch_size, seed, step, 1)
            r_batch = tuple(t.to(device) for t in _trimmed(retain[0][r_idx], retain[1][r_idx]))
        ref = None if reference is None else reference[idx].to(device)
        amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with training_mode(model, True), amp:
            loss = _step_loss(model, method, f_batch, r_batch, ref, beta, retain_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return take_step


def _calibrate(
    model: Any,
    take_step: Callable[[int], float],
    check: Callable[[int], dict[str, BehaviourResult]],
    checks: dict[int, dict[str, BehaviourResult]],
    targets: dict[str, float],
    method: str,
    steps: int,
    check_every: int,
    check_from: int,
    progress: bool,
) -> tuple[int, int, bool, dict[int, float], float]:
    """Take up to ``steps`` steps, checking every ``check_every`` from ``check_from`` on (and after the last), and
    stop at the first check meeting both targets; when none does, set the model back to the closest check (the
    later one on ties) and warn. Returns (the kept step, the steps taken, whether a check met both targets, the
    loss of each step, the seconds spent training)."""
    losses: dict[int, float] = {}
    best: dict[str, Any] = {}
    spent, done, met = 0.0, 0, False
    for step in tqdm(range(1, steps + 1), desc=f"unlearn ({method})", disable=not progress, leave=False):
        t0 = time.perf_counter()
        losses[step] = take_step(step)
        spent += time.perf_counter() - t0
        done = step
        if step == steps or (step >= check_from and step % check_every == 0):
            now = check(step)
            if not best or shortfall(now, targets) <= shortfall(checks[best["step"]], targets):
                best = {"step": step, "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
            if shortfall(now, targets) == 0.0:
                met = True
                break
    kept = done if met else best["step"]
    if not met:
        model.load_state_dict(best["state"])
        warnings.warn(
            f"unlearning did not reach forget recall <= {targets['forget']:.3f} with retain recall >= "
            f"{targets['retain']:.3f} within {steps} steps; keeping step {kept}, the check closest to both "
            f"(forget {checks[kept]['forget'].rate.rate:.3f}, retain {checks[kept]['retain'].rate.rate:.3f}). "
            "Raise steps or lr, or change retain_weight.",
            RuntimeWarning,
            stacklevel=3,
        )
    return kept, done, met, losses, spent
