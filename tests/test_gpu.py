"""CUDA paths, against the same computation on CPU; skipped where no CUDA device is visible."""

from __future__ import annotations

import copy

import pytest
import torch
from test_intervention import LAYER, next_resid

from revlens.anchor import ProbeAnchor
from revlens.blocking import Blocking
from revlens.finetune import finetune
from revlens.hooks import orthonormal_basis
from revlens.probe import ReversionProbe

from conftest import CONTROL, PROMPTS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def on(model, device: str, dtype: torch.dtype = torch.float32):
    return copy.deepcopy(model).to(device).to(dtype)


def test_probe_centroids_on_cuda_equal_cpu(tiny_model):
    probe = ReversionProbe(PROMPTS, control=CONTROL, batch_size=2)
    cpu = probe.measure(tiny_model)
    gpu = probe.measure(on(tiny_model, "cuda"))
    assert torch.allclose(gpu.centroid.cpu(), cpu.centroid, atol=1e-4)
    assert torch.allclose(gpu.control_centroid.cpu(), cpu.control_centroid, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocking_modes_on_cuda(tiny_model, dtype):
    d = tiny_model.cfg.d_model
    v = torch.randn(d, generator=torch.Generator().manual_seed(0))
    basis = orthonormal_basis(v, d).cuda()
    model = on(tiny_model, "cuda", dtype)
    tokens = tiny_model.to_tokens(PROMPTS[:3]).cuda()
    projected = next_resid(model, tokens, Blocking({LAYER: v}, "project"))
    assert projected.dtype == dtype
    scale = next_resid(model, tokens).float().norm(dim=-1).max()
    assert float((projected.float() @ basis.T).abs().max()) <= TOL[dtype] * float(scale)
    reference = on(tiny_model, "cuda", dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    clamp = Blocking({LAYER: v}, "clamp", reference=reference)
    clamp.set_batch(tokens)
    clamped = next_resid(model, tokens, clamp).float() @ basis.T
    assert torch.allclose(clamped, next_resid(reference, tokens).float() @ basis.T, atol=TOL[dtype] * float(scale))
    hooks = sum(len(hp._forward_hooks) + len(hp._backward_hooks) for hp in model.hook_dict.values())
    assert hooks == 0


def test_grad_blocking_on_cuda_removes_the_gradient_component(tiny_model):
    d = tiny_model.cfg.d_model
    v = torch.randn(d, generator=torch.Generator().manual_seed(1))
    u = (v / v.norm()).cuda()
    model = on(tiny_model, "cuda")
    tokens = tiny_model.to_tokens(PROMPTS[:2]).cuda()
    seen = {}

    def grab_post(act, hook):  # runs before the blocking hook on the same point: sees the projected gradient
        act.register_hook(lambda g: seen.setdefault("g", g))
        return act

    with model.hooks(fwd_hooks=[(f"blocks.{LAYER}.hook_resid_post", grab_post)]):
        with Blocking({LAYER: v}, "grad").applied(model):
            model(tokens).logsumexp(-1).sum().backward()
    grad = seen["g"]
    assert grad.is_cuda and float(grad.abs().max()) > 1e-4
    assert float((grad @ u).abs().max()) < 1e-5 * float(grad.norm(dim=-1).max())


def test_finetune_with_clamp_and_anchor_on_cuda_matches_cpu(tiny_model):
    v = torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, tiny_model.cfg.d_vocab, (16, 8), generator=gen)
    mask = torch.ones(16, 8)
    prompts = [tiny_model.to_tokens(p)[0] for p in PROMPTS]
    control = [tiny_model.to_tokens(p)[0] for p in CONTROL]
    finals = {}
    for device in ("cpu", "cuda"):
        reference = on(tiny_model, device)
        model = on(tiny_model, device)
        blocking = Blocking({LAYER: v}, "clamp+grad", reference=reference)
        anchor = ProbeAnchor({LAYER: v}, prompts, reference, 0.1, control=control, contrast_weight=1.0)
        finetune(
            model,
            tokens,
            mask,
            steps=5,
            lr=1e-2,
            optimizer="sgd",
            batch_size=8,
            blocking=blocking,
            anchor=anchor,
            device=device,
            progress=False,
        )
        finals[device] = torch.cat([p.detach().float().cpu().reshape(-1) for p in model.parameters()])
    start = torch.cat([p.detach().float().reshape(-1) for p in tiny_model.parameters()])
    moved = (finals["cpu"] - start).norm()
    assert float(moved) > 1e-3
    # SGD (AdamW would rescale float round-off in near-zero gradients up to the learning rate).
    assert float((finals["cuda"] - finals["cpu"]).norm()) < 1e-3 * float(moved)
