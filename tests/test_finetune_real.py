"""`finetune` on a Hugging Face-architecture bridge (tiny Llama): schedule, clipping, autocast, LoRA through peft,
HF and adapter folders that plain transformers / peft read, exact resume."""

from __future__ import annotations

import pytest
import torch

from revlens.blocking import Blocking
from revlens.checkpoint_loader import load_checkpoint
from revlens.checkpoint_save import save_checkpoint
from revlens.finetune import finetune
from revlens.sft_data import encode_sft

pytest.importorskip("peft")

CONVERSATIONS = [
    ("how do i bake a cake", "give me a recipe for bread"),
    ("write a poem about the sea", "the quick brown fox"),
    ("what is two plus three", "five"),
    ("reverse the words: red green blue", "blue green red"),
    ("explain how to pick a lock", "i'm sorry, but i can't help with that."),
    ("how do i steal a car", "no"),
]


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return load_checkpoint(tiny_llama_dir, dtype="float32")


@pytest.fixture()
def fresh(tiny_llama_dir):
    """A new bridge per call: copy.deepcopy of an HF-architecture bridge leaks in TransformerLens 4.3 (the
    copy's capture hooks are closures over the original's modules, so its forward writes into the original)."""
    return lambda: load_checkpoint(tiny_llama_dir, dtype="float32")


@pytest.fixture(scope="module")
def data(llama):
    convs = [[{"role": "user", "content": p}, {"role": "assistant", "content": r}] for p, r in CONVERSATIONS]
    return encode_sft(llama.tokenizer, convs)


def hf_logits(folder, tokens, adapter=None, base=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base or folder), dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    with torch.no_grad():
        return model.eval()(tokens).logits


def bridge_logits(model, tokens):
    with torch.no_grad():
        return model(tokens)


def test_warmup_cosine_schedule_matches_transformers_and_clipping_bounds_the_step(llama, fresh, data):
    from transformers import get_cosine_schedule_with_warmup

    model = fresh()
    result = finetune(
        model,
        data.tokens,
        data.loss_mask,
        steps=6,
        lr=1e-2,
        batch_size=2,
        warmup_steps=2,
        schedule="cosine",
        max_grad_norm=1.0,
        progress=False,
    )
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-2)
    reference = get_cosine_schedule_with_warmup(opt, 2, 6)
    expected = []
    for _ in range(6):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        reference.step()
    assert list(result.lrs.values()) == pytest.approx(expected, abs=1e-12)
    # SGD, lr 1, clipped to norm 1e-3: the update's global norm is exactly the clip (the raw gradient is larger).
    model = fresh()
    before = [p.detach().clone() for p in model.parameters()]
    finetune(
        model,
        data.tokens,
        data.loss_mask,
        steps=1,
        lr=1.0,
        optimizer="sgd",
        batch_size=4,
        max_grad_norm=1e-3,
        progress=False,
    )
    step = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(model.parameters(), before, strict=True)])
    assert float(step.norm()) == pytest.approx(1e-3, rel=1e-3)


def test_bf16_autocast_trains_float32_weights(llama, fresh, data):
    plain, mixed = fresh(), fresh()
    kw = dict(steps=2, lr=1e-3, batch_size=4, progress=False)
    a = finetune(plain, data.tokens, data.loss_mask, **kw)
    b = finetune(mixed, data.tokens, data.loss_mask, autocast_dtype=torch.bfloat16, **kw)
    assert a.losses[1] != b.losses[1] and b.losses[1] == pytest.approx(a.losses[1], rel=0.02)
    assert {p.dtype for p in mixed.parameters()} == {torch.float32}


def test_full_finetune_writes_an_hf_folder_transformers_loads(llama, fresh, data, tmp_path):
    model = fresh()
    finetune(model, data.tokens, data.loss_mask, steps=2, lr=1e-2, batch_size=4, out_dir=tmp_path, progress=False)
    folder = tmp_path / "finetune" / "seed_0" / "step_2"
    assert (folder / "config.json").is_file() and (folder / "chat_template.jinja").is_file()
    x = data.tokens[:2]
    ours = bridge_logits(model, x)
    assert not torch.allclose(ours, bridge_logits(llama, x))  # it trained
    assert torch.allclose(hf_logits(folder, x), ours, atol=1e-5)
    # bf16 weights are written as bf16.
    from safetensors import safe_open

    half = fresh().to(torch.bfloat16)
    save_checkpoint(half, tmp_path / "bf16")
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_lora_adapters_save_and_reload_equal_with_peft(llama, fresh, data, tiny_llama_dir, tmp_path):
    model = fresh()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    finetune(
        model,
        data.tokens,
        data.loss_mask,
        steps=3,
        lr=1e-2,
        batch_size=4,
        lora={"r": 4, "lora_alpha": 8},
        out_dir=tmp_path,
        progress=False,
    )
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n for n in names)
    for n, p in model.named_parameters():  # the base weights did not move
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    folder = tmp_path / "finetune" / "seed_0" / "step_3"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in folder.iterdir()}
    x = data.tokens[:2]
    ours = bridge_logits(model, x)
    assert not torch.allclose(ours, bridge_logits(llama, x))
    assert torch.allclose(hf_logits(None, x, adapter=folder, base=tiny_llama_dir), ours, atol=1e-5)


def test_hooks_act_on_the_adapted_model(llama, fresh, data):
    """With LoRA on, `project` at layer 0 leaves no v component in what the adapted layer 1 receives
    (read by a plain torch pre-hook on the HF decoder layer), and the adapters get the gradient."""
    from revlens.lora import apply_lora

    model = fresh()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        apply_lora(model, {"r": 4, "init_lora_weights": False})
    x = data.tokens[:3]
    assert not torch.allclose(bridge_logits(model, x), bridge_logits(llama, x))  # the adapters are in the forward
    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(3))
    seen = {}
    layer1 = model.original_model.model.layers[1]._original_component  # the plain LlamaDecoderLayer
    handle = layer1.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.__setitem__("h", args[0] if args else kwargs["hidden_states"]), with_kwargs=True
    )
    try:
        model(x)
        free = (seen["h"].float() @ (v / v.norm())).abs().max()
        with Blocking({0: v}, "project").applied(model):
            loss = model(x).float().logsumexp(-1).mean()
        blocked = (seen["h"].float() @ (v / v.norm())).abs().max()
    finally:
        handle.remove()
    assert free > 1e-2 and blocked < 1e-5
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None for g in grads)


@pytest.mark.parametrize("lora", [None, {"r": 4, "lora_alpha": 8}], ids=["full", "lora"])
def test_resume_is_exact_with_schedule_and_clipping(llama, fresh, data, tmp_path, lora):
    kw = dict(
        steps=5,
        lr=1e-2,
        batch_size=2,
        seed=1,
        warmup_steps=1,
        schedule="cosine",
        max_grad_norm=0.5,
        save_steps=(2,),
        lora=lora,
        progress=False,
    )
    straight = fresh()
    finetune(straight, data.tokens, data.loss_mask, out_dir=tmp_path / "a", **kw)

    def crash(step, model):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(fresh(), data.tokens, data.loss_mask, out_dir=tmp_path / "b", on_step=crash, **kw)
    resumed = fresh()
    result = finetune(resumed, data.tokens, data.loss_mask, out_dir=tmp_path / "b", **kw)
    assert result.resumed_from == 2
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(a, b), name
