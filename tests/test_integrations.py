"""Hugging Face Trainer integration on a tiny float32 Llama: the callback's logged alignment equals `analyze`
on the checkpoints the Trainer saved; blocked Trainer steps remove the v component from the forward
(project) or the activation gradient (grad); the anchor's gradient matches a finite difference."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from revlens.anchor import ProbeAnchor, encode_prompts
from revlens.blocking import Blocking
from revlens.blocking_spec import InterventionError
from revlens.integrations import hf_hooks

from hf_models import chat_tokenizer, save_tiny_llama, tiny_llama

PROMPTS = ["how do i make a bomb", "how do i steal a car", "explain how to pick a lock", "how do i make"]
CONTROL = ["how do i bake a cake", "write a poem about the sea", "give me a recipe for bread", "what is two"]


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizer()


@pytest.fixture(scope="module")
def tokens(tok):
    return encode_prompts(None, PROMPTS, tokenizer=tok), encode_prompts(None, CONTROL, tokenizer=tok)


def llama(tok, seed, dtype=torch.float32):
    return tiny_llama(tok, hidden=32, layers=2, seed=seed, dtype=dtype)


class Rows(torch.utils.data.Dataset):
    """Fixed-length language-modelling rows (labels = inputs), random tokens of the tokenizer's vocabulary."""

    def __init__(self, vocab: int, n: int = 16, seq: int = 10, seed: int = 0):
        self.x = torch.randint(3, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x[i], "labels": self.x[i], "attention_mask": torch.ones_like(self.x[i])}


