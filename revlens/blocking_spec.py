"""One typed description of a blocking setup, and the one strict parser of its compact string.

A setup is what `revlens finetune --mode`, `revlens demo --modes` and the Trainer integration accept:
parts joined by ``+``, each either a hook mode or ``name@number``::

    project | clamp | grad         hook modes (project and clamp exclude each other)
    anchor@W                       anchor each probe prompt's readout along V with weight W > 0
    contrast@W                     anchor the probe-minus-control contrast centroid with weight W > 0
    sample@K                       the anchor uses K prompts of each set per step (needs anchor/contrast)
    rank@K                         V = the rank-K reversion subspace instead of v_rev
    random@K[@DRAW]                V = a seeded random rank-K subspace (the control for rank@K)
    refusal                        V = the refusal direction: harmful-minus-harmless mean readout at the
                                   aligned model (Arditi et al. 2024), rank 1
    harmpca@K                      V = the top-K principal directions of the aligned model's probe readouts
                                   (a data-matched subspace that is not v_rev)
    full                           V = every dimension: the anchor holds whole readouts (LDIFS-style)
    kl@W                           KL(aligned || model) of the probe prompts' next-token distributions, weight W
    replay@R                       R rows of every batch drawn from replay data (e.g. align's refusal examples)
    safelora@F                     after training, project the update of the fraction F of weight matrices
                                   least similar to their projection onto V = W_align - W_pretrain (Safe LoRA)
    layers@L1/L2/...               block at these layers (default: the caller's choice)

Hook modes and the anchor act along V; ``kl``, ``replay`` and ``safelora`` need no direction and combine with
anything. ``plain`` is no blocking. ``str(spec)`` prints the canonical string (parts in the order above, numbers
in their shortest exact form), so ``BlockingSpec.parse(str(spec)) == spec``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

HOOK_MODES = ("project", "clamp", "grad")
PLAIN = "plain"
GRAMMAR = (
    "parts joined by '+': project | clamp | grad | anchor@W | contrast@W | sample@K | rank@K | "
    "random@K[@DRAW] | refusal | harmpca@K | full | kl@W | replay@R | safelora@F | layers@L1/L2/..., or "
    "'plain' alone (W > 0 a number, K, R >= 1, 0 < F <= 1, DRAW and L >= 0 integers), e.g. 'clamp+grad' or "
    "'anchor@0.003+contrast@0.1+rank@64'"
)
# Subspaces: the name in the compact string and how many numbers follow it.
SUBSPACES = {"rank": 1, "random": 1, "refusal": 0, "harmpca": 1, "full": 0}
# Whole numbers (ranks, draws, rows, prompts, layers) stay below this: draws seed 64-bit random generators, and
# every count is an int64 somewhere downstream.
INT_LIMIT = 2**63


class InterventionError(ValueError):
    """A blocking specification revlens cannot apply, with the fix."""


def _bad(text: str, part: str, why: str) -> InterventionError:
    return InterventionError(f"blocking mode {text!r}: {why} (part {part!r}); the grammar is {GRAMMAR}.")


def _number(x: float) -> str:
    """Shortest exact decimal of a float: 1.0 -> '1', 0.003 -> '0.003', 1e16 -> '1e16' (no '+', the part separator)."""
    out = repr(float(x)).replace("e+", "e")
    return out[:-2] if out.endswith(".0") else out


@dataclass(frozen=True)
class BlockingSpec:
    """What to block, where, and how: hook modes, layers, anchor weights, subspace and sampling.

    Args:
        hooks: a subset of ``("project", "clamp", "grad")`` (project and clamp exclude each other).
        layers: layer indices to block at, or None (the caller's default).
        anchor: weight of the per-prompt probe anchor (0: none).
        contrast: weight of the contrast-centroid anchor (0: none).
        subspace: None (v_rev), ``("rank", k)`` (the rank-k reversion subspace),
            ``("random", k, draw)`` (a seeded random rank-k subspace, the control), ``("refusal",)`` (the
            refusal direction), ``("harmpca", k)`` (top-k principal directions of the aligned model's probe
            readouts) or ``("full",)`` (every dimension).
        sample: prompts of each anchor (and KL) set used per step (None: all).
        kl: weight of the KL penalty to the aligned model's next-token distributions on the probe prompts.
        replay: rows of every batch drawn from replay data (None: none).
        safelora: fraction of weight matrices whose update is projected after training (None: none).

    Example:
        >>> spec = BlockingSpec.parse("anchor@0.003+contrast@0.1+rank@64")
        >>> spec.anchor, spec.subspace, str(spec)
        (0.003, ('rank', 64), 'anchor@0.003+contrast@0.1+rank@64')
    """

    hooks: tuple[str, ...] = ()
    layers: tuple[int, ...] | None = None
    anchor: float = 0.0
    contrast: float = 0.0
    subspace: tuple | None = None
    sample: int | None = None
    kl: float = 0.0
    replay: int | None = None
    safelora: float | None = None

    def __post_init__(self) -> None:
        hooks = tuple(self.hooks) if not isinstance(self.hooks, str) else (self.hooks,)
        unknown = [h for h in hooks if h not in HOOK_MODES]
        if unknown:
            raise InterventionError(
                f"unknown hook mode(s) {unknown}; choose from {HOOK_MODES}. The grammar is {GRAMMAR}."
            )
        if len(set(hooks)) != len(hooks):
            raise InterventionError(f"hook modes {list(hooks)} repeat one; give each once.")
        if {"project", "clamp"} <= set(hooks):
            raise InterventionError(
                "'project' and 'clamp' both set the coordinate; choose one (add '+grad' if wanted)."
            )
        object.__setattr__(self, "hooks", tuple(h for h in HOOK_MODES if h in hooks))
        for name in ("anchor", "contrast", "kl"):
            w = getattr(self, name)
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise InterventionError(f"{name} weight must be a finite number >= 0, got {w!r}.")
            object.__setattr__(self, name, float(w))
        if self.layers is not None:
            layers = tuple(self.layers)
            if any(isinstance(l, bool) or not isinstance(l, int) or l < 0 for l in layers) or not layers:
                raise InterventionError(f"layers must be a non-empty list of integers >= 0, got {self.layers!r}.")
            if len(set(layers)) != len(layers):
                raise InterventionError(f"layers {list(layers)} repeat a layer; give each once.")
            object.__setattr__(self, "layers", tuple(sorted(layers)))
        if self.subspace is not None:
            object.__setattr__(self, "subspace", _check_subspace(tuple(self.subspace)))
        if self.sample is not None:
            if isinstance(self.sample, bool) or not isinstance(self.sample, int) or self.sample < 1:
                raise InterventionError(f"sample must be a positive number of prompts per step, got {self.sample!r}.")
            if not self.has_penalty:
                raise InterventionError(
                    "sample@k sets how many prompts an anchor uses per step; add anchor@w, contrast@w or kl@w."
                )
        if self.replay is not None and (not _is_int(self.replay) or self.replay < 1):
            raise InterventionError(f"replay must be a positive number of rows per batch, got {self.replay!r}.")
        _check_limits(self)
        if self.safelora is not None:
            f = self.safelora
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
                raise InterventionError(
                    f"safelora takes the fraction of weight matrices to project, 0 < F <= 1, got {f!r}."
                )
            object.__setattr__(self, "safelora", float(f))
        if self.subspace is not None and not (self.hooks or self.has_anchor):
            raise InterventionError(
                f"{self.subspace[0]}@k chooses the subspace that hooks or an anchor block; add a "
                "hook mode or anchor@w/contrast@w."
            )
        if self.subspace == ("full",) and self.hooks:
            raise InterventionError(
                "hook modes along 'full' (every dimension) would erase or freeze the whole activation; use "
                "'full' with anchor@w (the full-rank anchor) or choose a subspace for the hooks."
            )
        if self.layers is not None and not (self.hooks or self.has_anchor):
            raise InterventionError(
                "layers@... says where to block, but nothing is blocked; add a hook mode or an anchor."
            )

    # ----------------------------------------------------------------------------------------------
    @property
    def has_anchor(self) -> bool:
        """True when a probe anchor (per-prompt or contrast) is part of the setup."""
        return self.anchor > 0 or self.contrast > 0

    @property
    def has_penalty(self) -> bool:
        """True when a loss term on the probe prompts (the anchor or the KL penalty) is part of the setup."""
        return self.has_anchor or self.kl > 0

    @property
    def needs_directions(self) -> bool:
        """True when hooks or the anchor act along directions (v_rev or a subspace)."""
        return bool(self.hooks) or self.has_anchor

    @property
    def is_plain(self) -> bool:
        """True when nothing is blocked (no hooks, no penalty, no replay, no weight projection)."""
        return not self.hooks and not self.has_penalty and self.replay is None and self.safelora is None

    @property
    def hook_mode(self) -> str | None:
        """The hook modes as :class:`revlens.blocking.Blocking` takes them (``"clamp+grad"``), or None."""
        return "+".join(self.hooks) or None

    @classmethod
    def parse(cls, text: str | BlockingSpec) -> BlockingSpec:
        """Read a compact string strictly: unknown, repeated or malformed parts raise InterventionError.

        Example:
            >>> BlockingSpec.parse("grad+clamp").hook_mode
            'clamp+grad'
        """
        if isinstance(text, BlockingSpec):
            return text
        if not isinstance(text, str):
            raise InterventionError(
                f"a blocking mode is a string, got {type(text).__name__}; the grammar is {GRAMMAR}."
            )
        if text.strip() == PLAIN:
            return cls()
        fields: dict = {}
        hooks: list[str] = []
        seen: set[str] = set()
        parts = text.split("+")
        for part in parts:
            raw = part
            part = part.strip()
            if not part:
                raise _bad(text, raw, "empty part")
            name, _, value = part.partition("@")
            key = "subspace" if name in SUBSPACES else name
            if key in seen:
                raise _bad(text, part, f"{'a subspace' if key == 'subspace' else repr(name)} is given twice")
            seen.add(key)
            if name == PLAIN:
                raise _bad(text, part, "'plain' means no blocking and stands alone")
            if name in HOOK_MODES:
                if value:
                    raise _bad(text, part, f"hook mode {name!r} takes no number")
                hooks.append(name)
            elif name in ("anchor", "contrast", "kl"):
                fields[name] = _weight(text, part, value)
            elif name == "replay":
                fields["replay"] = _integer(text, part, value, minimum=1)
            elif name == "safelora":
                f = _weight(text, part, value)
                if f > 1:
                    raise _bad(text, part, "the fraction of weight matrices must be in (0, 1]")
                fields["safelora"] = f
            elif name in ("refusal", "full"):
                if value:
                    raise _bad(text, part, f"{name!r} takes no number")
                fields["subspace"] = (name,)
            elif name == "harmpca":
                fields["subspace"] = ("harmpca", _integer(text, part, value, minimum=1))
            elif name == "sample":
                fields["sample"] = _integer(text, part, value, minimum=1)
            elif name == "rank":
                fields["subspace"] = ("rank", _integer(text, part, value, minimum=1))
            elif name == "random":
                k, sep, draw = value.partition("@")
                if sep and not draw:
                    raise _bad(text, part, "missing draw number after the second '@'")
                fields["subspace"] = (
                    "random",
                    _integer(text, part, k, minimum=1),
                    _integer(text, part, draw, minimum=0) if draw else 0,
                )
            elif name == "layers":
                if not value:
                    raise _bad(text, part, "missing layer numbers")
                fields["layers"] = tuple(_integer(text, part, v, minimum=0) for v in value.split("/"))
            else:
                raise _bad(text, part, "unknown part")
        try:
            return cls(hooks=tuple(hooks), **fields)
        except InterventionError as err:
            raise InterventionError(f"blocking mode {text!r}: {err} The grammar is {GRAMMAR}.") from None

    def __str__(self) -> str:
        if self.is_plain:
            return PLAIN
        parts = list(self.hooks)
        if self.anchor > 0:
            parts.append(f"anchor@{_number(self.anchor)}")
        if self.contrast > 0:
            parts.append(f"contrast@{_number(self.contrast)}")
        if self.kl > 0:
            parts.append(f"kl@{_number(self.kl)}")
        if self.sample is not None:
            parts.append(f"sample@{self.sample}")
        if self.subspace is not None:
            kind, *rest = self.subspace
            if not rest:
                parts.append(kind)
            else:
                k, *draw = rest
                parts.append(f"{kind}@{k}" + (f"@{draw[0]}" if draw and draw[0] else ""))
        if self.replay is not None:
            parts.append(f"replay@{self.replay}")
        if self.safelora is not None:
            parts.append(f"safelora@{_number(self.safelora)}")
        if self.layers is not None:
            parts.append("layers@" + "/".join(str(l) for l in self.layers))
        return "+".join(parts)

    def with_layers(self, layers: Iterable[int] | None) -> BlockingSpec:
        """The same setup at other layers (None: the caller's default)."""
        from dataclasses import replace

        return replace(self, layers=None if layers is None else tuple(int(l) for l in layers))


def _check_subspace(sub: tuple) -> tuple:
    if sub and sub[0] in ("rank", "harmpca") and len(sub) == 2 and _is_int(sub[1]) and sub[1] >= 1:
        return (sub[0], int(sub[1]))
    if sub in (("refusal",), ("full",)):
        return sub
    if sub and sub[0] == "random" and len(sub) in (2, 3) and _is_int(sub[1]) and sub[1] >= 1:
        draw = sub[2] if len(sub) == 3 else 0
        if _is_int(draw) and draw >= 0:
            return ("random", int(sub[1]), int(draw))
    raise InterventionError(
        f"subspace must be None, ('rank', k), ('random', k, draw), ('refusal',), ('harmpca', k) or ('full',) "
        f"with k >= 1 and draw >= 0, got {sub!r}."
    )


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _too_large(what: str, n: int) -> InterventionError:
    return InterventionError(
        f"{what} {n} is too large: ranks, draws, rows, prompts and layers must be below 2**63 = {INT_LIMIT} "
        "(draws seed 64-bit random generators); choose a smaller number."
    )


def _check_limits(spec: BlockingSpec) -> None:
    """Refuse whole numbers that do not fit in 64 bits (before anything uses them)."""
    named = [("sample", spec.sample), ("replay", spec.replay)]
    if spec.subspace is not None and len(spec.subspace) > 1:
        named.append((f"{spec.subspace[0]}@ rank", spec.subspace[1]))
        if len(spec.subspace) > 2:
            named.append(("random@ draw", spec.subspace[2]))
    named += [("layer", l) for l in spec.layers or ()]
    for what, n in named:
        if _is_int(n) and n >= INT_LIMIT:
            raise _too_large(what, n)


def _weight(text: str, part: str, value: str) -> float:
    if not value:
        raise _bad(text, part, "missing weight after '@'")
    try:
        w = float(value)
    except ValueError:
        raise _bad(text, part, f"{value!r} is not a number") from None
    if not math.isfinite(w) or w <= 0:
        raise _bad(text, part, "the weight must be a finite number > 0 (leave the part out for none)")
    return w


def _integer(text: str, part: str, value: str, minimum: int) -> int:
    if not value:
        raise _bad(text, part, "missing number after '@'")
    if not (value.isascii() and value.isdigit()):
        raise _bad(text, part, f"{value!r} is not a whole number >= {minimum}")
    if len(value.lstrip("0")) > len(str(INT_LIMIT)):  # int() of thousands of digits is slow, then refused
        raise _bad(
            text,
            part,
            f"{value[:20]}... is too large: whole numbers must be below 2**63 = {INT_LIMIT}; choose a smaller one",
        )
    n = int(value)
    if n < minimum:
        raise _bad(text, part, f"{n} is below {minimum}")
    if n >= INT_LIMIT:
        raise _bad(
            text, part, f"{n} is too large: whole numbers must be below 2**63 = {INT_LIMIT}; choose a smaller one"
        )
    return n
