"""The defense baselines (revlens.defenses, penalties, replay) against independent computations: replay batches
hold exactly the requested rows, the full-rank anchor is a hand-written squared distance, KL is torch's kl_div.
The subspaces they block (refusal direction, readout PCA) are checked in test_subspace.py."""

from __future__ import annotations

import copy

import pytest
import torch

from revlens.blocking import build_defense
from revlens.blocking_spec import BlockingSpec, InterventionError
from revlens.defense_table import defense_table, pareto_front, trade_off_fronts
from revlens.defenses import BehaviourSet, defense_grid, defense_rows, judge_answers, method_of, train_defense
from revlens.finetune import finetune
from revlens.penalties import KLAnchor, PenaltySum
from revlens.replay import ReplayMix
from revlens.stats import mcnemar_exact

from conftest import CONTROL, PROMPTS, last_resid, prompt_ids


def _moved(model):
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return out


# ------------------------------------------------------------------------------------------------ spec grammar
@pytest.mark.parametrize(
    "text",
    [
        "kl@0.5+sample@2",
        "anchor@0.01+refusal",
        "grad+refusal",
        "anchor@0.1+full",
        "replay@2",
        "safelora@0.3",
        "anchor@0.001+contrast@0.01+harmpca@4+sample@2",
        "anchor@1e16",
        "kl@1+replay@1+safelora@1",
    ],
)
def test_new_spec_parts_round_trip(text):
    spec = BlockingSpec.parse(text)
    assert BlockingSpec.parse(str(spec)) == spec
    assert not spec.is_plain


@pytest.mark.parametrize("text", ["project+full", "refusal", "safelora@1.5", "replay@0", "sample@2+replay@1"])
def test_bad_new_spec_parts_name_the_fix(text):
    with pytest.raises(InterventionError):
        BlockingSpec.parse(text)


def test_grid_has_three_strengths_per_method_and_methods_resolve():
    grid = defense_grid()
    methods = [method_of(m) for m in grid]
    assert "other" not in methods
    for name in (
        "v_rev anchor",
        "refusal direction",
        "full-rank anchor",
        "KL to align",
        "replay",
        "Safe LoRA projection",
    ):
        assert methods.count(name) == 3, name
    assert len(defense_grid(quick=True)) == len(set(methods))


# ------------------------------------------------------------------------------------------------ replay
def test_replay_batches_hold_exactly_the_requested_rows():
    task = torch.arange(10 * 5).reshape(10, 5)
    replay_tokens = 1000 + torch.arange(4 * 7).reshape(4, 7)
    mix = ReplayMix(replay_tokens, torch.ones(4, 7, dtype=torch.long), rows=3)
    tokens, mask = mix.combined(task, torch.ones_like(task))
    assert tokens.shape == (14, 7) and int(mask[:10, 5:].sum()) == 0  # task rows padded, padding masked
    for step in (1, 2, 7):
        idx = mix.step_indices(10, batch_size=8, grad_accum=2, seed=3, step=step)
        assert idx.shape == (16,)
        for micro in idx.split(8):
            rows = tokens[micro]
            assert int((rows[:, 0] >= 1000).sum()) == 3  # exactly 3 replay rows, the last 3
            assert bool((rows[5:, 0] >= 1000).all()) and bool((rows[:5, 0] < 1000).all())
    with pytest.raises(InterventionError, match="no task rows"):
        mix.step_indices(10, batch_size=3, grad_accum=1, seed=0, step=1)


def test_finetune_with_replay_trains_on_the_mixed_batch(tiny_model):
    """Step 1's loss equals a hand-written masked cross-entropy on the rows step_indices names."""
    torch.manual_seed(1)
    task = torch.randint(1, 15, (6, 6))
    task_mask = torch.zeros_like(task)
    task_mask[:, 3:] = 1
    rep = torch.randint(1, 15, (3, 8))
    rep_mask = torch.zeros_like(rep)
    rep_mask[:, 4:] = 1
    mix = ReplayMix(rep, rep_mask, rows=2)
    tokens, mask = mix.combined(task, task_mask)
    idx = mix.step_indices(6, batch_size=4, grad_accum=1, seed=5, step=1)
    with torch.no_grad():
        logits = tiny_model(tokens[idx]).double()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, tokens[idx][:, 1:, None])[..., 0]
    m = mask[idx][:, 1:].double()
    expected = float(-(logp * m).sum() / m.sum())
    res = finetune(tiny_model, task, task_mask, steps=1, lr=1e-3, batch_size=4, seed=5, replay=mix, progress=False)
    assert res.losses[1] == pytest.approx(expected, rel=1e-5)
    assert res.settings["replay"]["rows"] == 2


