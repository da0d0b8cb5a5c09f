"""Greedy answers of saved models on worker processes: one :class:`revlens.JobPool` job per generation batch.

:func:`revlens.generate_greedy` sorts the requests by length and answers them ``batch_size`` at a time; a job here
answers one of those very batches, so the answers are those of the one call in this process (the same rows padded
together), only side by side. Greedy answers are many small operations: two one-thread processes give 1.75x the
answers per second of one two-thread process on 2 cores (``benchmarks/workers_throughput.py``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from revlens import JobPool, encode_requests
from revlens.demos.chat_model.behaviour import greedy_answers
from revlens.demos.chat_model.hf_io import load_hf

_LOADED: dict[str, tuple[Any, Any]] = {}


def answer_batch(folder: str, requests: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """A job: greedy answers of the model saved in ``folder`` to ``requests`` (the model is loaded once per
    process, and dropped when another folder arrives)."""
    if folder not in _LOADED:
        _LOADED.clear()
        _LOADED[folder] = load_hf(folder)
    model, tokenizer = _LOADED[folder]
    return greedy_answers(model, tokenizer, requests, max_new_tokens, batch_size)


def generation_batches(tokenizer: Any, requests: Sequence[str], batch_size: int) -> list[list[int]]:
    """The request indices of each batch :func:`revlens.generate_greedy` forms: by chat-templated length (ties in
    the given order), ``batch_size`` at a time."""
    lengths = [len(ids) for ids in encode_requests(tokenizer, list(requests), chat_template=True)]
    order = sorted(range(len(requests)), key=lambda i: lengths[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


class AnswerJobs:
    """Named request lists answered by saved models on a :class:`revlens.JobPool`, a job per generation batch
    (in this process too: the batches :func:`revlens.generate_greedy` would form, so the same answers, with a
    progress bar that moves per batch). :meth:`submit` queues a list, :meth:`gather` waits for every queued list
    and returns ``{name: answers in the requests' order}``.
    """

    def __init__(self, pool: JobPool, max_new_tokens: int, batch_size: int):
        self.pool, self.max_new_tokens, self.batch_size = pool, max_new_tokens, batch_size
        self._batches: dict[str, tuple[int, list[list[int]]]] = {}

    def submit(self, name: str, folder: str | os.PathLike, tokenizer: Any, requests: Sequence[str]) -> None:
        requests = list(requests)
        batches = generation_batches(tokenizer, requests, self.batch_size)
        self._batches[name] = (len(requests), batches)
        for b, rows in enumerate(batches):
            self.pool.submit(
                (name, b),
                answer_batch,
                str(Path(folder).resolve()),
                [requests[i] for i in rows],
                self.max_new_tokens,
                self.batch_size,
            )

    def gather(self) -> dict[str, list[str]]:
        """Every submitted list's answers, in its requests' order, once all its jobs have ended."""
        out = {name: [""] * n for name, (n, _) in self._batches.items()}
        total = sum(len(batches) for _, batches in self._batches.values())
        bar = tqdm(self.pool.results(), total=total, desc=f"answers ({', '.join(out)})", unit="batch", leave=False)
        for (name, b), answers in bar:
            for i, answer in zip(self._batches[name][1][b], answers):
                out[name][i] = answer
        self._batches.clear()
        _LOADED.clear()  # jobs run here (one worker) keep no model beyond this call
        return out
