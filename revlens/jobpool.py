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
import signal
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


# In a worker: where it reports each job it starts (job id, pid), so a worker that dies is blamed on its own job.
_STARTED: Any = None


def _init_worker(
    threads: int,
    initializer: Callable[..., Any] | None,
    initargs: tuple[Any, ...],
    parent: int | None = None,
    started: Any = None,
) -> None:
    global _STARTED
    import torch

    _STARTED = started

    if parent is not None:
        threading.Thread(target=watch_parent, args=(parent,), name="revlens-watch-parent", daemon=True).start()
    torch.set_num_threads(threads)
    if initializer is not None:
        initializer(*initargs)


def _run_job(job: int, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """In a worker: report that job ``job`` starts in this process, then run it."""
    if _STARTED is not None:
        _STARTED.put((job, os.getpid()))  # a SimpleQueue: written at once, before the job can die
    return fn(*args, **kwargs)


class JobFailed(RuntimeError):
    """A job raised; the message names the job and the original error is its cause."""


def _how_it_died(exitcode: int | None) -> str:
    if exitcode is None:
        return "killed by a signal, e.g. out of memory, or it called os._exit"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"killed by {name}" + (", e.g. out of memory" if exitcode == -signal.SIGKILL else "")
    return f"exit code {exitcode}: it called os._exit or crashed"


def _dead_worker_failure(keys: list[Hashable], exitcode: int | None) -> JobFailed:
    """One line naming the job(s) whose worker process died (one when it is known, else every running job)."""
    jobs = f"job {keys[0]!r}" if len(keys) == 1 else "one of the jobs " + ", ".join(repr(k) for k in keys)
    return JobFailed(
        f"{jobs} failed: its worker process died before returning ({_how_it_died(exitcode)}); rerun with fewer "
        "workers or more memory, or with workers=1 to see the error in this process."
    )


def _failure(key: Hashable, err: BaseException, in_worker: bool) -> JobFailed:
    """One line naming the job and what went wrong (the full error and its traceback stay as the cause)."""
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
    job (a dead worker's own job: each worker reports the jobs it starts, and the worker that died is told from
    the ones the pool then stops by its exit code). Workers end themselves within ``PARENT_POLL_S`` seconds when
    this process dies (:func:`watch_parent`).
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
        self._job_ids: dict[Future, int] = {}
        self._executor: ProcessPoolExecutor | None = None
        if self.workers > 1:
            context = multiprocessing.get_context("spawn")
            self._started = context.SimpleQueue()
            self._executor = ProcessPoolExecutor(
                self.workers,
                mp_context=context,
                initializer=_init_worker,
                initargs=(self.threads, initializer, initargs, os.getpid(), self._started),
            )

    def __enter__(self) -> JobPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Drop jobs not started and wait for running ones (their results are not read)."""
        self._queue.clear()
        self._futures.clear()
        self._job_ids.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def submit(self, key: Hashable, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Queue ``fn(*args, **kwargs)``; its result comes back from :meth:`results` as ``(key, result)``."""
        if self._executor is None:
            self._queue.append((key, fn, args, kwargs))
        else:
            future = self._executor.submit(_run_job, len(self._job_ids), fn, args, kwargs)
            self._futures[future] = key
            self._job_ids[future] = len(self._job_ids)

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
                err = future.exception()
                if isinstance(err, BrokenProcessPool):
                    failure = self._blame_dead_worker()
                    self.close()
                    raise failure from err
                key = self._futures.pop(future)
                if err is not None:
                    self.close()
                    raise _failure(key, err, in_worker=True) from err
                yield key, future.result()

    def _blame_dead_worker(self) -> JobFailed:
        """The failure of the job that ran in the worker that died (every job running then, when unknown)."""
        wait(list(self._futures), timeout=PARENT_POLL_S)  # the pool fails every unfinished job at once
        pid_of: dict[int, int] = {}
        while not self._started.empty():
            job, pid = self._started.get()
            pid_of[job] = pid
        running = {
            future: pid_of[job]
            for future, job in self._job_ids.items()
            if future in self._futures
            and job in pid_of
            and future.done()
            and not future.cancelled()
            and isinstance(future.exception(), BrokenProcessPool)
        }
        processes = dict(getattr(self._executor, "_processes", None) or {})  # pid -> Process (CPython's pool)
        exitcodes = {}
        for pid in set(running.values()):
            process = processes.get(pid)
            if process is not None:
                process.join(timeout=PARENT_POLL_S)
                exitcodes[pid] = process.exitcode
        # the pool stops the other workers with SIGTERM once one died; the dead one ended otherwise
        dead = [f for f, pid in running.items() if exitcodes.get(pid) not in (None, -signal.SIGTERM)]
        culprits = dead or list(running) or list(self._futures)[:1]
        pid = running.get(culprits[0]) if len(culprits) == 1 else None
        return _dead_worker_failure([self._futures[f] for f in culprits], exitcodes.get(pid))
