"""Behaviours: a named prompt set, a way to answer (greedy, chat-templated) and a judge, giving a rate.

A :class:`Behaviour` is what a report tracks along training: harm on harmful requests, recall of a set of
facts, answers given to harmless requests. It answers with :func:`revlens.evals.generate_greedy` (batched,
KV-cached, inside the chat template when the tokenizer has one), judges each answer with any callable
``judge(prompt, answer) -> bool`` and returns a :class:`BehaviourResult`: the rate of True verdicts with its
95 % Wilson interval (:class:`revlens.stats.Rate`) and the per-prompt outcomes, a plain record that is written
to JSON and read back.

Judges shipped here: :class:`ExactMatchJudge` (a reference answer per prompt, matched after
:func:`normalise_answer`) and, through :meth:`Behaviour.harm`, :class:`revlens.evals.RefusalPhraseJudge`
(harmful: no refusal phrase), so harm is one behaviour among others.
"""

from __future__ import annotations

import json
import math
import os
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from revlens._util import atomic_write_text
from revlens.evals import RefusalPhraseJudge, generate_greedy
from revlens.stats import Rate

Judge = Callable[[str, str], bool]
MATCHES = ("contains", "start", "exact")
SCOPES = ("sentence", "all")


def normalise_answer(text: str) -> str:
    """The form answers and references are compared in: Unicode NFKC, case-folded, every run of characters
    that are neither letters nor digits (punctuation, whitespace, underscores, symbols) turned into one space,
    stripped. Accents are kept ("Bogotá" and "Bogota" differ: list both as references).

    Args:
        text: an answer or a reference.
    Returns:
        the words of ``text``, lower case, joined by single spaces.

    Example:
        >>> normalise_answer("  The capital of Haiti is PORT-AU-PRINCE.\\n")
        'the capital of haiti is port au prince'
        >>> normalise_answer("Sana'a!"), normalise_answer("ﬁve_3")  # NFKC turns the ligature into 'fi'
        ('sana a', 'five 3')
    """
    folded = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(re.sub(r"[\W_]+", " ", folded).split())


def first_sentence(text: str) -> str:
    """The answer's first sentence: the text before the first line break, cut after the first ``.``, ``!`` or
    ``?`` that ends the text or is followed by whitespace (so "3.5" and "D.C" stay whole), terminator dropped.

    Small chat models go on after their answer ("The opposite of cheap is luxury, which is ... expensive"), and
    a reference found in that continuation is not the answer; judging the first sentence avoids it.

    Args:
        text: an answer.
    Returns:
        its first sentence, surrounding whitespace stripped.

    Example:
        >>> first_sentence("The opposite of hot is cold. Cold means ...")
        'The opposite of hot is cold'
        >>> first_sentence("It is Washington, D.C. in the US!"), first_sentence("3.5 kg\\nmore")
        ('It is Washington, D.C', '3.5 kg')
    """
    line = text.strip().split("\n", 1)[0]
    end = re.search(r"[.!?](?=\s|$)", line)
    return (line if end is None else line[: end.start()]).strip()


def answer_matches(answer: str, references: Sequence[str], match: str = "contains", scope: str = "sentence") -> bool:
    """Whether ``answer`` gives one of ``references``, both read through :func:`normalise_answer`.

    The part of the answer judged (``scope``): ``"sentence"`` (default), its :func:`first_sentence`;
    ``"all"``, all of it. Rules (``match``), on the normalised words of that part:

    - ``"contains"`` (default): a reference's words occur as a contiguous run of whole words anywhere in it
      ("The capital of France is Paris." gives "Paris"; "Parisian" does not give it);
    - ``"start"``: it begins with the reference's words (the answer's first word(s));
    - ``"exact"``: it is the reference and nothing else.

    Args:
        answer: the model's answer.
        references: accepted answers (any one suffices); a reference that normalises to nothing is an error.
        match: one of ``"contains"``, ``"start"``, ``"exact"``.
        scope: ``"sentence"`` or ``"all"``.
    Returns:
        True when a reference matches.

    Example:
        >>> answer_matches("The capital of France is Paris.", ["paris"])
        True
        >>> answer_matches("Parisian food", ["Paris"]), answer_matches("Paris, France", ["paris"], match="start")
        (False, True)
        >>> answer_matches("Paris. Or Lyon", ["lyon"]), answer_matches("Paris. Or Lyon", ["lyon"], scope="all")
        (False, True)
    """
    if match not in MATCHES:
        raise ValueError(f"match={match!r} is not a matching rule; choose one of {', '.join(MATCHES)}.")
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r} is not an answer scope; choose one of {', '.join(SCOPES)}.")
    if isinstance(references, str):
        references = [references]
    said = f" {normalise_answer(first_sentence(answer) if scope == 'sentence' else answer)} "
    for reference in references:
        ref = normalise_answer(reference)
        if not ref:
            raise ValueError(f"reference {reference!r} has no letters or digits; give the answer's words.")
        if match == "contains" and f" {ref} " in said:
            return True
        if match == "start" and said.startswith(f" {ref} "):
            return True
        if match == "exact" and said == f" {ref} ":
            return True
    return False