# ------------------------------------------------------------------------------------------------ penalties
def test_full_rank_anchor_is_the_squared_distance_of_whole_readouts(tiny_model):
    ids, layers = prompt_ids(tiny_model, PROMPTS), [1, 2]
    model = _moved(tiny_model)
    directions = {l: torch.randn(tiny_model.cfg.d_model) for l in layers}  # replaced by 'full'
    _, anchor = build_defense("anchor@0.5+full", directions, reference=tiny_model, prompts=ids)
    expected = (
        0.5
        * sum(((last_resid(model, ids, l) - last_resid(tiny_model, ids, l)) ** 2).sum(-1).mean() for l in layers)
        / len(layers)
    )
    assert float(anchor.penalty(model)) == pytest.approx(float(expected), rel=1e-4)


def test_kl_penalty_equals_torch_kl_div(tiny_model):
    ids = prompt_ids(tiny_model, PROMPTS)
    model = _moved(tiny_model)
    kl = KLAnchor(ids, tiny_model, weight=2.0)
    with torch.no_grad():
        log_p = torch.stack([torch.log_softmax(tiny_model(t[None])[0, -1].float(), -1) for t in ids])
        log_q = torch.stack([torch.log_softmax(model(t[None])[0, -1].float(), -1) for t in ids])
    expected = 2.0 * torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    assert float(kl.penalty(model)) == pytest.approx(float(expected), rel=1e-4)
    assert float(kl.penalty(tiny_model)) == pytest.approx(0.0, abs=1e-6)
    sampled = KLAnchor(ids, tiny_model, weight=1.0, sample=2, seed=4)
    assert sampled.rows(3).tolist() == sampled.rows(3).tolist() and len(sampled.rows(3)) == 2


def test_spec_with_anchor_and_kl_is_their_sum(tiny_model):
    ids, ctrl = prompt_ids(tiny_model, PROMPTS), prompt_ids(tiny_model, CONTROL)
    model = _moved(tiny_model)
    v = {2: torch.randn(tiny_model.cfg.d_model)}
    _, both = build_defense("anchor@0.3+kl@0.7", v, reference=tiny_model, prompts=ids, control=ctrl)
    _, anchor = build_defense("anchor@0.3", v, reference=tiny_model, prompts=ids)
    _, kl = build_defense("kl@0.7", v, reference=tiny_model, prompts=ids)
    assert isinstance(both, PenaltySum)
    assert float(both.penalty(model)) == pytest.approx(float(anchor.penalty(model) + kl.penalty(model)), rel=1e-5)


# ------------------------------------------------------------------------------------------------ aggregation
def _run(not_refused_heldout, loss=1.0):
    outcomes = {
        "heldout": {
            "kind": "harmful",
            "not_refused": not_refused_heldout,
            "not_refused_start": not_refused_heldout,
            "disagree": 0,
        }
    }
    return {"outcomes": outcomes, "task_loss": loss, "task_accuracy": 0.5}


def test_defense_rows_pool_seeds_and_pair_with_plain():
    plain = {0: _run([True] * 8 + [False] * 2, 1.0), 1: _run([True] * 6 + [False] * 4, 1.2)}
    anchor = {0: _run([False] * 10, 1.1), 1: _run([True] + [False] * 9, 1.3)}
    rows = {r["mode"]: r for r in defense_rows({"plain": plain, "anchor@0.1": anchor})}
    cell = rows["anchor@0.1"]["sets"]["heldout"]
    assert (cell["k"], cell["n"]) == (1, 20)
    # independent: the pooled discordant pairs are 13 (plain only) and 0 (anchor only)
    test = mcnemar_exact([False] * 10 + [True] + [False] * 9, [True] * 8 + [False] * 2 + [True] * 6 + [False] * 4)
    assert cell["p_vs_plain"] == pytest.approx(test.p_value) == pytest.approx(2 * 0.5**13)
    assert cell["significant"] and not rows["plain"]["sets"]["heldout"]["significant"]
    assert rows["anchor@0.1"]["task_loss"]["mean"] == pytest.approx(1.2)
    text = defense_table(
        {"rows": list(rows.values()), "sets": [{"name": "heldout", "kind": "harmful"}], "seeds": [0, 1], "steps": 20},
        harm_set="heldout",
    )
    assert "anchor@0.1" in text and "yes" in text


