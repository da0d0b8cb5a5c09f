"""Blocking hooks, checked against TransformerLens' own cache and autograd."""

from __future__ import annotations

import copy

import pytest
import torch

from revlens.blocking import Blocking, parse_mode
from revlens.blocking_spec import InterventionError
from revlens.hooks import orthonormal_basis

from conftest import CONTROL, PROMPTS

LAYER = 1


def direction(d: int, seed: int = 0, k: int = 1) -> torch.Tensor:
    v = torch.randn(k, d, generator=torch.Generator().manual_seed(seed))
    return v[0] if k == 1 else v


def next_resid(model, tokens, blocking=None):
    """blocks.{LAYER+1}.hook_resid_pre: the (possibly blocked) output of layer LAYER, as the next block sees it."""
    name = f"blocks.{LAYER + 1}.hook_resid_pre"
    if blocking is None:
        return model.run_with_cache(tokens, names_filter=[name])[1][name]
    with blocking.applied(model):
        return model.run_with_cache(tokens, names_filter=[name])[1][name]


def jittered(model, scale: float = 0.05):
    """A copy of ``model`` with every weight moved by Gaussian noise."""
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(scale * torch.randn_like(p))
    return moved


def last_token_coords(model, prompts, u):
    """Each prompt's last-token coordinate along ``u`` at layer LAYER, from TransformerLens' own cache."""
    name = f"blocks.{LAYER}.hook_resid_post"
    return torch.stack([model.run_with_cache(t[None], names_filter=[name])[1][name][0, -1] @ u for t in prompts])


def hook_count(model) -> int:
    return sum(len(hp._forward_hooks) + len(hp._backward_hooks) for hp in model.hook_dict.values())


@pytest.mark.parametrize("k", [1, 3])
def test_project_removes_the_component(tiny_model, k):
    d = tiny_model.cfg.d_model
    tokens = tiny_model.to_tokens(PROMPTS[:2])
    v = direction(d, k=k)
    out = next_resid(tiny_model, tokens, Blocking({LAYER: v}, "project"))
    basis = torch.linalg.qr(v.reshape(k, d).T)[0].T
    assert (out @ basis.T).abs().max() < 1e-6
    before = next_resid(tiny_model, tokens)
    # Only the blocked component changes.
    expected = before - (before @ basis.T) @ basis
    assert torch.allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("k", [1, 2])
def test_clamp_holds_the_reference_coordinate(tiny_model, k):
    d = tiny_model.cfg.d_model
    reference = copy.deepcopy(tiny_model)
    moved = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tokens = tiny_model.to_tokens(PROMPTS[:3])
    v = direction(d, seed=3, k=k)
    basis = orthonormal_basis(v, d)
    blocking = Blocking({LAYER: v}, "clamp", reference=reference)
    blocking.set_batch(tokens)
    out = next_resid(moved, tokens, blocking)
    ref_coords = next_resid(reference, tokens) @ basis.T
    assert torch.allclose(out @ basis.T, ref_coords, atol=1e-5)
    free = next_resid(moved, tokens)
    assert torch.allclose(out - (out @ basis.T) @ basis, free - (free @ basis.T) @ basis, atol=1e-5)
    # Precomputed coordinates, indexed by rows, give the same forward pass.
    pre = blocking.reference_coords(tokens)
    blocking.set_batch(coords={l: c[[2, 0]] for l, c in pre.items()})
    out_rows = next_resid(moved, tokens[[2, 0]], blocking)
    assert torch.allclose(out_rows, out[[2, 0]], atol=1e-5)


def test_clamp_to_a_constant(tiny_model):
    d = tiny_model.cfg.d_model
    v = direction(d, seed=4)
    blocking = Blocking({LAYER: v}, "clamp", constant={LAYER: torch.tensor([0.7])})
    out = next_resid(tiny_model, tiny_model.to_tokens(PROMPTS[:2]), blocking)
    assert torch.allclose(out @ (v / v.norm()), torch.full(out.shape[:2], 0.7), atol=1e-5)


