"""Measured subspaces against TransformerLens' own cache: the refusal direction and the readout PCA (the
reversion and random subspaces are checked with the blocking grammar, in test_blocking_spec.py)."""

from __future__ import annotations

import pytest
import torch

from revlens.blocking_spec import InterventionError
from revlens.subspace import readout_pca, refusal_direction

from conftest import CONTROL, PROMPTS, last_resid, prompt_ids


def test_refusal_direction_is_the_unit_difference_of_means(tiny_model):
    harmful, harmless = prompt_ids(tiny_model, PROMPTS), prompt_ids(tiny_model, CONTROL)
    got = refusal_direction(tiny_model, harmful, harmless, layers=[1, 2])
    for l in (1, 2):
        diff = last_resid(tiny_model, harmful, l).mean(0) - last_resid(tiny_model, harmless, l).mean(0)
        torch.testing.assert_close(got[l].double(), diff / diff.norm(), atol=1e-5, rtol=1e-4)


def test_readout_pca_spans_the_top_principal_directions(tiny_model):
    harmful = prompt_ids(tiny_model, PROMPTS)
    got = readout_pca(tiny_model, harmful, 2, layers=[2])[2].double()
    rows = last_resid(tiny_model, harmful, 2)
    centred = rows - rows.mean(0)
    eigvals, eigvecs = torch.linalg.eigh(centred.T @ centred)
    top = eigvecs[:, -2:].T  # the two largest
    torch.testing.assert_close(got @ got.T, torch.eye(2, dtype=torch.float64), atol=1e-5, rtol=0)
    # the same 2-dimensional subspace: projecting one basis on the other keeps it whole
    torch.testing.assert_close(
        (top @ got.T).abs().square().sum(1), torch.ones(2, dtype=torch.float64), atol=1e-4, rtol=0
    )
    with pytest.raises(InterventionError, match="more than 5 prompts"):
        readout_pca(tiny_model, harmful, 5, layers=[2])
