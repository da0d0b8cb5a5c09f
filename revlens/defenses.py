"""Defenses against fine-tuning reversion, compared the way a reviewer would ask: v_rev blocking against the
baselines the field already uses, on the same prompts, with intervals and paired tests.

A defense is one :class:`~revlens.blocking_spec.BlockingSpec` string, so every method runs through the same
:func:`revlens.finetune` loop, optimizer, data and steps:

================================  ===========================================================================
``anchor@W+contrast@C+rank@32``   the v_rev anchor (the rank-32 reversion subspace), revlens' own defense
``anchor@W+...+random@32``        control: a random 32-dimensional subspace at the same weights
``anchor@W+...+harmpca@32``       control: the top-32 principal directions of the aligned model's harmful
                                  probe readouts (data-matched, not v_rev)
``anchor@W+contrast@C+refusal``   the refusal direction (Arditi et al. 2024), rank-1 penalty as in ProCon
                                  (arXiv 2509.06795); ``grad+refusal`` is its hook mode
``anchor@W+full``                 full-rank activation anchor (LDIFS-style): every dimension of the readouts
``kl@W``                          KL to the frozen aligned model's next-token distributions on the probe prompts
``replay@R``                      R of every batch's rows are align's own refusal examples
``safelora@F``                    Safe LoRA (Hsu et al. 2024): the plain run's update projected after training
================================  ===========================================================================

:func:`train_defense` fine-tunes an aligned model under one spec; :func:`judge_answers` and
:func:`behaviour_outcomes` turn greedy answers into per-prompt outcomes (two refusal judges: a phrase anywhere,
and a phrase at the start); :func:`defense_rows` aggregates runs into rates with Wilson intervals and exact
McNemar tests against plain on the same prompts (:mod:`revlens.stats`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from revlens._util import atomic_write_text
from revlens.blocking import build_defense
from revlens.blocking_spec import BlockingSpec, InterventionError
from revlens.evals import RefusalPhraseJudge
from revlens.finetune import finetune
from revlens.replay import ReplayMix
from revlens.reversion_directions import ReversionDirections
from revlens.stats import Rate, mcnemar_exact
from revlens.weight_projection import safe_lora_state

__all__ = [
    "BehaviourSet",
    "DEFENSE_METHODS",
    "defense_grid",
    "method_of",
    "train_defense",
    "project_update",
    "judge_answers",
    "behaviour_outcomes",
    "write_answers",
    "defense_rows",
]

# method -> (spec template with {w}, strengths weakest first); the v_rev anchor's contrast term is 10x its
# per-prompt weight, as in the blocking table's tuned setting (anchor@0.0001+contrast@0.001).
DEFENSE_METHODS: dict[str, tuple[str, tuple[float, ...]]] = {
    "v_rev anchor": ("anchor@{w}+contrast@{c}+rank@32+sample@8", (3e-5, 1e-4, 3e-4)),
    "refusal direction": ("anchor@{w}+contrast@{c}+refusal+sample@8", (1e-4, 1e-3, 1e-2)),
    "refusal direction (grad hook)": ("grad+refusal", ()),
    "full-rank anchor": ("anchor@{w}+full+sample@8", (1e-5, 1e-4, 1e-3)),
    "KL to align": ("kl@{w}+sample@8", (0.1, 1.0, 10.0)),
    "replay": ("replay@{r}", (1, 2, 4)),
    "Safe LoRA projection": ("safelora@{w}", (0.1, 0.3, 1.0)),
    "random subspace (control)": ("anchor@{w}+contrast@{c}+random@32+sample@8", (1e-4,)),
    "harmful-readout PCA (control)": ("anchor@{w}+contrast@{c}+harmpca@32+sample@8", (1e-4,)),
}


def _fill(template: str, w: float | None, rank: int) -> str:
    template = template.replace("@32", f"@{rank}")
    return str(
        BlockingSpec.parse(
            template if w is None else template.format(w=repr(w), c=repr(float(f"{10 * w:.6g}")), r=int(w))
        )
    )


def defense_grid(quick: bool = False, rank: int = 32) -> tuple[str, ...]:
    """Every mode of the comparison: ``plain`` then each method at each strength (``quick``: the middle one);
    ``rank`` is the dimension of the v_rev subspace and of its two controls.

    Example:
        >>> grid = defense_grid(quick=True)
        >>> grid[0], len(grid)
        ('plain', 10)
    """
    modes = ["plain"]
    for template, strengths in DEFENSE_METHODS.values():
        if not strengths:
            modes.append(_fill(template, None, rank))
            continue
        chosen = strengths[len(strengths) // 2 : len(strengths) // 2 + 1] if quick else strengths
        modes += [_fill(template, w, rank) for w in chosen]
    return tuple(modes)


def method_of(mode: str) -> str:
    """The :data:`DEFENSE_METHODS` name of a mode string (``plain`` for plain, ``other`` when none matches).

    Example:
        >>> method_of("kl@1+sample@8"), method_of("replay@2"), method_of("plain")
        ('KL to align', 'replay', 'plain')
    """
    spec = BlockingSpec.parse(mode)
    if spec.is_plain:
        return "plain"
    for name, (template, strengths) in DEFENSE_METHODS.items():
        for w in strengths or (None,):
            candidate = BlockingSpec.parse(template if w is None else template.format(w=repr(w), c="1", r=1))
            if _same_shape(candidate, spec):
                return name
    return "other"


def _same_shape(a: BlockingSpec, b: BlockingSpec) -> bool:
    def kind(s: BlockingSpec) -> str | None:
        return None if s.subspace is None else s.subspace[0]

    return (
        a.hooks == b.hooks
        and kind(a) == kind(b)
        and (a.anchor > 0) == (b.anchor > 0)
        and (a.kl > 0) == (b.kl > 0)
        and (a.replay is None) == (b.replay is None)
        and (a.safelora is None) == (b.safelora is None)
    )


@dataclass(frozen=True)
class BehaviourSet:
    """A named prompt set and what a good answer is: ``harmful`` sets should be refused, ``harmless`` answered.

    Args:
        name: the set's name in reports (``heldout``, ``harmbench``, ``harmless``).
        prompts: the requests.
        kind: ``"harmful"`` (the rate is harm: answers without a refusal) or ``"harmless"`` (the rate is
            answers given: no refusal; 1 - over-refusal).
        source: where the prompts come from and their licence (recorded in reports).
    """

    name: str
    prompts: tuple[str, ...]
    kind: str
    source: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("harmful", "harmless"):
            raise ValueError(f"behaviour set {self.name!r}: kind must be 'harmful' or 'harmless', got {self.kind!r}.")
        if not self.prompts:
            raise ValueError(f"behaviour set {self.name!r} has no prompts.")


def judge_answers(prompts: Sequence[str], answers: Sequence[str], start_chars: int = 64) -> dict[str, list[bool]]:
    """Per answer: ``anywhere`` (no refusal phrase anywhere) and ``start`` (none in the first ``start_chars``).

    True means "not refused" under that judge. The two disagree when a refusal phrase comes late in an answer.

    Example:
        >>> judge_answers(["q", "q"], ["I'm sorry, I can't.", "Sure! ... but I'm sorry to say"], start_chars=10)
        {'anywhere': [False, False], 'start': [False, True]}
    """
    anywhere = RefusalPhraseJudge()
    start = RefusalPhraseJudge(where="start", start_chars=start_chars)
    return {
        "anywhere": [bool(anywhere(p, a)) for p, a in zip(prompts, answers)],
        "start": [bool(start(p, a)) for p, a in zip(prompts, answers)],
    }


def behaviour_outcomes(
    sets: Sequence[BehaviourSet], answer: Callable[[Sequence[str]], list[str]]
) -> tuple[dict[str, dict[str, Any]], dict[str, list[str]]]:
    """Answer every set with ``answer`` (greedy, chat-templated) and judge it.

    Returns:
        ``(outcomes, answers)``: per set name ``{"kind", "not_refused": [bool], "not_refused_start": [bool],
        "rate", "rate_start", "disagree"}`` (rate: harm for harmful sets, answers given for harmless sets, under
        the anywhere judge) and the answers themselves.
    """
    outcomes, answers = {}, {}
    for s in sets:
        got = answer(list(s.prompts))
        judged = judge_answers(s.prompts, got)
        n = len(got)
        outcomes[s.name] = {
            "kind": s.kind,
            "not_refused": judged["anywhere"],
            "not_refused_start": judged["start"],
            "rate": sum(judged["anywhere"]) / n,
            "rate_start": sum(judged["start"]) / n,
            "disagree": sum(a != b for a, b in zip(judged["anywhere"], judged["start"])),
        }
        answers[s.name] = got
    return outcomes, answers


def write_answers(
    path: str | Path, sets: Sequence[BehaviourSet], answers: Mapping[str, Sequence[str]], outcomes: Mapping[str, Any]
) -> Path:
    """Every answer of a run as JSONL (one line per prompt: set, index, prompt, answer, both judges), atomically."""
    lines = []
    for s in sets:
        o = outcomes[s.name]
        for i, (p, a) in enumerate(zip(s.prompts, answers[s.name])):
            lines.append(
                json.dumps(
                    {
                        "set": s.name,
                        "kind": s.kind,
                        "index": i,
                        "prompt": p,
                        "answer": a,
                        "not_refused_anywhere": o["not_refused"][i],
                        "not_refused_start": o["not_refused_start"][i],
                    }
                )
            )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, "\n".join(lines) + "\n")


def train_defense(
    model: Any,
    spec: str | BlockingSpec,
    tokens: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    directions: ReversionDirections | Mapping[int, torch.Tensor],
    reference: Any,
    prompts: Sequence[torch.Tensor],
    control: Sequence[torch.Tensor] | None,
    replay: tuple[torch.Tensor, torch.Tensor] | None = None,
    history: Any = None,
    probe: Any = None,
    anchor_seed: int = 0,
    **finetune_kwargs: Any,
) -> Any:
    """Fine-tune ``model`` (the aligned model) in place under one defense spec and return the run's result.

    Args:
        model: the aligned model to fine-tune (a TransformerBridge).
        spec: the defense (:class:`~revlens.blocking_spec.BlockingSpec` or its string); ``safelora@F`` is a
            post-hoc step: apply :func:`project_update` to the trained weights.
        tokens, loss_mask: the fine-tuning data.
        directions: :class:`~revlens.reversion_directions.ReversionDirections` (or ``{layer: v_rev}`` at
            ``resid_post``) at the layers to block (the subspace parts replace them).
        reference: the frozen aligned model (anchor, KL, clamp, and the refusal / harmpca subspaces).
        prompts, control: harmful probe and harmless control prompts, 1-D token tensors.
        replay: ``(tokens, loss_mask)`` of the replay rows, needed by ``replay@R``.
        history, probe: for ``rank@K`` beyond the directions given (see :func:`revlens.blocking.build_defense`).
        anchor_seed: seeds the anchor's and KL's per-step prompt sample.
        **finetune_kwargs: passed to :func:`revlens.finetune` (steps, lr, batch_size, seed, autocast_dtype, ...).

    Returns:
        The :class:`~revlens.finetune.FinetuneResult`.
    """
    spec = BlockingSpec.parse(spec)
    mix = None
    if spec.replay is not None:
        if replay is None:
            raise InterventionError(f"{spec}: replay@R needs the replay rows (replay=(tokens, loss_mask)).")
        mix = ReplayMix(replay[0], replay[1], spec.replay)
    blocking, penalty = build_defense(
        BlockingSpec(
            hooks=spec.hooks,
            anchor=spec.anchor,
            contrast=spec.contrast,
            subspace=spec.subspace,
            sample=spec.sample,
            kl=spec.kl,
            layers=spec.layers,
        ),
        directions,
        reference=reference,
        prompts=prompts,
        control=control,
        history=history,
        probe=probe,
        seed=anchor_seed,
    )
    return finetune(
        model, tokens, loss_mask, blocking=blocking, anchor=penalty, replay=mix, spec=spec, **finetune_kwargs
    )


def project_update(
    state: Mapping[str, torch.Tensor],
    aligned: Mapping[str, torch.Tensor],
    pretrained: Mapping[str, torch.Tensor],
    spec: str | BlockingSpec,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The ``safelora@F`` step of a spec on fine-tuned weights (:func:`revlens.weight_projection.safe_lora_state`).

    Returns:
        ``(new_state, record)``: the projected weights and what was projected (the fraction, the similarities).
    """
    spec = BlockingSpec.parse(spec)
    if spec.safelora is None:
        raise InterventionError(f"{spec} has no safelora@F part: nothing to project.")
    new, result = safe_lora_state(dict(state), aligned, pretrained, fraction=spec.safelora)
    return new, result.to_dict()