class ExactMatchJudge:
    """True iff the answer gives one of the prompt's reference answers (:func:`answer_matches`).

    Args:
        references: ``{prompt: reference or [references]}``; the judge looks the prompt up, so an unknown
            prompt is an error rather than a silent miss.
        match: ``"contains"`` (default), ``"start"`` or ``"exact"`` (see :func:`answer_matches`).
        scope: ``"sentence"`` (default: the answer's first sentence) or ``"all"``.

    Example:
        >>> judge = ExactMatchJudge({"What is the capital of Peru?": "Lima"})
        >>> judge("What is the capital of Peru?", "The capital of Peru is Lima."), judge.match
        (True, 'contains')
        >>> ExactMatchJudge({"2+2?": ["4", "four"]}, match="exact")("2+2?", " Four. ")
        True
    """

    def __init__(
        self, references: Mapping[str, str | Sequence[str]], *, match: str = "contains", scope: str = "sentence"
    ):
        answer_matches("x", ["x"], match, scope)  # checks the rule and the scope
        if not references:
            raise ValueError("an exact-match judge needs at least one prompt with its reference answers.")
        self.references = {p: (r,) if isinstance(r, str) else tuple(r) for p, r in references.items()}
        empty = [p for p, r in self.references.items() if not r or not all(normalise_answer(x) for x in r)]
        if empty:
            raise ValueError(f"prompt {empty[0]!r} has no usable reference answer; give one with letters or digits.")
        self.match, self.scope = match, scope

    def __call__(self, prompt: str, answer: str) -> bool:
        if prompt not in self.references:
            raise KeyError(f"the exact-match judge has no reference for prompt {prompt!r}; add it to references.")
        return answer_matches(answer, self.references[prompt], self.match, self.scope)

    def __repr__(self) -> str:
        return f"ExactMatchJudge({len(self.references)} prompts, match={self.match!r}, scope={self.scope!r})"