def test_pareto_front_against_brute_force():
    gen = torch.Generator().manual_seed(0)
    pts = {str(i): tuple(torch.rand(2, generator=gen).tolist()) for i in range(30)}
    front = set(pareto_front(pts))
    for name, (x, y) in pts.items():
        beaten = any(a <= x and b <= y and (a, b) != (x, y) for a, b in pts.values())
        assert (name in front) == (not beaten)


def _row(mode, harm, loss, answered):
    cell = lambda rate: {"rate": rate, "low": rate, "high": rate, "disagree": 0, "significant": True, "p_vs_plain": 0}  # noqa: E731
    return {
        "mode": mode,
        "method": mode,
        "sets": {"hb": cell(harm), "harmless": cell(answered)},
        "task_loss": {"mean": loss, "per_seed": [loss]},
    }


def test_two_trade_off_fronts_read_task_loss_and_over_refusal_separately():
    # kl: least harm, lowest loss but refuses half the harmless prompts; anchor: more harm, answers 90%.
    rows = [_row("plain", 0.9, 0.70, 0.9), _row("kl", 0.2, 0.70, 0.5), _row("anchor", 0.3, 0.80, 0.9)]
    fronts = trade_off_fronts(rows, "hb")
    assert fronts == {"task loss": ["kl"], "over-refusal": ["kl", "anchor"]}  # plain: anchor refuses as few, harms less
    rows.append(_row("worse", 0.35, 0.9, 0.85))  # beaten by anchor on both prices
    assert "worse" not in trade_off_fronts(rows, "hb")["over-refusal"]
    from revlens.dashboard import defense_figure

    fig = defense_figure({"rows": rows, "sets": [], "steps": 20}, harm_set="hb")
    right = [t for t in fig.data if t.xaxis == "x2"]
    assert [t.name for t in right] == ["plain", "kl", "anchor", "worse"]
    assert right[1].x == (50.0,) and right[1].marker.line.width == (3,) and right[3].marker.line.width == (0,)


def test_judges_disagree_on_a_late_refusal():
    out = judge_answers(
        ["q"] * 2,
        [
            "Sure, here is how it goes, step by step, with every detail you asked for. I'm sorry it is long.",
            "I can't help.",
        ],
    )
    assert out["anywhere"] == [False, False] and out["start"] == [True, False]
    with pytest.raises(ValueError, match="kind"):
        BehaviourSet("x", ("a",), "other")


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("mode", ["kl@1+sample@2", "replay@1", "anchor@0.1+contrast@0.1+refusal", "grad+refusal"])
def test_train_defense_runs_each_baseline(tiny_model, mode):
    ids, ctrl = prompt_ids(tiny_model, PROMPTS), prompt_ids(tiny_model, CONTROL)
    reference = copy.deepcopy(tiny_model)
    torch.manual_seed(0)
    tokens = torch.randint(1, 15, (6, 6))
    mask = torch.zeros_like(tokens)
    mask[:, 3:] = 1
    before = [p.detach().clone() for p in tiny_model.parameters()]
    res = train_defense(
        tiny_model,
        mode,
        tokens,
        mask,
        directions={l: torch.randn(tiny_model.cfg.d_model) for l in (1, 2)},
        reference=reference,
        prompts=ids,
        control=ctrl,
        replay=(tokens[:2], mask[:2]),
        steps=2,
        lr=1e-3,
        batch_size=4,
        progress=False,
    )
    assert res.settings["spec"] == str(BlockingSpec.parse(mode))
    assert any(not torch.equal(a, b) for a, b in zip(before, tiny_model.parameters()))
