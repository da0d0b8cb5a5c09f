"""The shared readout helpers agree with TransformerLens and with a hand-written reduction."""

from __future__ import annotations

import pytest
import torch
from transformer_lens.utilities import get_act_name

import revlens
from revlens import readout


@pytest.mark.parametrize("alias", sorted(readout.HOOK_ALIASES))
def test_hook_names_are_transformer_lens_names(alias, tiny_model):
    assert readout.hook_name(alias, 2) == get_act_name(alias, 2)
    assert readout.hook_name(readout.HOOK_ALIASES[alias], 2) == get_act_name(alias, 2)
    assert readout.hook_name(alias, 2) in tiny_model.hook_dict


def test_only_residual_hook_points_are_accepted():
    with pytest.raises(revlens.ProbeError, match="residual-stream"):
        readout.hook_name("q", 0)


def test_reduce_positions_matches_a_loop_and_checks_shapes():
    gen = torch.Generator().manual_seed(0)
    act = torch.randn(3, 5, 4, generator=gen)
    lengths = torch.tensor([5, 2, 1])
    last = torch.stack([act[i, n - 1] for i, n in enumerate(lengths.tolist())])
    mean = torch.stack([act[i, :n].mean(0) for i, n in enumerate(lengths.tolist())])
    torch.testing.assert_close(readout.reduce_positions(act, lengths, "last"), last)
    torch.testing.assert_close(readout.reduce_positions(act, lengths, "mean"), mean)
    with pytest.raises(TypeError, match="lengths"):
        readout.reduce_positions(act, lengths[:2], "last")


def test_tokenized_set_pads_right():
    tokens, lengths = readout.TokenizedSet([torch.tensor([5, 6, 7]), torch.tensor([8])]).padded(pad_id=0)
    assert tokens.tolist() == [[5, 6, 7], [8, 0, 0]] and lengths.tolist() == [3, 1]