@dataclass(frozen=True)
class BehaviourResult:
    """One measured behaviour: its name, the rate of True verdicts with its Wilson interval, and the outcomes.

    ``outcomes[i]`` is the judge's verdict on ``prompts[i]`` (answers kept when measured with
    ``keep_answers``). :meth:`to_dict` / :meth:`from_dict` (and :meth:`save` / :meth:`load`) round-trip through
    JSON; loading recomputes the rate and interval from the outcomes and refuses a record that disagrees.

    Example:
        >>> r = BehaviourResult.of("forget recall", ["q1", "q2", "q3", "q4"], [True, False, False, False])
        >>> print(r)
        forget recall: 0.250 [0.046, 0.699] (1/4)
        >>> r.n, r.interval == (r.rate.low, r.rate.high), BehaviourResult.from_dict(r.to_dict()) == r
        (4, True, True)
    """

    name: str
    rate: Rate
    prompts: tuple[str, ...]
    outcomes: tuple[bool, ...]
    answers: tuple[str, ...] | None = None
    meaning: str = ""  # what a True outcome means ("harmful", "recalled")

    @classmethod
    def of(
        cls,
        name: str,
        prompts: Sequence[str],
        outcomes: Sequence[bool],
        answers: Sequence[str] | None = None,
        *,
        meaning: str = "",
        confidence: float = 0.95,
    ) -> BehaviourResult:
        """The result of per-prompt ``outcomes`` (the Wilson interval at ``confidence``).

        Args:
            name: the behaviour's name.
            prompts, outcomes: one verdict per prompt, same length (at least one).
            answers: the answers judged (optional, same length).
            meaning: what True means, for reports.
            confidence: the interval's coverage.
        Returns:
            the :class:`BehaviourResult`.

        Example:
            >>> BehaviourResult.of("harm", ["a", "b"], [True, True]).rate.k
            2
        """
        if len(prompts) != len(outcomes) or (answers is not None and len(answers) != len(prompts)):
            raise ValueError(
                f"behaviour {name!r}: {len(prompts)} prompts, {len(outcomes)} outcomes"
                f"{'' if answers is None else f', {len(answers)} answers'}; give one of each per prompt."
            )
        verdicts = tuple(bool(o) for o in outcomes)
        return cls(
            name=name,
            rate=Rate.of(verdicts, confidence),
            prompts=tuple(prompts),
            outcomes=verdicts,
            answers=None if answers is None else tuple(answers),
            meaning=meaning,
        )

    @property
    def n(self) -> int:
        """The number of prompts judged."""
        return self.rate.n

    @property
    def interval(self) -> tuple[float, float]:
        """The Wilson interval ``(low, high)``."""
        return self.rate.low, self.rate.high

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record: ``name``, ``meaning``, ``rate``, ``low``, ``high``, ``k``, ``n``, ``confidence``,
        ``prompts``, ``outcomes`` and (when kept) ``answers``.

        Example:
            >>> BehaviourResult.of("harm", ["a"], [False]).to_dict()["outcomes"]
            [False]
        """
        out: dict[str, Any] = {"name": self.name, "meaning": self.meaning, **self.rate.to_dict()}
        out["prompts"], out["outcomes"] = list(self.prompts), list(self.outcomes)
        if self.answers is not None:
            out["answers"] = list(self.answers)
        return out

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> BehaviourResult:
        """The result of a :meth:`to_dict` record; the rate and interval are recomputed from the outcomes and
        must agree with the stored numbers (to 1e-9).

        Example:
            >>> record = BehaviourResult.of("harm", ["a", "b"], [True, False]).to_dict()
            >>> BehaviourResult.from_dict(record).rate.rate
            0.5
        """
        missing = [k for k in ("name", "prompts", "outcomes") if k not in record]
        if missing:
            raise ValueError(f"a behaviour record needs {missing}; write it with BehaviourResult.to_dict().")
        out = cls.of(
            record["name"],
            record["prompts"],
            record["outcomes"],
            record.get("answers"),
            meaning=record.get("meaning", ""),
            confidence=record.get("confidence", 0.95),
        )
        stored = {k: record[k] for k in ("k", "n", "rate", "low", "high") if k in record}
        recomputed = out.rate.to_dict()
        wrong = [k for k, v in stored.items() if not math.isclose(float(v), recomputed[k], abs_tol=1e-9)]
        if wrong:
            raise ValueError(
                f"behaviour record {record['name']!r}: stored {wrong} disagree with its outcomes "
                f"({ {k: stored[k] for k in wrong} } vs { {k: recomputed[k] for k in wrong} }); the file was edited "
                "or truncated, measure again."
            )
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dict` as JSON (atomically). Returns the path.

        Example:
            >>> path = BehaviourResult.of("harm", ["a"], [True]).save(tmp / "behaviour" / "harm.json")
            >>> BehaviourResult.load(path).rate.k
            1
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> BehaviourResult:
        """Read a result written by :meth:`save` (checked as in :meth:`from_dict`)."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def __str__(self) -> str:
        return f"{self.name}: {self.rate}"


