"""Training losses shared by fine-tuning and evaluation (a leaf module: it imports nothing of revlens)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F


def masked_lm_loss(logits: torch.Tensor, tokens: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose target ``tokens[:, i]`` has ``loss_mask`` set."""
    return _masked_cross_entropy(logits[:, :-1], tokens[:, 1:], loss_mask[:, 1:])


def _masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits [n, k, vocab]`` against ``targets [n, k]`` over positions where ``mask``."""
    mask = mask.to(logits.dtype)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none")
    return (ce.view_as(mask) * mask).sum() / mask.sum().clamp_min(1)


def _logits_of(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def takes_logits_to_keep(model: Any) -> bool:
    """Whether ``model(tokens, logits_to_keep=positions)`` computes logits at ``positions`` only: a Hugging Face
    causal LM, a TransformerBridge over one (its keyword arguments reach the HF module), or either with peft
    adapters. TransformerLens-native models compute every position."""
    hf = getattr(model, "original_model", model)
    base = hf.get_base_model() if hasattr(hf, "get_base_model") else hf
    forward = getattr(base, "forward", None)
    return forward is not None and "logits_to_keep" in inspect.signature(forward).parameters


def model_lm_loss(
    model: Any, tokens: torch.Tensor, loss_mask: torch.Tensor, keep_logits: bool | None = None
) -> torch.Tensor:
    """:func:`masked_lm_loss` of ``model`` on ``tokens``, with logits computed only where a target has loss.

    Fine-tuning data put the loss on the response, a fraction of each row, while the unembedding (a
    ``d_model x d_vocab`` matmul, forwards and backwards) and the cross-entropy dominate a small model's step;
    positions without a target in the loss cannot change it. ``keep_logits`` (default:
    :func:`takes_logits_to_keep`) chooses; without it every position's logits are computed, as before.

    Example:
        >>> tokens = model.to_tokens(prompts)
        >>> loss_mask = torch.zeros(tokens.shape)
        >>> loss_mask[:, 3:] = 1.0  # the loss on the tokens from the fourth on
        >>> loss = model_lm_loss(model, tokens, loss_mask)
        >>> torch.allclose(loss, masked_lm_loss(model(tokens), tokens, loss_mask))
        True
    """
    logits, targets, mask = _scored_logits(model, tokens, loss_mask, keep_logits)
    return _masked_cross_entropy(logits, targets, mask)


def sequence_logprobs(
    model: Any, tokens: torch.Tensor, loss_mask: torch.Tensor, keep_logits: bool | None = None
) -> torch.Tensor:
    """Per row, the summed log-probability ``log p(y | x)`` of the tokens whose ``loss_mask`` is set (the
    response of a chat row), under ``model``; differentiable. Logits are computed only where a target is
    scored, as in :func:`model_lm_loss`.

    Args:
        model: a Hugging Face causal LM or a TransformerBridge/HookedTransformer (``model(tokens)`` gives logits).
        tokens: ``[batch, seq]`` token ids; ``loss_mask``: ``[batch, seq]``, nonzero on the scored targets.
        keep_logits: compute logits at scored positions only (default: :func:`takes_logits_to_keep`).
    Returns:
        ``[batch]`` float32 log-probabilities (0 for a row with no scored token).

    Example:
        >>> tokens = model.to_tokens(prompts)
        >>> mask = torch.zeros(tokens.shape)
        >>> mask[:, -1] = 1.0  # score the last token of each row
        >>> logp = sequence_logprobs(model, tokens, mask)
        >>> expected = model(tokens)[:, -2].log_softmax(-1).gather(-1, tokens[:, -1:]).squeeze(-1)
        >>> logp.shape, torch.allclose(logp, expected, atol=1e-5)
        (torch.Size([5]), True)
    """
    logits, targets, mask = _scored_logits(model, tokens, loss_mask, keep_logits)
    logp = logits.float().log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (logp * mask.to(logp.dtype)).sum(-1)


def _scored_logits(
    model: Any, tokens: torch.Tensor, loss_mask: torch.Tensor, keep_logits: bool | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits, targets and mask at the positions whose next token is scored (all positions but the last, or
    only the scored columns when the model takes ``logits_to_keep``)."""
    if keep_logits is None:
        keep_logits = takes_logits_to_keep(model)
    if not keep_logits:
        return _logits_of(model(tokens))[:, :-1], tokens[:, 1:], loss_mask[:, 1:]
    columns = loss_mask[:, 1:].any(0).nonzero().squeeze(1)  # logits at column c predict token c + 1
    logits = _logits_of(model(tokens, logits_to_keep=columns))
    if logits.shape[1] != len(columns):
        raise ValueError(
            f"{type(model).__name__} returned logits at {logits.shape[1]} positions for {len(columns)} requested: "
            "it ignores logits_to_keep; call with keep_logits=False."
        )
    return logits, tokens[:, columns + 1], loss_mask[:, columns + 1]
