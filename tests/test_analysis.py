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


# ------------------------------------------------------------------------------------------------ AnalyzeConfig
def test_analyze_config_is_the_one_list_of_settings(revlens_doctest_namespace, tmp_path):
    """analyze(config=...) equals analyze(**settings); report.config records the config's recorded fields, and an
    older report.config (without them) reads back with the defaults; the CLI has one option per CLI field."""
    import argparse
    import dataclasses

    from revlens.cli import build_parser
    from revlens.config import AnalyzeConfig

    ns = revlens_doctest_namespace
    cfg = AnalyzeConfig(layers=[0, 1], null_samples=500, seed=3, progress=False)
    by_config = revlens.analyze(ns["ckpts"], ns["prompts"], config=cfg)
    by_keywords = revlens.analyze(ns["ckpts"], ns["prompts"], layers=[0, 1], null_samples=500, seed=3, progress=False)
    np.testing.assert_array_equal(by_config.alignment, by_keywords.alignment)
    np.testing.assert_array_equal(by_config.null_p99_activation, by_keywords.null_p99_activation)
    assert by_config.config == by_keywords.config
    assert {k: by_config.config[k] for k in cfg.recorded()} == cfg.recorded()
    assert AnalyzeConfig.from_report_config(by_config.config) == AnalyzeConfig(layers=[0, 1], null_samples=500, seed=3)
    old = {"hook": "resid_post", "readout": "last", "estimator": "mean_diff", "k": 1, "contrast": False}
    assert AnalyzeConfig.from_report_config(old) == AnalyzeConfig()
    with pytest.raises(TypeError, match="unknown AnalyzeConfig setting"):
        revlens.analyze(ns["ckpts"], ns["prompts"], layer=[0])
    with pytest.raises(ValueError, match="k=2 needs estimator='pca'"):
        AnalyzeConfig(k=2)
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    options = {a.dest for a in sub.choices["analyze"]._actions}
    cli_fields = {f.name for f in dataclasses.fields(AnalyzeConfig) if f.metadata["cli"]}
    assert cli_fields <= options and {"cache_dir", "progress", "distributed"}.isdisjoint(options)
