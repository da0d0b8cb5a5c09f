"""Training loop of the chat-model pipeline on the Hugging Face module: refusal training (the align phase)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from revlens import make_optimizer, model_lm_loss, takes_logits_to_keep
from revlens.demos.chat_model.behaviour import hf_module


def draw_batch(groups: Sequence[tuple[int, int]], gen: torch.Generator) -> torch.Tensor:
    """Row indices of one batch from consecutive row groups given as ``(rows, draws)``: ``draws`` rows drawn
    with replacement from each group's ``rows``, so every batch holds refusals and answers in a fixed ratio."""
    start, parts = 0, []
    for rows, draws in groups:
        if rows < 1 or draws < 0:
            raise ValueError(f"group (rows={rows}, draws={draws}): rows must be >= 1 and draws >= 0.")
        parts.append(start + torch.randint(rows, (draws,), generator=gen))
        start += rows
    return torch.cat(parts)


def train_steps(
    model: Any,
    tokens: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    steps: int,
    lr: float = 5e-5,
    batch_size: int = 8,
    seed: int = 0,
    groups: Sequence[tuple[int, int]] | None = None,
    decay: bool = False,
    autocast_dtype: torch.dtype | None = None,
    stop: Callable[[int], bool] | None = None,
    check_every: int = 10,
    check_from: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """AdamW on the masked LM loss, batches drawn with replacement by a generator seeded by (seed, step).

    ``groups`` (``(rows, draws)`` for consecutive blocks of ``tokens``, draws summing to ``batch_size``)
    fixes how many rows of each block every batch holds;
    ``decay`` lowers the learning rate linearly from ``lr`` towards 0 at ``steps``; ``autocast_dtype``
    (e.g. ``torch.bfloat16``) runs the forward under ``torch.autocast`` with float32 master weights.
    ``stop(step)`` is called every ``check_every`` steps from ``check_from`` on (and after the last) and ends
    training when it returns True. Returns ``{"steps": steps done, "losses": {step: loss}, "seconds":
    training time}``.
    """
    if groups is not None and (sum(r for r, _ in groups) != tokens.shape[0] or sum(d for _, d in groups) != batch_size):
        raise ValueError(
            f"groups {list(groups)} must cover the {tokens.shape[0]} rows and draw batch_size={batch_size} rows."
        )
    module = hf_module(model)
    dev = next(module.parameters()).device
    opt = make_optimizer(module.parameters(), "adamw", lr, 0.0)
    keep_logits = takes_logits_to_keep(module)
    losses: dict[int, float] = {}
    spent, done = 0.0, 0
    for step in tqdm(range(1, steps + 1), desc="align", disable=not progress, leave=False):
        t0 = time.perf_counter()
        module.train()
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        if groups is None:
            idx = torch.randint(tokens.shape[0], (batch_size,), generator=gen)
        else:
            idx = draw_batch(groups, gen)
        x, m = tokens[idx], loss_mask[idx]
        keep = int((m * torch.arange(1, m.shape[1] + 1)).max())  # right padding past the longest answer
        x, m = x[:, :keep].to(dev), m[:, :keep].to(dev)
        for group in opt.param_groups:
            group["lr"] = lr * (1.0 - (step - 1) / steps) if decay else lr
        amp = torch.autocast(dev.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with amp:
            loss = model_lm_loss(module, x, m, keep_logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        module.eval()
        losses[step] = loss.item()
        spent += time.perf_counter() - t0
        done = step
        due = step == steps or (step >= check_from and step % check_every == 0)
        if stop is not None and due and stop(step):
            break
    return {"steps": done, "losses": losses, "seconds": spent}
