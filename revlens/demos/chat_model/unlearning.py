"""The unlearning setting's shallow phase: facts the shipped model knows, unlearned, then benign fine-tuning.

``pretrain`` is the model as shipped; ``unlearn`` (the history's ``align`` slot) is :func:`revlens.unlearn` on the
forget set of a :class:`revlens.KnowledgeSplit` (default: SmolLM2's country capitals, with opposites and plurals
as the retain set): gradient difference (ascent on the forget probe items' answers, descent on the retain probe
items'; Liu et al. 2022, Yao et al. 2023) or NPO (Zhang et al. 2024), calibrated like refusal training: it stops
at the first check where held-out forget recall <= ``forget_ratio`` and held-out retain recall >= ``retain_ratio``
of their values as shipped. Every checkpoint is then read on held-out forget recall (what fine-tuning may bring
back: Hu et al. 2024, Lynch et al. 2024), held-out retain recall and the forget probe items' recall, greedy and
chat-templated under the exact-match judge, each a rate with its 95% Wilson interval. The analysis reads v_rev on
the forget probe prompts with the retain probe prompts (the same question format) as the contrast.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from revlens import BehaviourResult, KnowledgeSplit, measure_behaviours, unlearn
from revlens.demos.chat_model.data import sft_tensors
from revlens.demos.chat_model.hf_io import load_hf
from revlens.demos.chat_model.phases import ShallowPhase, Tracked, digest

# Blocking rows of the unlearning setting: the v_rev anchor (rank-32 reversion subspace) and its random-subspace
# control at the refusal track's tuned weights; the field's baselines that transfer, at the middle strength of the
# refusal track's defense grid (revlens.defense_grid): replay of the unlearn phase's own examples, KL to the
# unlearned model on the forget probe prompts, and a full-rank activation anchor to it.
UNLEARN_ANCHOR = "anchor@0.0001+contrast@0.001"
UNLEARN_FULL_MODES = (
    "plain",
    f"{UNLEARN_ANCHOR}+rank@32+sample@8",
    f"{UNLEARN_ANCHOR}+random@32+sample@8",
    "replay@2",
    "kl@1+sample@8",
    "anchor@0.0001+full+sample@8",
)
UNLEARN_QUICK_MODES = UNLEARN_FULL_MODES[:3]
# The recall behaviours: (set, part) -> the key a checkpoint's record holds its rate under.
RECALL = {("forget", "heldout"): "forget_recall", ("retain", "heldout"): "retain_recall"}
RECALL[("forget", "probe")] = "forget_recall_probe"
CITATIONS = {
    "graddiff": "gradient difference (Liu et al. 2022; Yao et al. 2023)",
    "npo": "NPO (Zhang et al. 2024)",
}


def recall_behaviours(split: KnowledgeSplit) -> dict[str, Any]:
    """``{key: Behaviour}`` for every part :data:`RECALL` reads (exact match, the split's judge settings)."""
    return {key: split.behaviour(which, part) for (which, part), key in RECALL.items()}


def recall_record(results: dict[str, BehaviourResult]) -> dict[str, Any]:
    """A checkpoint's recall record: each key's rate and ``<key>_ci`` (its 95% Wilson interval), and under
    ``recall`` every result whole (per-item outcomes and answers)."""
    out: dict[str, Any] = {}
    for key, result in results.items():
        out[key], out[f"{key}_ci"] = result.rate.rate, [result.rate.low, result.rate.high]
    out["recall"] = {key: result.to_dict() for key, result in results.items()}
    return out


def recall_behaviour(ctx: Any, model: Any, tokenizer: Any) -> dict[str, Any]:
    """Held-out forget and retain recall and the forget probe items' recall of ``model`` (:func:`recall_record`)."""
    behaviours = recall_behaviours(ctx.knowledge)
    got = measure_behaviours(
        model, list(behaviours.values()), tokenizer=tokenizer, batch_size=ctx.settings.generate_batch
    )
    return recall_record({key: got[b.name] for key, b in behaviours.items()})


class Unlearning(ShallowPhase):
    """The unlearning phase (see the module docstring)."""

    name, title, behaviour = "unlearn", "unlearn", "recall"
    tracked = Tracked("forget_recall", "forget recall", "held-out forget items")
    kept = Tracked("retain_recall", "retain recall", "held-out retain items")
    metrics = ("forget_recall", "retain_recall", "forget_recall_probe")
    along = (
        "forget_recall",
        "forget_recall_ci",
        "retain_recall",
        "retain_recall_ci",
        "forget_recall_probe",
        "task_accuracy",
    )

    def shape(self, quick: bool) -> dict[str, Any]:
        """Recall at every saved step (the relearning curve), the unlearning blocking rows, recall and the task
        evaluated."""
        save = (1, 2, 5, 10, 20) if quick else (1, 2, 5, 10, 20, 30, 50, 100)
        modes = UNLEARN_QUICK_MODES if quick else UNLEARN_FULL_MODES
        return {"save_steps": save, "behaviour_steps": save, "modes": modes, "behaviours": ("recall", "task")}

    def data_digest(self, ctx: Any) -> str:
        return digest(ctx.knowledge.to_dict())

    def probe_prompts(self, ctx: Any) -> tuple[list[str], list[str]]:
        return ctx.knowledge.prompts("forget", "probe"), ctx.knowledge.prompts("retain", "probe")

    def pretrain(
        self, ctx: Any, model: Any, tokenizer: Any, pool: Any, evaluate: bool, train: bool
    ) -> tuple[dict[str, Any] | None, Any]:
        """The shipped model's recall and task (``evaluate``); training reads the shipped recall back from the
        manifest, so it needs nothing more here."""
        from revlens.demos.chat_model.pipeline import _behaviour

        return (_behaviour(ctx, model, tokenizer) if evaluate else None), None

    def train(self, ctx: Any, store: Path, inputs: Any, pool: Any) -> None:
        """:func:`revlens.unlearn` from pretrain on the forget and retain probe items (16-token greedy checks of
        the held-out parts), then the kept step's recall; written to ``store`` with its record."""
        from revlens import save_hf_model
        from revlens.demos.chat_model.pipeline import ALIGN_RECORD, _align_key, _autocast

        s, split = ctx.settings, ctx.knowledge
        model, tok = load_hf(ctx.history / "pretrain")
        behaviours = recall_behaviours(split)
        records = ctx.manifest["behaviour"]["pretrain"]["recall"]
        shipped = {which: BehaviourResult.from_dict(records[f"{which}_recall"]) for which in ("forget", "retain")}
        t0 = time.perf_counter()
        result = unlearn(
            model,
            sft_tensors(tok, split.pairs("forget", "probe")),
            sft_tensors(tok, split.pairs("retain", "probe")),
            forget_check=behaviours["forget_recall"],
            retain_check=behaviours["retain_recall"],
            method=s.unlearn_method,
            steps=s.align_max_steps,
            lr=s.align_lr,
            batch_size=s.batch_size,
            forget_ratio=s.forget_ratio,
            retain_ratio=s.retain_ratio,
            check_every=s.align_check_every,
            check_from=s.align_check_from,
            seed=0,  # the batch draws of benchmarks/smollm2_unlearn_relearn.py, which chose the preset
            autocast_dtype=_autocast(s),
            tokenizer=tok,
            generate_batch=s.generate_batch,
            shipped=shipped,
            progress=ctx.progress,
        )
        kept = result.checks[result.steps]  # the held-out parts at the kept step, as its check generated them
        probe = behaviours["forget_recall_probe"]
        results = {
            "forget_recall": kept["forget"],
            "retain_recall": kept["retain"],
            "forget_recall_probe": probe.measure(model, tokenizer=tok, batch_size=s.generate_batch),
        }
        record = {
            "align": {
                "phase": self.name,
                "method": CITATIONS[s.unlearn_method],
                "steps": result.steps,
                "trained_steps": result.trained_steps,
                "calibrated": result.calibrated,
                "targets": result.targets,
                "checks": {s: {f"{k}_recall": r.rate.rate for k, r in c.items()} for s, c in result.checks.items()},
                "losses": result.losses,
                "train_seconds": result.seconds,
                "seconds": time.perf_counter() - t0,
                "settings": result.settings,
            },
            "behaviour": recall_record(results),
            "settings": _align_key(ctx),
        }
        store.parent.mkdir(parents=True, exist_ok=True)
        save_hf_model(model, tok, store, extra_files={ALIGN_RECORD: json.dumps(record, indent=1)})

    def replay_pairs(self, ctx: Any) -> list[tuple[str, str]]:
        """The unlearn phase's own examples: each forget probe item answered as the unlearned model answers it
        (what unlearning left in the fact's place; the analogue of replaying align's refusals), and the retain
        probe items with their targets (the retain loss)."""
        from revlens.demos.chat_model.pipeline import ALIGN_RECORD

        record = json.loads((ctx.history / "align" / ALIGN_RECORD).read_text())
        probe = record["behaviour"]["recall"]["forget_recall_probe"]
        return list(zip(probe["prompts"], probe["answers"])) + ctx.knowledge.pairs("retain", "probe")

    def blocking_row(self, behaviour: dict[str, Any]) -> dict[str, float]:
        return {**super().blocking_row(behaviour), "forget_recall_probe": behaviour["forget_recall_probe"]}

    def describe(self, record: dict[str, Any]) -> list[str]:
        checks = {
            step: {k.removesuffix("_recall"): round(v, 3) for k, v in c.items()}
            for step, c in record.get("checks", {}).items()
        }
        targets, lr = record.get("targets", {}), record.get("settings", {}).get("lr")
        forget, retain = targets.get("forget", float("nan")), targets.get("retain", float("nan"))
        return [
            f"unlearn: {record.get('steps')} steps of {record.get('method')}, lr {lr}, calibrated: "
            f"{record.get('calibrated')} (held-out forget recall <= {forget:.3f}, retain recall >= {retain:.3f}); "
            f"checks {checks}"
        ]


def load_knowledge(knowledge: str | Path | KnowledgeSplit | None) -> KnowledgeSplit:
    """The split a run unlearns: a :class:`revlens.KnowledgeSplit`, a JSON file written by
    :meth:`revlens.KnowledgeSplit.save`, or None for the shipped SmolLM2 split."""
    if isinstance(knowledge, KnowledgeSplit):
        return knowledge
    return KnowledgeSplit.load(knowledge)