def test_grad_blocks_the_gradient_and_keeps_the_forward(tiny_model):
    d = tiny_model.cfg.d_model
    v = direction(d, seed=5)
    u = v / v.norm()
    tokens = tiny_model.to_tokens(PROMPTS[:2])
    grabbed = {}

    def grab(act, hook):
        act.retain_grad()
        grabbed["act"] = act
        return act

    def run(blocking):
        hooks = [(f"blocks.{LAYER + 1}.hook_resid_pre", grab)]
        with tiny_model.hooks(fwd_hooks=hooks):
            if blocking is None:
                logits = tiny_model(tokens)
            else:
                with blocking.applied(tiny_model):
                    logits = tiny_model(tokens)
        logits.logsumexp(-1).sum().backward()
        tiny_model.zero_grad()
        return logits.detach(), grabbed["act"].grad

    logits_plain, _ = run(None)
    blocking = Blocking({LAYER: v}, "grad")
    logits_blocked, _ = run(blocking)
    assert torch.equal(logits_plain, logits_blocked)
    # The gradient that reaches the blocked activation (layer LAYER's resid_post) has no component along v.
    seen = {}

    def grab_post(act, hook):
        act.register_hook(lambda g: seen.setdefault("g", g))
        return act

    with tiny_model.hooks(fwd_hooks=[(f"blocks.{LAYER}.hook_resid_post", grab_post)]):
        with blocking.applied(tiny_model):
            tiny_model(tokens).logsumexp(-1).sum().backward()
    tiny_model.zero_grad()
    # The blocking hook runs after grab_post on the same point: the gradient grab_post's tensor
    # receives is the projected one.
    assert (seen["g"] @ u).abs().max() < 1e-5
    assert seen["g"].abs().max() > 1e-4


def test_grad_mode_changes_the_weight_update_only_along_v(tiny_model):
    """With grad blocking at the last layer, the update to layer-LAYER weights cannot move resid along v."""
    d = tiny_model.cfg.d_model
    v = direction(d, seed=6)
    tokens = tiny_model.to_tokens(PROMPTS)
    blocking = Blocking({LAYER: v}, "grad")
    with blocking.applied(tiny_model):
        tiny_model(tokens).logsumexp(-1).mean().backward()
    g_bias = tiny_model.blocks[LAYER].mlp.out.bias.grad.clone()
    tiny_model.zero_grad()
    # The output bias adds directly to resid_post, so its gradient is the summed activation gradient.
    assert abs(float(g_bias @ (v / v.norm()))) < 1e-5


def test_hooks_are_removed_even_when_the_step_raises(tiny_model):
    before = hook_count(tiny_model)
    blocking = Blocking({0: direction(32), 2: direction(32, 1)}, "project+grad")
    with pytest.raises(RuntimeError, match="boom"):
        with blocking.applied(tiny_model):
            assert hook_count(tiny_model) > before
            raise RuntimeError("boom")
    assert hook_count(tiny_model) == before


def test_bfloat16_blocking(tiny_model):
    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    v = direction(32, seed=7)
    out = next_resid(model, model.to_tokens(PROMPTS[:2]), Blocking({LAYER: v}, "project"))
    assert out.dtype == torch.bfloat16
    # Zero to bfloat16 precision relative to the activation scale.
    assert float((out.float() @ (v / v.norm())).abs().max()) < 2e-2 * float(out.float().norm(dim=-1).max())


def test_bad_specifications_are_clear_errors(tiny_model):
    with pytest.raises(InterventionError, match="unknown blocking mode"):
        parse_mode("freeze")
    with pytest.raises(InterventionError, match="choose one"):
        parse_mode("project+clamp")
    with pytest.raises(InterventionError, match="needs a reference"):
        Blocking({1: direction(32)}, "clamp")
    with pytest.raises(InterventionError, match="zero"):
        Blocking({1: torch.zeros(32)}, "project")
    with pytest.raises(InterventionError, match="out of range"):
        with Blocking({9: direction(32)}, "project").applied(tiny_model):
            pass
    with pytest.raises(InterventionError, match="d_model"):
        with Blocking({1: direction(16)}, "project").applied(tiny_model):
            pass
    blocking = Blocking({1: direction(32)}, "clamp", reference=tiny_model)
    with pytest.raises(InterventionError, match="no reference coordinates"):
        with blocking.applied(tiny_model):
            tiny_model(tiny_model.to_tokens(PROMPTS[0]))


