"""Small shared mechanics: atomic writes, a train/eval-mode context, right-padding.

Atomic writes go to a uniquely named temporary sibling (pid + random suffix) and are renamed into
place, so an interrupted write never leaves a half-written file and two processes writing the same
target never share a temporary name: the last writer wins, whole. A write that runs out of disk space raises
:class:`DiskFullError` naming the file and the fix, and leaves no temporary file behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch


class DiskFullError(OSError):
    """A write that ran out of disk space (or quota); the message names the file and the fix.

    An :class:`OSError` with ``errno`` ENOSPC and ``filename`` set to the file (or folder) being written; the
    library's own error (an ``OSError``, a safetensors ``SafetensorError``, torch's serializer error) is its
    ``__cause__``.
    """

    def __init__(self, path: str | os.PathLike, free: int | None = None):
        room = "" if free is None else f" ({_size(free)} free there)"
        super().__init__(
            f"no space left on the disk while writing {path}{room}; nothing half-written was kept. Free space on "
            "that disk, or write to a folder on another disk (--out / out_dir=), and run again."
        )
        self.errno = errno.ENOSPC
        self.filename = str(path)

    def __str__(self) -> str:  # the message alone (OSError would print "[Errno 28] None: 'path'")
        return str(self.args[0])


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


# Messages the writers give when the disk is full: OSError's strerror, and the Rust "os error 28" of safetensors
# ("Error while serializing: I/O error: No space left on device (os error 28)").
_DISK_FULL_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
# torch.save's serializer reports a failed write without the OS error ("[enforce fail at inline_container.cc:...]
# unexpected pos ..."): it counts as disk full only when the disk has (nearly) no room left.
_TORCH_WRITER_TEXT = ("inline_container", "PytorchStreamWriter")
_NEARLY_FULL = 16 * 2**20


def _free_bytes(path: Path) -> int | None:
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def is_disk_full(err: BaseException, path: str | os.PathLike) -> bool:
    """True when ``err``, raised while writing ``path``, means the disk (or the user's quota) is full."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    if any(marker in text for marker in _DISK_FULL_TEXT):
        return True
    if isinstance(err, RuntimeError) and any(marker in text for marker in _TORCH_WRITER_TEXT):
        free = _free_bytes(Path(path))
        return free is not None and free < _NEARLY_FULL
    return False


@contextlib.contextmanager
def naming_disk_full(path: str | os.PathLike) -> Iterator[None]:
    """Turn a disk-full error of any writer inside the block into one :class:`DiskFullError` naming ``path``.

    Example:
        >>> import errno
        >>> with naming_disk_full("out/report.json"):
        ...     raise OSError(errno.ENOSPC, "No space left on device")
        Traceback (most recent call last):
        ...
        revlens._util.DiskFullError: no space left on the disk while writing out/report.json...
    """
    try:
        yield
    except DiskFullError:
        raise
    except Exception as err:
        if not is_disk_full(err, path):
            raise
        raise DiskFullError(path, _free_bytes(Path(path))) from err


def temp_sibling(path: str | os.PathLike) -> Path:
    """A fresh temporary name next to ``path`` (same folder, so the final rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        with naming_disk_full(path):
            tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps_kwargs: Any) -> Path:
    """:func:`atomic_write_text` of ``json.dumps(obj)``."""
    return atomic_write_text(path, json.dumps(obj, **dumps_kwargs))


def atomic_save_tensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write tensors as safetensors through a temporary file and an atomic rename."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = temp_sibling(path)
    try:
        with naming_disk_full(path):
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                str(tmp),
                metadata=None if metadata is None else dict(metadata),
            )
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def replace_dir(tmp: Path, path: Path) -> Path:
    """Move the finished folder ``tmp`` to ``path``, replacing an older ``path`` only once ``tmp`` is complete.

    The old folder is first renamed aside (not deleted), so a kill at any moment leaves either the old or
    the new folder in place under a recognisable name (``<name>.old-*``), never neither.
    """
    old = None
    if path.exists():
        old = temp_sibling(path).with_suffix(".old")
        path.rename(old)
    tmp.rename(path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


@contextlib.contextmanager
def training_mode(model: Any, train: bool) -> Iterator[Any]:
    """Put ``model`` in train (True) or eval (False) mode inside the block; restore its mode on exit."""
    was_training = model.training
    model.train(train)
    try:
        yield model
    finally:
        model.train(was_training)


def pad_right(sequences: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D token tensors into ``[n, max_len]`` (``pad_id`` after the end) and their lengths."""
    lengths = torch.tensor([len(s) for s in sequences])
    out = torch.full((len(sequences), int(lengths.max())), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        out[i, : len(s)] = s
    return out, lengths


def tensor_digest(*tensors: torch.Tensor | None) -> str:
    """sha256 of the tensors' dtypes, shapes and bytes (first 16 hex digits); None counts as a marker."""
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_fingerprint(model: Any) -> str:
    """A fingerprint of a model's weights: each parameter's name, shape, dtype, float64 sum and first values."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            h.update(f"{name}{tuple(p.shape)}{p.dtype}{float(flat.double().sum()):.8e}".encode())
            h.update(flat[:64].to("cpu").float().numpy().tobytes())
    return h.hexdigest()[:16]
