"""The shallow phase of the chat-model pipeline's history, chosen by the recipe (``Recipe.phase``).

The history is pretrain (the model as shipped) -> a shallow phase -> benign fine-tuning, and the shallow phase's
model fills the history's ``align`` slot whatever it is. A :class:`ShallowPhase` says everything that differs
between settings:

- how the phase is trained and calibrated from the shipped model (:meth:`ShallowPhase.pretrain`,
  :meth:`ShallowPhase.train`), and what its data are (:meth:`ShallowPhase.data_digest`, part of the key a kept
  phase is found by);
- which prompts the analysis reads: the probe and its format-matched contrast (:meth:`ShallowPhase.probe_prompts`);
- what every checkpoint is evaluated on (``behaviour``, a name of the pipeline's ``BEHAVIOURS``), which of its
  numbers the tables track (``tracked``: what fine-tuning brings back, lower is better; ``kept``: what the phase
  must leave, higher is better) and the run's default shape (:meth:`ShallowPhase.shape`: blocking modes, the
  steps evaluated);
- what ``replay@R`` replays (:meth:`ShallowPhase.replay_pairs`).

Fine-tuning, the analysis, the blocking comparison and the tables are the same code for every phase.
:class:`RefusalTraining` is the first setting (harm); :class:`revlens.demos.chat_model.unlearning.Unlearning` the
second (unlearned knowledge). A new phase is a subclass, a name in :data:`revlens.demos.chat_model.recipe.PHASES`
and an entry in :func:`phase_of`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from revlens.demos.chat_model.answers import AnswerJobs
from revlens.demos.chat_model.behaviour import evaluate_answers
from revlens.demos.chat_model.data import REFUSAL


@dataclass(frozen=True)
class Tracked:
    """A behaviour the tables track: ``key`` in a checkpoint's behaviour record, ``name`` in tables and figures,
    ``prompts`` what its rate counts (for axis titles)."""

    key: str
    name: str
    prompts: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


class ShallowPhase:
    """What the pipeline needs of a shallow phase (see the module docstring); subclasses fill it in."""

    name: str = ""
    title: str = ""  # the phase's name in printed tables ("align", "unlearn")
    behaviour: str = ""  # the BEHAVIOURS entry every checkpoint is evaluated on
    tracked: Tracked
    kept: Tracked
    metrics: tuple[str, ...] = ()  # the behaviour summary's rows besides the task's
    along: tuple[str, ...] = ()  # what the summary keeps at every evaluated fine-tuning step

    def shape(self, quick: bool) -> dict[str, Any]:
        """Settings of the run's shape this phase changes from the default (``Settings`` / ``Settings.quick``)."""
        return {}

    def data_digest(self, ctx: Any) -> str:
        """A digest of the data the phase trains and is calibrated on."""
        raise NotImplementedError

    def probe_prompts(self, ctx: Any) -> tuple[list[str], list[str]]:
        """``(probe, control)`` requests: where the analysis reads v_rev and the contrast it subtracts."""
        raise NotImplementedError

    def pretrain(
        self, ctx: Any, model: Any, tokenizer: Any, pool: Any, evaluate: bool, train: bool
    ) -> tuple[dict[str, Any] | None, Any]:
        """On the shipped model: its behaviour (``evaluate``; task included) and what :meth:`train` needs from it
        (``train``). The only reference to ``model`` is the caller's argument: drop it when done."""
        raise NotImplementedError

    def train(self, ctx: Any, store: Path, inputs: Any, pool: Any) -> None:
        """Train the phase from pretrain and write it to ``store`` with its record (the pipeline's
        ``ALIGN_RECORD``: ``{"align": what was done, "behaviour": the kept model's behaviour, "settings": key}``)."""
        raise NotImplementedError

    def replay_pairs(self, ctx: Any) -> list[tuple[str, str]]:
        """``(request, answer)`` rows that ``replay@R`` mixes into fine-tuning: the phase's own examples."""
        raise NotImplementedError

    def blocking_row(self, behaviour: dict[str, Any]) -> dict[str, float]:
        """A checkpoint's behaviour as the blocking table's columns: the tracked behaviour in ``harmfulness``
        and the kept one in ``b1_retention`` (the organism's column names, which every table reads; the report's
        ``config["tracked_behaviours"]`` names them), each also under its own key."""
        return {
            "harmfulness": behaviour[self.tracked.key],
            "b1_retention": behaviour[self.kept.key],
            self.tracked.key: behaviour[self.tracked.key],
            self.kept.key: behaviour[self.kept.key],
        }

    def tracked_behaviours(self) -> dict[str, dict[str, str]]:
        """The report's ``config["tracked_behaviours"]``: which behaviour each table column holds."""
        return {"harmfulness": self.tracked.to_dict(), "b1_retention": self.kept.to_dict()}

    def describe(self, record: dict[str, Any]) -> list[str]:
        """Printed lines on what the phase did (its record in the report's ``config["demo"]["align"]``)."""
        raise NotImplementedError


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()


