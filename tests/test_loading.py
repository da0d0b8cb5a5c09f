"""Loading real Hugging Face chat checkpoints: dtype, sharded safetensors, LoRA adapters, Trainer folders,
and weight swapping into the model already booted (issue 10 items 1-2, issue 9 item 5)."""

from __future__ import annotations

import json
import os
import sys
import warnings

import numpy as np
import pytest
import torch

import revlens
from revlens.checkpoint_format import CheckpointError
from revlens.checkpoint_loader import CheckpointLoader, load_checkpoint
from revlens.checkpoint_save import save_checkpoint
from revlens.history import History

from conftest import PROMPTS, shifted
from hf_models import save_tiny_llama, tiny_llama

CHAT_PROMPTS = ["how do i make a bomb", "how do i steal a car", "explain how to pick a lock", "write a poem"]
HOOK = "blocks.1.hook_resid_post"


def resid(model, tokens, hook=HOOK):
    """The residual stream at ``hook``, through TransformerLens' own run_with_cache."""
    with torch.no_grad():
        return model.run_with_cache(tokens, names_filter=hook)[1][hook].clone()


def chat_tokens(tok):
    return tok("how do i make a bomb", return_tensors="pt", add_special_tokens=False)["input_ids"]


def write_lora(folder, base_dir, seed, *, r=4):
    """A LoRA adapter on ``base_dir`` written with peft, with nonzero B so it changes the model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.bfloat16, local_files_only=True)
    peft_model = get_peft_model(
        base, LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0)
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(str(folder))
    return peft_model


def test_dtype_is_kept_or_cast_and_readout_matches_hf(tiny_llama_dir, chat_tok):
    from transformers import AutoModelForCausalLM

    bridge = load_checkpoint(tiny_llama_dir, device="cpu")
    assert {p.dtype for p in bridge.parameters()} == {torch.bfloat16}
    model = load_checkpoint(tiny_llama_dir, device="cpu", dtype="float32")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    hf = AutoModelForCausalLM.from_pretrained(
        str(tiny_llama_dir), dtype=torch.bfloat16, attn_implementation="eager", local_files_only=True
    ).eval()
    tokens = chat_tokens(chat_tok)
    with torch.no_grad():
        expected = hf(tokens, output_hidden_states=True).hidden_states[1]  # after layer 0 (the last is normed)
    torch.testing.assert_close(resid(bridge, tokens, "blocks.0.hook_resid_post"), expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="auto, float32, bfloat16, float16"):
        load_checkpoint(tiny_llama_dir, dtype="int8")


def test_weight_swap_gives_the_readouts_of_a_fresh_boot(tmp_path, chat_tok):
    folders = [save_tiny_llama(tmp_path / f"s{seed}", chat_tok, seed=seed) for seed in range(3)]
    tokens = chat_tokens(chat_tok)
    loader = CheckpointLoader(device="cpu")
    swapped = [resid(loader.load(f), tokens) for f in folders]
    assert (loader.boots, loader.swaps) == (1, 2)
    assert {p.dtype for p in loader.model.parameters()} == {torch.bfloat16}
    for folder, got in zip(folders, swapped):
        torch.testing.assert_close(got, resid(load_checkpoint(folder, device="cpu"), tokens), atol=0, rtol=0)
    assert not torch.equal(swapped[0], swapped[1])
    # Another dtype or another architecture is booted afresh, not swapped.
    save_tiny_llama(tmp_path / "f32", chat_tok, seed=4, dtype=torch.float32)
    wide = save_tiny_llama(tmp_path / "wide", chat_tok, model=tiny_llama(chat_tok, hidden=64, seed=5))
    loader.load(tmp_path / "f32")
    assert loader.boots == 2 and {p.dtype for p in loader.model.parameters()} == {torch.float32}
    torch.testing.assert_close(resid(loader.load(wide), tokens), resid(load_checkpoint(wide, device="cpu"), tokens))
    assert loader.boots == 3


def test_weight_swap_of_revlens_native_checkpoints(tiny_model, tmp_path):
    d = tiny_model.cfg.d_model
    save_checkpoint(tiny_model, tmp_path / "a")
    save_checkpoint(shifted(tiny_model, 1, torch.ones(d)), tmp_path / "b")
    tokens = tiny_model.to_tokens(PROMPTS[0])
    loader = CheckpointLoader()
    first = resid(loader.load(tmp_path / "a"), tokens)
    second = resid(loader.load(tmp_path / "b"), tokens)
    assert (loader.boots, loader.swaps) == (1, 1)
    torch.testing.assert_close(second, resid(load_checkpoint(tmp_path / "b"), tokens), atol=0, rtol=0)
    torch.testing.assert_close(second - first, torch.ones_like(first), atol=1e-5, rtol=0)


def test_sharded_safetensors_with_index_load_and_swap(tmp_path, chat_tok):
    model = tiny_llama(chat_tok, seed=7)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    chat_tok.save_pretrained(tmp_path / "sharded")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    whole = save_tiny_llama(tmp_path / "whole", chat_tok, model=model)
    tokens = chat_tokens(chat_tok)
    expected = resid(load_checkpoint(whole, device="cpu"), tokens)
    torch.testing.assert_close(
        resid(load_checkpoint(tmp_path / "sharded", device="cpu"), tokens), expected, atol=0, rtol=0
    )
    loader = CheckpointLoader(device="cpu")
    loader.load(save_tiny_llama(tmp_path / "other", chat_tok, seed=8))
    torch.testing.assert_close(resid(loader.load(tmp_path / "sharded"), tokens), expected, atol=0, rtol=0)
    assert loader.swaps == 1
    (tmp_path / "sharded" / shards[0]).unlink()
    with pytest.raises(CheckpointError, match="missing the shard"):
        load_checkpoint(tmp_path / "sharded")


def test_lora_adapter_history_matches_merged_full_weights(tiny_llama_dir, chat_tok, tmp_path):
    from transformers import AutoModelForCausalLM

    pretrain = save_tiny_llama(tmp_path / "pretrain", chat_tok, seed=11)
    adapters, merged = {}, {}
    for step, seed in ((1, 21), (2, 22)):
        peft_model = write_lora(tmp_path / "lora" / f"checkpoint-{step}", tiny_llama_dir, seed)
        adapters[step] = tmp_path / "lora" / f"checkpoint-{step}"
        merged[step] = save_tiny_llama(
            tmp_path / "merged" / f"step_{step}", chat_tok, model=peft_model.merge_and_unload()
        )
    adapter_config = json.loads((adapters[1] / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_llama_dir)
    # The adapter, loaded alone, is its base with the LoRA update merged in.
    tokens = chat_tokens(chat_tok)
    base_only = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), local_files_only=True)
    assert not torch.equal(
        resid(load_checkpoint(adapters[1], device="cpu"), tokens),
        resid(load_checkpoint(tiny_llama_dir, device="cpu"), tokens),
    )
    del base_only
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lora_report = revlens.analyze(
            History.from_trainer(tmp_path / "lora", pretrain=pretrain, align=tiny_llama_dir),
            CHAT_PROMPTS,
            layers=[0, 1],
            progress=False,
            null_samples=200,
        )
        full_report = revlens.analyze(
            {"pretrain": pretrain, "align": tiny_llama_dir, "finetune": {"lora": merged}},
            CHAT_PROMPTS,
            layers=[0, 1],
            progress=False,
            null_samples=200,
        )
    assert lora_report.runs == ["lora"] and lora_report.steps == [1, 2]
    np.testing.assert_allclose(lora_report.alignment, full_report.alignment, atol=2e-2)
    assert np.isfinite(lora_report.alignment).all()


def test_adapter_base_from_argument_when_not_local(tiny_llama_dir, chat_tok, tmp_path):
    write_lora(tmp_path / "ad", tiny_llama_dir, 3)
    cfg_path = tmp_path / "ad" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"not a local folder.*base=PATH"):
        load_checkpoint(tmp_path / "ad")
    tokens = chat_tokens(chat_tok)
    via_base = resid(load_checkpoint(tmp_path / "ad", device="cpu", base=tiny_llama_dir), tokens)
    via_ref = revlens.CheckpointRef("finetune", tmp_path / "ad", "r", 1).load("cpu", base=tiny_llama_dir)
    torch.testing.assert_close(resid(via_ref, tokens), via_base, atol=0, rtol=0)


def test_missing_peft_is_a_clear_error(tiny_llama_dir, tmp_path, monkeypatch):
    write_lora(tmp_path / "ad", tiny_llama_dir, 4)
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(CheckpointError, match=r"pip install revlens\[peft\]"):
        load_checkpoint(tmp_path / "ad")


class _Evil:
    """Unpickling this creates a file: proof that a Trainer's pickles were (not) read."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _trainer_checkpoint(folder, chat_tok, seed, marker, *, tokenizer=True):
    model = tiny_llama(chat_tok, seed=seed)
    model.save_pretrained(folder)
    if tokenizer:
        chat_tok.save_pretrained(folder)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
        torch.save({"state": _Evil(marker)}, folder / name)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": int(folder.name.split("-")[1])}))