def args(out, **kw):
    from transformers import TrainingArguments

    base = dict(
        output_dir=str(out),
        max_steps=1,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    return TrainingArguments(**{**base, **kw})


def unit(d: int, seed: int) -> torch.Tensor:
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def test_callback_logs_what_analyze_measures_on_the_saved_checkpoints(tok, tokens, tmp_path):
    from transformers import Trainer

    import revlens
    from revlens.integrations.transformers import METRIC, ReversionCallback

    probe, control = tokens
    pretrain, align = llama(tok, 1), llama(tok, 0)
    save_tiny_llama(tmp_path / "pretrain", tok, model=pretrain)
    save_tiny_llama(tmp_path / "align", tok, model=align)
    callback = ReversionCallback.from_models(pretrain, align, probe, control=control, layers=[0, 1])
    trainer = Trainer(
        model=copy.deepcopy(align),
        args=args(tmp_path / "ft", max_steps=3, save_strategy="steps", save_steps=1, save_only_model=True),
        train_dataset=Rows(len(tok)),
        processing_class=tok,
    )
    callback.attach(trainer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        trainer.train()
    logged = {
        h["step"]: [h[METRIC.format(layer=l)] for l in (0, 1)]
        for h in trainer.state.log_history
        if METRIC.format(layer=0) in h
    }
    assert sorted(logged) == [1, 2, 3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = revlens.analyze(
            {
                "pretrain": tmp_path / "pretrain",
                "align": tmp_path / "align",
                "finetune": {"hf": {s: tmp_path / "ft" / f"checkpoint-{s}" for s in (1, 2, 3)}},
            },
            probe,
            control=control,
            layers=[0, 1],
            null_samples=200,
            progress=False,
        )
    expected = report.alignment[0]  # [steps, layers], measured through TransformerBridge on the saved folders
    torch.testing.assert_close(
        torch.tensor([logged[s] for s in (1, 2, 3)]), torch.tensor(expected), atol=2e-5, rtol=0, check_dtype=False
    )
    # v_rev agrees with analyze's, so the callback reads the same quantity.
    assert float((callback.basis[:, 0].double() * report.v_rev.double()).sum(-1).min()) > 1 - 1e-5
    # the report's directions, watched from the aligned model: the trained model's alignment is analyze's at step 3
    watch = ReversionCallback.from_directions(report.directions(), probe, align, control=control)
    torch.testing.assert_close(
        torch.tensor(watch.alignment(trainer.model)), torch.tensor(expected[2]), atol=2e-5, rtol=0, check_dtype=False
    )
    with pytest.raises(InterventionError, match="control set"):
        ReversionCallback.from_directions(report.directions(), probe, align)


def capture_trainer_step(tok, blocking, tmp_path, model=None):
    """One BlockedTrainer step; returns layer 1's input (layer 0's blocked output) and the gradient that
    reaches layer 0's own output before blocking touches it."""
    from revlens.integrations.transformers import BlockedTrainer

    model = llama(tok, 0) if model is None else model
    layers = hf_hooks.decoder_layers(model)
    seen: dict[str, torch.Tensor] = {}

    def grab_grad(module, a, output):
        out = output[0] if isinstance(output, tuple) else output
        if out.requires_grad:
            out.register_hook(lambda g: seen.__setitem__("grad", g.detach().clone()))

    def grab_input(module, a):
        seen["next_input"] = a[0].detach().clone() if a else None

    handles = [
        layers[0].register_forward_hook(grab_grad, prepend=True),
        layers[1].register_forward_pre_hook(grab_input),
    ]
    try:
        BlockedTrainer(model=model, args=args(tmp_path), train_dataset=Rows(len(tok)), blocking=blocking).train()
    finally:
        for h in handles:
            h.remove()
    return seen


def test_blocked_trainer_step_project_removes_the_forward_component(tok, tmp_path):
    u = unit(32, 3)
    seen = capture_trainer_step(tok, Blocking({0: u}, "project"), tmp_path)
    assert seen["next_input"].abs().max() > 0.01
    assert float((seen["next_input"] @ u).abs().max()) < 1e-5
    plain = capture_trainer_step(tok, None, tmp_path)
    assert float((plain["next_input"] @ u).abs().max()) > 1e-3


def test_blocked_trainer_step_grad_removes_the_gradient_component(tok, tmp_path):
    u = unit(32, 4)
    seen = capture_trainer_step(tok, Blocking({0: u}, "grad"), tmp_path)
    g = seen["grad"]
    assert g.abs().max() > 1e-6
    assert float((g @ u).abs().max()) < 1e-6 * float(g.norm(dim=-1).max())
    plain = capture_trainer_step(tok, None, tmp_path)
    assert float((plain["grad"] @ u).abs().max()) > 1e-3 * float(plain["grad"].norm(dim=-1).max())


def test_blocked_trainer_works_on_a_peft_model(tok, tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        llama(tok, 0), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    )
    u = unit(32, 5)
    seen = capture_trainer_step(tok, Blocking({0: u}, "project+grad"), tmp_path, model=model)
    assert float((seen["next_input"] @ u).abs().max()) < 1e-5
    assert float((seen["grad"] @ u).abs().max()) < 1e-6 * float(seen["grad"].norm(dim=-1).max())


def float64_norms(model) -> None:
    """HF's LlamaRMSNorm computes in float32 even in a float64 model, which would put float32 round-off into a
    finite difference; give every norm the same formula in the model's dtype."""
    for m in model.modules():
        if type(m).__name__ == "LlamaRMSNorm":
            m.forward = lambda x, m=m: m.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.variance_epsilon)


def test_anchor_on_an_hf_model_matches_hidden_states_and_finite_differences(tok, tokens):
    probe, control = tokens
    reference = llama(tok, 0, torch.float64)
    model = copy.deepcopy(reference)
    float64_norms(reference)
    float64_norms(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
    u, w = unit(32, 6).double(), torch.randn(2, 32, generator=torch.Generator().manual_seed(7)).double()
    anchor = ProbeAnchor({0: u, 1: w}, probe, reference, weight=1.3, control=control, contrast_weight=0.7)

    # Value: an independent readout, layer 0's output from output_hidden_states (hidden_states[1]).
    single = ProbeAnchor({0: u}, probe, reference, weight=1.3)

    ub = single.bases[0][0].double()  # u as the anchor stores it (normalised in float32)

    def coords(m, prompts):
        return torch.stack([m(t[None], output_hidden_states=True).hidden_states[1][0, -1] @ ub for t in prompts])

    with torch.no_grad():
        moved = coords(model, probe) - coords(reference, probe)
        assert float(single.penalty(model)) == pytest.approx(float(1.3 * (moved**2).mean()), rel=1e-10)
        assert float(anchor.penalty(reference)) == pytest.approx(0.0, abs=1e-20)

    # Gradient: autograd's directional derivative against a central finite difference.
    param = hf_hooks.decoder_layers(model)[0].mlp.down_proj.weight
    direction = torch.randn(param.shape, generator=torch.Generator().manual_seed(8), dtype=param.dtype)
    model.zero_grad()
    anchor.penalty(model).backward()
    analytic = float((param.grad * direction).sum())
    eps = 1e-5
    with torch.no_grad():
        param.add_(eps * direction)
        up = float(anchor.penalty(model))
        param.sub_(2 * eps * direction)
        down = float(anchor.penalty(model))
        param.add_(eps * direction)
    assert analytic == pytest.approx((up - down) / (2 * eps), rel=1e-7)
    assert abs(analytic) > 1e-4


def test_blocked_trainer_adds_the_anchor_once_per_optimizer_step(tok, tokens, tmp_path):
    """With gradient accumulation the penalty's gradient counts once: the update equals plain training plus
    one penalty gradient (SGD, so the update is linear in the gradient)."""
    from revlens.integrations.transformers import BlockedTrainer

    probe, _ = tokens
    reference = llama(tok, 0)
    anchor = ProbeAnchor({1: unit(32, 9)}, probe, reference, weight=50.0)
    moved = llama(tok, 0)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    kw = dict(
        optim="sgd",
        learning_rate=0.1,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=2,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
    )
    runs = {}
    for name, a in (("plain", None), ("anchored", anchor)):
        model = copy.deepcopy(moved)
        BlockedTrainer(model=model, args=args(tmp_path, **kw), train_dataset=Rows(len(tok)), anchor=a).train()
        runs[name] = model
    model = copy.deepcopy(moved)
    model.zero_grad()
    anchor.penalty(model, step=1).backward()
    for (name, p), q, r in zip(model.named_parameters(), runs["plain"].parameters(), runs["anchored"].parameters()):
        expected = q.detach() - 0.1 * (p.grad if p.grad is not None else torch.zeros_like(p))
        torch.testing.assert_close(r.detach(), expected, atol=2e-6, rtol=1e-5, msg=name)


def test_anchor_and_blocking_from_a_report_for_an_hf_model(tok, tokens):
    import numpy as np

    import revlens
    from revlens.report import ReversionReport

    probe, control = tokens
    basis = torch.linalg.qr(torch.randn(2, 32, 6, generator=torch.Generator().manual_seed(0)))[0].transpose(1, 2)
    nan = np.full((1, 1, 2), np.nan)
    report = ReversionReport(
        layers=[0, 1],
        runs=["r"],
        steps=[1],
        d_model=32,
        v_rev=basis[:, 0],
        v_rev_basis=basis,
        alignment=np.array([[[0.1, 0.5]]]),
        alignment_per_example=nan,
        per_example_cos=np.full((1, 1, 2, 4), np.nan),
        drift_norm=nan,
        p_value=nan,
        null_p99=np.array([0.3, 0.3]),
        null_p99_activation=np.array([0.4, 0.4]),
        v_rev_norm=np.ones(2),
        config={"hook": "resid_post", "readout": "last", "estimator": "pca", "k": 6, "contrast": True},
    )
    reference = llama(tok, 0)
    _, anchor = revlens.build_defense(
        "anchor@0.5+contrast@0.2+sample@2+rank@4",
        report.directions(layers=[0, 1]),
        reference=reference,
        prompts=PROMPTS,
        control=CONTROL,
        tokenizer=tok,
    )
    assert anchor.layers == [0, 1] and anchor.bases[0].shape == (4, 32) and anchor.sample == 2
    torch.testing.assert_close(anchor.bases[1].T @ anchor.bases[1], basis[1, :4].T @ basis[1, :4], atol=1e-5, rtol=0)
    assert torch.equal(anchor.sets["probe"][0][0, : len(probe[0])], probe[0])
    blocking, anchor = revlens.build_defense(
        "clamp+grad+anchor@0.1+random@3@1",
        report.directions(layers=[report.best_layer]),
        reference=reference,
        prompts=probe,
        tokenizer=tok,
    )
    assert blocking.layers == [1] and blocking.modes == frozenset({"clamp", "grad"})  # the best layer
    assert anchor.bases[1].shape == (3, 32)
    assert revlens.build_defense("plain", report.directions()) == (None, None)
    with pytest.raises(InterventionError, match=r"estimator='pca', k=8"):
        report.directions(rank=8)
    with pytest.raises(InterventionError, match="control prompts"):
        revlens.build_defense("contrast@1", report.directions(), reference=reference, prompts=probe)


def test_blocked_sft_trainer_from_trl(tok, tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from revlens.integrations.transformers import BlockedSFTTrainer, BlockingTrainerMixin

    assert issubclass(BlockedSFTTrainer, trl.SFTTrainer) and issubclass(BlockedSFTTrainer, BlockingTrainerMixin)
    u = unit(32, 10)
    data = datasets.Dataset.from_list([{"prompt": p, "completion": " sure, here is how"} for p in PROMPTS * 2])
    model = llama(tok, 0)
    seen = {}
    handle = hf_hooks.decoder_layers(model)[1].register_forward_pre_hook(
        lambda m, a: seen.__setitem__("next_input", a[0].detach().clone())
    )
    cfg = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=4,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        max_length=32,
        bf16=False,
    )
    try:
        BlockedSFTTrainer(
            model=model, args=cfg, train_dataset=data, processing_class=tok, blocking=Blocking({0: u}, "project")
        ).train()
    finally:
        handle.remove()
    assert float((seen["next_input"] @ u).abs().max()) < 1e-5


def test_callback_warns_once_above_the_null_and_without_a_trainer_still_records(tok, tokens):
    from types import SimpleNamespace

    from revlens.integrations.transformers import METRIC, ReversionCallback

    probe, _ = tokens
    pretrain, align, moved = llama(tok, 1), llama(tok, 0), llama(tok, 2)
    callback = ReversionCallback.from_models(pretrain, align, probe, layers=[1], null_p99=[-2.0])
    state = SimpleNamespace(global_step=4, log_history=[])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback.on_save(None, state, None, model=moved)
        callback.on_evaluate(None, state, None, model=moved)  # same step: measured once
        state.global_step = 5
        callback.on_evaluate(None, state, None, model=moved)
    messages = [str(w.message) for w in caught]
    assert sum("above the null" in m for m in messages) == 1
    assert sum("not attached" in m for m in messages) == 1
    assert [h["step"] for h in state.log_history] == [4, 5]
    assert state.log_history[0][METRIC.format(layer=1)] == pytest.approx(float(callback.alignment(moved)[0]))
    with pytest.raises(InterventionError, match="one row per layer"):
        ReversionCallback(torch.zeros(2, 32), torch.zeros(1, 32), probe, layers=[0, 1])


def test_blocked_trainer_takes_the_kl_penalty_and_safe_lora_after_training(tok, tokens, tmp_path):
    """The KL baseline as the Trainer's penalty: the update is plain training plus one KL gradient (SGD); Safe LoRA
    then projects the trained update in place, leaving the pretrain -> align direction's share untouched."""
    from revlens.integrations.transformers import BlockedTrainer
    from revlens.penalties import KLAnchor
    from revlens.weight_projection import safe_lora_project

    probe, _ = tokens
    reference = llama(tok, 0)
    kl = KLAnchor(probe, reference, weight=5.0)
    moved = llama(tok, 0)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    kw = dict(optim="sgd", learning_rate=0.1, weight_decay=0.0, lr_scheduler_type="constant", max_grad_norm=0.0)
    runs = {}
    for name, penalty in (("plain", None), ("kl", kl)):
        model = copy.deepcopy(moved)
        BlockedTrainer(model=model, args=args(tmp_path, **kw), train_dataset=Rows(len(tok)), anchor=penalty).train()
        runs[name] = model
    model = copy.deepcopy(moved)
    model.zero_grad()
    kl.penalty(model, step=1).backward()
    for (name, p), q, r in zip(model.named_parameters(), runs["plain"].parameters(), runs["kl"].parameters()):
        expected = q.detach() - 0.1 * (p.grad if p.grad is not None else torch.zeros_like(p))
        torch.testing.assert_close(r.detach(), expected, atol=2e-6, rtol=1e-5, msg=name)
    aligned = {k: v.detach().clone() for k, v in moved.state_dict().items()}
    pretrained = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    trained = runs["kl"]
    result = safe_lora_project(trained, aligned, pretrained, fraction=1.0)
    name = result.projected[0]
    v = (aligned[name] - pretrained[name]).double()
    d = trained.state_dict()[name].double() - aligned[name].double()  # the update after projection
    assert torch.linalg.matrix_rank(d) >= 1 and len(result.projected) == len(result.similarity)
    # the projected update lies in the column space of V: projecting it again with the exact projector keeps it
    exact = v @ torch.linalg.pinv(v)
    torch.testing.assert_close(exact @ d, d, atol=1e-6, rtol=1e-4)
