"""`analyze` against planted directions: v_rev, alignment and drift known exactly, estimators, zero drift."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats

import revlens

from conftest import CONTROL, PROMPTS, shifted, unit
from conftest import PLANTED_LAYER as LAYER


def test_planted_direction_recovered_exactly(planted):
    spec, u, moves = planted
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        report = revlens.analyze(spec, PROMPTS, layers=[LAYER], progress=False)
    assert torch.allclose(report.v_rev[0].double(), u.double(), atol=1e-5)
    for ri, run in enumerate(report.runs):
        for si, step in enumerate(report.steps):
            a, b = moves[run][step]
            assert report.alignment[ri, si, 0] == pytest.approx(a / math.hypot(a, b), abs=1e-5)
            assert report.drift_norm[ri, si, 0] == pytest.approx(math.hypot(a, b), abs=1e-4)
            # Every prompt moves by the same vector, so per-example alignment equals the centroid's.
            assert report.alignment_per_example[ri, si, 0] == pytest.approx(a / math.hypot(a, b), abs=1e-5)


def test_planted_direction_with_control_and_estimators(planted):
    spec, u, moves = planted
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        # The shift applies to control prompts alike, so the contrast readout sees no drift at all.
        contrast = revlens.analyze(spec, PROMPTS, control=CONTROL, layers=[LAYER], progress=False)
        assert np.isnan(contrast.alignment).all()
        for estimator, k in (("per_example", 1), ("pca", 1), ("pca", 2)):
            rep = revlens.analyze(spec, PROMPTS, layers=[LAYER], estimator=estimator, k=k, progress=False)
            assert torch.allclose(rep.v_rev[0].double(), u.double(), atol=1e-5), estimator
            a, b = moves["seed_0"][1]
            expected = a / math.hypot(a, b) if k == 1 else None
            if k == 1:
                assert rep.alignment[0, 0, 0] == pytest.approx(expected, abs=1e-5)
            else:
                # Rank 2: the second direction is noise-free zero energy; alignment is |a|/||(a,b)|| at least.
                assert rep.alignment[0, 0, 0] >= abs(a) / math.hypot(a, b) - 1e-5
                assert rep.null_p99[0] == pytest.approx(math.sqrt(stats.beta.ppf(0.99, 1, (32 - 2) / 2)))


def test_alignment_of_zero_drift_is_nan_with_warning(tiny_model):
    spec = {
        "pretrain": shifted(tiny_model, LAYER, unit(32, 0)),
        "align": tiny_model,
        "finetune": {"r": {1: tiny_model}},
    }
    with pytest.warns(RuntimeWarning, match="drift is zero"):
        report = revlens.analyze(spec, PROMPTS, layers=[LAYER], progress=False)
    assert np.isnan(report.alignment).all()