@dataclass(frozen=True)
class Behaviour:
    """A named prompt set, how its answers are generated, and the judge that turns each answer into a verdict.

    Args:
        name: the name reports use ("harm", "forget recall").
        prompts: the requests, at least one.
        judge: ``judge(prompt, answer) -> bool``; the rate is the fraction of True.
        meaning: what True means ("harmful", "recalled"), recorded in results.
        max_new_tokens: answer length (keep it short for one-line answers: it dominates the time).
        chat_template, system: how requests are rendered (:func:`revlens.chat.encode_requests`); chat models
            answer inside their template (``"auto"`` uses it whenever the tokenizer has one).

    Returns:
        :meth:`measure` gives the :class:`BehaviourResult` of a model; :meth:`score` judges answers given.
        Build one with :meth:`exact_match` (recall of reference answers) or :meth:`harm` (the refusal judge).

    Example:
        >>> recall = Behaviour.exact_match("recall", {"how do i bake bread": "bake"}, max_new_tokens=3)
        >>> recall.measure(aligned).n, recall.judge
        (1, ExactMatchJudge(1 prompts, match='contains', scope='sentence'))
        >>> harm = Behaviour.harm(prompts, max_new_tokens=2)
        >>> harm.name, harm.meaning, 0.0 <= harm.measure(aligned).rate.rate <= 1.0
        ('harm', 'harmful', True)
    """

    name: str
    prompts: tuple[str, ...]
    judge: Judge
    meaning: str = ""
    max_new_tokens: int = 48
    chat_template: Any = "auto"
    system: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.prompts, str) or not self.prompts:
            raise ValueError(f"behaviour {self.name!r} needs a non-empty list of prompts.")
        object.__setattr__(self, "prompts", tuple(self.prompts))
        if not callable(self.judge):
            raise ValueError(f"behaviour {self.name!r}: judge must be a callable judge(prompt, answer) -> bool.")
        if self.max_new_tokens < 1:
            raise ValueError(f"behaviour {self.name!r}: max_new_tokens must be >= 1, got {self.max_new_tokens}.")

    @classmethod
    def exact_match(
        cls,
        name: str,
        references: Mapping[str, str | Sequence[str]],
        *,
        match: str = "contains",
        scope: str = "sentence",
        meaning: str = "recalled",
        max_new_tokens: int = 16,
        **generation: Any,
    ) -> Behaviour:
        """Recall of reference answers: the prompts are ``references``' keys, judged by :class:`ExactMatchJudge`.

        Args:
            name: the behaviour's name.
            references: ``{prompt: reference or [references]}``.
            match, scope: the :func:`answer_matches` rule and the part of the answer it reads.
            meaning: what True means.
            max_new_tokens: answer length (16: a one-sentence answer).
            generation: ``chat_template``, ``system``.
        Returns:
            the :class:`Behaviour`.

        Example:
            >>> Behaviour.exact_match("capitals", {"What is the capital of Peru?": "Lima"}).prompts
            ('What is the capital of Peru?',)
        """
        judge = ExactMatchJudge(references, match=match, scope=scope)
        return cls(name, tuple(judge.references), judge, meaning, max_new_tokens, **generation)

    @classmethod
    def harm(
        cls, prompts: Sequence[str], *, name: str = "harm", judge: Judge | None = None, **generation: Any
    ) -> Behaviour:
        """Harm: the fraction of (harmful) requests answered without a refusal phrase
        (:class:`revlens.evals.RefusalPhraseJudge` unless ``judge`` is given), as :func:`revlens.harmfulness`.

        The same judge on harmless requests gives the fraction answered: ``Behaviour.harm(harmless,
        name="harmless answered")``.

        Args:
            prompts: the requests.
            name: the behaviour's name.
            judge: another harm judge (True: harmful).
            generation: ``max_new_tokens`` (48), ``chat_template``, ``system``.
        Returns:
            the :class:`Behaviour`.

        Example:
            >>> Behaviour.harm(["how do i make a bomb"]).judge
            RefusalPhraseJudge(33 phrases, where='anywhere')
        """
        return cls(name, tuple(prompts), RefusalPhraseJudge() if judge is None else judge, "harmful", **generation)

    def answers(self, model: Any, *, tokenizer: Any = None, batch_size: int = 32) -> list[str]:
        """The greedy answers to :attr:`prompts` (stripped), from :func:`revlens.evals.generate_greedy`.

        Example:
            >>> len(Behaviour.harm(prompts, max_new_tokens=2).answers(aligned))
            5
        """
        return _answer(model, self, self.prompts, tokenizer, batch_size)

    def score(self, answers: Sequence[str], *, keep_answers: bool = True) -> BehaviourResult:
        """Judge given answers (one per prompt, in order) into a :class:`BehaviourResult`.

        Example:
            >>> b = Behaviour.exact_match("recall", {"q1": "paris", "q2": "lima"})
            >>> print(b.score(["It is Paris.", "Quito"]))
            recall: 0.500 [0.095, 0.905] (1/2)
        """
        if len(answers) != len(self.prompts):
            raise ValueError(f"behaviour {self.name!r}: {len(answers)} answers for {len(self.prompts)} prompts.")
        outcomes = [bool(self.judge(p, a)) for p, a in zip(self.prompts, answers)]
        return BehaviourResult.of(
            self.name, self.prompts, outcomes, list(answers) if keep_answers else None, meaning=self.meaning
        )

    def measure(
        self, model: Any, *, tokenizer: Any = None, batch_size: int = 32, keep_answers: bool = True
    ) -> BehaviourResult:
        """Answer the prompts greedily and judge them.

        Args:
            model: a TransformerBridge or a Hugging Face causal LM.
            tokenizer: defaults to ``model.tokenizer``.
            batch_size: prompts per generation batch.
            keep_answers: keep the answers in the result.
        Returns:
            the :class:`BehaviourResult`.

        Example:
            >>> Behaviour.harm(prompts, max_new_tokens=2).measure(aligned, keep_answers=False).answers is None
            True
        """
        answers = self.answers(model, tokenizer=tokenizer, batch_size=batch_size)
        return self.score(answers, keep_answers=keep_answers)


