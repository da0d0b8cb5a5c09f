"""ReversionDirections: what a report's directions carry, the safetensors + JSON files, and the consumers that take
them (blocking, the anchor, the monitor), checked on the doctest history whose v_rev at layer 0 is planted (e0)."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch

import revlens
from revlens import InterventionError, ReversionDirections
from revlens.chat import template_digest
from revlens.directions import v_rev_pca


@pytest.fixture(scope="module")
def ns(revlens_doctest_namespace):
    return revlens_doctest_namespace


def test_a_reports_directions_are_its_basis_with_how_it_was_read(ns):
    report = ns["report"]
    d = report.directions()
    assert d.layers == report.layers == [0, 1] and d.rank == 1 and d.d_model == 16
    for i, l in enumerate(report.layers):
        assert torch.equal(d.bases[l], report.v_rev_basis[i])
    assert abs(float(d.bases[0][0] @ torch.eye(16)[0])) > 1 - 1e-6  # the planted v_rev, e0
    assert (d.hook, d.readout, d.estimator, d.contrast) == ("resid_post", "last", "mean_diff", False)
    assert d.chat_template == "raw" and d.n_prompts == 5  # string prompts, a tokenizer without a template
    assert d.models == report.config["models_fingerprint"] and len(d.models) == 16
    assert report.directions(layers=[report.best_layer]).layers == [0]
    with pytest.raises(InterventionError, match="not analysed"):
        report.directions(layers=[5])
    with pytest.raises(InterventionError, match="estimator='pca', k=2"):
        report.directions(rank=2)  # a mean-difference report has one direction


def test_rank_k_directions_are_the_first_rows_of_a_pca_basis(ns):
    gen = torch.Generator().manual_seed(0)
    h_pre, h_ali = torch.randn(12, 2, 16, generator=gen), torch.randn(12, 2, 16, generator=gen)
    basis = v_rev_pca(h_pre, h_ali, 4).float()
    report = ns["report"]
    pca = type(report)(**{**report.__dict__, "v_rev_basis": basis, "config": {**report.config, "estimator": "pca"}})
    d = pca.directions(rank=2)
    assert d.rank == 2 and d.estimator == "pca" and torch.equal(d.bases[1], basis[1, :2])


def test_save_and_load_round_trip_and_refuse_a_mismatched_pair(ns, tmp_path):
    d = ns["report"].directions()
    d.save(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["directions.json", "directions.safetensors"]
    back = ReversionDirections.load(tmp_path / "a")
    assert back.layers == d.layers and all(torch.equal(back.bases[l], d.bases[l]) for l in d.layers)
    assert back.digest() == d.digest() and back.models == d.models and back.chat_template == "raw"
    # tensors from another save (other layers) next to this JSON: refused, naming the file
    d.at([0]).save(tmp_path / "b")
    shutil.copy(tmp_path / "b" / "directions.safetensors", tmp_path / "a" / "directions.safetensors")
    with pytest.raises(ValueError, match="not the tensors file"):
        ReversionDirections.load(tmp_path / "a")
    meta = json.loads((tmp_path / "b" / "directions.json").read_text())
    meta["format"] = 99
    (tmp_path / "b" / "directions.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format 1"):
        ReversionDirections.load(tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="directions.json"):
        ReversionDirections.load(tmp_path / "none")


def test_from_models_measures_the_reports_v_rev(ns):
    pretrain = revlens.load_checkpoint(f"{ns['ckpts']}/pretrain")
    d = ReversionDirections.from_models(pretrain, ns["aligned"], ns["prompts"])
    torch.testing.assert_close(d.stacked()[:, 0], ns["report"].v_rev, atol=1e-6, rtol=0)
    pca = ReversionDirections.from_models(pretrain, ns["aligned"], ns["prompts"], layers=[0], rank=2)
    assert pca.estimator == "pca" and pca.bases[0].shape == (2, 16)
    assert abs(float(pca.bases[0][0] @ torch.eye(16)[0])) > 1 - 1e-5  # every prompt moved by 2 e0
    assert d.chat_template == "raw" and d.contrast is False and d.models is not None


def test_a_chat_template_other_than_the_measured_one_is_refused(ns):
    d = ns["report"].directions()
    d.check_template(None, "the anchor")  # raw, as measured
    with pytest.raises(InterventionError, match="raw"):
        d.check_template(ns["chat_tokenizer"].chat_template, "the anchor")
    templated = ReversionDirections(d.bases, chat_template=template_digest("{{ x }}"))
    templated.check_template("{{ x }}", "the anchor")
    with pytest.raises(InterventionError, match="chat_template="):
        templated.check_template("{{ y }}", "the anchor")
    ReversionDirections(d.bases).check_template("{{ y }}", "the anchor")  # unknown rendering: nothing to check


def test_blocking_and_the_anchor_take_directions_at_their_hook(ns):
    d = ns["report"].directions(layers=[0])
    blocking = revlens.Blocking(d, "project")
    by_hand = revlens.Blocking({0: ns["report"].v_rev[0]}, "project")
    assert blocking.layers == [0] and blocking.hook == "resid_post"
    assert torch.equal(blocking.bases[0], by_hand.bases[0])
    with pytest.raises(InterventionError, match="hook"):
        revlens.Blocking(d, "project", hook="resid_pre")
    mean = ReversionDirections(d.bases, readout="mean")
    with pytest.raises(InterventionError, match="readout='mean'"):
        revlens.ProbeAnchor(mean, [torch.tensor([1, 2])], ns["aligned"], 1.0)


def test_the_monitor_from_directions_reads_the_planted_alignment(ns):
    report, model = ns["report"], ns["model"]
    monitor = revlens.ReversionMonitor.from_directions(report.directions(), ns["aligned"], ns["prompts"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        a = monitor.update(model, 2)
    np.testing.assert_allclose(a, report.alignment[0, 1], atol=1e-6)  # seed_0, step 2: 0.6 at layer 0
    assert round(float(a[0]), 3) == 0.6
    with pytest.raises(InterventionError, match="control set"):
        revlens.ReversionMonitor.from_directions(
            report.directions(), ns["aligned"], ns["prompts"], control=ns["control"]
        )