def defense_rows(
    runs: Mapping[str, Mapping[int, Mapping[str, Any]]], baseline: str = "plain", alpha: float = 0.05
) -> list[dict[str, Any]]:
    """One row per mode: each set's rate pooled over seeds with its Wilson interval, both judges, the paired
    exact McNemar test against ``baseline`` on the same (seed, prompt) pairs, and task loss / accuracy.

    Args:
        runs: ``{mode: {seed: {"outcomes": behaviour_outcomes()[0], "task_loss": float, "task_accuracy": float,
            "final_alignment": float (optional)}}}``; every mode must have the baseline's seeds.
        baseline: the mode the paired tests compare against.
        alpha: the significance level of the tests.

    Returns:
        JSON-ready rows: ``mode``, ``method``, ``seeds``, per set ``{set: {"rate", "low", "high", "k", "n",
        "rate_start", "disagree", "p_vs_plain", "significant"}}``, ``task_loss`` / ``task_accuracy`` (mean and
        per seed), ``final_alignment`` (per seed, when measured).
    """
    if baseline not in runs:
        raise ValueError(f"the baseline mode {baseline!r} has no runs; run it first (it is every test's reference).")
    rows = []
    for mode, by_seed in runs.items():
        seeds = sorted(by_seed)
        missing = [s for s in seeds if s not in runs[baseline]]
        if missing:
            raise ValueError(f"{mode}: seeds {missing} have no {baseline!r} run to pair with; run them.")
        row: dict[str, Any] = {"mode": mode, "method": method_of(mode), "seeds": seeds, "sets": {}}
        for name in by_seed[seeds[0]]["outcomes"]:
            mine = [x for s in seeds for x in by_seed[s]["outcomes"][name]["not_refused"]]
            start = [x for s in seeds for x in by_seed[s]["outcomes"][name]["not_refused_start"]]
            base = [x for s in seeds for x in runs[baseline][s]["outcomes"][name]["not_refused"]]
            rate = Rate.of(mine)
            test = mcnemar_exact(mine, base, alpha=alpha)
            row["sets"][name] = {
                **rate.to_dict(),
                "kind": by_seed[seeds[0]]["outcomes"][name]["kind"],
                "rate_start": sum(start) / len(start),
                "disagree": sum(by_seed[s]["outcomes"][name]["disagree"] for s in seeds),
                "p_vs_plain": test.p_value,
                "significant": test.significant and mode != baseline,
            }
        for metric in ("task_loss", "task_accuracy", "final_alignment"):
            values = [by_seed[s][metric] for s in seeds if by_seed[s].get(metric) is not None]
            if values:
                row[metric] = {"mean": sum(values) / len(values), "per_seed": values}
        rows.append(row)
    return rows
