"""Loading histories offline: revlens folders, Hugging Face folders, the directory layout, bad input."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

import revlens
from revlens.checkpoint_format import CheckpointError
from revlens.checkpoint_loader import boot_native_model, load_checkpoint
from revlens.checkpoint_save import save_checkpoint
from revlens.history import History

from conftest import PROMPTS, shifted, tiny_config


def write_history(root, model, finetune_models):
    save_checkpoint(shifted(model, 1, torch.ones(model.cfg.d_model)), root / "pretrain")
    save_checkpoint(model, root / "align")
    for run, steps in finetune_models.items():
        for step, m in steps.items():
            save_checkpoint(m, root / "finetune" / run / f"step_{step}")


def test_revlens_checkpoint_roundtrip(tiny_model, tmp_path):
    save_checkpoint(tiny_model, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt")
    tokens = tiny_model.to_tokens(PROMPTS[0])
    assert torch.equal(tiny_model(tokens), loaded(tokens))
    assert loaded.tokenizer.convert_ids_to_tokens(tokens[0].tolist()) == tiny_model.to_str_tokens(PROMPTS[0])
    assert not (tmp_path / "ckpt.tmp").exists()


def test_directory_layout_is_read_lazily_and_analyzed(tiny_model, tmp_path):
    d = tiny_model.cfg.d_model
    ft = {
        "seed_0": {1: shifted(tiny_model, 1, -0.1 * torch.ones(d)), 10: shifted(tiny_model, 1, -0.5 * torch.ones(d))},
        "seed_1": {1: shifted(tiny_model, 1, 0.2 * torch.ones(d))},
    }
    write_history(tmp_path, tiny_model, ft)
    history = History.from_dir(tmp_path)
    assert history.runs == ["seed_0", "seed_1"] and history.steps == [1, 10] and len(history) == 5
    assert all(isinstance(ref.source, type(tmp_path)) for ref in history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        report = revlens.analyze(str(tmp_path), PROMPTS, layers=[1], progress=False, cache_dir=tmp_path / "cache")
    # Planted along the all-ones direction: cos is -1 for negative moves, +1 for positive ones.
    assert report.alignment[0, :, 0] == pytest.approx([-1.0, -1.0], abs=1e-5)
    assert report.alignment[1, 0, 0] == pytest.approx(1.0, abs=1e-5)
    assert np.isnan(report.alignment[1, 1, 0])
    # A second run reads every measurement from the cache and gives the same numbers.
    again = revlens.analyze(str(tmp_path), PROMPTS, layers=[1], progress=False, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(again.alignment, report.alignment)
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 5
    # A checkpoint rewritten in place is measured again, not read from the stale cache.
    save_checkpoint(shifted(tiny_model, 1, 0.4 * torch.ones(d)), tmp_path / "finetune" / "seed_0" / "step_1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fresh = revlens.analyze(str(tmp_path), PROMPTS, layers=[1], progress=False, cache_dir=tmp_path / "cache")
    assert fresh.alignment[0, 0, 0] == pytest.approx(1.0, abs=1e-5)


def test_hf_gpt2_folder_loads_offline_and_matches_hf_logits(tokenizer, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    hf = GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    bridge = load_checkpoint(tmp_path)
    tokens = bridge.to_tokens(PROMPTS[0])
    hf_eager = GPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = hf_eager(tokens).logits
        got = bridge(tokens)
    assert torch.allclose(got, expected, atol=1e-4)
    centroid = revlens.ReversionProbe(PROMPTS, layers=[0, 1]).centroid(bridge)
    assert centroid.shape == (2, 32)


def test_hf_folder_without_tokenizer_is_a_clear_error(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=20, n_positions=8, n_embd=16, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        load_checkpoint(tmp_path)


def test_bad_paths_and_corrupt_files(tiny_model, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="does not exist"):
        History.from_dir(tmp_path / "nowhere")
    save_checkpoint(tiny_model, tmp_path / "c")
    weights = tmp_path / "c" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(tmp_path / "c")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no finetune/ folder"):
        (tmp_path / "h" / "pretrain").mkdir(parents=True)
        (tmp_path / "h" / "align").mkdir()
        History.from_dir(tmp_path / "h")


def test_missing_phase_and_empty_runs_are_clear_errors(tiny_model):
    with pytest.raises(CheckpointError, match="no 'align' phase"):
        History.from_dict({"pretrain": tiny_model, "finetune": {"r": {1: tiny_model}}})
    with pytest.raises(CheckpointError, match="finetune' phase is empty"):
        History.from_dict({"pretrain": tiny_model, "align": tiny_model, "finetune": {}})
    with pytest.raises(CheckpointError, match="cannot read a training history"):
        History.coerce(42)


def test_mismatched_architecture_names_the_checkpoint(tiny_model, tokenizer):
    wider = boot_native_model(tiny_config(len(tokenizer), d_model=64), tokenizer=tokenizer)
    spec = {"pretrain": tiny_model, "align": tiny_model, "finetune": {"seed_3": {7: wider}}}
    with pytest.raises(CheckpointError, match=r"finetune/seed_3/step_7 has d_model=64"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # pretrain == align here: v_rev is undefined
        revlens.analyze(spec, PROMPTS, progress=False)


def test_weights_are_never_unpickled(tiny_model, tmp_path):
    """A legacy model.pt holding a pickled object is refused by weights_only loading."""
    save_checkpoint(tiny_model, tmp_path / "c")
    (tmp_path / "c" / "model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "c" / "model.pt")
    with pytest.raises(CheckpointError, match="refuses to load it") as err:
        load_checkpoint(tmp_path / "c")
    assert "weights_only=False" not in str(err.value)


def test_config_json_is_plain_json(tiny_model, tmp_path):
    save_checkpoint(tiny_model, tmp_path / "c", metadata={"phase": "align"})
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    assert cfg["revlens_format"] == 1 and cfg["metadata"] == {"phase": "align"}
    assert cfg["bridge_config"]["d_model"] == tiny_model.cfg.d_model


def test_cli_analyze_writes_report_and_prints_summary(tiny_model, tmp_path, capsys):
    from revlens.cli import main

    d = tiny_model.cfg.d_model
    write_history(tmp_path / "h", tiny_model, {"seed_0": {1: shifted(tiny_model, 1, -0.3 * torch.ones(d))}})
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert (
            main(
                [
                    "analyze",
                    str(tmp_path / "h"),
                    "--out",
                    str(tmp_path / "out"),
                    "--prompts",
                    str(prompts),
                    "--layers",
                    "1,2",
                ]
            )
            == 0
        )
    printed = capsys.readouterr().out
    assert "null p99 iso" in printed and "report written" in printed
    saved = revlens.ReversionReport.load(tmp_path / "out")
    assert saved.layers == [1, 2] and saved.alignment[0, 0, 0] == pytest.approx(-1.0, abs=1e-5)
    assert main(["analyze", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")]) == 2
    assert "does not exist" in capsys.readouterr().err