def test_probe_anchor_penalty_matches_the_cache_and_pulls_back(tiny_model):
    from revlens.anchor import ProbeAnchor
    from revlens.finetune import finetune

    d = tiny_model.cfg.d_model
    v = direction(d, seed=8)
    u = v / v.norm()
    prompts = [tiny_model.to_tokens(p)[0] for p in PROMPTS]
    anchor = ProbeAnchor({LAYER: v}, prompts, tiny_model, weight=2.0)
    # a bridge that ran a grad-enabled forward can no longer be deep-copied (TL 4.3): copy first
    moved, plain, anchored = jittered(tiny_model), copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    with torch.no_grad():
        assert float(anchor.penalty(tiny_model)) == pytest.approx(0.0, abs=1e-10)
        moved_coords = last_token_coords(moved, prompts, u) - last_token_coords(tiny_model, prompts, u)
        expected = 2.0 * (moved_coords**2).mean()
        assert float(anchor.penalty(moved)) == pytest.approx(float(expected), rel=1e-4)
    # Fine-tuning with the anchor moves the probe prompts along v less than plain fine-tuning does.
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, tiny_model.cfg.d_vocab, (16, 8), generator=gen)
    mask = torch.ones(16, 8)
    finetune(plain, tokens, mask, steps=10, lr=3e-3, batch_size=8, progress=False)
    finetune(anchored, tokens, mask, steps=10, lr=3e-3, batch_size=8, anchor=anchor, progress=False)
    with torch.no_grad():
        assert float(anchor.penalty(anchored)) < float(anchor.penalty(plain))


def test_contrast_anchor_penalty_matches_the_cache(tiny_model):
    """The contrast term: motion of (probe centroid - control centroid) along v, from TL's own cache."""
    from revlens.anchor import ProbeAnchor

    v = direction(tiny_model.cfg.d_model, seed=9)
    u = v / v.norm()
    tokens = [tiny_model.to_tokens(p)[0] for p in PROMPTS]
    probe, control = tokens[: len(tokens) // 2], tokens[len(tokens) // 2 :]
    anchor = ProbeAnchor({LAYER: v}, probe, tiny_model, weight=0.0, control=control, contrast_weight=3.0)
    moved = jittered(tiny_model)
    with torch.no_grad():
        contrast = {
            m: last_token_coords(m, probe, u).mean() - last_token_coords(m, control, u).mean()
            for m in (moved, tiny_model)
        }
        expected = 3.0 * (contrast[moved] - contrast[tiny_model]) ** 2
        assert float(anchor.penalty(tiny_model)) == pytest.approx(0.0, abs=1e-10)
        assert float(anchor.penalty(moved)) == pytest.approx(float(expected), rel=1e-4)
    with pytest.raises(InterventionError, match="control prompts"):
        ProbeAnchor({LAYER: v}, probe, tiny_model, contrast_weight=1.0)


def test_sampled_anchor_uses_the_drawn_prompts_of_each_step(tiny_model):
    """sample=k: the penalty equals the full formula on the k prompts drawn for that step, the same on every call."""
    from revlens.anchor import ProbeAnchor

    v = direction(tiny_model.cfg.d_model, seed=10)
    u = v / v.norm()
    tokens = [tiny_model.to_tokens(p)[0] for p in PROMPTS + CONTROL]
    probe, control = tokens[:6], tokens[6:]
    anchor = ProbeAnchor(
        {LAYER: v}, probe, tiny_model, weight=1.5, control=control, contrast_weight=2.0, sample=3, seed=4
    )
    moved = jittered(tiny_model)

    rows_p, rows_c = anchor.rows("probe", 7), anchor.rows("control", 7)
    assert len(rows_p) == 3 and len(set(rows_p.tolist())) == 3 and torch.equal(rows_p, anchor.rows("probe", 7))
    assert not all(torch.equal(rows_p, anchor.rows("probe", s)) for s in range(8, 14))
    with torch.no_grad():
        picked_p, picked_c = [probe[i] for i in rows_p], [control[i] for i in rows_c]
        dp = last_token_coords(moved, picked_p, u) - last_token_coords(tiny_model, picked_p, u)
        dc = last_token_coords(moved, picked_c, u) - last_token_coords(tiny_model, picked_c, u)
        expected = 1.5 * (dp**2).mean() + 2.0 * (dp.mean() - dc.mean()) ** 2
        assert float(anchor.penalty(moved, step=7)) == pytest.approx(float(expected), rel=1e-4)
    with pytest.raises(InterventionError, match="sample"):
        ProbeAnchor({LAYER: v}, probe, tiny_model, sample=0)