def test_trainer_checkpoint_folders_are_steps_and_pickles_are_never_read(tiny_llama_dir, chat_tok, tmp_path, capsys):
    from revlens.cli import main

    marker = tmp_path / "UNPICKLED"
    root = tmp_path / "h"
    save_tiny_llama(root / "pretrain", chat_tok, seed=31)
    save_tiny_llama(root / "align", chat_tok, seed=0)
    out = root / "finetune" / "sft"
    for step in (10, 20):
        _trainer_checkpoint(out / f"checkpoint-{step}", chat_tok, 40 + step, marker, tokenizer=step == 10)
    chat_tok.save_pretrained(out)  # the Trainer's output_dir holds the tokenizer; checkpoint-20 has none
    (out / "runs").mkdir()  # TensorBoard logs: known, skipped without a word
    (out / "notes").mkdir()  # anything else is named
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = History.from_dir(root)
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == [
        f"skipping {out / 'notes'}: its name is not step_<N> or checkpoint-<N> with an integer N."
    ]
    assert history.runs == ["sft"] and history.steps == [10, 20]
    assert history.finetune["sft"][20].source == out / "checkpoint-20"
    trainer = History.from_trainer(out, pretrain=root / "pretrain", align=root / "align")
    assert trainer.runs == ["sft"] and trainer.steps == [10, 20]
    tokens = chat_tokens(chat_tok)
    expected = resid(
        load_checkpoint(save_tiny_llama(tmp_path / "c20", chat_tok, model=tiny_llama(chat_tok, seed=60)), device="cpu"),
        tokens,
    )
    torch.testing.assert_close(resid(trainer.finetune["sft"][20].load("cpu"), tokens), expected, atol=0, rtol=0)
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(CHAT_PROMPTS))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert (
            main(
                [
                    "analyze",
                    str(root),
                    "--out",
                    str(tmp_path / "o"),
                    "--prompts",
                    str(prompts),
                    "--layers",
                    "1",
                    "--dtype",
                    "float32",
                    "--base",
                    str(tiny_llama_dir),
                ]
            )
            == 0
        )
    saved = revlens.ReversionReport.load(tmp_path / "o")
    assert saved.steps == [10, 20] and np.isfinite(saved.alignment).all()
    assert not marker.exists()
    with pytest.raises(SystemExit):
        main(["analyze", str(root), "--out", str(tmp_path / "o2"), "--dtype", "int4"])
    assert "invalid choice" in capsys.readouterr().err


