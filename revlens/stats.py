"""Uncertainty for behaviour rates: Wilson score intervals and the exact McNemar test on paired outcomes.

A harmfulness or refusal rate measured on a few hundred prompts moves by several points between runs of the
same model; these helpers say how much. :func:`wilson_interval` (and :class:`Rate`, which carries it) bounds
one rate; :func:`mcnemar_exact` says whether two models (or one model before and after fine-tuning) differ
on the *same* prompts, using only the prompts on which they disagree.

Both are written out in closed form with the standard library, so the numbers do not depend on a scipy
version; the tests check them against scipy.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from statistics import NormalDist


def _check_unit_open(value: float, name: str, example: str) -> None:
    if not isinstance(value, numbers.Real) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must be a number strictly between 0 and 1, got {value!r}; pass e.g. {example}.")


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion ``k / n`` (no continuity correction).

    Unlike the normal (Wald) interval it stays inside [0, 1] and keeps a width at ``k = 0`` and ``k = n``,
    where behaviour rates often sit (no refusals, all refusals). Closed form (Wilson 1927; Newcombe 1998):
    ``(p + z^2/2n ± z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)`` with ``z`` the two-sided normal quantile.

    Args:
        k: number of successes (e.g. harmful completions), ``0 <= k <= n``.
        n: number of trials (prompts), at least 1.
        confidence: two-sided coverage, strictly between 0 and 1 (0.95: a 95 % interval).

    Returns:
        ``(low, high)``, with ``low = 0.0`` exactly when ``k == 0`` and ``high = 1.0`` exactly when ``k == n``.

    Example:
        >>> low, high = wilson_interval(84, 200)
        >>> round(low, 4), round(high, 4)
        (0.3537, 0.4893)
        >>> wilson_interval(0, 10, confidence=0.9)[0]
        0.0
    """
    if not isinstance(n, numbers.Integral) or not isinstance(k, numbers.Integral):
        raise ValueError(
            f"k and n must be whole counts, got k={k!r}, n={n!r}; pass the number of successes and trials."
        )
    k, n = int(k), int(n)
    if n <= 0:
        raise ValueError(
            f"a Wilson interval needs at least one trial, got n={n}: a rate over no outcomes is undefined; "
            "evaluate at least one prompt (or report the count without an interval)."
        )
    if not 0 <= k <= n:
        raise ValueError(f"k={k} successes is outside 0..n={n}; k counts the successes among the n trials.")
    _check_unit_open(confidence, "confidence", "0.95")
    z = NormalDist().inv_cdf(0.5 + 0.5 * float(confidence))
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n))
    low = 0.0 if k == 0 else max(0.0, center - half)
    high = 1.0 if k == n else min(1.0, center + half)
    return low, high


@dataclass(frozen=True)
class Rate:
    """A rate ``k / n`` with its Wilson interval at ``confidence``: what a report should print for a behaviour rate.

    Build it with :meth:`Rate.of` (from per-prompt outcomes) or :meth:`Rate.from_counts`.

    Example:
        >>> r = Rate.from_counts(84, 200)
        >>> print(r)
        0.420 [0.354, 0.489] (84/200)
        >>> r.to_dict()["n"], Rate.of([True, False, False, True]).k
        (200, 2)
    """

    k: int
    n: int
    rate: float
    low: float
    high: float
    confidence: float = 0.95

    @classmethod
    def from_counts(cls, k: int, n: int, confidence: float = 0.95) -> Rate:
        """The rate ``k / n`` and its Wilson interval.

        Args:
            k: number of successes, ``0 <= k <= n``.
            n: number of trials, at least 1.
            confidence: two-sided coverage of the interval.

        Returns:
            the :class:`Rate`.

        Example:
            >>> Rate.from_counts(0, 20).high < 0.2
            True
        """
        low, high = wilson_interval(k, n, confidence)
        return cls(int(k), int(n), int(k) / int(n), low, high, float(confidence))

    @classmethod
    def of(cls, outcomes: Sequence[bool], confidence: float = 0.95) -> Rate:
        """The rate of True among ``outcomes`` (one per prompt) and its Wilson interval.

        Args:
            outcomes: per-prompt booleans, e.g. a judge's verdicts (True: harmful); at least one.
            confidence: two-sided coverage of the interval.

        Returns:
            the :class:`Rate`.

        Example:
            >>> print(Rate.of([True, True, False, False, False]))
            0.400 [0.118, 0.769] (2/5)
        """
        values = [bool(o) for o in outcomes]
        if not values:
            raise ValueError("Rate.of got no outcomes; pass one boolean per evaluated prompt (at least one).")
        return cls.from_counts(sum(values), len(values), confidence)

    def to_dict(self) -> dict[str, float | int]:
        """The fields as plain JSON-ready numbers.

        Returns:
            ``{"k", "n", "rate", "low", "high", "confidence"}``.

        Example:
            >>> Rate.from_counts(1, 2).to_dict()["rate"]
            0.5
        """
        return {
            "k": self.k,
            "n": self.n,
            "rate": float(self.rate),
            "low": float(self.low),
            "high": float(self.high),
            "confidence": float(self.confidence),
        }

    def __str__(self) -> str:
        return f"{self.rate:.3f} [{self.low:.3f}, {self.high:.3f}] ({self.k}/{self.n})"


