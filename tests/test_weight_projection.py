"""Safe LoRA weight projection (revlens.weight_projection) against hand-written computations: planted rank-one
alignment updates, an explicit C = V V^T / ||V||_F, V @ pinv(V) for the exact projector, planted similarities
for the selection rules, and tiny Llama / GPT-2 models (LoRA through peft, and full fine-tuning)."""

from __future__ import annotations

import copy
import doctest
import json
import math

import pytest
import torch

import revlens.weight_projection as wp
from revlens.weight_projection import ProjectionResult, safe_lora_project, safe_lora_state

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed: int, dtype=F64) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=F64).to(dtype)


def _unit(n: int, seed: int) -> torch.Tensor:
    x = _randn(n, seed=seed)
    return x / x.norm()


def _c(v: torch.Tensor) -> torch.Tensor:
    """Safe LoRA's approximate projection, built explicitly."""
    v = v.to(F64)
    return v @ v.T / torch.linalg.norm(v)


def _sim(dw: torch.Tensor, cdw: torch.Tensor) -> float:
    return float((dw * cdw).sum() / (torch.linalg.norm(dw) * torch.linalg.norm(cdw)))


def _states(shapes: dict[str, tuple[int, int]], seed: int = 0):
    """Pretrained, aligned (pretrained + random V) and a random aligned base for each name."""
    pre = {n: _randn(*s, seed=seed + 10 * i) for i, (n, s) in enumerate(shapes.items())}
    v = {n: _randn(*s, seed=seed + 10 * i + 1) for i, (n, s) in enumerate(shapes.items())}
    ali = {n: pre[n] + v[n] for n in shapes}
    return pre, ali, v


# --------------------------------------------------------------------------------------------- planted updates


def test_planted_rank_one_alignment_keeps_updates_along_u_and_removes_orthogonal_ones():
    d_out, d_in = 6, 5
    u, v = _unit(d_out, 1), _unit(d_in, 2)
    names = ["layers.0.along.weight", "layers.1.across.weight"]
    pre = {n: _randn(d_out, d_in, seed=3 + i) for i, n in enumerate(names)}
    ali = {n: pre[n] + torch.outer(u, v) for n in names}  # V = u v^T, so C = u u^T exactly
    along = torch.outer(u, _randn(d_in, seed=5))  # dW = u w^T
    across = (torch.eye(d_out, dtype=F64) - torch.outer(u, u)) @ _randn(d_out, d_in, seed=6)  # u^T dW = 0
    assert float((u @ across).abs().max()) < 1e-12
    ft = {names[0]: ali[names[0]] + along, names[1]: ali[names[1]] + across}

    new, result = safe_lora_state(ft, ali, pre, fraction=1.0)  # both selected
    assert result.projected == names
    assert result.similarity[names[0]] == pytest.approx(1.0, abs=1e-12)
    assert result.similarity[names[1]] == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(new[names[0]], ft[names[0]], rtol=0, atol=1e-12)  # projection changes nothing
    torch.testing.assert_close(new[names[1]], ali[names[1]], rtol=0, atol=1e-12)  # the update is removed

    new, result = safe_lora_state(ft, ali, pre, threshold=0.5)
    assert result.projected == [names[1]]
    assert new[names[0]] is ft[names[0]]  # not selected: the input's own tensor
    torch.testing.assert_close(new[names[1]], ali[names[1]], rtol=0, atol=1e-12)
    assert torch.equal(ft[names[1]], ali[names[1]] + across)  # inputs untouched


def test_approximate_c_rescales_by_the_singular_value_while_the_exact_projector_does_not():
    d_out, d_in = 5, 4
    u, v = _unit(d_out, 11), _unit(d_in, 12)
    name = "layers.0.w.weight"
    pre = {name: torch.zeros(d_out, d_in, dtype=F64)}
    ali = {name: 3.0 * torch.outer(u, v)}  # V = 3 u v^T: C = 3 u u^T, exact projector u u^T
    dw = torch.outer(u, _randn(d_in, seed=13))
    ft = {name: ali[name] + dw}
    approx, r1 = safe_lora_state(ft, ali, pre, threshold=2.0)
    exact, r2 = safe_lora_state(ft, ali, pre, threshold=2.0, exact=True)
    assert r1.similarity[name] == pytest.approx(1.0, abs=1e-12) and r2.similarity[name] == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(approx[name], ali[name] + 3.0 * dw, rtol=0, atol=1e-12)
    torch.testing.assert_close(exact[name], ft[name], rtol=0, atol=1e-12)
    assert r2.exact and not r1.exact