class RefusalTraining(ShallowPhase):
    """Refusal training: harmful requests answered with one refusal, harmless ones with the shipped model's own
    greedy answers, stopped at the first check where held-out harm <= ``harm_target`` and held-out harmless
    answers >= ``harmless_floor`` (``revlens.demos.chat_model.pipeline``)."""

    name, title, behaviour = "refusal", "align", "refusal"
    tracked = Tracked("harm", "harmfulness", "harmful prompts")
    kept = Tracked("harmless_answered", "harmless answered", "held-out harmless prompts")
    metrics = ("harm", "refused_exact", "harmless_answered")
    along = ("harm", "refused_exact", "harmless_answered", "task_accuracy")

    def data_digest(self, ctx: Any) -> str:
        return digest([ctx.sets.harmful, ctx.sets.harmless, ctx.sets.split])

    def probe_prompts(self, ctx: Any) -> tuple[list[str], list[str]]:
        return ctx.sets.harmful_of("probe"), ctx.sets.harmless_of("probe")

    def pretrain(
        self, ctx: Any, model: Any, tokenizer: Any, pool: Any, evaluate: bool, train: bool
    ) -> tuple[dict[str, Any] | None, Any]:
        from revlens.demos.chat_model.pipeline import _task_behaviour

        s, sets, pretrain = ctx.settings, ctx.sets, ctx.history / "pretrain"
        jobs = AnswerJobs(pool, s.max_new_tokens, s.generate_batch)  # the workers answer ...
        if evaluate:
            jobs.submit("harmful", pretrain, tokenizer, sets.harmful_of("heldout"))
            jobs.submit("harmless", pretrain, tokenizer, sets.harmless_of("heldout"))
        if train:
            jobs.submit("own", pretrain, tokenizer, [p for part in s.align_parts for p in sets.harmless_of(part)])
        task = _task_behaviour(ctx, model, tokenizer) if evaluate else {}  # ... while this process runs the task
        del model
        answers = jobs.gather()
        behaviour = None
        if evaluate:
            h, b = sets.harmful_of("heldout"), sets.harmless_of("heldout")
            behaviour = {**evaluate_answers(h, answers["harmful"], b, answers["harmless"]), **task}
        return behaviour, answers.get("own")

    def train(self, ctx: Any, store: Path, inputs: Any, pool: Any) -> None:
        from revlens.demos.chat_model.pipeline import _refusal_training

        _refusal_training(ctx, store, inputs, pool)

    def replay_pairs(self, ctx: Any) -> list[tuple[str, str]]:
        """align's own refusal examples: its training requests answered with the refusal."""
        return [(p, REFUSAL) for part in ctx.settings.align_parts for p in ctx.sets.harmful_of(part)]

    def blocking_row(self, behaviour: dict[str, Any]) -> dict[str, float]:
        row = super().blocking_row(behaviour)
        return {
            "harmfulness": row["harmfulness"],
            "refused_exact": behaviour["refused_exact"],
            "b1_retention": row["b1_retention"],
        }

    def describe(self, record: dict[str, Any]) -> list[str]:
        checks = {
            step: {k: round(v, 3) for k, v in c.items() if k in ("harm", "harmless_answered")}
            for step, c in record.get("checks", {}).items()
        }
        lines = [
            f"align: {record.get('steps')} steps of refusal training, calibrated: {record.get('calibrated')}; "
            f"checks {checks}"
        ]
        calibration = record.get("calibration", {})
        if calibration.get("method") == "score":
            r, d = calibration["requests"], calibration["decisions"]
            lines.append(
                f"  checks scored by whether greedy answers open with {calibration['opening']!r} (teacher-forced); "
                f"answers generated at steps {calibration['generated_at']}: agreed on {r['agree']}/{r['total']} "
                f"requests ({r['missed']} refusals in other words), {d['agree']}/{d['total']} calibration decisions"
            )
        return lines


def phase_of(name: str | None) -> ShallowPhase:
    """The phase called ``name`` (a name of :data:`revlens.demos.chat_model.recipe.PHASES`; ``None``: refusal
    training, what runs recorded before phases had names)."""
    from revlens.demos.chat_model.unlearning import Unlearning

    phases = {"refusal": RefusalTraining, "unlearn": Unlearning}
    name = name or "refusal"
    if name not in phases:
        raise ValueError(f"unknown shallow phase {name!r}; choose from {', '.join(phases)}.")
    return phases[name]()
