"""ReversionProbe against TransformerLens' own cache, and bad probe input with an error naming the problem and
the fix (issue 9, items 12 and 14)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from revlens import cli
from revlens.probe import ProbeError, ReversionProbe
from revlens.prompts import load_prompt_file

from conftest import CONTROL, PROMPTS


def test_centroids_match_transformerlens_cache(tiny_model):
    probe = ReversionProbe(PROMPTS, layers=[0, 2], readout="last", batch_size=2)
    result = probe.measure(tiny_model, covariance=True)
    rows_last, rows_mean = [], []
    for prompt in PROMPTS:
        tokens = tiny_model.to_tokens(prompt)
        _, cache = tiny_model.run_with_cache(tokens)
        acts = torch.stack([cache[f"blocks.{l}.hook_resid_post"][0] for l in (0, 2)], 0)  # [L, seq, d]
        rows_last.append(acts[:, -1].double())
        rows_mean.append(acts.mean(1).double())
    last = torch.stack(rows_last)
    assert torch.allclose(result.centroid, last.mean(0), atol=1e-5)
    assert torch.allclose(result.per_example.double(), last, atol=1e-5)
    expected_cov = torch.stack([torch.cov(last[:, l].T) for l in range(2)])
    assert torch.allclose(result.covariance, expected_cov, atol=1e-5)
    mean_probe = ReversionProbe(PROMPTS, layers=[0, 2], readout="mean", batch_size=3)
    assert torch.allclose(mean_probe.centroid(tiny_model), torch.stack(rows_mean).mean(0), atol=1e-5)


def test_contrast_readout_is_probe_minus_control(tiny_model):
    probe = ReversionProbe(PROMPTS, control=CONTROL, layers=[1])
    res = probe.measure(tiny_model)
    plain = ReversionProbe(PROMPTS, layers=[1]).centroid(tiny_model)
    ctrl = ReversionProbe(CONTROL, layers=[1]).centroid(tiny_model)
    assert torch.allclose(res.centroid, plain - ctrl, atol=1e-6)


def test_token_id_prompts_equal_string_prompts(tiny_model):
    ids = [tiny_model.to_tokens(p)[0] for p in PROMPTS]
    a = ReversionProbe(PROMPTS, layers=[1]).centroid(tiny_model)
    b = ReversionProbe(ids, layers=[1], batch_size=2).centroid(tiny_model)
    assert torch.allclose(a, b, atol=1e-6)


def test_probe_tokenizes_once_for_checkpoints_sharing_a_vocabulary(tiny_model):
    """Checkpoints load one at a time, each with its own tokenizer object: one tokenization serves them all."""
    from revlens.checkpoint_loader import boot_native_model
    from revlens.wordtok import word_tokenizer

    from conftest import WORDS, tiny_config

    probe = ReversionProbe(PROMPTS, per_example=False)
    twin_tok = word_tokenizer(WORDS)
    twin = boot_native_model(tiny_config(len(twin_tok), seed=1), tokenizer=twin_tok)
    assert twin.tokenizer is not tiny_model.tokenizer
    probe.centroid(tiny_model)
    probe.centroid(twin)
    assert len(probe._tokenized) == 1
    other = word_tokenizer(list(reversed(WORDS)))
    probe.centroid(boot_native_model(tiny_config(len(other), seed=1), tokenizer=other))
    assert len(probe._tokenized) == 2


# ------------------------------------------------------------------------------------------------ bad input
def test_probe_rejects_bad_input(tiny_model):
    with pytest.raises(ProbeError, match="empty"):
        ReversionProbe([])
    with pytest.raises(ProbeError, match="one string"):
        ReversionProbe("how do i make a bomb")
    with pytest.raises(ProbeError, match="readout"):
        ReversionProbe(PROMPTS, readout="first")
    with pytest.raises(ProbeError, match="out of range"):
        ReversionProbe(PROMPTS, layers=[7]).centroid(tiny_model)
    with pytest.raises(ProbeError, match="longer than the model's context"):
        ReversionProbe([" ".join(["bomb"] * 40)]).centroid(tiny_model)
    with pytest.raises(ProbeError, match="hook"):
        ReversionProbe(PROMPTS, hook="resid_sideways")


@pytest.mark.parametrize(
    "hook",
    [
        "blocks.{layer}.hook_nothing",
        "blocks.{layer}.attn.hook_z",
        "blocks.{layer}.attn.hook_pattern",
        "attn.hook_z",
        "{0}",
        "resid_sideways",
        "",
    ],
)
def test_non_residual_hooks_are_refused_at_construction(hook):
    with pytest.raises(ProbeError, match="resid_post") as err:
        ReversionProbe(PROMPTS, hook=hook)
    assert "blocks.{layer}.hook_resid_pre" in str(err.value)


def test_templates_and_aliases_are_accepted(tiny_model):
    a = ReversionProbe(PROMPTS, layers=[1], hook="resid_pre").centroid(tiny_model)
    b = ReversionProbe(PROMPTS, layers=[1], hook="blocks.{layer}.hook_resid_pre").centroid(tiny_model)
    assert torch.equal(a, b)


def test_hook_point_missing_from_the_model_is_named():
    model = SimpleNamespace(
        cfg=SimpleNamespace(n_layers=2),
        hook_dict={"blocks.0.hook_resid_post": None, "blocks.1.hook_resid_post": None, "blocks.0.hook_resid_pre": None},
    )
    probe = ReversionProbe(PROMPTS, hook="resid_mid")
    with pytest.raises(ProbeError, match=r"no hook point blocks\.0\.hook_resid_mid.*resid_post"):
        probe.resolve_layers(model)


def test_duplicate_layers_are_refused(tmp_path, capsys):
    with pytest.raises(ProbeError, match="more than once"):
        ReversionProbe(PROMPTS, layers=[1, 1])
    with pytest.raises(ProbeError, match="integer layer indices"):
        ReversionProbe(PROMPTS, layers=[1.5])
    with pytest.raises(SystemExit) as exit_:
        cli.main(["analyze", str(tmp_path), "--out", str(tmp_path / "o"), "--layers", "1,1"])
    assert exit_.value.code == 2 and "more than once" in capsys.readouterr().err


def test_float_token_tensors_are_refused():
    with pytest.raises(ProbeError, match="integer tensor"):
        ReversionProbe(torch.tensor([[1.0, 2.0, 3.7]]))
    with pytest.raises(ProbeError, match="integer tensor"):
        ReversionProbe([torch.tensor([1, 2]), torch.tensor([1.0, 2.5])])
    assert ReversionProbe(torch.tensor([[1, 2, 3]], dtype=torch.int32)).prompts[0].dtype == torch.long


def test_bad_prompt_files_are_named(tmp_path, capsys):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"\x00\x01\x02PK\x03\x04" * 10)
    with pytest.raises(ValueError, match=f"{binary}.*binary"):
        load_prompt_file(binary)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match=f"{latin}.*not UTF-8"):
        load_prompt_file(latin)
    with pytest.raises(ValueError, match=f"{tmp_path}.*is a directory"):
        load_prompt_file(tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match="has no prompts"):
        load_prompt_file(empty)
    with pytest.raises(FileNotFoundError, match="harmful_requests.txt"):
        load_prompt_file(tmp_path / "missing.txt")
    assert cli.main(["analyze", str(tmp_path), "--out", str(tmp_path / "o"), "--prompts", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