def test_similarity_and_projection_of_random_matrices_match_an_explicit_c():
    shapes = {"model.layers.0.tall.weight": (9, 4), "model.layers.0.wide.weight": (4, 9), "blocks.1.sq.weight": (6, 6)}
    pre, ali, v = _states(shapes, seed=20)
    dws = {n: _randn(*s, seed=40 + i) for i, (n, s) in enumerate(shapes.items())}
    for dtype, atol in ((F64, 1e-12), (torch.float32, 1e-5)):
        ft = {n: (ali[n] + dws[n]).to(dtype) for n in shapes}
        ali_t = {n: t.to(dtype) for n, t in ali.items()}
        pre_t = {n: t.to(dtype) for n, t in pre.items()}
        new, result = safe_lora_state(ft, ali_t, pre_t, threshold=2.0)  # every similarity is below 2
        assert result.projected == list(shapes)
        for n in shapes:
            a, p, f = ali_t[n].to(F64), pre_t[n].to(F64), ft[n].to(F64)
            c, dw = _c(a - p), f - a
            assert result.similarity[n] == pytest.approx(_sim(dw, c @ dw), abs=1e-10)
            assert new[n].dtype == dtype
            torch.testing.assert_close(new[n].to(F64), a + c @ dw, rtol=0, atol=atol)


def test_exact_projector_equals_v_pinv_v_on_rank_deficient_v():
    shapes = {"layers.0.a.weight": (8, 6), "layers.0.b.weight": (5, 9)}
    ranks = {"layers.0.a.weight": 2, "layers.0.b.weight": 3}
    pre, ali, ft = {}, {}, {}
    for i, (n, (d_out, d_in)) in enumerate(shapes.items()):
        v = _randn(d_out, ranks[n], seed=60 + i) @ _randn(ranks[n], d_in, seed=70 + i)
        assert int(torch.linalg.matrix_rank(v)) == ranks[n]
        pre[n] = _randn(d_out, d_in, seed=80 + i)
        ali[n] = pre[n] + v
        ft[n] = ali[n] + _randn(d_out, d_in, seed=90 + i)
    new, result = safe_lora_state(ft, ali, pre, fraction=1.0, exact=True)
    for n in shapes:
        v, dw = ali[n] - pre[n], ft[n] - ali[n]
        proj = v @ torch.linalg.pinv(v)
        torch.testing.assert_close(new[n], ali[n] + proj @ dw, rtol=0, atol=1e-10)
        assert result.similarity[n] == pytest.approx(_sim(dw, proj @ dw), abs=1e-10)
        # for a projector, <dW, P dW> = ||P dW||^2, so sim = ||P dW|| / ||dW||
        assert result.similarity[n] == pytest.approx(float(torch.linalg.norm(proj @ dw) / torch.linalg.norm(dw)))


# --------------------------------------------------------------------------------------------------- selection


def _planted_sims(sims: list[float], d_out: int = 5, d_in: int = 4):
    """Matrices m0, m1, ... whose update makes angle arccos(sim) with a rank-one alignment V = u v^T."""
    u = _unit(d_out, 100)
    z = (torch.eye(d_out, dtype=F64) - torch.outer(u, u)) @ _randn(d_out, seed=101)
    z = z / z.norm()
    names = [f"model.layers.{i}.mlp.weight" for i in range(len(sims))]
    pre, ali, ft = {}, {}, {}
    for i, (n, s) in enumerate(zip(names, sims)):
        w = _unit(d_in, 200 + i)
        pre[n] = _randn(d_out, d_in, seed=300 + i)
        ali[n] = pre[n] + torch.outer(u, _unit(d_in, 400 + i))
        ft[n] = ali[n] + 2.0 * torch.outer(s * u + math.sqrt(1 - s * s) * z, w)  # sim = cos(angle) = s
    return names, pre, ali, ft


