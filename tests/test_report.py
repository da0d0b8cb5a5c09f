"""ReversionReport: summary and round trip of an analysed report; tidy results (long tables, arrays in
safetensors beside a small JSON, old reports, shape validation)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch

import revlens
from revlens.report import REPORT_JSON, REPORT_TENSORS, ReversionReport

from conftest import PROMPTS

ROOT = Path(__file__).resolve().parent.parent


def deep_report(
    n_runs: int = 3, n_steps: int = 4, n_layers: int = 6, d: int = 16, n_prompts: int = 5, seed: int = 0
) -> ReversionReport:
    rng = np.random.default_rng(seed)
    shape = (n_runs, n_steps, n_layers)
    alignment = rng.uniform(-0.3, 0.3, shape)
    alignment[:, :, n_layers // 2] += 0.5
    alignment[0, -1, :] = np.nan  # run 0 has no last checkpoint
    v = torch.linalg.qr(torch.randn(d, n_layers, generator=torch.Generator().manual_seed(seed)))[0].T
    return ReversionReport(
        layers=list(range(2, 2 + n_layers)),
        runs=[f"seed_{i}" for i in range(n_runs)],
        steps=[1, 2, 5, 10, 20, 50, 100, 200][:n_steps],
        d_model=d,
        v_rev=v,
        v_rev_basis=v[:, None],
        alignment=alignment,
        alignment_per_example=alignment * 0.9,
        per_example_cos=rng.uniform(-1, 1, shape + (n_prompts,)),
        drift_norm=rng.uniform(0, 2, shape),
        p_value=rng.uniform(0, 1, shape),
        null_p99=np.full(n_layers, 0.5),
        null_p99_activation=rng.uniform(0.5, 0.9, n_layers),
        v_rev_norm=rng.uniform(0, 3, n_layers),
        v_rev_snr=np.r_[0.5, rng.uniform(5, 50, n_layers - 1)],
        null_draws_activation=rng.normal(0, 0.2, (n_layers, 500)).astype(np.float32),
        config={
            "hook": "resid_post",
            "readout": "last",
            "estimator": "mean_diff",
            "contrast": False,
            "n_prompts": n_prompts,
        },
        behaviour={"harm": {"final": [0.5, 0.25]}},
    )


def test_report_summary_and_roundtrip(planted, tmp_path):
    spec, _, _ = planted
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        report = revlens.analyze(spec, PROMPTS, progress=False)
    text = report.summary()
    assert "null p99" in text and f"L{report.best_layer}" in text
    report.save(tmp_path)
    back = revlens.ReversionReport.load(tmp_path)
    np.testing.assert_allclose(back.alignment, report.alignment, equal_nan=True)
    np.testing.assert_allclose(back.null_p99_activation, report.null_p99_activation, equal_nan=True)
    assert torch.allclose(back.v_rev, report.v_rev, equal_nan=True)
    assert back.layers == report.layers and back.runs == report.runs and back.steps == report.steps
    assert report.to_dict()["exceedance"]["pairs"] == 4


def test_to_dataframe_is_long_and_holds_every_value():
    report = deep_report()
    df = report.to_dataframe()
    assert len(df) == 3 * 4 * 6
    required = [
        "run",
        "step",
        "layer",
        "alignment",
        "alignment_per_example",
        "drift_norm",
        "p_value",
        "null_p99",
        "null_p99_activation",
        "v_rev_snr",
        "low_snr",
    ]
    assert set(required) <= set(df.columns)
    for ri, run in enumerate(report.runs):
        for si, step in enumerate(report.steps):
            for li, layer in enumerate(report.layers):
                row = df[(df.run == run) & (df.step == step) & (df.layer == layer)]
                assert len(row) == 1
                row = row.iloc[0]
                for col in ("alignment", "alignment_per_example", "drift_norm", "p_value"):
                    np.testing.assert_equal(row[col], getattr(report, col)[ri, si, li])
                assert row.null_p99_activation == report.null_p99_activation[li]
                assert row.low_snr == (li == 0) and row.v_rev_snr == report.v_rev_snr[li]
    # Regrouping by hand is one line now.
    pivot = df.pivot_table(index="step", columns="layer", values="alignment", aggfunc="mean")
    np.testing.assert_allclose(pivot.to_numpy(), np.nanmean(report.alignment, axis=0))


def test_per_prompt_dataframe():
    report = deep_report()
    df = report.per_prompt_dataframe()
    assert list(df.columns) == ["run", "step", "layer", "prompt", "cos"] and len(df) == report.per_example_cos.size
    row = df[(df.run == "seed_2") & (df.step == 5) & (df.layer == 4) & (df.prompt == 3)].iloc[0]
    assert row.cos == report.per_example_cos[2, 2, 2, 3]


def test_save_puts_arrays_in_safetensors_and_load_round_trips(tmp_path):
    report = deep_report()
    report.save(tmp_path)
    header = json.loads((tmp_path / REPORT_JSON).read_text())
    assert header["format"] == 2 and "alignment" not in header and "per_example_cos" not in header
    assert header["summary"] == report.summary() and header["best_layer"] == report.best_layer
    assert header["flagged_layers"] == [2] and header["selection"]["layer"] == report.best_layer
    back = ReversionReport.load(tmp_path)
    for name in (
        "alignment",
        "alignment_per_example",
        "drift_norm",
        "p_value",
        "null_p99",
        "null_p99_activation",
        "v_rev_norm",
        "v_rev_snr",
    ):
        np.testing.assert_array_equal(getattr(back, name), getattr(report, name), err_msg=name)
    np.testing.assert_allclose(back.per_example_cos, report.per_example_cos, rtol=1e-6)  # stored as float32
    np.testing.assert_array_equal(back.null_draws_activation, report.null_draws_activation)
    assert torch.equal(back.v_rev, report.v_rev.float())
    assert (back.layers, back.runs, back.steps, back.behaviour) == (
        report.layers,
        report.runs,
        report.steps,
        report.behaviour,
    )
    assert back.summary() == report.summary()


def test_old_reports_with_arrays_in_json_still_load(tmp_path):
    report = deep_report()
    old = report.to_dict()  # the old layout: every array as nested lists in report.json, no format number
    for key in ("selection", "flagged_layers", "snr_threshold", "v_rev_snr"):
        old.pop(key)
    (tmp_path / REPORT_JSON).write_text(json.dumps(old))
    from safetensors.torch import save_file

    save_file(
        {"v_rev": report.v_rev.float().clone(), "v_rev_basis": report.v_rev_basis.float().clone()},
        str(tmp_path / REPORT_TENSORS),
    )
    back = ReversionReport.load(tmp_path)
    np.testing.assert_array_equal(back.alignment, report.alignment)  # NaN survives as null -> NaN
    np.testing.assert_allclose(back.per_example_cos, report.per_example_cos)
    assert np.isnan(back.v_rev_snr).all() and back.flagged_layers == [] and back.null_draws_activation is None
    assert "activation max n/a" in back.summary()


def test_tensors_from_another_report_are_refused_with_the_file_named(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    deep_report(d=16).save(a)
    deep_report(d=24).save(b)
    (a / REPORT_TENSORS).write_bytes((b / REPORT_TENSORS).read_bytes())
    with pytest.raises(ValueError, match=r"tensors\.safetensors.*'v_rev'.*\(6, 24\).*d_model=16"):
        ReversionReport.load(a)
    c = tmp_path / "c"
    deep_report(n_layers=7).save(c)
    (a / REPORT_TENSORS).write_bytes((c / REPORT_TENSORS).read_bytes())
    with pytest.raises(ValueError, match=r"tensors\.safetensors: 'alignment' has shape \(3, 4, 7\)"):
        ReversionReport.load(a)


def test_load_errors_name_the_problem(tmp_path):
    deep_report().save(tmp_path)
    (tmp_path / REPORT_TENSORS).unlink()
    with pytest.raises(FileNotFoundError, match="tensors.safetensors is missing"):
        ReversionReport.load(tmp_path)
    (tmp_path / REPORT_JSON).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ReversionReport.load(tmp_path)
    (tmp_path / REPORT_JSON).write_text(
        json.dumps({"layers": [0], "runs": [], "steps": [], "d_model": 4, "format": 99})
    )
    with pytest.raises(ValueError, match="newer than this revlens"):
        ReversionReport.load(tmp_path)
    (tmp_path / REPORT_JSON).write_text(json.dumps({"layers": [0], "runs": [], "steps": [], "d_model": 4}))
    (tmp_path / REPORT_TENSORS).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot be read as safetensors"):
        ReversionReport.load(tmp_path)


def test_summary_stays_narrow_at_depth_and_html_has_the_table():
    report = deep_report(n_runs=10, n_steps=8, n_layers=80, d=64)
    text = report.summary()
    assert max(len(line) for line in text.splitlines()) <= 120
    assert len(text.splitlines()) < 30
    best = report.best_layer
    assert f"L{best}*" in text and "corrected for choosing 1 of 79 layers" in text and "low-SNR layers" in text
    html = report._repr_html_()
    assert "<table>" in html and f"<th>L{best}*</th>" in html and "to_dataframe" in html


def test_pandas_is_a_core_dependency():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.split(">")[0].split("=")[0].strip() == "pandas" for d in deps)
