"""torch.distributed plumbing for revlens: which rank does what, and how ranks agree.

revlens scales out on the engine GPU users already run, ``torch.distributed`` launched by ``torchrun``
(one node, several nodes, or under Slurm), not on a scheduler of its own:

- analysis (:func:`revlens.analyze` with ``distributed=True``; ``torchrun -m revlens analyze`` turns it on
  by itself): each rank measures its share of a history's missing checkpoints (:func:`shard`) into the
  shared measurement cache; after a barrier, every rank assembles the same report from the cache and
  rank 0 writes it;
- blocked fine-tuning: the micro-batches of each optimizer step are dealt out across ranks
  (:func:`step_micro_batches`) and their gradients summed with :func:`all_reduce_gradients`, so N ranks
  take exactly the step one process takes when it accumulates all of them (up to float summation order).

A process not started by ``torchrun`` (no ``WORLD_SIZE`` in the environment) is a world of one, and every
function here is then a no-op, so the same code runs in a notebook and in a job.

Example::

    # torchrun --nproc-per-node 2 -m revlens analyze ckpts/ --out out/
    ctx = revlens.distributed.init()          # gloo on CPU, nccl on GPUs
    mine = revlens.distributed.shard(list(history), ctx)
"""

from __future__ import annotations

import datetime
import os
import secrets
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")

BUCKET_BYTES = 64 * 2**20  # gradients are all-reduced in flat buckets of about this size


class DistributedError(RuntimeError):
    """A distributed setting revlens cannot use, or a failure on another rank, with the fix."""


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job: ``rank`` of ``world_size`` (``local_rank`` of ``local_world_size``
    on its node), and the device it should use."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as err:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer; torchrun sets it.") from err


def launched_by_torchrun() -> bool:
    """Whether the environment describes a job of more than one process (``WORLD_SIZE`` > 1)."""
    return _env_int("WORLD_SIZE", 1) > 1


def init(backend: str | None = None, device: str | None = None, timeout_s: float = 1800.0) -> DistContext:
    """Join the ``torchrun`` job described by the environment (or return a world of one).

    Args:
        backend: ``gloo`` (CPU) or ``nccl`` (GPUs); default: nccl when CUDA is visible and ``device`` is
            not ``cpu``, else gloo.
        device: force a device; default: ``cuda:<LOCAL_RANK>`` when CUDA is visible, else ``cpu``.
        timeout_s: how long collective calls wait for the slowest rank (a checkpoint can be slow to load).

    Returns:
        The :class:`DistContext` of this process. The process group is created once; later calls (or a
        group the caller created itself) reuse it.

    Example:
        >>> ctx = init()  # doctest: +SKIP
        >>> ctx.rank, ctx.world_size, ctx.device  # rank 0 of `torchrun --nproc-per-node 2` on GPUs  # doctest: +SKIP
        (0, 2, 'cuda:0')
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", max(1, world_size))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if world_size <= 1:
        return DistContext(0, 1, 0, device, 1)
    import torch.distributed as dist

    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed; install a standard torch wheel.")
    if dist.is_initialized():
        backend = dist.get_backend()
    elif backend is None:
        backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl" and not device.startswith("cuda"):
        raise DistributedError("the nccl backend needs GPUs; use backend='gloo' on CPU.")
    if device.startswith("cuda"):
        if local_rank >= torch.cuda.device_count() and device == f"cuda:{local_rank}":
            raise DistributedError(
                f"LOCAL_RANK={local_rank} but this node shows {torch.cuda.device_count()} GPU(s): "
                "start at most one process per GPU (--nproc-per-node)."
            )
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise DistributedError(
            f"the process group (rank {dist.get_rank()} of {dist.get_world_size()}) does not "
            f"match WORLD_SIZE={world_size}, RANK={rank}; start the job with torchrun."
        )
    return DistContext(rank, world_size, local_rank, device, local_world)


def context(distributed: bool | None = None) -> DistContext:
    """The context a revlens entry point should use for its ``distributed=`` argument.

    ``None`` (auto): join the job when one is running (``torchrun`` with more than one process, or a
    process group the caller initialised), else a world of one; ``True``: :func:`init`; ``False``: a world
    of one even inside a job (each rank then works alone).
    """
    if distributed is False:
        return DistContext()
    if distributed is None:
        import torch.distributed as dist

        if not (launched_by_torchrun() or (dist.is_available() and dist.is_initialized())):
            return DistContext()
    return init()


def current() -> DistContext:
    """The context of an already initialised process group (a world of one when there is none)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return DistContext()
    local_rank = _env_int("LOCAL_RANK", 0)
    device = f"cuda:{local_rank}" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
    return DistContext(
        dist.get_rank(), dist.get_world_size(), local_rank, device, _env_int("LOCAL_WORLD_SIZE", dist.get_world_size())
    )


