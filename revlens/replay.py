"""Safety-data replay: a fixed number of rows of every fine-tuning batch drawn from replay data.

The baseline the field uses against fine-tuning erosion: keep training on some of the later phase's own
examples (for refusal training, its refusal rows) while fine-tuning on the new task. Each micro-batch of
``batch_size`` rows holds ``batch_size - rows`` task rows and ``rows`` replay rows; both are drawn with
replacement from generators seeded with (seed, step), so a resumed run draws the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Int

from revlens.blocking_spec import InterventionError

__all__ = ["ReplayMix"]


@dataclass
class ReplayMix:
    """Replay rows (tokens and loss mask, as the task data) and how many of them go into every micro-batch.

    Args:
        tokens: replay rows ``[n_replay, seq]`` (right-padded token ids).
        loss_mask: ``[n_replay, seq]``, 1 on the tokens the loss reads (the responses).
        rows: replay rows in every micro-batch (>= 1, below the batch size).

    Example:
        >>> import torch
        >>> mix = ReplayMix(torch.ones(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.long), rows=2)
        >>> idx = mix.step_indices(n_task=10, batch_size=8, grad_accum=1, seed=0, step=1)
        >>> int((idx >= 10).sum())
        2
    """

    tokens: torch.Tensor
    loss_mask: torch.Tensor
    rows: int

    def __post_init__(self) -> None:
        if self.tokens.ndim != 2 or self.tokens.shape != self.loss_mask.shape:
            raise InterventionError(
                f"replay tokens and loss_mask must both be [n, seq]; got {tuple(self.tokens.shape)} and "
                f"{tuple(self.loss_mask.shape)}."
            )
        if self.tokens.shape[0] < 1:
            raise InterventionError("replay data has no rows; give at least one example to replay.")
        if isinstance(self.rows, bool) or not isinstance(self.rows, int) or self.rows < 1:
            raise InterventionError(f"replay rows per batch must be a positive integer, got {self.rows!r}.")
        if not bool((self.loss_mask.sum(1) > 0).all()):
            raise InterventionError("a replay row has an empty loss mask (no response tokens); drop it.")

    def combined(
        self, tokens: Int[torch.Tensor, "n seq"], loss_mask: Int[torch.Tensor, "n seq"]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The task rows followed by the replay rows, right-padded to one width (padding is masked out)."""
        width = max(tokens.shape[1], self.tokens.shape[1])

        def pad(t: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=0)

        return (
            torch.cat([pad(tokens), pad(self.tokens.to(tokens.dtype))]),
            torch.cat([pad(loss_mask), pad(self.loss_mask.to(loss_mask.dtype))]),
        )

    def step_indices(self, n_task: int, batch_size: int, grad_accum: int, seed: int, step: int) -> torch.Tensor:
        """Rows of :meth:`combined` for one optimizer step: ``grad_accum`` micro-batches of ``batch_size``, each
        ``batch_size - rows`` task rows (indices below ``n_task``) then ``rows`` replay rows."""
        if self.rows >= batch_size:
            raise InterventionError(
                f"replay@{self.rows} leaves no task rows in a batch of {batch_size}; use fewer replay rows or a "
                "larger batch."
            )
        task_rows = batch_size - self.rows
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))
        task = torch.randint(n_task, (task_rows * grad_accum,), generator=gen)
        gen_r = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step) + 500_000_001)
        replay = n_task + torch.randint(self.tokens.shape[0], (self.rows * grad_accum,), generator=gen_r)
        parts = []
        for i in range(grad_accum):
            parts += [task[i * task_rows : (i + 1) * task_rows], replay[i * self.rows : (i + 1) * self.rows]]
        return torch.cat(parts)

    def description(self) -> dict:
        """What decides the replay (recorded with a fine-tuning run's settings)."""
        from revlens._util import tensor_digest

        return {"rows": self.rows, "data": tensor_digest(self.tokens.long(), self.loss_mask.float())}