@pytest.mark.parametrize(
    "option, expected",
    [
        ({"threshold": 0.5}, [1, 3]),
        ({"threshold": 0.05}, []),
        ({"threshold": 0.92}, [0, 1, 2, 3]),
        ({"fraction": 0.2}, [1]),
        ({"fraction": 0.4}, [1, 3]),
        ({"fraction": 0.41}, [1, 2, 3]),  # ceil(2.05) = 3
        ({"fraction": 0.6}, [1, 2, 3]),
        ({"fraction": 0.0}, []),
        ({"fraction": 1.0}, [0, 1, 2, 3, 4]),
    ],
)
def test_threshold_and_fraction_select_the_lowest_similarities(option, expected):
    sims = [0.9, 0.1, 0.6, 0.3, 0.95]
    names, pre, ali, ft = _planted_sims(sims)
    new, result = safe_lora_state(ft, ali, pre, **option)
    assert result.projected == [names[i] for i in expected]
    assert [result.similarity[n] for n in names] == pytest.approx(sims, abs=1e-12)
    assert result.threshold == option.get("threshold") and result.fraction == option.get("fraction")
    for i, n in enumerate(names):
        if i not in expected:
            assert new[n] is ft[n]


def test_fraction_count_is_not_pushed_up_by_float_round_off():
    sims = [0.02 + 0.9 * i / 25 for i in range(25)]
    names, pre, ali, ft = _planted_sims(sims[::-1])  # 0.28 * 25 = 7.000000000000001 in floats: still 7
    _, result = safe_lora_state(ft, ali, pre, fraction=0.28)
    assert result.projected == names[-7:]


def test_alignment_free_matrix_has_similarity_zero_and_loses_its_update_and_zero_update_has_similarity_one():
    names = ["layers.0.untouched.weight", "layers.0.unchanged.weight", "layers.0.ordinary.weight"]
    pre = {n: _randn(4, 3, seed=500 + i) for i, n in enumerate(names)}
    ali = dict(pre)
    ali[names[1]] = pre[names[1]] + _randn(4, 3, seed=510)
    ali[names[2]] = pre[names[2]] + _randn(4, 3, seed=511)
    ft = dict(ali)
    ft[names[0]] = ali[names[0]] + _randn(4, 3, seed=520)  # V = 0: C = 0
    ft[names[2]] = ali[names[2]] + _randn(4, 3, seed=521)  # names[1]: dW = 0
    for exact in (False, True):
        new, result = safe_lora_state(ft, ali, pre, fraction=0.34, exact=exact)  # ceil(1.02) = 2 matrices
        assert result.similarity[names[0]] == 0.0 and result.similarity[names[1]] == 1.0
        assert 0.0 < result.similarity[names[2]] < 1.0
        assert result.projected == [names[0], names[2]]  # the zero update never takes a place
        assert safe_lora_state(ft, ali, pre, threshold=0.0, exact=exact)[1].projected == []  # strict: 0 < 0 is false
        torch.testing.assert_close(new[names[0]], ali[names[0]], rtol=0, atol=0)  # update removed entirely


# ------------------------------------------------------------------------------------------ tiny Llama models


def _tiny_llama(seed: int = 0):
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).float().eval()


def _perturbed(state: dict[str, torch.Tensor], seed: int, match: str = ".layers.") -> dict[str, torch.Tensor]:
    """The state dict minus a random V on every decoder matrix (the "pretrained" model of an aligned one)."""
    out = {}
    for i, (k, t) in enumerate(state.items()):
        out[k] = t - 0.1 * _randn(*t.shape, seed=seed + i, dtype=t.dtype) if (match in k and t.ndim == 2) else t
    return out


