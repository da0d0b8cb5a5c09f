"""Bad probe input gives an error naming the problem and the fix (issue 9, items 12 and 14)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from revlens import cli
from revlens.probe import ProbeError, ReversionProbe
from revlens.prompts import load_prompt_file

from conftest import PROMPTS


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
