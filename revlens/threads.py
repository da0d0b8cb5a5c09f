"""How many CPU threads torch uses while revlens measures checkpoints.

torch's default (one thread per core) suits large matrix products. revlens mostly reads small models
one prompt batch at a time, where each operation is too small to split: extra threads then add
synchronisation and, on a machine whose cores are busy with other jobs, wait for each other. On the
project's 2-core machine under load, analysing 122 small checkpoints took 4 min 12 s with the default
threads and 43-49 s with one thread, with the same numbers.

Policy (:func:`choose_num_threads`): an explicit request wins (``threads=`` / ``--threads N``), then the
``REVLENS_NUM_THREADS`` environment variable; otherwise one thread per ``SMALL_MODEL_PARAMS`` parameters,
at least 1 and at most the cores this process may use. :class:`ThreadPolicy` applies it to the first
model measured and restores torch's previous setting afterwards.
"""

from __future__ import annotations

import os
from typing import Any

import torch

ENV_VAR = "REVLENS_NUM_THREADS"
SMALL_MODEL_PARAMS = 20_000_000


def available_cores() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _positive_int(value: Any, what: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or (isinstance(value, float) and value != n):
        raise ValueError(
            f"{what} must be a positive whole number of threads, got {value!r}; "
            "leave it unset to let revlens choose from the model size."
        )
    return n


def choose_num_threads(n_params: int, cores: int | None = None, override: int | None = None) -> int:
    """The number of torch CPU threads for measuring a model of ``n_params`` parameters.

    Args:
        n_params: the model's parameter count.
        cores: CPUs available (default: this process's affinity mask).
        override: an explicit thread count; wins over everything else.

    Returns:
        ``override``, else ``$REVLENS_NUM_THREADS``, else ``n_params // SMALL_MODEL_PARAMS``
        clamped to ``[1, cores]``: one thread below 20M parameters, all cores from ``20M * cores``.

    Example:
        >>> choose_num_threads(5_000_000, cores=16)
        1
        >>> choose_num_threads(7_000_000_000, cores=16)
        16
    """
    if override is not None:
        return _positive_int(override, "threads")
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return _positive_int(env, ENV_VAR)
    cores = available_cores() if cores is None else _positive_int(cores, "cores")
    return int(min(cores, max(1, int(n_params) // SMALL_MODEL_PARAMS)))


def count_parameters(model: Any) -> int:
    """Parameters of a torch module (a parameter shared by several modules, e.g. tied embeddings, once)."""
    return sum(p.numel() for p in model.parameters())


class ThreadPolicy:
    """Sets torch's thread count for the first model it is shown; restores the previous count on exit.

    Example:
        >>> probe, before = revlens.ReversionProbe(prompts), torch.get_num_threads()
        >>> with ThreadPolicy(override=None) as policy:
        ...     policy.fit(model)  # 1 thread for a small model
        ...     result = probe.measure(model)
        1
        >>> torch.get_num_threads() == before  # restored on exit
        True
    """

    def __init__(self, override: int | None = None):
        if override is not None:
            _positive_int(override, "threads")
        self.override = override
        self.chosen: int | None = None
        self._previous: int | None = None

    def start(self) -> ThreadPolicy:
        """Remember torch's current thread count; apply an explicit or environment request at once."""
        self._previous = torch.get_num_threads()
        self.chosen = None
        if self.override is not None or os.environ.get(ENV_VAR, "").strip():
            self._set(choose_num_threads(0, override=self.override))
        return self

    def fit(self, model: Any) -> int:
        """Choose and apply the thread count for ``model`` (once; later models share the first's size)."""
        if self.chosen is None:
            self._set(choose_num_threads(count_parameters(model), override=self.override))
        return int(self.chosen)

    def _set(self, n: int) -> None:
        self.chosen = n
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)

    def restore(self) -> None:
        """Put torch's thread count back to what it was at :meth:`start`."""
        if self._previous is not None and torch.get_num_threads() != self._previous:
            torch.set_num_threads(self._previous)
        self._previous = None

    def __enter__(self) -> ThreadPolicy:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.restore()