def test_skipped_folders_warn_and_colliding_steps_are_refused(tiny_model, tmp_path):
    root = tmp_path / "h"
    save_checkpoint(tiny_model, root / "pretrain")
    save_checkpoint(tiny_model, root / "align")
    run = root / "finetune" / "seed_0"
    save_checkpoint(tiny_model, run / "step_1")
    (run / "step_abc").mkdir()
    (run / "step_2").mkdir()
    os.symlink(tmp_path / "gone", run / "step_3")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = History.from_dir(root)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert history.steps == [1]
    assert any("step_abc" in m and "not step_<N>" in m for m in messages)
    assert any("step_2" in m and "no config.json" in m for m in messages)
    assert any("step_3" in m and "broken symlink" in m for m in messages)
    save_checkpoint(tiny_model, run / "step_01")
    with pytest.raises(CheckpointError, match=r"step_01 and step_1 .* both step 1"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        History.from_dir(root)
    os.rename(run / "step_01", run / "checkpoint-1")
    with pytest.raises(CheckpointError, match=r"checkpoint-1 and step_1 .* both step 1"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        History.from_dir(root)


def test_device_map_is_passed_to_from_pretrained(tiny_llama_dir, chat_tok, monkeypatch):
    from transformers import AutoModelForCausalLM

    seen = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    bridge = load_checkpoint(tiny_llama_dir, device_map="auto")
    assert seen[0]["device_map"] == "auto" and seen[0]["dtype"] == torch.bfloat16
    tokens = chat_tokens(chat_tok)
    torch.testing.assert_close(
        resid(bridge, tokens), resid(load_checkpoint(tiny_llama_dir, device="cpu"), tokens), atol=0, rtol=0
    )
    with pytest.raises(CheckpointError, match="not both"):
        load_checkpoint(tiny_llama_dir, device="cpu", device_map="auto")
