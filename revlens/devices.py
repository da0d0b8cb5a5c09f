"""Validate a user-given torch device before anything is loaded onto it."""

from __future__ import annotations

import torch


def check_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` as a :class:`torch.device`, or a ValueError that names the problem and the fix.

    Checked up front so that ``--device banana`` or ``--device cuda`` on a machine without CUDA fails
    before minutes of checkpoint loading, not inside the first forward pass.

    Example:
        >>> check_device("cpu")
        device(type='cpu')
    """
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a torch device; use cpu, cuda, cuda:N or mps.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r}: no CUDA device is visible to torch {torch.__version__} "
                "(a CPU-only build, no driver, or CUDA_VISIBLE_DEVICES hides them); use cpu."
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {device!r}: only {count} CUDA device(s) are visible (cuda:0..cuda:{count - 1}).")
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError(f"device {device!r}: the Apple MPS backend is not available here; use cpu.")
    elif dev.type == "meta":
        raise ValueError(f"device {device!r} holds no data, so nothing can be measured on it; use cpu or cuda.")
    elif dev.type != "cpu":
        backend = getattr(torch, dev.type, None)
        available = getattr(backend, "is_available", None)
        if available is None or not available():
            raise ValueError(f"device {device!r}: the {dev.type} backend is not available here; use cpu or cuda.")
    return dev