def test_lora_projection_merges_to_w_plus_scaling_c_b_a_on_projected_modules():
    model = _tiny_llama()
    aligned = {k: t.detach().clone() for k, t in model.state_dict().items()}
    pretrained = _perturbed(aligned, seed=1000)
    r, alpha = 4, 8
    pm = peft.get_peft_model(
        model, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )
    scaling = alpha / r
    originals = {}
    with torch.no_grad():
        for l in range(2):
            for proj in ("q_proj", "v_proj"):
                layer = getattr(pm.base_model.model.model.layers[l].self_attn, proj)
                layer.lora_B["default"].weight.copy_(
                    _randn(*layer.lora_B["default"].weight.shape, seed=l * 7 + len(proj))
                )
                name = f"model.layers.{l}.self_attn.{proj}.weight"
                originals[name] = (
                    layer.lora_A["default"].weight.detach().to(F64).clone(),
                    layer.lora_B["default"].weight.detach().to(F64).clone(),
                )
    hand = {}
    for name, (a, b) in originals.items():
        c = _c(aligned[name].to(F64) - pretrained[name].to(F64))
        dw = scaling * b @ a
        hand[name] = _sim(dw, c @ dw)
    expected = sorted(hand, key=hand.get)[:2]

    result = safe_lora_project(pm, aligned, pretrained, fraction=0.5)
    assert set(result.similarity) == set(originals)
    for name in originals:
        assert result.similarity[name] == pytest.approx(hand[name], abs=1e-9)
    assert sorted(result.projected) == sorted(expected)

    merged = copy.deepcopy(pm).merge_and_unload().state_dict()
    for name, (a, b) in originals.items():
        c = _c(aligned[name].to(F64) - pretrained[name].to(F64))
        update = scaling * (c @ b @ a if name in expected else b @ a)
        torch.testing.assert_close(merged[name].to(F64), aligned[name].to(F64) + update, rtol=0, atol=1e-5)
    for name, t in aligned.items():
        if name not in originals:
            assert torch.equal(merged[name], t), name  # k_proj, MLP, norms, embeddings: untouched


def test_full_finetune_projects_to_w_align_plus_c_dw_and_keeps_other_weights():
    model = _tiny_llama(seed=1)
    aligned = {k: t.detach().clone() for k, t in model.state_dict().items()}
    pretrained = _perturbed(aligned, seed=2000)
    matrices = [k for k, t in aligned.items() if ".layers." in k and t.ndim == 2]
    assert len(matrices) == 14
    # Two planted low-similarity matrices: V rank one (u v^T) and dW orthogonal to u.
    for i, k in enumerate(matrices[:2]):
        d_out, d_in = aligned[k].shape
        u = _unit(d_out, 2100 + i)
        pretrained[k] = aligned[k] - torch.outer(u, _unit(d_in, 2200 + i)).float()
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            if name in matrices:
                dw = 0.05 * _randn(*p.shape, seed=3000 + i)
                if name in matrices[:2]:
                    v = (aligned[name] - pretrained[name]).to(F64)
                    u = torch.linalg.svd(v).U[:, :1]
                    dw = dw - u @ (u.T @ dw)
                p.add_(dw.float())
            elif p.ndim == 2:  # the embedding (tied to the unembedding): changed but never projected
                p.add_(0.01)
    finetuned = {k: t.detach().clone() for k, t in model.state_dict().items()}

    hand = {}
    for k in matrices:
        a = aligned[k].to(F64)
        dw, c = finetuned[k].to(F64) - a, _c(a - pretrained[k].to(F64))
        hand[k] = _sim(dw, c @ dw)
    expected = [k for k in matrices if hand[k] < 0.5]
    assert matrices[0] in expected and matrices[1] in expected and len(expected) < len(matrices)

    state_new, state_result = safe_lora_state(finetuned, aligned, pretrained, threshold=0.5)
    result = safe_lora_project(model, aligned, pretrained, threshold=0.5)
    assert result.projected == expected == state_result.projected
    for k in matrices:
        assert result.similarity[k] == pytest.approx(hand[k], abs=1e-9)
    after = model.state_dict()
    for k, t in finetuned.items():
        if k in expected:
            a = aligned[k].to(F64)
            want = a + _c(a - pretrained[k].to(F64)) @ (t.to(F64) - a)
            torch.testing.assert_close(after[k].to(F64), want, rtol=0, atol=1e-6)
            torch.testing.assert_close(state_new[k].to(F64), want, rtol=0, atol=1e-6)
        else:
            assert torch.equal(after[k], t), k
            assert state_new[k] is t


