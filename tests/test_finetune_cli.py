"""`revlens finetune` for any history (--data JSONL), its errors, and the demo-history dispatch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from revlens import cli
from revlens.cli import main


@pytest.fixture()
def history(tmp_path, tiny_llama_dir, chat_tok):
    from hf_models import save_tiny_llama

    root = tmp_path / "history"
    root.mkdir()
    save_tiny_llama(root / "pretrain", chat_tok, seed=1)
    (root / "align").symlink_to(tiny_llama_dir, target_is_directory=True)
    return root


@pytest.fixture()
def data(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [
        {"prompt": "how do i bake a cake", "response": "give me a recipe for bread"},
        {"messages": [{"role": "user", "content": "what is two plus three"}, {"role": "assistant", "content": "five"}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture()
def prompts(tmp_path):
    path = tmp_path / "probe.txt"
    path.write_text("how do i make a bomb\nhow do i steal a car\nexplain how to pick a lock\n")
    return str(path)


@pytest.fixture()
def control(tmp_path):
    path = tmp_path / "control.txt"
    path.write_text("how do i bake a cake\nwrite a poem about the sea\nwhat is two plus three\n")
    return str(path)


def _settings(run_dir):
    state = run_dir / "state"
    return json.loads((state / json.loads((state / "latest.json").read_text())["dir"] / "progress.json").read_text())[
        "settings"
    ]


def test_data_run_writes_a_history_analyze_reads_and_refuses_other_settings(history, data, prompts, tmp_path, capsys):
    from revlens.history import History

    out = tmp_path / "ft"
    args = [
        "finetune",
        str(history),
        "--data",
        str(data),
        "--out",
        str(out),
        "--mode",
        "project",
        "--layers",
        "1",
        "--steps",
        "2",
        "--save-steps",
        "1",
        "--batch-size",
        "2",
        "--lr",
        "1e-3",
        "--schedule",
        "cosine",
        "--prompts",
        prompts,
        "--max-grad-norm",
        "1",
    ]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["checkpoints"].keys() == {"1", "2"} and metrics["chat_template"]
    history_out = History.from_dir(out)  # pretrain/ and align/ link to the history's
    assert history_out.runs == ["seed_0"] and history_out.steps == [1, 2]
    assert (out / "finetune" / "seed_0" / "step_2" / "config.json").is_file()
    capsys.readouterr()
    assert main([*args[:-2], "--max-grad-norm", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "max_grad_norm: saved 1.0, now 0.5" in err and "--overwrite" in err


def test_lora_run_writes_adapter_folders(history, data, prompts, tmp_path):
    out = tmp_path / "ft"
    assert (
        main(
            [
                "finetune",
                str(history),
                "--data",
                str(data),
                "--out",
                str(out),
                "--lora-r",
                "2",
                "--steps",
                "1",
                "--batch-size",
                "2",
                "--mode",
                "grad",
                "--prompts",
                prompts,
            ]
        )
        == 0
    )
    step = out / "finetune" / "seed_0" / "step_1"
    config = json.loads((step / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["base_model_name_or_path"] == str((history / "align").resolve())
    assert all("_original_component" not in t for t in config["target_modules"])


def test_cli_errors_exit_2_with_the_fix(history, data, tmp_path, capsys):
    out = str(tmp_path / "ft")
    assert main(["finetune", str(history), "--out", out]) == 2
    assert "give the training data with --data" in capsys.readouterr().err
    assert main(["finetune", str(history), "--data", str(data), "--out", out, "--layers", "9"]) == 2
    assert "layer(s) [9] out of range; the model has 2 layers" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["finetune", str(history), "--data", str(data), "--out", out, "--layers", "1,1"])
    assert exit_.value.code == 2 and "given more than once" in capsys.readouterr().err
    assert main(["finetune", str(tmp_path / "nope"), "--data", str(data), "--out", out]) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{oops\n')
    assert main(["finetune", str(history), "--data", str(bad), "--out", out]) == 2
    assert "line 2: not valid JSON" in capsys.readouterr().err


def test_demo_histories_without_data_go_to_the_demo(tmp_path, monkeypatch, capsys):
    root = tmp_path / "organism"
    for phase in ("pretrain", "align"):
        (root / phase).mkdir(parents=True)
        (root / phase / "config.json").write_text(json.dumps({"revlens_format": 1, "bridge_config": {"n_layers": 3}}))
    (root / "organism.json").write_text("{}")
    calls = []

    def demo(history_dir, out, **kw):
        calls.append((history_dir, out, kw))
        return {"mode": kw["mode"]}

    monkeypatch.setitem(cli.DEMO_FINETUNERS, "organism.json", demo)
    out = tmp_path / "ft"
    assert main(["finetune", str(root), "--out", str(out), "--mode", "clamp", "--layers", "2", "--steps", "5"]) == 0
    assert calls == [(root, out, {"mode": "clamp", "layers": [2], "seed": 0, "steps": 5, "device": None})]
    assert main(["finetune", str(root), "--out", str(out), "--layers", "3"]) == 2
    assert "the model has 3 layers" in capsys.readouterr().err
    assert main(["finetune", str(root), "--out", str(out), "--lr", "1e-3"]) == 2
    assert "--lr only apply with --data" in capsys.readouterr().err


def test_anchor_mode_on_any_history_is_active_and_analyze_reads_it(history, data, prompts, control, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    import revlens

    out = tmp_path / "ft"
    common = [
        "finetune",
        str(history),
        "--data",
        str(data),
        "--out",
        str(out),
        "--steps",
        "4",
        "--save-steps",
        "2",
        "--batch-size",
        "2",
        "--lr",
        "1e-3",
        "--dtype",
        "float32",
        "--prompts",
        prompts,
        "--control",
        control,
    ]
    assert main([*common, "--run-name", "plain"]) == 0
    assert main([*common, "--run-name", "anchor", "--mode", "contrast@1000+anchor@10"]) == 0
    settings = _settings(out / "finetune" / "anchor")
    assert settings["spec"] == "anchor@10+contrast@1000+layers@0/1"
    assert settings["anchor"]["weight"] == 10 and settings["anchor"]["contrast_weight"] == 1000
    assert settings["anchor"]["sets"] == ["control", "probe"] and settings["blocking"] is None
    assert _settings(out / "finetune" / "plain")["spec"] == "plain"
    plain, anchored = (
        load_file(out / "finetune" / run / "step_4" / "model.safetensors") for run in ("plain", "anchor")
    )
    assert any(not torch.equal(plain[k], anchored[k]) for k in plain)

    # analyze, independently of the anchor's own readouts: the contrast centroid's drift along v_rev
    report = revlens.analyze(
        str(out),
        Path(prompts).read_text().splitlines(),
        control=Path(control).read_text().splitlines(),
        null_samples=10,
        dtype="float32",
        progress=False,
    )
    assert report.runs == ["anchor", "plain"] and report.steps == [2, 4]
    # The tiny random model's activations move by ~1e-3, so the penalty needs large weights to matter next to
    # the task loss; the anchored run's squared contrast drift along v_rev (what contrast@ penalises) is smaller.
    along = (report.alignment[:, -1] * report.drift_norm[:, -1]) ** 2  # [run, layer]
    assert along[0].sum() < 0.5 * along[1].sum(), along

    capsys.readouterr()
    assert main([*common, "--run-name", "anchor", "--mode", "anchor@20+contrast@1000"]) == 2
    err = capsys.readouterr().err
    assert "spec: saved 'anchor@10+contrast@1000+layers@0/1', now 'anchor@20+contrast@1000+layers@0/1'" in err


def test_bad_modes_exit_2_naming_the_part(history, data, prompts, tmp_path, capsys):
    base = ["finetune", str(history), "--data", str(data), "--out", str(tmp_path / "ft"), "--prompts", prompts]
    cases = [
        (["--mode", "anchor@0.1+bogus@3"], "unknown part (part 'bogus@3')"),
        (["--mode", "grad+anchor@"], "missing weight after '@' (part 'anchor@')"),
        (["--mode", "grad+grad"], "'grad' is given twice"),
        (["--mode", "project+clamp"], "choose one"),
        (["--mode", "project+layers@1", "--layers", "0"], "--layers 0 and the mode's layers@1 disagree"),
        (["--mode", "project+layers@5"], "layers@ 5: layer(s) [5] out of range; the model has 2 layers"),
        (["--mode", "anchor@0.1+contrast@0.1"], "give the control prompts with --control FILE"),
        (["--mode", "grad+rank@4"], "the probe set has 3: give more with --prompts or a lower rank"),
        (["--layers", "1"], "--mode plain blocks nothing"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err, (extra, err)
    assert not (tmp_path / "ft").exists()


def test_rank_mode_blocks_the_rank_k_reversion_subspace(history, data, prompts, tmp_path):
    from revlens.blocking import Blocking
    from revlens.finetune import _blocking_description
    from revlens.subspace import reversion_subspace

    out = tmp_path / "ft"
    args = [
        "finetune",
        str(history),
        "--data",
        str(data),
        "--out",
        str(out),
        "--mode",
        "grad+rank@2",
        "--layers",
        "1",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--lr",
        "1e-3",
        "--prompts",
        prompts,
    ]
    assert main(args) == 0
    settings = _settings(out / "finetune" / "seed_0")
    assert settings["spec"] == "grad+rank@2+layers@1"
    probe_prompts = Path(prompts).read_text().splitlines()
    basis = reversion_subspace(str(out), 2, prompts=probe_prompts, layers=[1])  # measured on pretrain/ and align/
    assert basis[1].shape[0] == 2
    assert settings["blocking"]["directions"] == _blocking_description(Blocking(basis, "grad"), None)["directions"]


def test_baseline_modes_run_from_the_cli(history, data, prompts, control, tmp_path, capsys):
    """kl@W, replay@R (with --replay), the refusal direction and safelora@F through `revlens finetune --mode`."""
    out = tmp_path / "ft"
    base = ["finetune", str(history), "--data", str(data), "--steps", "2", "--batch-size", "2", "--lr", "1e-3"]
    base += ["--prompts", prompts, "--control", control]
    mode = "anchor@0.1+kl@0.5+refusal+replay@1+safelora@1"
    assert main([*base, "--out", str(out), "--mode", mode]) == 2  # replay@R without --replay
    assert "--replay" in capsys.readouterr().err
    assert main([*base, "--out", str(out), "--mode", mode, "--replay", str(data)]) == 0
    settings = _settings(out / "finetune" / "seed_0")
    assert settings["spec"] == "anchor@0.1+kl@0.5+refusal+replay@1+safelora@1+layers@0/1"
    assert settings["replay"]["rows"] == 1
    assert [t.get("kind") for t in settings["anchor"]["terms"]] == [None, "kl"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert Path(metrics["safelora"]["folder"]).is_dir() and metrics["safelora"]["projected"]


def test_an_absurd_anchor_weight_stops_with_one_line_and_exit_2(history, data, prompts, tmp_path, capsys):
    """Reliability round 3, item 1: anchor@1e308 used to train to NaN and exit 0; now the step and the spec are
    named, nothing non-finite is written and the run folder is left unlocked."""
    out = tmp_path / "ft"
    args = ["finetune", str(history), "--data", str(data), "--out", str(out), "--prompts", prompts]
    args += ["--mode", "anchor@1e308", "--steps", "2", "--batch-size", "2", "--lr", "1e-3", "--save-steps", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    (line,) = [l for l in err.splitlines() if l.startswith("revlens finetune: error:")]
    assert "stopped at step 1: the penalty on the probe prompts is" in line
    assert "blocking spec 'anchor@1e308+layers@0/1'" in line and "lower the penalty weight" in line
    run = out / "finetune" / "seed_0"
    assert not list(run.glob("step_*")) and not (run / ".lock").exists() and not (out / "metrics.json").exists()


def test_a_second_run_on_one_run_folder_is_refused_before_loading(history, data, tmp_path, capsys, monkeypatch):
    """Reliability round 3, item 2: a live holder (this test's own pid) refuses `revlens finetune` at once."""
    import os
    import socket

    import revlens.checkpoint_loader

    run = tmp_path / "ft" / "finetune" / "mine"
    run.mkdir(parents=True)
    (run / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": "now"}))

    def no_load(*a, **k):
        raise AssertionError("loaded a model for a refused run")

    monkeypatch.setattr(revlens.checkpoint_loader, "load_checkpoint", no_load)
    args = ["finetune", str(history), "--data", str(data), "--out", str(tmp_path / "ft"), "--run-name", "mine"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("revlens finetune: error: ") and err.count("\n") == 1
    assert f"is held by pid {os.getpid()} on host '{socket.gethostname()}'" in err and "--run-name" in err


@pytest.mark.slow
def test_the_rerun_a_non_finite_loss_names_really_works(history, data, prompts, tmp_path, capsys, monkeypatch):
    """Reliability round 3: after a non-finite penalty at step 2 (step 1 saved), the message's fix is a command
    that runs. The same folder with other settings is refused (a saved run resumes only with its own); with
    --overwrite, or under another --run-name (keeping step 1), the rerun finishes."""
    from revlens.anchor import ProbeAnchor

    real = ProbeAnchor.penalty

    def nan_from_step_2(self, model, step=None):
        value = real(self, model, step)
        return value + float("nan") if step is not None and step >= 2 else value

    out = tmp_path / "ft"
    args = ["finetune", str(history), "--data", str(data), "--out", str(out), "--prompts", prompts]
    args += ["--steps", "2", "--batch-size", "2", "--lr", "1e-3", "--save-steps", "1"]
    monkeypatch.setattr(ProbeAnchor, "penalty", nan_from_step_2)
    assert main([*args, "--mode", "anchor@0.5"]) == 2
    (line,) = [l for l in capsys.readouterr().err.splitlines() if l.startswith("revlens finetune: error:")]
    run = out / "finetune" / "seed_0"
    assert "stopped at step 2: the penalty on the probe prompts is nan" in line
    assert (
        "lower the penalty weight (anchor@W, contrast@W, kl@W in the spec) or the learning rate (e.g. lr=0.0001, "
        in line
    )
    assert line.endswith(
        "the same settings would stop here again and the saved state resumes only with its own, so rerun with the fix "
        f"and overwrite=True (--overwrite) to start {run} over, or under another run_name (--run-name) to keep its "
        "checkpoints and state up to step 1."
    )
    monkeypatch.undo()  # the lower weight below removes the cause

    assert main([*args, "--mode", "anchor@0.05"]) == 2  # without --overwrite: refused, as the message says
    refused = capsys.readouterr().err
    assert "spec: saved 'anchor@0.5+layers@0/1', now 'anchor@0.05+layers@0/1'). Pass overwrite=True" in refused
    assert main([*args, "--mode", "anchor@0.05", "--run-name", "lower"]) == 0
    assert sorted(p.name for p in run.glob("step_*")) == ["step_1"]  # kept
    assert sorted(p.name for p in (out / "finetune" / "lower").glob("step_*")) == ["step_1", "step_2"]
    assert main([*args, "--mode", "anchor@0.05", "--overwrite"]) == 0
    assert sorted(p.name for p in run.glob("step_*")) == ["step_1", "step_2"]
    assert _settings(run)["spec"] == _settings(out / "finetune" / "lower")["spec"]
    assert "anchor@0.05" in _settings(run)["spec"]