@dataclass(frozen=True)
class McNemar:
    """The exact McNemar test of two paired outcome lists: the discordant counts, the p-value and the verdict.

    ``only_a`` counts prompts where outcome ``a`` is True and ``b`` False, ``only_b`` the reverse;
    ``significant`` is ``p_value < alpha``.

    Example:
        >>> m = mcnemar_exact([True, True, False], [False, True, True])
        >>> m.only_a, m.only_b, m.p_value, m.significant
        (1, 1, 1.0, False)
    """

    only_a: int
    only_b: int
    p_value: float
    significant: bool
    alpha: float = 0.05

    def to_dict(self) -> dict[str, float | int | bool]:
        """The fields as plain JSON-ready values.

        Returns:
            ``{"only_a", "only_b", "p_value", "significant", "alpha"}``.

        Example:
            >>> mcnemar_exact([True] * 6, [False] * 6).to_dict()["p_value"]
            0.03125
        """
        return {
            "only_a": self.only_a,
            "only_b": self.only_b,
            "p_value": float(self.p_value),
            "significant": bool(self.significant),
            "alpha": float(self.alpha),
        }


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool], alpha: float = 0.05) -> McNemar:
    """The exact two-sided McNemar test: do paired outcomes ``a`` and ``b`` on the same prompts differ in rate?

    Only discordant prompts carry information: under the null each is equally likely to favour ``a`` or ``b``,
    so ``only_a ~ Binomial(only_a + only_b, 1/2)``. The two-sided p-value is
    ``min(1, 2 P[X <= min(only_a, only_b)])``, computed exactly with integer binomial coefficients
    (``math.comb`` and :class:`fractions.Fraction`), so it holds for any count without underflow.
    With no discordant prompt the p-value is 1.

    Args:
        a: per-prompt outcomes of the first model (e.g. True: harmful), in prompt order.
        b: per-prompt outcomes of the second model on the same prompts, same length and order.
        alpha: significance level, strictly between 0 and 1.

    Returns:
        a :class:`McNemar` with the discordant counts, the p-value and ``significant = p_value < alpha``.

    Example:
        >>> before = [False] * 10
        >>> after = [True] * 6 + [False] * 4
        >>> m = mcnemar_exact(after, before)
        >>> m.only_a, m.only_b, m.p_value, m.significant
        (6, 0, 0.03125, True)
    """
    a_values, b_values = [bool(x) for x in a], [bool(x) for x in b]
    if len(a_values) != len(b_values):
        raise ValueError(
            f"mcnemar_exact needs paired outcomes of the same prompts, but a has {len(a_values)} and b has "
            f"{len(b_values)}; pass both models' outcomes on the same prompt list, in the same order."
        )
    if not a_values:
        raise ValueError("mcnemar_exact got no pairs; pass both models' outcomes on at least one prompt.")
    _check_unit_open(alpha, "alpha", "0.05")
    only_a = sum(x and not y for x, y in zip(a_values, b_values))
    only_b = sum(y and not x for x, y in zip(a_values, b_values))
    m = only_a + only_b
    if m == 0:
        p_value = 1.0
    else:
        tail = sum(math.comb(m, i) for i in range(min(only_a, only_b) + 1))
        p_value = float(min(Fraction(1), Fraction(2 * tail, 2**m)))
    return McNemar(only_a, only_b, p_value, p_value < alpha, float(alpha))