# ------------------------------------------------------------------------------------ GPT-2 Conv1D, name forms


def _tiny_gpt2():
    cfg = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=8, n_layer=1, n_head=2)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).float().eval()


def test_gpt2_conv1d_weights_are_projected_on_their_output_side_full_and_lora():
    name = "transformer.h.0.attn.c_attn.weight"  # Conv1D: stored [d_in, d_out] = [8, 24]
    model = _tiny_gpt2()
    aligned = {k: t.detach().clone() for k, t in model.state_dict().items()}
    pretrained = _perturbed(aligned, seed=4000, match=".h.")
    v_out = (aligned[name].to(F64) - pretrained[name].to(F64)).T  # [d_out, d_in]
    c = _c(v_out)

    full = copy.deepcopy(model)
    dw_stored = 0.05 * _randn(8, 24, seed=4100)
    with torch.no_grad():
        full.transformer.h[0].attn.c_attn.weight.add_(dw_stored.float())
    result = safe_lora_project(full, aligned, pretrained, fraction=1.0, names="c_attn")
    assert result.projected == [name]
    want = aligned[name].to(F64) + (c @ dw_stored.float().to(F64).T).T
    torch.testing.assert_close(full.state_dict()[name].to(F64), want, rtol=0, atol=1e-6)

    config = peft.LoraConfig(r=2, lora_alpha=2, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0)
    pm = peft.get_peft_model(copy.deepcopy(model), config)
    layer = pm.base_model.model.transformer.h[0].attn.c_attn
    with torch.no_grad():
        layer.lora_B["default"].weight.copy_(_randn(24, 2, seed=4200))
    a = layer.lora_A["default"].weight.detach().to(F64).clone()
    b = layer.lora_B["default"].weight.detach().to(F64).clone()
    result = safe_lora_project(pm, aligned, pretrained, threshold=2.0)
    assert result.projected == [name]
    merged = pm.merge_and_unload().state_dict()
    torch.testing.assert_close(merged[name].to(F64), aligned[name].to(F64) + (c @ b @ a).T, rtol=0, atol=1e-5)


