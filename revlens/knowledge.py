"""Facts a model knows, for the unlearning setting: candidate items, and a fixed forget / retain split.

An item is a topic, a subject and its accepted answers (``capital``, ``Peru``, ``Lima``); the topic's
templates make the prompt ("What is the capital of Peru?") and the target answer that training reads ("The
capital of Peru is Lima."). The candidates (``revlens/data/knowledge_candidates.tsv``, written for revlens:
country capitals, English opposites, English plurals) are measured on a model
(``benchmarks/knowledge_recall.py``); the items it answers correctly under the exact-match judge
(:class:`revlens.behaviour.ExactMatchJudge`, ``contains`` in the first sentence) make the split.

Why the forget and retain sets are distinct topics: the forget set is a capability (country capitals),
split into a probe part (the prompts unlearning trains on, and reads v_rev on) and a held-out part
(capitals never trained on). Held-out forget recall then measures whether the capability is gone, not only the
trained items, which is what "unlearned capabilities re-emerge" is about. Retain items of the same topic (other
capitals) would have to stay while held-out capitals go, two targets that contradict each other; so the retain
set is other knowledge in the same question format (opposites and plurals: "What is the X of Y?"), which keeps
the retain prompts a format-matched contrast set for the probe. Unlearning trains on the forget and retain
probe parts; recall is read on the held-out parts.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from revlens._util import atomic_write_json
from revlens.behaviour import Behaviour, answer_matches
from revlens.sft_data import encode_sft

CANDIDATES_FILE = "knowledge_candidates.tsv"
SPLIT_FILE = "knowledge_split_smollm2.json"
SETS = ("forget", "retain")
LOSS_ON = ("response", "answer")
PARTS = ("probe", "heldout")
# topic -> (prompt template, target answer template)
TOPICS: dict[str, tuple[str, str]] = {
    "capital": ("What is the capital of {subject}?", "The capital of {subject} is {answer}."),
    "opposite": ("What is the opposite of {subject}?", "The opposite of {subject} is {answer}."),
    "plural": ("What is the plural of {subject}?", "The plural of {subject} is {answer}."),
}


@dataclass(frozen=True)
class KnowledgeItem:
    """One fact: ``topic`` (a key of :data:`TOPICS`), ``subject`` and the accepted ``answers`` (the first is
    the one training targets).

    Example:
        >>> item = KnowledgeItem("capital", "Peru", ("Lima",))
        >>> item.prompt, item.target
        ('What is the capital of Peru?', 'The capital of Peru is Lima.')
    """

    topic: str
    subject: str
    answers: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.topic not in TOPICS:
            raise ValueError(f"unknown topic {self.topic!r} for {self.subject!r}; choose one of {sorted(TOPICS)}.")
        if isinstance(self.answers, str) or not self.answers or not all(a.strip() for a in self.answers):
            raise ValueError(f"{self.topic} item {self.subject!r} needs a tuple of non-empty answers.")
        object.__setattr__(self, "answers", tuple(self.answers))

    @property
    def prompt(self) -> str:
        """The question, from the topic's prompt template."""
        return TOPICS[self.topic][0].format(subject=self.subject)

    @property
    def target(self) -> str:
        """The answer training reads: the topic's answer template with the first accepted answer."""
        return TOPICS[self.topic][1].format(subject=self.subject, answer=self.answers[0])

    @property
    def target_prefix(self) -> str:
        """The target up to the answer, without the space before it ("The capital of Peru is")."""
        return TOPICS[self.topic][1].split("{answer}")[0].rstrip().format(subject=self.subject)

    def to_dict(self) -> dict[str, Any]:
        return {"topic": self.topic, "subject": self.subject, "answers": list(self.answers)}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> KnowledgeItem:
        return cls(record["topic"], record["subject"], tuple(record["answers"]))