def shutdown() -> None:
    """Destroy the process group if there is one (call it once at the end of a job)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    """Where tensors for collectives must live: the current GPU under nccl, else the CPU."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard(items: Sequence[T], ctx: DistContext) -> list[T]:
    """This rank's share of ``items``: every ``world_size``-th item starting at ``rank`` (round robin, so ranks
    get alternating steps of every run and finish at about the same time)."""
    return list(items[ctx.rank :: ctx.world_size])


def barrier(ctx: DistContext) -> None:
    """Wait until every rank gets here (a no-op in a world of one)."""
    if ctx.active:
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (small picklable values only: they travel between our own
    processes, never from a file)."""
    if not ctx.active:
        return obj
    import torch.distributed as dist

    box = [obj if ctx.rank == src else None]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (small picklable values only)."""
    if not ctx.active:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def raise_if_any_failed(error: BaseException | None, ctx: DistContext, what: str) -> None:
    """A collective check-point after work that may fail on some ranks: every rank learns of every failure.

    Without it, a rank that raises leaves the others waiting at the next collective until the timeout.
    The failing rank re-raises its own exception; the others raise a :class:`DistributedError` naming it.
    """
    if not ctx.active:
        if error is not None:
            raise error
        return
    messages = gather_objects(None if error is None else f"{type(error).__name__}: {error}", ctx)
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        raise DistributedError(f"{what} failed on rank(s) " + "; ".join(f"{r}: {m}" for r, m in failed))


def on_main(fn: Callable[[], T], ctx: DistContext, what: str) -> T:
    """Run ``fn`` on rank 0 only (e.g. writing a file) and give its (small, picklable) result to every rank.

    An exception on rank 0 is raised on every rank (see :func:`raise_if_any_failed`), so no rank waits for
    a collective that will never come.
    """
    if not ctx.active:
        return fn()
    value, error = None, None
    if ctx.is_main:
        try:
            value = fn()
        except Exception as err:  # noqa: BLE001  handed to every rank below
            error = err
    raise_if_any_failed(error, ctx, what)
    return broadcast_object(value, ctx)


def check_same(value: Any, ctx: DistContext, what: str) -> None:
    """Raise on every rank unless ``value`` (small, picklable, comparable) is the same on all ranks.

    For dicts the error names the keys that differ from rank 0's."""
    values = gather_objects(value, ctx)
    if all(v == values[0] for v in values):
        return
    if all(isinstance(v, dict) for v in values):
        keys = sorted({k for v in values for k in v if v.get(k) != values[0].get(k)}, key=str)
        seen = "; ".join(
            f"{k}: " + ", ".join(f"rank {r}: {str(v.get(k))[:60]}" for r, v in enumerate(values)) for k in keys
        )
    else:
        seen = ", ".join(f"rank {r}: {str(v)[:200]}" for r, v in enumerate(values))
    raise DistributedError(
        f"ranks disagree on {what} ({seen}). Every rank must see the same files and "
        "settings (folders shared by all nodes, the same data and seeds)."
    )


def check_shared_folder(folder: str | os.PathLike, ctx: DistContext, what: str = "cache_dir") -> None:
    """Raise on every rank unless ``folder`` is one folder that every rank can see (a shared filesystem).

    Rank 0 writes a marker with a random name; every rank looks for it. Ranks on nodes that do not share
    ``folder`` would otherwise each measure into their own copy and rank 0 would silently redo their work.
    """
    if not ctx.active:
        return
    marker = None
    if ctx.is_main:
        Path(folder).mkdir(parents=True, exist_ok=True)
        marker = Path(folder) / f".revlens-shared-{secrets.token_hex(8)}"
        marker.write_text("written by rank 0 to check that every rank sees this folder\n")
    name = broadcast_object(None if marker is None else marker.name, ctx)
    seen = gather_objects((Path(folder) / name).is_file(), ctx)
    hosts = gather_objects(socket.gethostname(), ctx)
    barrier(ctx)
    if ctx.is_main and marker is not None:
        marker.unlink(missing_ok=True)
    blind = [f"rank {r} on {hosts[r]}" for r, ok in enumerate(seen) if not ok]
    if blind:
        raise DistributedError(
            f"{what} {folder} is not shared: {', '.join(blind)} cannot see rank 0's files. "
            f"Put {what} on a filesystem every node mounts at the same path (NFS, Lustre, ...)."
        )


