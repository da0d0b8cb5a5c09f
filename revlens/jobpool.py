"""Independent jobs side by side: in this process one after another, or in spawned worker processes.

The demos' fine-tuning runs (the organism's blocked runs; the SmolLM2 preset's seeds, their checkpoint
evaluations and its blocked runs) do not depend on each other. On a CPU, ``workers`` processes of
``cores // workers`` torch threads each get more done than one process with every core where the work is
many small operations: for SmolLM2-135M on 2 cores, two one-thread processes gave 1.75x the greedy answers
per second of one two-thread process, and 1.05x the training steps (large matrix products already use both
cores); ``benchmarks/workers_throughput.py``. The SmolLM2 demo's full run went from 64.5 to 55.4 minutes
(``benchmarks/smollm2_demo.py``).

Results are the same as in one process up to float rounding: a different thread count may sum in another
order. Each result comes back to the caller as soon as its job ends, so the caller can record it before the
next one finishes (an interrupted run keeps every finished job). Jobs may be submitted while results are
read (a seed's evaluations once its training is done).

Example:
    >>> with JobPool(workers=1) as pool:
    ...     pool.submit("a", pow, 2, 3)
    ...     pool.submit("b", pow, 3, 2)
    ...     sorted(pool.results())
    [('a', 8), ('b', 9)]
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from revlens.threads import available_cores

MAX_DEFAULT_WORKERS = 4


def available_memory_bytes() -> int | None:
    """Memory the system can give new processes without swapping (``MemAvailable``), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def default_workers(
    on_gpu: bool = False,
    cores: int | None = None,
    cap: int = MAX_DEFAULT_WORKERS,
    bytes_per_worker: int | None = None,
    available_bytes: int | None = None,
) -> int:
    """One worker per CPU core, at most ``cap`` and at most as many as fit in the available memory at
    ``bytes_per_worker`` each (when given); 1 on a GPU (the runs share the one device).

    Example:
        >>> default_workers(cores=8, bytes_per_worker=4 * 2**30, available_bytes=10 * 2**30)
        2
    """
    if on_gpu:
        return 1
    n = min(cap, available_cores() if cores is None else cores)
    if bytes_per_worker:
        free = available_memory_bytes() if available_bytes is None else available_bytes
        if free is not None:
            n = min(n, free // bytes_per_worker)
    return max(1, n)


def threads_per_worker(workers: int, cores: int | None = None) -> int:
    """The torch threads each of ``workers`` processes gets: the cores shared out, at least one."""
    return max(1, (available_cores() if cores is None else cores) // max(1, workers))


# A worker whose parent died exits with this status, within PARENT_POLL_S seconds.
ORPHAN_EXIT_CODE = 70
PARENT_POLL_S = 1.0


def watch_parent(parent: int, interval: float = PARENT_POLL_S) -> None:
    """Return never: poll every ``interval`` seconds and end this process (``os._exit``) once its parent
    ``parent`` is gone (the process is re-parented, so ``os.getppid()`` changes). Run in a daemon thread of each
    worker, so a killed parent (SIGKILL, out of memory, a closed terminal) does not leave its workers training on.

    Polling, not ``prctl(PR_SET_PDEATHSIG)``: that signal fires when the parent *thread* that started the worker
    ends, and the pool starts workers from whichever thread submits; polling works on every POSIX system.
    """
    while True:
        if os.getppid() != parent:
            os._exit(ORPHAN_EXIT_CODE)
        time.sleep(interval)


def _init_worker(
    threads: int, initializer: Callable[..., Any] | None, initargs: tuple[Any, ...], parent: int | None = None
) -> None:
    import torch

    if parent is not None:
        threading.Thread(target=watch_parent, args=(parent,), name="revlens-watch-parent", daemon=True).start()
    torch.set_num_threads(threads)
    if initializer is not None:
        initializer(*initargs)


class JobFailed(RuntimeError):
    """A job raised; the message names the job and the original error is its cause."""


def _failure(key: Hashable, err: BaseException, in_worker: bool) -> JobFailed:
    """One line naming the job and what went wrong (the full error and its traceback stay as the cause)."""
    if isinstance(err, BrokenProcessPool):
        return JobFailed(
            f"job {key!r} failed: its worker process died before returning (killed by a signal, e.g. out of "
            "memory, or it called os._exit); rerun with fewer workers or more memory, or with workers=1 to see "
            "the error in this process."
        )
    text = " ".join(str(err).split())
    if len(text) > 300:
        text = text[:297] + "..."
    where = " in a worker process" if in_worker else ""
    return JobFailed(f"job {key!r} failed{where}: {type(err).__name__}" + (f": {text}" if text else ""))


class JobPool:
    """Run submitted jobs and yield ``(key, result)`` as each ends.

    Args:
        workers: 1 runs every job in this process, in submission order, when :meth:`results` reaches it;
            more starts that many spawned processes (the job functions must be importable module-level
            functions and their arguments picklable).
        threads: torch threads per worker process (default :func:`threads_per_worker`).
        initializer, initargs: called once in each worker process (after its thread count is set).

    A job that raises, or whose worker dies, ends :meth:`results` with a one-line :class:`JobFailed` naming the
    job. Workers end themselves within ``PARENT_POLL_S`` seconds when this process dies (:func:`watch_parent`).
    """

    def __init__(
        self,
        workers: int,
        threads: int | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
    ):
        if int(workers) != workers or workers < 1:
            raise ValueError(f"workers must be a whole number >= 1, got {workers!r}.")
        self.workers = int(workers)
        self.threads = threads_per_worker(self.workers) if threads is None else threads
        self._queue: collections.deque[tuple[Hashable, Callable[..., Any], tuple, dict]] = collections.deque()
        self._futures: dict[Future, Hashable] = {}
        self._executor: ProcessPoolExecutor | None = None
        if self.workers > 1:
            self._executor = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(self.threads, initializer, initargs, os.getpid()),
            )

    def __enter__(self) -> JobPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Drop jobs not started and wait for running ones (their results are not read)."""
        self._queue.clear()
        self._futures.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def submit(self, key: Hashable, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Queue ``fn(*args, **kwargs)``; its result comes back from :meth:`results` as ``(key, result)``."""
        if self._executor is None:
            self._queue.append((key, fn, args, kwargs))
        else:
            self._futures[self._executor.submit(fn, *args, **kwargs)] = key

    def pending(self) -> int:
        """Jobs submitted whose result has not been yielded yet."""
        return len(self._queue) + len(self._futures)

    def results(self) -> Iterator[tuple[Hashable, Any]]:
        """``(key, result)`` of every job, in the order they end, including jobs submitted meanwhile.

        Raises:
            JobFailed: a job raised (jobs not started are dropped).
        """
        while self._queue:
            key, fn, args, kwargs = self._queue.popleft()
            try:
                result = fn(*args, **kwargs)
            except Exception as err:
                self.close()
                raise _failure(key, err, in_worker=False) from err
            yield key, result
        while self._futures:
            done, _ = wait(list(self._futures), return_when=FIRST_COMPLETED)
            for future in done:
                key = self._futures.pop(future)
                err = future.exception()
                if err is not None:
                    self.close()
                    raise _failure(key, err, in_worker=True) from err
                yield key, future.result()
