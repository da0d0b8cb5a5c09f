"""Loss terms on the probe prompts beyond the v_rev anchor: KL to the aligned model, and a sum of terms.

:class:`KLAnchor` keeps the fine-tuned model's next-token distribution at the end of each probe prompt (where
the answer starts, in the chat template) close to the frozen aligned model's: weight * mean over prompts of
KL(p_align || p_model). It is the distribution-level baseline for the v_rev anchor: it holds what the model
would say, not where its readouts sit. :class:`PenaltySum` adds several terms (an anchor and a KL penalty) so
that :func:`revlens.finetune` and ``BlockedTrainer`` take them as one ``anchor``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from revlens._util import tensor_digest, training_mode
from revlens.blocking_spec import InterventionError
from revlens.readout import TokenizedSet

__all__ = ["KLAnchor", "PenaltySum", "last_token_log_probs"]


def _logits(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    out = model(tokens)
    return out.logits if hasattr(out, "logits") else out


def last_token_log_probs(model: Any, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the next token after each row's last real token, float32 ``[batch, vocab]``.

    Rows are right-padded (``lengths`` real tokens each); under causal attention the padding after a row's
    last token does not change what is read there.
    """
    device = next(model.parameters()).device
    logits = _logits(model, tokens.to(device))
    last = logits[torch.arange(tokens.shape[0], device=device), lengths.to(device) - 1]
    return torch.log_softmax(last.float(), dim=-1)


class KLAnchor:
    """weight * mean over probe prompts x of KL(p_ref(. | x) || p_model(. | x)) at the prompt's last token.

    The reference distributions are computed once, here, from the frozen aligned model. With ``sample=k`` each
    step uses k prompts, drawn afresh per step from (seed, step), so a resumed run draws the same ones.

    Args:
        prompts: the probe prompts as 1-D token tensors (chat-templated, as the probe reads them).
        reference: the frozen aligned model (a TransformerBridge or a Hugging Face causal LM).
        weight: the penalty's weight (> 0).
        sample: prompts per step (None: all).
        seed: seeds the per-step sample.
        batch_size: prompts per forward pass when the reference distributions are computed.

    Example:
        >>> import torch
        >>> class Toy(torch.nn.Module):
        ...     def __init__(self, shift):
        ...         super().__init__()
        ...         self.emb = torch.nn.Embedding(5, 5)
        ...         torch.nn.init.eye_(self.emb.weight)
        ...         self.emb.weight.data[:, 0] += shift
        ...     def forward(self, x):
        ...         return self.emb(x)
        >>> kl = KLAnchor([torch.tensor([1, 2]), torch.tensor([3])], Toy(0.0), weight=1.0)
        >>> kl.penalty(Toy(0.0)).item()
        0.0
        >>> kl.penalty(Toy(1.0)).item() > 0
        True
    """

    def __init__(
        self,
        prompts: Sequence[torch.Tensor],
        reference: Any,
        weight: float,
        *,
        sample: int | None = None,
        seed: int = 0,
        batch_size: int = 8,
    ):
        if not weight > 0:
            raise InterventionError(f"the KL penalty's weight must be > 0, got {weight}.")
        if not prompts:
            raise InterventionError("the KL penalty needs at least one probe prompt.")
        if reference is None:
            raise InterventionError("the KL penalty needs the frozen reference model (the aligned checkpoint).")
        if sample is not None and sample < 1:
            raise InterventionError(f"sample must be a positive number of prompts per step, got {sample}.")
        self.weight, self.sample, self.seed, self._calls = float(weight), sample, int(seed), 0
        self.tokens, self.lengths = TokenizedSet(list(prompts)).padded(pad_id=0)
        n = self.tokens.shape[0]
        with torch.no_grad(), training_mode(reference, False):
            parts = [
                last_token_log_probs(reference, *self._rows(torch.arange(i, min(i + batch_size, n)))).cpu()
                for i in range(0, n, batch_size)
            ]
        self.reference_log_probs = torch.cat(parts)

    def _rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = self.lengths[rows]
        return self.tokens[rows][:, : int(lengths.max())], lengths

    def rows(self, step: int | None) -> torch.Tensor:
        """The prompts this step uses: all, or ``sample`` of them drawn from (seed, step)."""
        n = self.tokens.shape[0]
        if self.sample is None or self.sample >= n or step is None:
            return torch.arange(n)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 2 * int(step) + 5)
        return torch.randperm(n, generator=gen)[: self.sample]

    def penalty(self, model: Any, step: int | None = None) -> torch.Tensor:
        """The differentiable penalty for the model's current weights (``step`` picks the sample)."""
        if step is None and self.sample is not None:
            self._calls += 1
            step = self._calls
        rows = self.rows(step)
        log_q = last_token_log_probs(model, *self._rows(rows))
        log_p = self.reference_log_probs[rows].to(log_q.device)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
        return self.weight * kl

    def description(self) -> dict[str, Any]:
        """What decides the penalty (recorded with a fine-tuning run's settings, so a resume refuses another)."""
        return {
            "kind": "kl",
            "weight": self.weight,
            "sample": self.sample,
            "seed": self.seed,
            "prompts_reference": tensor_digest(self.tokens, self.lengths, self.reference_log_probs),
        }


class PenaltySum:
    """Several penalties (a :class:`~revlens.anchor.ProbeAnchor`, a :class:`KLAnchor`) added as one.

    Example:
        >>> import torch
        >>> class Const:
        ...     def __init__(self, v):
        ...         self.v = v
        ...     def penalty(self, model, step=None):
        ...         return torch.tensor(self.v)
        >>> float(PenaltySum([Const(1.0), Const(2.5)]).penalty(None, 3))
        3.5
    """

    def __init__(self, terms: Sequence[Any]):
        self.terms = [t for t in terms if t is not None]
        if not self.terms:
            raise InterventionError("a sum of penalties needs at least one term.")

    def penalty(self, model: Any, step: int | None = None) -> torch.Tensor:
        """The sum of every term's penalty."""
        return torch.stack([t.penalty(model, step) for t in self.terms]).sum()

    def description(self) -> dict[str, Any]:
        """Each term's description, in order."""
        return {"kind": "sum", "terms": [describe_penalty(t) for t in self.terms]}


def describe_penalty(term: Any) -> dict[str, Any] | None:
    """A penalty's description (its ``description()``), or None for no penalty."""
    if term is None:
        return None
    if not hasattr(term, "description"):
        raise InterventionError(
            f"{type(term).__name__} has no description(): a penalty passed as anchor= must describe what decides "
            "it, so that a resumed run can refuse other settings."
        )
    return term.description()
