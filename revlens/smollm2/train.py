"""Training loops of the SmolLM2 demo on the Hugging Face module: refusal training (the align phase)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from revlens.losses import masked_lm_loss
from revlens.smollm2.behaviour import hf_module


def _logits(module: Any, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
    out = module(input_ids=x, attention_mask=pad_mask)
    return out.logits if hasattr(out, "logits") else out


def train_steps(
    model: Any,
    tokens: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    steps: int,
    lr: float = 5e-5,
    batch_size: int = 8,
    seed: int = 0,
    stop: Callable[[int], bool] | None = None,
    check_every: int = 10,
    progress: bool = True,
) -> dict[str, Any]:
    """AdamW on the masked LM loss, batches drawn with replacement by a generator seeded by (seed, step).

    ``stop(step)`` is called every ``check_every`` steps (and after the last) and ends training when it
    returns True. Returns ``{"steps": steps done, "losses": {step: loss}, "seconds": training time}``.
    """
    module = hf_module(model)
    dev = next(module.parameters()).device
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.0)
    losses: dict[int, float] = {}
    spent, done = 0.0, 0
    for step in tqdm(range(1, steps + 1), desc="align", disable=not progress, leave=False):
        t0 = time.perf_counter()
        module.train()
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(tokens.shape[0], (batch_size,), generator=gen)
        x, m = tokens[idx], loss_mask[idx]
        keep = int((m * torch.arange(1, m.shape[1] + 1)).max())  # right padding past the longest answer
        x, m = x[:, :keep].to(dev), m[:, :keep].to(dev)
        loss = masked_lm_loss(_logits(module, x, torch.ones_like(x)), x, m)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        module.eval()
        losses[step] = loss.item()
        spent += time.perf_counter() - t0
        done = step
        if stop is not None and (step % check_every == 0 or step == steps) and stop(step):
            break
    return {"steps": done, "losses": losses, "seconds": spent}
