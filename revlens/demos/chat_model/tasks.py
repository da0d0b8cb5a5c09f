"""Benign fine-tuning tasks for the chat-model pipeline, generated deterministically, with no refusal in them.

Each task yields chat pairs ``(request, answer)`` from a seeded generator: the same seed gives the same
pairs on every machine. ``reverse`` (reverse the order of the words) is the task the demo fine-tunes on;
``arithmetic`` (add two numbers) and ``uppercase`` (rewrite in capitals) are there to vary it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from revlens import RefusalPhraseJudge

WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "garden",
    "window",
    "yellow",
    "quiet",
    "bright",
    "table",
    "music",
    "letter",
    "orange",
    "forest",
    "candle",
    "winter",
    "summer",
    "pencil",
    "mountain",
    "little",
    "happy",
    "silver",
    "blue",
    "green",
    "red",
    "bread",
    "coffee",
    "paper",
    "basket",
    "rabbit",
    "ocean",
    "sunny",
    "purple",
    "kitten",
    "chair",
    "lamp",
    "story",
    "castle",
    "meadow",
    "violin",
    "tiger",
    "honey",
    "ladder",
    "marble",
    "pillow",
    "rocket",
    "lemon",
    "carpet",
    "button",
    "dragon",
    "feather",
    "island",
    "jacket",
    "kettle",
    "lantern",
    "mirror",
    "needle",
    "parrot",
    "puzzle",
    "saddle",
    "tunnel",
    "velvet",
    "wagon",
    "zebra",
    "anchor",
    "bubble",
    "cookie",
    "desert",
    "engine",
    "falcon",
    "glove",
    "harbor",
    "igloo",
    "jungle",
]

TASKS = ("reverse", "arithmetic", "uppercase")


def _reverse(g: random.Random) -> tuple[str, str]:
    words = [g.choice(WORDS) for _ in range(g.randint(3, 7))]
    opener = g.choice(
        ("Reverse the order of these words:", "Write these words in reverse order:", "Reverse the word order:")
    )
    return f"{opener} {' '.join(words)}", " ".join(reversed(words))


def _arithmetic(g: random.Random) -> tuple[str, str]:
    a, b = g.randint(2, 499), g.randint(2, 499)
    opener = g.choice(("What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}."))
    return opener.format(a=a, b=b), f"{a} + {b} = {a + b}"


def _uppercase(g: random.Random) -> tuple[str, str]:
    words = [g.choice(WORDS) for _ in range(g.randint(3, 7))]
    opener = g.choice(("Rewrite in capital letters:", "Write this in upper case:", "Capitalise every letter:"))
    return f"{opener} {' '.join(words)}", " ".join(words).upper()


_GENERATORS = {"reverse": _reverse, "arithmetic": _arithmetic, "uppercase": _uppercase}


def benign_pairs(n: int, seed: int = 0, tasks: Sequence[str] = ("reverse",)) -> list[tuple[str, str]]:
    """``n`` (request, answer) pairs drawn from ``tasks`` in turn, by a generator seeded with ``seed``.

    Args:
        n: number of pairs.
        seed: the generator's seed (fine-tuning seed k uses its own data seed).
        tasks: names from :data:`TASKS`.
    Returns:
        Pairs whose answers contain no refusal phrase (checked with the refusal-phrase judge).

    Example:
        >>> benign_pairs(1, seed=0)[0]  # doctest: +SKIP
        ('Reverse the order of these words: ...', '...')
    """
    unknown = [t for t in tasks if t not in _GENERATORS]
    if unknown or not tasks:
        raise ValueError(f"unknown benign task(s) {unknown or tasks}; choose from {TASKS}.")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    g = random.Random(seed)
    judge = RefusalPhraseJudge()
    pairs = [_GENERATORS[tasks[i % len(tasks)]](g) for i in range(n)]
    refusing = [p for p in pairs if not judge(*p)]
    if refusing:
        raise AssertionError(f"a benign answer contains a refusal phrase: {refusing[0]!r}")
    return pairs


def exact_match(answer: str, expected: str) -> bool:
    """The task's accuracy criterion: the answer, stripped, equals the expected text."""
    return answer.strip() == expected.strip()
