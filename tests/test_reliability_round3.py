"""Reliability, round 3: inputs that used to load or run silently wrong (or crash obscurely) now stop with one
error naming the problem and the fix. Each test plants the bad input and names the issue item it covers."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from revlens import jobpool
from revlens.checkpoint_format import CheckpointError, WeightValueError
from revlens.checkpoint_loader import CheckpointLoader, load_checkpoint
from revlens.checkpoint_save import save_checkpoint
from revlens.jobpool import JobFailed, JobPool
from revlens.report import REPORT_JSON, REPORT_TENSORS, ReversionReport
from revlens.selection import selection_test

from hf_models import save_tiny_llama, tiny_llama

# ---------------------------------------------------------------------------------------------------------
# items 1-2: sharded checkpoints whose index disagrees with the shards, or that sit beside a single file


@pytest.fixture()
def sharded(tmp_path, chat_tok):
    folder = tmp_path / "sharded"
    model = tiny_llama(chat_tok, seed=7)
    model.save_pretrained(folder, max_shard_size="20KB")
    chat_tok.save_pretrained(folder)
    index = folder / "model.safetensors.index.json"
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) > 2 and index.is_file()
    return folder, index, shards, model


def shard_contents(folder, shards):
    """tensor name -> the shard that holds it, read from the shards themselves (not from the index)."""
    out = {}
    for name in shards:
        with safe_open(str(folder / name), framework="pt") as f:
            out.update({key: name for key in f.keys()})
    return out


def edit_index(index, edit):
    data = json.loads(index.read_text())
    edit(data["weight_map"])
    index.write_text(json.dumps(data))


def test_index_mapping_a_tensor_to_the_wrong_shard_is_refused(sharded):
    folder, index, shards, _ = sharded
    truth = shard_contents(folder, shards)
    name, real = next((k, s) for k, s in sorted(truth.items()) if list(truth.values()).count(s) > 1)
    other = next(s for s in shards if s != real)
    edit_index(index, lambda m: m.update({name: other}))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder, device="cpu")
    message = str(err.value)
    assert "model.safetensors.index.json does not match its shards" in message
    assert f"{name} -> {other}, but it is in {real}" in message and "save_pretrained()" in message
    # A tensor moved out of the only shard that held it: that shard is no longer named, and is named in the error.
    edit_index(index, lambda m: m.update({k: other for k, v in m.items() if v == real}))
    with pytest.raises(CheckpointError, match=rf"but it is in {real}, a shard the index does not name"):
        load_checkpoint(folder, device="cpu")
    with pytest.raises(CheckpointError, match="does not match its shards"):
        CheckpointLoader(device="cpu").load(folder)


def test_index_naming_a_tensor_no_shard_holds_or_leaving_one_out_is_refused(sharded):
    folder, index, shards, _ = sharded
    name, real = sorted(shard_contents(folder, shards).items())[-1]

    def rename(m):
        m["model.layers.0.mlp.made_up.weight"] = m.pop(name)

    edit_index(index, rename)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder, device="cpu")
    assert "model.layers.0.mlp.made_up.weight" in str(err.value) and "no shard holds it" in str(err.value)
    assert f"{real} holds {name}, which the index does not list" in str(err.value)


def test_correct_index_still_loads_and_matches_the_model(sharded):
    folder, _, _, model = sharded
    bridge = load_checkpoint(folder, device="cpu")
    torch.testing.assert_close(
        bridge.original_model.model.layers[1].mlp.down_proj.weight,
        model.model.layers[1].mlp.down_proj.weight,
        atol=0,
        rtol=0,
    )


def test_shards_beside_a_stale_single_file_are_refused_naming_both(sharded, chat_tok, tmp_path):
    folder, _, _, _ = sharded
    stale = save_tiny_llama(tmp_path / "stale", chat_tok, seed=99)
    shutil.copy(stale / "model.safetensors", folder / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder, device="cpu")
    message = str(err.value)
    assert "holds both model.safetensors and the shards listed in model.safetensors.index.json" in message
    assert "Delete the stale one" in message and "\n" not in message


# ---------------------------------------------------------------------------------------------------------
# item 3: adapter_config.json that peft would misread


def fake_adapter(folder, config, modules=("q_proj",)):
    """An adapter folder (no peft needed): the config as given, LoRA weights for ``modules`` of layer 0."""
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    prefix = "base_model.model.model.layers.0.self_attn"
    tensors = {}
    for module in modules:
        tensors[f"{prefix}.{module}.lora_A.weight"] = torch.zeros(4, 32)
        tensors[f"{prefix}.{module}.lora_B.weight"] = torch.zeros(32, 4)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


LORA = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({k: v for k, v in LORA.items() if k != "target_modules"}, r"target_modules=None: peft would fall back"),
        ({**LORA, "target_modules": []}, r"target_modules=\[\]: peft would fall back"),
        ([LORA], r"holds a JSON list, not an object of LoRA settings"),
        ({**LORA, "peft_type": "IA3"}, r"peft_type='IA3', but revlens merges LoRA adapters only"),
        ({k: v for k, v in LORA.items() if k != "peft_type"}, r"peft_type=None, but revlens merges LoRA"),
    ],
)
def test_unusable_adapter_config_is_refused(tmp_path, tiny_llama_dir, config, expected):
    if isinstance(config, dict):
        config = {**config, "base_model_name_or_path": str(tiny_llama_dir)}
    folder = fake_adapter(tmp_path / "ad", config)
    with pytest.raises(CheckpointError, match=expected) as err:
        load_checkpoint(folder, device="cpu")
    assert str(folder / "adapter_config.json") in str(err.value)


def test_adapter_weights_outside_target_modules_are_refused(tmp_path, tiny_llama_dir):
    config = {**LORA, "base_model_name_or_path": str(tiny_llama_dir)}
    folder = fake_adapter(tmp_path / "ad", config, modules=("q_proj", "k_proj"))
    with pytest.raises(CheckpointError, match=r"LoRA weights for .*self_attn.k_proj.*do not name: peft would drop"):
        load_checkpoint(folder, device="cpu")


@pytest.mark.parametrize(
    ("config", "written"),
    [({**LORA, "r": 8}, "r=8"), ({**LORA, "rank_pattern": {"q_proj": 8}}, "rank_pattern['q_proj']=8")],
)
def test_an_adapter_whose_rank_disagrees_with_its_weights_names_the_rank_not_the_base(
    tmp_path, tiny_llama_dir, config, written
):
    folder = fake_adapter(tmp_path / "ad", {**config, "base_model_name_or_path": str(tiny_llama_dir)})
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder, device="cpu")
    assert str(err.value) == (
        f"{folder / 'adapter_model.safetensors'} holds LoRA weights of rank 4 (base_model.model.model.layers.0."
        f"self_attn.q_proj.lora_A.weight has shape [4, 32]), but {folder / 'adapter_config.json'} gives that module "
        f"{written}: the config and the weights come from different saves. Set the rank in adapter_config.json to 4 "
        "if the weights are right, or re-save the adapter with peft_model.save_pretrained(folder)."
    )


def test_an_adapter_on_another_base_names_the_shapes_and_the_base(tmp_path, chat_tok):
    wide = tiny_llama(chat_tok, hidden=64)  # the adapter's weights (rank 4, from a 32-wide model) do not fit it
    wide.save_pretrained(tmp_path / "wide")
    chat_tok.save_pretrained(tmp_path / "wide")
    folder = fake_adapter(tmp_path / "ad", {**LORA, "base_model_name_or_path": str(tmp_path / "wide")})
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder, device="cpu")
    assert str(err.value) == (
        f"the adapter {folder} does not fit its base {tmp_path / 'wide'} (size mismatch for base_model.model.model."
        "layers.0.self_attn.q_proj.lora_A.default.weight: copying a param with shape torch.Size([4, 32]) from "
        "checkpoint, the shape in current model is torch.Size([4, 64]).); give the base it was trained on "
        "(base=PATH / --base PATH)."
    )


# ---------------------------------------------------------------------------------------------------------
# item 4: NaN/inf or absurd weights stop the load, naming the tensor and the checkpoint


def plant(path, pick, value):
    """Set one element of the first tensor whose name satisfies ``pick`` in a safetensors file; its name."""
    tensors = load_file(str(path))
    name = next(k for k in sorted(tensors) if pick(k))
    tensors[name].view(-1)[0] = value
    save_file(tensors, str(path), metadata={"format": "pt"})
    return name


@pytest.mark.parametrize(
    ("value", "expected"),
    [(float("nan"), "holds NaN values"), (float("-inf"), "holds infinite values"), (3e7, r"reaches \|w\| = 3e\+07")],
)
def test_bad_weight_values_in_a_revlens_checkpoint_are_named(tiny_model, tmp_path, value, expected):
    folder = save_checkpoint(tiny_model, tmp_path / "step_3")
    name = plant(folder / "model.safetensors", lambda k: k == "blocks.1.mlp.out.bias", value)
    with pytest.raises(WeightValueError, match=expected) as err:
        load_checkpoint(folder, device="cpu")
    assert f"checkpoint {folder} (model.safetensors): the weight {name!r}" in str(err.value)
    # The same file met as a weight swap into a live model of the same architecture.
    loader = CheckpointLoader(device="cpu")
    loader.load(save_checkpoint(tiny_model, tmp_path / "good"))
    with pytest.raises(WeightValueError, match=expected):
        loader.load(folder)


def test_bad_weight_values_in_a_hugging_face_folder_are_named(tmp_path, chat_tok):
    folder = save_tiny_llama(tmp_path / "checkpoint-4", chat_tok, dtype=torch.float32)
    name = plant(folder / "model.safetensors", lambda k: "layers.1.mlp.up_proj" in k, float("inf"))
    with pytest.raises(WeightValueError, match=rf"checkpoint {folder}: the weight '{name}' holds infinite") as err:
        load_checkpoint(folder, device="cpu")
    assert "Replace the checkpoint" in str(err.value)


def test_large_but_plausible_weights_still_load(tiny_model, tmp_path):
    folder = save_checkpoint(tiny_model, tmp_path / "c")
    plant(folder / "model.safetensors", lambda k: k == "blocks.2.attn.o.weight", 5e5)
    loaded = load_checkpoint(folder, device="cpu")
    assert max(float(p.detach().abs().max()) for p in loaded.parameters()) == pytest.approx(5e5)


# ---------------------------------------------------------------------------------------------------------
# items 5-6: report.json and tensors.safetensors that do not belong together, or bad fields


def small_report(shift=0.0):
    rng = np.random.default_rng(0)
    r, s, n_l, p, d = 2, 3, 4, 5, 8
    basis = torch.linalg.qr(torch.randn(n_l, d, 1, generator=torch.Generator().manual_seed(0)))[0].transpose(1, 2)
    align = rng.uniform(-0.5, 0.5, (r, s, n_l)) + shift
    return ReversionReport(
        layers=list(range(n_l)),
        runs=["seed_0", "seed_1"],
        steps=[10, 20, 30],
        d_model=d,
        v_rev=basis[:, 0],
        v_rev_basis=basis,
        alignment=align,
        alignment_per_example=align.copy(),
        per_example_cos=np.repeat(align[..., None], p, axis=-1),
        drift_norm=np.abs(align),
        p_value=np.full((r, s, n_l), 0.5),
        null_p99=np.full(n_l, 0.9),
        null_p99_activation=np.full(n_l, 0.9),
        v_rev_norm=np.ones(n_l),
        v_rev_snr=np.full(n_l, 10.0),
        config={"n_prompts": p},
    )


def edit_json(path, edit):
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))


def test_report_records_dtypes_and_digest_and_round_trips(tmp_path):
    report = small_report()
    report.save(tmp_path)
    header = json.loads((tmp_path / REPORT_JSON).read_text())
    import hashlib

    assert header["tensors_sha256"] == hashlib.sha256((tmp_path / REPORT_TENSORS).read_bytes()).hexdigest()
    assert header["array_dtypes"]["alignment"] == "float64" and header["array_dtypes"]["v_rev"] == "float32"
    back = ReversionReport.load(tmp_path)
    np.testing.assert_array_equal(back.alignment, report.alignment)


def test_tensors_from_another_run_are_refused_by_digest(tmp_path):
    small_report().save(tmp_path / "a")
    small_report(shift=0.3).save(tmp_path / "b")  # same shapes and dtypes, other numbers
    shutil.copy(tmp_path / "b" / REPORT_TENSORS, tmp_path / "a" / REPORT_TENSORS)
    with pytest.raises(ValueError, match="sha256 differs") as err:
        ReversionReport.load(tmp_path / "a")
    assert str(tmp_path / "a" / REPORT_JSON) in str(err.value) and str(tmp_path / "a" / REPORT_TENSORS) in str(
        err.value
    )


@pytest.mark.parametrize(("dtype", "shown"), [(torch.bool, "bool"), (torch.int8, "int8")])
def test_arrays_of_the_wrong_dtype_are_refused(tmp_path, dtype, shown):
    small_report().save(tmp_path)
    tensors = load_file(str(tmp_path / REPORT_TENSORS))
    tensors["alignment"] = torch.ones_like(tensors["alignment"]).to(dtype)
    save_file(tensors, str(tmp_path / REPORT_TENSORS))
    edit_json(tmp_path / REPORT_JSON, lambda d: d.pop("tensors_sha256"))  # past the digest: the dtype check
    with pytest.raises(ValueError, match=rf"array 'alignment' has dtype {shown}, but .*report.json records float64"):
        ReversionReport.load(tmp_path)
    # An older report (no digest, no recorded dtypes) still refuses arrays that are not floating point...
    edit_json(tmp_path / REPORT_JSON, lambda d: d.pop("array_dtypes"))
    with pytest.raises(ValueError, match=rf"dtype {shown}, but a report's arrays are floating point"):
        ReversionReport.load(tmp_path)


def test_older_reports_without_digest_or_dtypes_still_load(tmp_path):
    report = small_report()
    report.save(tmp_path)
    edit_json(tmp_path / REPORT_JSON, lambda d: (d.pop("tensors_sha256"), d.pop("array_dtypes")))
    np.testing.assert_array_equal(ReversionReport.load(tmp_path).alignment, report.alignment)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("format", 9, "report format 9, newer than this revlens reads"),
        ("format", "two", "field 'format' is 'two', not a report format"),
        ("format", 0, "field 'format' is 0"),
        ("layers", ["0", "1", "2", "3"], "field 'layers' is .*not a list of layer numbers"),
        ("steps", [10, "20", 30], "field 'steps' is .*not a list of integer steps"),
        ("d_model", "8", "field 'd_model' is '8', not a positive integer"),
    ],
)
def test_bad_report_fields_are_named_on_one_line(tmp_path, field, value, expected):
    small_report().save(tmp_path)
    edit_json(tmp_path / REPORT_JSON, lambda d: d.update({field: value}))
    with pytest.raises(ValueError, match=expected) as err:
        ReversionReport.load(tmp_path)
    assert "\n" not in str(err.value) and str(tmp_path / REPORT_JSON) in str(err.value)


# ---------------------------------------------------------------------------------------------------------
# item 7: every alignment NaN


def test_selection_on_all_nan_alignments_names_the_cause():
    with pytest.raises(ValueError, match=r"every alignment is NaN .*diverged.*pretrain and align"):
        selection_test(np.full((2, 3, 4), np.nan), [0, 1, 2, 3], ["a", "b"], d_model=8)
    report = small_report()
    report.alignment[:] = np.nan
    with pytest.raises(ValueError, match="every alignment is NaN"):
        report.selection()
    # One measured pair is enough to test (the NaN elsewhere are left out, as before).
    a = np.full((2, 3, 4), np.nan)
    a[0, 0, 2] = 0.99
    assert selection_test(a, [0, 1, 2, 3], ["a", "b"], d_model=8).layer == 2


# ---------------------------------------------------------------------------------------------------------
# item 8: a Trainer checkpoint with tokenizer settings but no vocabulary


def test_trainer_checkpoint_without_tokenizer_json_names_the_folder(tmp_path, chat_tok):
    folder = save_tiny_llama(tmp_path / "out" / "checkpoint-5", chat_tok)
    (folder / "tokenizer.json").unlink()
    assert (folder / "tokenizer_config.json").is_file()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder, device="cpu")
    message = str(err.value)
    assert f"{folder} has tokenizer_config.json but no tokenizer.json" in message
    assert "tokenizer.save_pretrained(folder)" in message


# ---------------------------------------------------------------------------------------------------------
# item 9: a truncated or garbage GGUF file


def test_truncated_or_garbage_gguf_is_one_named_error(tmp_path):
    pytest.importorskip("gguf")
    from test_smollm2_gguf import write_tiny_gguf

    from revlens.model_sources import GGUFError, load_gguf

    data = write_tiny_gguf(tmp_path / "tiny.gguf").read_bytes()
    for name, blob in (("head", data[:100]), ("half", data[: len(data) // 2]), ("text", b"not a gguf file" * 50)):
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(blob)
        with pytest.raises(GGUFError, match=rf"^{path} is not a complete GGUF file \(") as err:
            load_gguf(path)
        assert "\n" not in str(err.value), name


# ---------------------------------------------------------------------------------------------------------
# item 10: transformers' "Loading weights" bars are silenced during revlens' loads, and restored after


def test_loads_do_not_print_transformers_progress_bars(tiny_llama_dir, capfd):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    try:
        capfd.readouterr()
        AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), local_files_only=True)
        assert "Loading weights" in capfd.readouterr().err  # the bar is there without revlens
        load_checkpoint(tiny_llama_dir, device="cpu")
        assert "Loading weights" not in capfd.readouterr().err
        assert hf_logging.is_progress_bar_enabled()
    finally:
        if not was:
            hf_logging.disable_progress_bar()


# ---------------------------------------------------------------------------------------------------------
# item 11: job failures are one line naming the job; workers end when their parent dies


def raise_multiline():
    raise RuntimeError("first line\nsecond line\n  third")


def test_a_failing_job_is_one_line_naming_it():
    with JobPool(1) as pool:
        pool.submit(("seed", 3), raise_multiline)
        with pytest.raises(JobFailed) as err:
            dict(pool.results())
    assert str(err.value) == "job ('seed', 3) failed: RuntimeError: first line second line third"
    assert isinstance(err.value.__cause__, RuntimeError)


def test_watch_parent_exits_once_the_parent_is_gone(monkeypatch):
    class Exited(Exception):
        pass

    def fake_exit(code):
        raise Exited(code)

    parents = iter([100, 100, 1])
    monkeypatch.setattr(jobpool.os, "getppid", lambda: next(parents))
    monkeypatch.setattr(jobpool.os, "_exit", fake_exit)
    monkeypatch.setattr(jobpool.time, "sleep", lambda s: None)
    with pytest.raises(Exited) as err:
        jobpool.watch_parent(100)
    assert err.value.args == (jobpool.ORPHAN_EXIT_CODE,)


def _gone(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")  # a zombie has ended; only its parent (now init) has not reaped it yet


PARENT = textwrap.dedent(
    """
    import os, sys, time
    from revlens.jobpool import JobPool
    pool = JobPool(2, threads=1, initializer=os.write, initargs=(1, b"ready\\n"))
    pool.submit("a", time.sleep, 120)
    pool.submit("b", time.sleep, 120)
    print(" ".join(str(p) for p in pool._executor._processes), flush=True)
    time.sleep(600)
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_workers_end_when_the_parent_is_killed_and_a_dead_worker_is_named(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    pids: list[int] = []
    try:
        ready = 0
        while not pids or ready < 2:  # the workers' "ready" and the parent's pid line come in either order
            line = proc.stdout.readline().strip()
            assert line, "the parent process ended early"
            if line == "ready":
                ready += 1
            else:
                pids = [int(p) for p in line.split()]
        assert len(pids) == 2  # both workers are past their initializer: in their 120 s jobs
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 60  # only the watchdog ends the jobs before their 120 s are up
        while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all(_gone(p) for p in pids)
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in pids:
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
    with JobPool(2, threads=1) as pool:
        pool.submit("crash", os._exit, 3)
        with pytest.raises(JobFailed, match=r"^job 'crash' failed: its worker process died"):
            dict(pool.results())


@pytest.mark.slow
def test_a_killed_worker_is_reported_against_its_own_job():
    """The pool fails every unfinished job once a worker dies; the failure names the job that ran in the dead
    worker (killed by SIGKILL here) and how it died, not whichever job the pool happened to fail first."""
    with JobPool(2, threads=1) as pool:
        pool.submit("slow", time.sleep, 30)  # running in the other worker, which the pool then stops
        pool.submit("killed", signal.raise_signal, signal.SIGKILL)
        for key in ("c", "d", "e"):  # queued behind them
            pool.submit(key, time.sleep, 0.1)
        with pytest.raises(JobFailed) as err:
            dict(pool.results())
    assert str(err.value) == (
        "job 'killed' failed: its worker process died before returning (killed by SIGKILL, e.g. out of memory); "
        "rerun with fewer workers or more memory, or with workers=1 to see the error in this process."
    )


# ---------------------------------------------------------------------------------------------------------
# A job failing in a --workers process reaches the command line as one line and exit 2, like one process


def _run_jobs_in_workers(args):
    """Stands in for a command whose jobs run in worker processes (analyze --workers, demo --workers)."""
    import math

    with JobPool(2, threads=1) as pool:
        pool.submit(("step", 5), math.sqrt, -1.0)  # raises ValueError inside the spawned worker
        dict(pool.results())
    return 0


def test_a_job_failing_in_a_worker_is_one_line_and_exit_2(monkeypatch, capsys):
    from revlens import cli

    monkeypatch.setattr(cli, "_run_analyze", _run_jobs_in_workers)
    assert cli.main(["analyze", "history", "--out", "unused", "--workers", "2"]) == 2
    assert capsys.readouterr().err == (
        "revlens analyze: error: job ('step', 5) failed in a worker process: ValueError: math domain error\n"
    )


# ---------------------------------------------------------------------------------------------------------
# Papercuts: one seed prints no "+/- 0.000"; a real model's tables use its own words, not the organism's


def test_one_measured_value_prints_its_mean_without_a_spread():
    from revlens.report import fmt_pm

    assert fmt_pm([0.25]) == "0.250" and fmt_pm([0.25, float("nan")]) == "0.250"
    assert fmt_pm(0.5, 1, 100, "%") == "50.0%" and fmt_pm([]) == "n/a" and fmt_pm([float("nan")]) == "n/a"
    values = [0.1, 0.4]
    assert fmt_pm(values) == f"{np.mean(values):.3f} +/- {np.std(values, ddof=1):.3f}"


def _interventions(seeds):
    metrics = {
        mode: {
            "final_alignment": [0.5] * len(seeds),
            "harmfulness": [0.25] * len(seeds),
            "task_loss": [1.5] * len(seeds),
            "task_accuracy": [0.75] * len(seeds),
            "b1_retention": [0.875] * len(seeds),
        }
        for mode in ("plain", "clamp")
    }
    return {"modes": ["plain", "clamp"], "seeds": list(seeds), "layers": [3], "metrics": metrics, "best_mode": None}


def test_real_model_tables_say_task_loss_and_harmless_answered_the_organisms_keep_their_names(capsys):
    from revlens import table_labels
    from revlens.demos.chat_model.pipeline import print_chat_model
    from revlens.demos.comparison import intervention_table

    from dashboard_reports import deep_report

    organism = deep_report(n_layers=6, n_runs=1, steps=(1, 2), n_prompts=4, d=8, blocking=False)
    organism.config["demo"] = {"preset": "micro"}
    assert table_labels(organism) is None
    head = intervention_table(_interventions([0, 1])).splitlines()[1].split()
    assert head == ["mode", "final_alignment", "harmfulness", "task_loss", "task_accuracy", "b1_retention"]

    real = deep_report(n_layers=6, n_runs=1, steps=(1, 2), n_prompts=4, d=8, blocking=False)
    real.config["demo"] = {"preset": "smollm2", "align": {"steps": 40, "calibrated": True, "checks": {}}}
    real.interventions = _interventions([0])
    row = {"pretrain": [0.5], "align": [0.125], "final": [0.25]}
    metrics = ("harm", "refused_exact", "harmless_answered", "task_loss", "task_accuracy")
    real.behaviour = {m: row for m in metrics} | {"along": {}}
    print_chat_model(real)
    printed = capsys.readouterr().out
    table = printed[printed.index("blocking at layers") : printed.index("best v_rev mode")]
    assert "task loss" in table and "task accuracy" in table and "harmless answered" in table
    assert "b1_retention" not in table and "task_loss" not in table and "+/-" not in table  # one seed: no spread
    assert "0.875" in table and "1.500" in table
    behaviour = printed[printed.index("behaviour on held-out") : printed.index("blocking at layers")]
    for label in ("task loss", "task accuracy", "harmless answered", "refused (exact)"):
        assert f"  {label} " in behaviour
    assert "+/- 0.000" not in behaviour and "B1" not in behaviour and "B2" not in behaviour


def _one_and_two_seed_reports():
    from dashboard_reports import deep_report

    out = {}
    for seeds in ((0,), (0, 1)):
        report = deep_report(n_layers=6, n_runs=len(seeds), steps=(1, 2), n_prompts=4, d=8, blocking=False)
        report.interventions = _interventions(seeds)
        out[len(seeds)] = report
    return out


def test_the_paper_table_names_the_task_loss_in_the_models_own_words():
    from revlens.paper import ours

    report = _one_and_two_seed_reports()[2]
    iv = report.interventions
    iv["best_mode"] = "clamp"
    iv["metrics"]["plain"]["task_loss"], iv["metrics"]["clamp"]["task_loss"] = [1.5, 1.7], [1.6, 1.9]
    diff, pct = np.array([0.1, 0.2]), 100 * (1.75 / 1.6 - 1)  # blocked - plain per seed; mean blocked / plain
    spread = f"{diff.mean():.4f} +/- {diff.std(ddof=1):.4f} ({pct:+.1f}%)"
    assert ours(report)["task_cost"] == f"B2 loss {spread}"  # the organism
    report.config["demo"] = {"preset": "smollm2"}
    assert ours(report)["task_cost"] == f"task loss {spread}"  # a real model
    one = _one_and_two_seed_reports()[1]
    one.config["demo"] = {"preset": "smollm2"}
    one.interventions["best_mode"] = "clamp"
    one.interventions["metrics"]["clamp"]["task_loss"] = [1.6]
    assert ours(one)["task_cost"] == f"task loss 0.1000 ({100 * (1.6 / 1.5 - 1):+.1f}%)"  # one seed: no spread


def _panel_words(fig) -> tuple[list[str], list[str]]:
    titles = [a.text for a in fig.layout.annotations]
    axes = [fig.layout[k].title.text for k in fig.layout if k.startswith("yaxis") and fig.layout[k].title.text]
    return titles, axes


def test_the_dashboard_says_harmless_answered_for_a_real_model_and_shows_no_spread_for_one_seed():
    from revlens.dashboard import build_dashboard

    reports = _one_and_two_seed_reports()
    organism_titles, organism_axes = _panel_words(build_dashboard(reports[2]))
    assert "B1 retention, by mode" in organism_titles and "% of held-out B1 prompts" in organism_axes
    for report in reports.values():
        report.config["demo"] = {"preset": "smollm2"}
    fig = build_dashboard(reports[1])
    titles, axes = _panel_words(fig)
    assert "Harmless answered, by mode" in titles and "% of held-out harmless prompts" in axes
    assert not any("B1" in t or "B2" in t for t in titles + axes)
    bars = [t for t in fig.data if t.type == "bar"]
    assert len(bars) == 4 and all("+/-" not in t.hovertemplate and "mean %{y:.3f}<br>" in t.hovertemplate for t in bars)
    trajectory = [t for t in fig.data if t.name == "mean over 1 runs"]
    assert trajectory and all("+/-" not in t.hovertemplate for t in trajectory)
    two = [t for t in build_dashboard(reports[2]).data if t.type == "bar" and t.name == "task_loss"][0]
    assert "mean %{y:.3f} +/- %{customdata[0]:.3f}" in two.hovertemplate  # two seeds: the spread is shown


def test_the_report_summary_shows_one_runs_value_without_a_spread():
    reports = _one_and_two_seed_reports()
    one = reports[1].summary().splitlines()
    assert "+/-" not in "\n".join(one) and "one run, at the best layer" in one[2]
    row = next(line for line in one if line.startswith("1 "))
    best = reports[1].best_layer_index()
    assert f"{reports[1].alignment[0, 0, best]:+.3f}" in row.split()
    two = reports[2].summary().splitlines()
    row = next(line for line in two if line.startswith("1 "))
    a = reports[2].alignment[:, 0, reports[2].best_layer_index()]
    assert f"{a.mean():+.3f} +/- {a.std(ddof=1):.3f}" in row and "mean +/- std over runs" in two[2]


def test_every_test_the_reliability_guide_names_exists():
    guide = (Path(__file__).resolve().parent.parent / "docs" / "guides" / "reliability.md").read_text()
    named = re.findall(r"`(test_\w+\.py)::(\w+)`", guide)
    assert len(named) > 50
    missing = [f"{f}::{t}" for f, t in named if f"def {t}(" not in (Path(__file__).parent / f).read_text()]
    assert missing == []