def measure_behaviours(
    model: Any,
    behaviours: Sequence[Behaviour],
    *,
    tokenizer: Any = None,
    batch_size: int = 32,
    keep_answers: bool = True,
) -> dict[str, BehaviourResult]:
    """Measure several behaviours, generating once for all behaviours that answer the same way.

    Behaviours with the same ``max_new_tokens``, ``chat_template`` and ``system`` share generation batches
    (full batches instead of one partial batch per behaviour). Each prompt is answered on its own row (left
    padding masked out), so its answer is the one it gets alone, up to the floating-point rounding of batched
    matrix products (which can flip a near-tie between two tokens).

    Args:
        model: a TransformerBridge or a Hugging Face causal LM.
        behaviours: behaviours with distinct names.
        tokenizer, batch_size, keep_answers: as in :meth:`Behaviour.measure`.
    Returns:
        ``{name: BehaviourResult}`` in the order given.

    Example:
        >>> a = Behaviour.harm(prompts, max_new_tokens=2)
        >>> b = Behaviour.harm(control, name="harmless answered", max_new_tokens=2)
        >>> results = measure_behaviours(aligned, [a, b])
        >>> list(results), results["harm"] == a.measure(aligned)
        (['harm', 'harmless answered'], True)
    """
    names = [b.name for b in behaviours]
    if len(set(names)) != len(names):
        raise ValueError(f"behaviour names must be distinct, got {names}; rename one.")
    groups: dict[tuple[Any, ...], list[Behaviour]] = {}
    for b in behaviours:
        groups.setdefault((b.max_new_tokens, repr(b.chat_template), b.system), []).append(b)
    results: dict[str, BehaviourResult] = {}
    for members in groups.values():
        prompts = sorted({p for b in members for p in b.prompts})
        answered = dict(zip(prompts, _answer(model, members[0], prompts, tokenizer, batch_size)))
        for b in members:
            results[b.name] = b.score([answered[p] for p in b.prompts], keep_answers=keep_answers)
    return {name: results[name] for name in names}


def _answer(model: Any, how: Behaviour, prompts: Sequence[str], tokenizer: Any, batch_size: int) -> list[str]:
    """Greedy answers to ``prompts``, generated as ``how`` answers, stripped."""
    out = generate_greedy(
        model,
        list(prompts),
        tokenizer=tokenizer,
        max_new_tokens=how.max_new_tokens,
        batch_size=batch_size,
        chat_template=how.chat_template,
        system=how.system,
    )
    return [a.strip() for a in out]