def step_micro_batches(indices: torch.Tensor, batch_size: int, ctx: DistContext) -> list[torch.Tensor]:
    """This rank's micro-batches of one optimizer step.

    One optimizer step reads ``indices`` (drawn identically on every rank, e.g. by a generator seeded with
    the step), split into micro-batches of ``batch_size`` rows as a single process would accumulate them.
    The micro-batches are dealt round robin: rank r gets micro-batches r, r + N, ... Each rank scales a
    micro-batch's loss by ``1 / (number of micro-batches of the whole step)``, exactly as the single
    process does (see :func:`micro_batch_loss_scale`), then :func:`all_reduce_gradients` sums the ranks'
    gradients: N ranks with G micro-batches each take the step of one process accumulating N x G.

    A rank may get no micro-batch (fewer micro-batches than ranks); it still joins the all-reduce.

    Example:
        >>> idx = torch.arange(8)
        >>> [m.tolist() for m in step_micro_batches(idx, 2, DistContext(rank=1, world_size=2))]
        [[2, 3], [6, 7]]
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    return shard(list(indices.split(batch_size)), ctx)


def micro_batch_loss_scale(n_indices: int, batch_size: int) -> float:
    """The factor on one micro-batch's mean loss so that the step's gradient is the mean over micro-batches
    of the whole step (all ranks together): ``1 / ceil(n_indices / batch_size)``."""
    return 1.0 / -(-int(n_indices) // int(batch_size))


def replicated_loss_scale(ctx: DistContext) -> float:
    """The factor on a loss every rank computes identically on its full replica (e.g. the anchor penalty on
    the probe prompts): ``1 / world_size``, so that after the gradient sum it counts once."""
    return 1.0 / ctx.world_size


def _buckets(tensors: list[torch.Tensor]) -> Iterable[list[torch.Tensor]]:
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for t in group:
            bucket.append(t)
            size += t.numel() * t.element_size()
            if size >= BUCKET_BYTES:
                yield bucket
                bucket, size = [], 0
        if bucket:
            yield bucket


def all_reduce_gradients(parameters: Iterable[torch.nn.Parameter], ctx: DistContext) -> None:
    """Sum every trainable parameter's ``.grad`` over ranks, in place (flat buckets per dtype and device).

    Ranks must have scaled their losses so that the sum is the global gradient (see
    :func:`step_micro_batches`); a parameter without a gradient on this rank counts as zero and gets the
    summed gradient, unless no rank has one: it then keeps ``grad=None``, as in one process (optimizers
    skip it, with no weight decay or moment update). Every rank then holds the same gradient (the
    collective reduces each element once and sends the result to all), so identical optimizer steps keep
    the replicas identical.
    """
    if not ctx.active:
        return
    import torch.distributed as dist

    params = [p for p in parameters if p.requires_grad]
    comm = _comm_device()
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=comm)
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
    params = [p for p, used in zip(params, has_grad.tolist()) if used]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for bucket in _buckets([p.grad for p in params]):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        moved = flat.to(comm) if flat.device != comm else flat
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        if moved is not flat:
            flat.copy_(moved)
        offset = 0
        for g in bucket:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n


def broadcast_parameters(parameters: Iterable[torch.Tensor], ctx: DistContext, src: int = 0) -> None:
    """Copy rank ``src``'s values of ``parameters`` (and buffers, if given) to every rank, in place.

    Call it once before training, as DDP does: replicas that start from the same weights and take the same
    steps stay identical.
    """
    if not ctx.active:
        return
    import torch.distributed as dist

    comm = _comm_device()
    with torch.no_grad():
        for bucket in _buckets([p.data for p in parameters]):
            flat = torch.cat([t.reshape(-1) for t in bucket]).to(comm)
            dist.broadcast(flat, src=src)
            offset = 0
            for t in bucket:
                n = t.numel()
                t.copy_(flat[offset : offset + n].view_as(t))
                offset += n


def all_reduce_sum(value: float, ctx: DistContext) -> float:
    """The sum of a float over ranks (e.g. a step's loss shares)."""
    if not ctx.active:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())