class _Wrapped(torch.nn.Module):
    """A TransformerBridge-style wrapper: the HF layer lives at ``._original_component``."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self._original_component = inner


def test_bridge_names_suffix_matches_and_aliased_state_keys_map_to_hf_names():
    root = torch.nn.Module()
    root.model = torch.nn.Module()
    root.model.layers = torch.nn.ModuleList([_Wrapped(torch.nn.Linear(3, 4, bias=False))])
    bridge = torch.nn.Module()
    bridge.original_model = root  # a bridge is read through its original_model
    u = _unit(4, 5000)
    pre = {"layers.0.weight": torch.zeros(4, 3)}  # no "model." prefix: matched by suffix
    ali = {"layers.0.weight": torch.outer(u, _unit(3, 5001)).float()}
    across = ((torch.eye(4, dtype=F64) - torch.outer(u, u)) @ _randn(4, 3, seed=5002)).float()
    with torch.no_grad():
        root.model.layers[0]._original_component.weight.copy_(ali["layers.0.weight"] + across)
    result = safe_lora_project(bridge, ali, pre, threshold=0.5)
    assert result.projected == ["model.layers.0.weight"] and result.similarity["model.layers.0.weight"] < 1e-6
    torch.testing.assert_close(
        root.model.layers[0]._original_component.weight, ali["layers.0.weight"], atol=1e-6, rtol=0
    )

    # A bridge's state dict also lists aliases (self_attn.q for self_attn.q_proj) sharing one tensor.
    w = ali["layers.0.weight"] + across
    ft = {"model.layers.0._original_component.q.weight": w, "model.layers.0._original_component.q_proj.weight": w}
    ali2 = {"model.layers.0.q_proj.weight": ali["layers.0.weight"]}
    pre2 = {"model.layers.0.q_proj.weight": pre["layers.0.weight"]}
    new, result = safe_lora_state(ft, ali2, pre2, threshold=0.5)
    assert list(result.similarity) == ["model.layers.0.q_proj.weight"]
    assert new["model.layers.0._original_component.q.weight"] is new["model.layers.0._original_component.q_proj.weight"]
    torch.testing.assert_close(new["model.layers.0._original_component.q.weight"], ali2["model.layers.0.q_proj.weight"])


# ------------------------------------------------------------------------------------------- errors and result


def test_errors_name_the_problem_and_leave_the_model_untouched():
    names, pre, ali, ft = _planted_sims([0.2, 0.8])
    with pytest.raises(ValueError, match="exactly one of threshold= .* got both"):
        safe_lora_state(ft, ali, pre, threshold=0.5, fraction=0.5)
    with pytest.raises(ValueError, match="exactly one of threshold= .* got neither"):
        safe_lora_state(ft, ali, pre)
    with pytest.raises(ValueError, match=r"fraction=1.5 must be a number in \[0, 1\]"):
        safe_lora_state(ft, ali, pre, fraction=1.5)
    missing = {k: t for k, t in ali.items() if k != names[1]}
    with pytest.raises(ValueError, match=rf"weight '{names[1]}' has no counterpart in the aligned state dict"):
        safe_lora_state(ft, missing, pre, threshold=0.5)
    bad = dict(pre)
    bad[names[0]] = torch.zeros(4, 5, dtype=F64)
    with pytest.raises(ValueError, match=rf"weight '{names[0]}' has different shapes: .*pretrained \(4, 5\)"):
        safe_lora_state(ft, ali, bad, threshold=0.5)
    with pytest.raises(ValueError, match="no 2-D floating-point weight matched names='nothing'"):
        safe_lora_state(ft, ali, pre, threshold=0.5, names="nothing")
    lora_state = {"model.layers.0.q_proj.lora_A.default.weight": torch.zeros(2, 4)}
    with pytest.raises(ValueError, match="is a LoRA adapter weight, not a full weight: merge the adapter"):
        safe_lora_state(lora_state, ali, pre, threshold=0.5)

    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Linear(4, 5, bias=False) for _ in range(2)])
    state = {f"layers.{i}.weight": _randn(5, 4, seed=600 + i, dtype=torch.float32) for i in range(2)}
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="weight 'layers.1.weight' has no counterpart in the pretrained state dict"):
        safe_lora_project(model, state, {"layers.0.weight": state["layers.0.weight"]}, threshold=1.0)
    with pytest.raises(ValueError, match=r"weight 'layers.0.weight' has different shapes: finetuned \(5, 4\)"):
        safe_lora_project(model, {k: t.T for k, t in state.items()}, state, fraction=1.0)
    assert all(torch.equal(model.state_dict()[k], t) for k, t in before.items())  # nothing half-projected


def test_result_to_dict_is_json_and_summary_is_one_line():
    names, pre, ali, ft = _planted_sims([0.25, 0.75])
    _, result = safe_lora_state(ft, ali, pre, threshold=0.5, exact=True)
    data = json.loads(json.dumps(result.to_dict()))
    assert data == {
        "similarity": pytest.approx({names[0]: 0.25, names[1]: 0.75}),
        "projected": [names[0]],
        "threshold": 0.5,
        "fraction": None,
        "exact": True,
    }
    assert ProjectionResult(**data).projected == result.projected
    line = result.summary()
    assert "\n" not in line and "projected 1 of 2 matrices" in line and "sim < 0.5" in line


def test_docstring_examples_run():
    outcome = doctest.testmod(wp, optionflags=doctest.ELLIPSIS)
    assert outcome.attempted >= 10 and outcome.failed == 0
