"""Training losses shared by fine-tuning and evaluation (a leaf module: it imports nothing of revlens)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_lm_loss(logits: torch.Tensor, tokens: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose target ``tokens[:, i]`` has ``loss_mask`` set."""
    targets, mask = tokens[:, 1:], loss_mask[:, 1:].to(logits.dtype)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none")
    return (ce.view_as(mask) * mask).sum() / mask.sum().clamp_min(1)