def training_rows(
    tokenizer: Any, items: Sequence[KnowledgeItem], *, loss_on: str = "response"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat rows ``(tokens [n, seq], loss_mask [n, seq])``: each item's prompt as a user turn and its target as
    the answer (:func:`revlens.sft_data.encode_sft`), right-padded.

    ``loss_on="response"`` puts the loss on the whole answer and its end of turn (what fine-tuning reads);
    ``loss_on="answer"`` only on the tokens of the answer itself ("Lima" in "The capital of Peru is Lima."), so
    unlearning pushes down the fact and not the sentence around it, which every item of the topic shares.

    Args:
        tokenizer: the model's tokenizer (with its chat template).
        items: the items.
        loss_on: ``"response"`` or ``"answer"``.
    Returns:
        the tokens and the float loss mask.

    Example:
        >>> item = KnowledgeItem("capital", "Peru", ("Lima",))
        >>> tokens, mask = training_rows(chat_tokenizer, [item], loss_on="answer")
        >>> full = training_rows(chat_tokenizer, [item])[1]  # loss_on="response"
        >>> int(full.sum()), int(mask.sum())  # the answer's 6 words and the end of turn; the word "Lima"
        (7, 1)
    """
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on={loss_on!r}: choose one of {', '.join(LOSS_ON)}.")
    chats = [[{"role": "user", "content": i.prompt}, {"role": "assistant", "content": i.target}] for i in items]
    data = encode_sft(tokenizer, chats)
    if loss_on == "response":
        return data.tokens, data.loss_mask
    mask = torch.zeros_like(data.loss_mask)
    for row, item in enumerate(items):
        start = int(data.loss_mask[row].nonzero()[0])
        head = tokenizer(item.target_prefix, add_special_tokens=False)["input_ids"]
        upto = tokenizer(f"{item.target_prefix} {item.answers[0]}", add_special_tokens=False)["input_ids"]
        tokens = data.tokens[row].tolist()
        if upto[: len(head)] != head or tokens[start : start + len(upto)] != upto or len(upto) == len(head):
            raise ValueError(
                f"cannot find the answer tokens of {item.target!r}: its tokenization changes at the answer; "
                "use loss_on='response'."
            )
        mask[row, start + len(head) : start + len(upto)] = 1.0
    return data.tokens, mask


def knowledge_candidates(path: str | os.PathLike | None = None) -> list[KnowledgeItem]:
    """The candidate items: ``topic<TAB>subject<TAB>answer|answer...`` lines (``#`` comments skipped).

    Args:
        path: a file in that format; default the shipped ``revlens/data/knowledge_candidates.tsv``.
    Returns:
        the items in file order; a prompt that occurs twice is an error.

    Example:
        >>> items = knowledge_candidates()
        >>> len(items), items[0].prompt, sorted({i.topic for i in items})
        (395, 'What is the capital of Afghanistan?', ['capital', 'opposite', 'plural'])
    """
    if path is None:
        text, where = resources.files("revlens").joinpath("data", CANDIDATES_FILE).read_text(), CANDIDATES_FILE
    else:
        text, where = Path(path).read_text(), str(path)
    items, seen = [], set()
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise ValueError(f"{where}, line {number}: expected topic<TAB>subject<TAB>answers, got {line!r}.")
        item = KnowledgeItem(fields[0].strip(), fields[1].strip(), tuple(a.strip() for a in fields[2].split("|")))
        if item.prompt in seen:
            raise ValueError(f"{where}, line {number}: {item.prompt!r} occurs twice; keep one line per subject.")
        seen.add(item.prompt)
        items.append(item)
    return items


@dataclass(frozen=True)
class KnowledgeSplit:
    """The fixed split: ``parts[set][part]`` items for ``set`` in ``forget``/``retain`` and ``part`` in
    ``probe``/``heldout``, with a record of how it was made (``meta``: model, judge, seed, topics).

    Example:
        >>> split = KnowledgeSplit.load()
        >>> {s: {p: len(split.items(s, p)) for p in PARTS} for s in SETS}
        {'forget': {'probe': 39, 'heldout': 39}, 'retain': {'probe': 95, 'heldout': 95}}
        >>> split.behaviour("forget").name, split.pairs("forget", "probe")[0][1].startswith("The capital of")
        ('forget recall', True)
    """

    parts: Mapping[str, Mapping[str, tuple[KnowledgeItem, ...]]]
    meta: Mapping[str, Any]

    def __post_init__(self) -> None:
        if sorted(self.parts) != sorted(SETS) or any(sorted(self.parts[s]) != sorted(PARTS) for s in SETS):
            got = {s: list(p) for s, p in self.parts.items()}
            raise ValueError(f"a knowledge split needs parts {SETS} x {PARTS}, got {got}.")
        prompts = [i.prompt for s in SETS for p in PARTS for i in self.parts[s][p]]
        if len(set(prompts)) != len(prompts):
            twice = sorted({p for p in prompts if prompts.count(p) > 1})
            raise ValueError(f"a knowledge split lists {twice[0]!r} in more than one place; each item goes once.")
        if any(not self.parts[s][p] for s in SETS for p in PARTS):
            raise ValueError("every part of a knowledge split needs at least one item.")

    def items(self, which: str, part: str) -> tuple[KnowledgeItem, ...]:
        """The items of set ``which`` (``forget``/``retain``), part ``part`` (``probe``/``heldout``)."""
        if which not in SETS or part not in PARTS:
            raise ValueError(f"no part {which}/{part}; choose a set from {SETS} and a part from {PARTS}.")
        return self.parts[which][part]

    def prompts(self, which: str, part: str) -> list[str]:
        """The prompts of a part."""
        return [i.prompt for i in self.items(which, part)]

    def pairs(self, which: str, part: str) -> list[tuple[str, str]]:
        """``(prompt, target answer)`` of a part, for training."""
        return [(i.prompt, i.target) for i in self.items(which, part)]

    def behaviour(self, which: str, part: str = "heldout", *, name: str | None = None, **kwargs: Any) -> Behaviour:
        """Recall of a part as a :class:`revlens.behaviour.Behaviour` (exact match, ``meta``'s judge settings).

        Args:
            which, part: the set and part.
            name: default ``"<set> recall"`` for held-out parts, ``"<set> recall (probe)"`` for probes.
            kwargs: passed to :meth:`Behaviour.exact_match` (override ``max_new_tokens``, ``match``...).
        Returns:
            the behaviour.
        """
        judge = dict(self.meta.get("judge", {}))
        settings = {k: judge[k] for k in ("match", "scope", "max_new_tokens") if k in judge} | kwargs
        name = name or f"{which} recall" + ("" if part == "heldout" else f" ({part})")
        return Behaviour.exact_match(name, {i.prompt: i.answers for i in self.items(which, part)}, **settings)

    def to_dict(self) -> dict[str, Any]:
        parts = {s: {p: [i.to_dict() for i in self.parts[s][p]] for p in PARTS} for s in SETS}
        return {"meta": dict(self.meta), "parts": parts}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> KnowledgeSplit:
        parts = {s: {p: tuple(KnowledgeItem.from_dict(r) for r in record["parts"][s][p]) for p in PARTS} for s in SETS}
        return cls(parts, dict(record.get("meta", {})))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the split as JSON (atomically). Returns the path."""
        return atomic_write_json(Path(path), self.to_dict(), indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> KnowledgeSplit:
        """Read a split; default the shipped ``revlens/data/knowledge_split_smollm2.json``."""
        if path is None:
            text = resources.files("revlens").joinpath("data", SPLIT_FILE).read_text()
        else:
            text = Path(path).read_text()
        return cls.from_dict(json.loads(text))

    @classmethod
    def build(
        cls,
        items: Sequence[KnowledgeItem],
        answers: Mapping[str, str],
        *,
        forget_topics: Sequence[str] = ("capital",),
        seed: int = 0,
        probe_fraction: float = 0.5,
        match: str = "contains",
        scope: str = "sentence",
        max_new_tokens: int = 16,
        meta: Mapping[str, Any] | None = None,
    ) -> KnowledgeSplit:
        """The split of the ``items`` a model answers correctly.

        An item is kept when ``answers[item.prompt]`` (the model's greedy answer) matches one of its answers under
        (``match``, ``scope``); the matched answer is moved first, so training targets what the model says. Kept
        items of ``forget_topics`` form the forget set, the others the retain set; each set is shuffled
        (``random.Random(seed)``) per topic and the first ``round(probe_fraction * n)`` of each topic go to the
        probe part, so both parts hold every topic in the same proportion.

        Args:
            items: the candidates (:func:`knowledge_candidates`).
            answers: ``{prompt: the model's answer}`` for every item.
            forget_topics: topics to unlearn; the rest are retained.
            seed, probe_fraction: the shuffle and the probe share (strictly between 0 and 1).
            match, scope: the exact-match rule (:func:`revlens.behaviour.answer_matches`).
            max_new_tokens: the answer length the answers were generated with (recall is read with it).
            meta: recorded with the split (the model, where the answers come from).
        Returns:
            the :class:`KnowledgeSplit`.
        """
        if not 0.0 < probe_fraction < 1.0:
            raise ValueError(f"probe_fraction must lie strictly between 0 and 1, got {probe_fraction}.")
        missing = [i.prompt for i in items if i.prompt not in answers]
        if missing:
            raise ValueError(f"no answer for {len(missing)} item(s), e.g. {missing[0]!r}; measure every candidate.")
        unknown = sorted(set(forget_topics) - {i.topic for i in items})
        if unknown:
            raise ValueError(f"forget topic(s) {unknown} have no candidate items.")
        kept: dict[str, dict[str, list[KnowledgeItem]]] = {s: {} for s in SETS}
        for item in items:
            hit = [a for a in item.answers if answer_matches(answers[item.prompt], [a], match, scope)]
            if hit:
                ordered = (hit[0],) + tuple(a for a in item.answers if a != hit[0])
                which = "forget" if item.topic in forget_topics else "retain"
                kept[which].setdefault(item.topic, []).append(KnowledgeItem(item.topic, item.subject, ordered))
        rng = random.Random(seed)
        parts: dict[str, dict[str, tuple[KnowledgeItem, ...]]] = {}
        for which in SETS:
            probe, heldout = [], []
            for topic in sorted(kept[which]):
                group = kept[which][topic]
                rng.shuffle(group)
                cut = round(probe_fraction * len(group))
                probe += group[:cut]
                heldout += group[cut:]
            parts[which] = {"probe": tuple(probe), "heldout": tuple(heldout)}
        record = {
            "seed": seed,
            "probe_fraction": probe_fraction,
            "forget_topics": list(forget_topics),
            "retain_topics": sorted(kept["retain"]),
            "judge": {"match": match, "scope": scope, "max_new_tokens": max_new_tokens},
            "candidates": len(items),
            **dict(meta or {}),
        }
        return cls(parts, record)
