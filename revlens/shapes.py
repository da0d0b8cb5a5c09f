"""Run-time checks of typed tensor shapes (jaxtyping annotations, checked with typeguard).

typeguard 4's instrumenting ``@typechecked`` cannot see through ``@jaxtyped`` (it skips the
function with an InstrumentationWarning), so this decorator checks each annotated argument and
the return value with ``typeguard.check_type`` inside one jaxtyping dimension scope: named
dimensions must agree across all arguments of one call.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from typing import Any, TypeVar

from jaxtyping import jaxtyped
from typeguard import TypeCheckError, check_type

F = TypeVar("F", bound=Callable[..., Any])


def _describe(value: Any) -> str:
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is None:
        return repr(value)[:80]
    return f"{type(value).__name__} of shape {tuple(shape)} and dtype {dtype}"


def shape_checked(fn: F) -> F:
    """Check ``fn``'s annotated arguments and return value, shapes included, on every call."""
    sig = inspect.signature(fn)
    hints: dict[str, Any] = {}

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not hints:
            hints.update(typing.get_type_hints(fn, include_extras=True))
        bound = sig.bind(*args, **kwargs)
        with jaxtyped("context"):
            for name, value in bound.arguments.items():
                if name in hints:
                    try:
                        check_type(value, hints[name])
                    except TypeCheckError as err:
                        raise TypeError(
                            f"{fn.__qualname__}: argument {name!r} should be {hints[name]}, got {_describe(value)} "
                            "(named dimensions must agree across arguments)."
                        ) from err
            out = fn(*args, **kwargs)
            if "return" in hints:
                try:
                    check_type(out, hints["return"])
                except TypeCheckError as err:
                    raise TypeError(
                        f"{fn.__qualname__} returned {_describe(out)}, expected {hints['return']}."
                    ) from err
        return out

    return typing.cast(F, wrapper)
