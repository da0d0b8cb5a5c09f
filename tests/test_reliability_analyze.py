"""Reliability of `analyze` (issue 9): cache validity, non-finite readouts, bad arguments, thread policy.

Each test names the issue item it covers; each failed on the code before the fix.
"""

from __future__ import annotations

import copy
import os
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import revlens
from revlens import analysis
from revlens.analysis import _MeasurementCache
from revlens.checkpoint_format import CheckpointError
from revlens.checkpoint_loader import CheckpointRef, boot_native_model
from revlens.checkpoint_save import save_checkpoint
from revlens.probe import ProbeResult, ReversionProbe

from conftest import PROMPTS, shifted, tiny_config

ONES = torch.ones(32)


def quiet_analyze(*args, **kwargs):
    kwargs.setdefault("progress", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = revlens.analyze(*args, **kwargs)
    return report, [str(w.message) for w in caught]


def write_history(root, model, finetune):
    """pretrain = align + 1 at layer 1 (v_rev = the all-ones direction there); finetune as given."""
    save_checkpoint(shifted(model, 1, ONES), root / "pretrain")
    save_checkpoint(model, root / "align")
    for run, steps in finetune.items():
        for step, m in steps.items():
            save_checkpoint(m, root / "finetune" / run / f"step_{step}")
    return root


def cache_entries(cache_dir):
    return {p.name.rsplit("-", 1)[0]: p for p in cache_dir.rglob("*.safetensors")}


# item 1: every weight file keys the cache, not only *.safetensors


def as_legacy_pt(folder):
    """Turn a revlens folder into one whose weights are a weights-only ``model.pt``."""
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "model.pt")


def test_rewritten_pt_weights_are_measured_again(tiny_model, tmp_path):
    step = tmp_path / "h" / "finetune" / "r" / "step_1"
    write_history(tmp_path / "h", tiny_model, {"r": {1: shifted(tiny_model, 1, -0.3 * ONES)}})
    as_legacy_pt(step)
    cache = tmp_path / "cache"
    first, _ = quiet_analyze(str(tmp_path / "h"), PROMPTS, layers=[1], cache_dir=cache)
    assert first.alignment[0, 0, 0] == pytest.approx(-1.0, abs=1e-5)
    save_checkpoint(shifted(tiny_model, 1, 0.3 * ONES), step)  # same size, other weights
    as_legacy_pt(step)
    again, _ = quiet_analyze(str(tmp_path / "h"), PROMPTS, layers=[1], cache_dir=cache)
    assert again.alignment[0, 0, 0] == pytest.approx(1.0, abs=1e-5)
    assert len(cache_entries(cache)) == 3  # the stale entry of step_1 was replaced, not kept beside


WEIGHT_FILES = [
    "pytorch_model.bin",
    "model.pt",
    "model.pth",
    "adapter_model.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "tokenizer.json",
    "model-00001-of-00002.safetensors",
]


@pytest.mark.parametrize("name", WEIGHT_FILES)
def test_stamp_changes_with_every_weight_file(tmp_path, name, monkeypatch):
    from revlens.analysis import checkpoint_stamp

    for n in WEIGHT_FILES:
        (tmp_path / n).write_bytes(b"0" * 64)
    before = checkpoint_stamp(tmp_path)
    (tmp_path / name).write_bytes(b"1" * 64)  # same size, other content
    assert checkpoint_stamp(tmp_path) != before
    (tmp_path / f".{name}.123.tmp").write_bytes(b"x")  # a writer's temporary file is not part of the checkpoint
    assert checkpoint_stamp(tmp_path) == checkpoint_stamp(tmp_path)
    # Files too large to hash are keyed on (size, mtime_ns).
    monkeypatch.setattr(analysis, "HASHED_FILE_BYTES", 0)
    big = checkpoint_stamp(tmp_path)
    st = (tmp_path / name).stat()
    os.utime(tmp_path / name, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000))
    assert checkpoint_stamp(tmp_path) != big


# item 2: token-id prompts keyed on their values; every setting that changes the numbers in the key


def long_prompts(middle: int, n: int = 2) -> list[torch.Tensor]:
    """Prompts longer than the 1,000 elements beyond which torch abbreviates a printed tensor."""
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(1, 20, (1001,), generator=gen) for _ in range(n)]
    for r in rows:
        r[500] = middle
    return rows


def test_cache_key_sees_every_token_of_long_prompts(tmp_path):
    a, b = long_prompts(3), long_prompts(4)
    assert str(a[0]) == str(b[0])  # torch abbreviates the printed form: the old key
    assert _MeasurementCache(tmp_path, {"prompts": a}).root != _MeasurementCache(tmp_path, {"prompts": b}).root
    from revlens.analysis import cache_key

    assert cache_key({"prompts": a}) != cache_key({"prompts": b})
    assert cache_key({"prompts": a}) == cache_key({"prompts": long_prompts(3)})
    assert cache_key({"prompts": [a[0][:-1], a[1]]}) != cache_key({"prompts": a})
    base = {"prompts": ["x"], "control": None, "layers": None, "hook": "resid_post", "readout": "last"}
    for change in (
        {"control": ["y"]},
        {"layers": [1]},
        {"hook": "resid_pre"},
        {"readout": "mean"},
        {"dtype": "bfloat16"},
        {"chat_template": False},
        {"system": "be brief"},
    ):
        assert cache_key({**base, **change}) != cache_key(base), change


def test_long_token_prompt_sets_do_not_share_cache_entries(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = boot_native_model({**tiny_config(len(tokenizer)), "n_ctx": 1001}, tokenizer=tokenizer)
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        tuned.blocks[0].mlp.W_in.add_(0.1 * torch.randn_like(tuned.blocks[0].mlp.W_in))
    save_checkpoint(shifted(model, 0, ONES), tmp_path / "h" / "pretrain")
    save_checkpoint(model, tmp_path / "h" / "align")
    save_checkpoint(tuned, tmp_path / "h" / "finetune" / "r" / "step_1")
    kw = dict(readout="mean", layers=[0], null_samples=10, cache_dir=tmp_path / "cache")
    a, _ = quiet_analyze(str(tmp_path / "h"), long_prompts(3, n=1), **kw)
    b, _ = quiet_analyze(str(tmp_path / "h"), long_prompts(4, n=1), **kw)
    probe_b = ReversionProbe(long_prompts(4, n=1), layers=[0], readout="mean")
    expected = (probe_b.centroid(tuned) - probe_b.centroid(model)).norm()
    assert b.drift_norm[0, 0, 0] == pytest.approx(float(expected), rel=1e-9)
    assert a.drift_norm[0, 0, 0] != pytest.approx(float(expected), rel=1e-6)


# item 4 and item 14: NaN/inf and absurdly large readouts


def with_bias(model, layer, index, value):
    out = copy.deepcopy(model)
    with torch.no_grad():
        out.blocks[layer].mlp.out.bias[index] = value
    return out


def test_non_finite_finetune_checkpoint_is_named_recorded_and_counted(tiny_model):
    spec = {
        "pretrain": shifted(tiny_model, 1, ONES),
        "align": tiny_model,
        "finetune": {"r": {1: shifted(tiny_model, 1, -0.3 * ONES), 2: with_bias(tiny_model, 1, 0, float("nan"))}},
    }
    report, messages = quiet_analyze(spec, PROMPTS, layers=[1, 2])
    assert any("finetune/r/step_2" in m and "NaN or infinite" in m for m in messages)
    assert not any("drift is zero" in m for m in messages)
    assert report.config["non_finite"] == ["finetune/r/step_2"]
    assert np.isnan(report.alignment[0, 1]).all() and np.isnan(report.drift_norm[0, 1]).all()
    assert report.alignment[0, 0, 0] == pytest.approx(-1.0, abs=1e-5)
    summary = report.summary()
    assert "non-finite" in summary and "1 checkpoint(s): finetune/r/step_2" in summary


@pytest.mark.parametrize("phase", ["pretrain", "align"])
def test_non_finite_pretrain_or_align_is_an_error_naming_it(tiny_model, phase):
    bad = with_bias(tiny_model, 0, 3, float("inf"))
    spec = {"pretrain": shifted(tiny_model, 1, ONES), "align": tiny_model, "finetune": {"r": {1: tiny_model}}}
    spec[phase] = bad
    with pytest.raises(CheckpointError, match=rf"^{phase}: its readouts are NaN or infinite at layer\(s\) \[0, 1, 2\]"):
        quiet_analyze(spec, PROMPTS)


def test_extreme_weights_warn_naming_the_checkpoint(tiny_model):
    huge = shifted(tiny_model, 1, 1e30 * ONES)
    spec = {"pretrain": shifted(tiny_model, 1, ONES), "align": tiny_model, "finetune": {"r": {7: huge}}}
    report, messages = quiet_analyze(spec, PROMPTS, layers=[1])
    assert report.alignment[0, 0, 0] == pytest.approx(1.0)  # finite, plausible-looking: hence the warning
    assert any(m.startswith("finetune/r/step_7: readouts reach |h| = 1e+30") for m in messages)


# items 6 and 9: stale or corrupt cache entries are misses with a warning naming the file


@pytest.fixture()
def cached_history(tiny_model, tmp_path):
    write_history(
        tmp_path / "h",
        tiny_model,
        {"r": {1: shifted(tiny_model, 1, -0.3 * ONES), 2: shifted(tiny_model, 1, 0.2 * ONES)}},
    )
    first, _ = quiet_analyze(str(tmp_path / "h"), PROMPTS, cache_dir=tmp_path / "cache")
    return tmp_path, first


def other_width_entry(path, d_model=16):
    """Rewrite a cache entry as if measured on a model of another width."""
    t = load_file(str(path))
    n, layers = int(t["n_prompts"][0]), t["centroid"].shape[0]
    out = {
        "centroid": torch.zeros(layers, d_model, dtype=torch.float64),
        "n_prompts": t["n_prompts"],
        "probe_centroid": torch.zeros(layers, d_model, dtype=torch.float64),
        "per_example": torch.zeros(n, layers, d_model),
    }
    if "covariance" in t:
        out["covariance"] = torch.zeros(layers, d_model, d_model, dtype=torch.float64)
    save_file(out, str(path))


def test_entries_of_another_architecture_are_measured_again(cached_history):
    root, first = cached_history
    entries = cache_entries(root / "cache")
    other_width_entry(entries["align"])
    other_width_entry(entries["finetune__r__step_2"])
    again, messages = quiet_analyze(str(root / "h"), PROMPTS, cache_dir=root / "cache")
    np.testing.assert_array_equal(again.alignment, first.alignment)
    for name in ("align", "finetune__r__step_2"):
        assert any(f"cache entry {entries[name]}" in m and "shape" in m for m in messages), name
    # An entry that fits its own shapes but not the checkpoints measured beside it: an error naming the file.
    other_width_entry(entries["pretrain"])
    with pytest.raises(CheckpointError, match="cache file .*pretrain-.*every checkpoint of a history"):
        quiet_analyze(str(root / "h"), PROMPTS, cache_dir=root / "cache")


def test_truncated_or_empty_entries_are_measured_again(cached_history):
    root, first = cached_history
    entries = cache_entries(root / "cache")
    entries["finetune__r__step_1"].write_bytes(entries["finetune__r__step_1"].read_bytes()[:50])
    entries["pretrain"].write_bytes(b"")
    again, messages = quiet_analyze(str(root / "h"), PROMPTS, cache_dir=root / "cache")
    np.testing.assert_array_equal(again.alignment, first.alignment)
    for name in ("pretrain", "finetune__r__step_1"):
        assert any(f"cache entry {entries[name]}" in m and "cannot be read" in m for m in messages), name
    _, messages = quiet_analyze(str(root / "h"), PROMPTS, cache_dir=root / "cache")
    assert not any("cache entry" in m for m in messages)  # repaired by the rerun


# item 10: concurrent writers of one cache


def test_interleaved_writers_of_one_entry_never_collide(tmp_path, monkeypatch):
    """Writer B writes the same entry completely while writer A is between its write and its rename."""
    import safetensors.torch as st

    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"weights")
    ref = CheckpointRef("align", src)
    settings = {"prompts": ["a"], "layers": None}

    def result(v: float) -> ProbeResult:
        centroid = torch.full((2, 4), v, dtype=torch.float64)
        return ProbeResult(centroid, centroid.clone(), None, torch.full((1, 2, 4), v), None, 1)

    writer_a, writer_b = (_MeasurementCache(tmp_path / "cache", settings) for _ in range(2))
    original, calls = st.save_file, []

    def save_then_let_b_run(tensors, filename, metadata=None):
        original(tensors, filename, metadata=metadata)
        calls.append(filename)
        if len(calls) == 1:
            writer_b.put(ref, result(2.0))

    monkeypatch.setattr(st, "save_file", save_then_let_b_run)
    writer_a.put(ref, result(1.0))
    assert calls[0] != calls[1]  # two temporary names
    assert writer_b.root == writer_a.root
    files = list(writer_a.root.iterdir())
    assert len(files) == 1 and not files[0].name.startswith(".")  # no temporary file left
    got = _MeasurementCache(tmp_path / "cache", settings).get(ref)
    assert torch.equal(got.centroid, result(1.0).centroid)  # the last writer (A) won, whole


# item 12: bad arguments fail before anything is loaded, with one line and exit code 2


def test_cli_rejects_bad_device_out_and_threads_before_loading(tiny_model, tmp_path, capsys):
    from revlens.cli import main

    missing = str(tmp_path / "no_history")  # loading anything would report this folder instead
    assert main(["analyze", missing, "--out", str(tmp_path / "o"), "--device", "banana"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "device 'banana' is not a torch device; use cpu" in err
    if not torch.cuda.is_available():
        assert main(["analyze", missing, "--out", str(tmp_path / "o"), "--device", "cuda"]) == 2
        assert "no CUDA device is visible" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["analyze", missing, "--out", str(tmp_path / "file")]) == 2
    assert "--out" in (err := capsys.readouterr().err) and "is a file; give a folder" in err
    assert main(["analyze", missing, "--out", str(tmp_path / "o"), "--threads", "0"]) == 2
    assert "threads must be a positive whole number" in capsys.readouterr().err


@pytest.mark.parametrize("n", [0, -5])
def test_null_samples_must_be_positive(tiny_model, n):
    spec = {"pretrain": shifted(tiny_model, 1, ONES), "align": tiny_model, "finetune": {"r": {1: tiny_model}}}
    with pytest.raises(ValueError, match=rf"null_samples={n}: .* give a positive integer"):
        revlens.analyze(spec, PROMPTS, null_samples=n, progress=False)


def test_cache_dir_that_is_a_file_is_an_error(tiny_model, tmp_path):
    (tmp_path / "f").write_text("x")
    spec = {"pretrain": shifted(tiny_model, 1, ONES), "align": tiny_model, "finetune": {"r": {1: tiny_model}}}
    with pytest.raises(ValueError, match="is a file; give a folder"):
        revlens.analyze(spec, PROMPTS, cache_dir=tmp_path / "f", progress=False)


# item 15: thread count from the model size, overridable, restored afterwards


def test_thread_policy(monkeypatch):
    from revlens.threads import ENV_VAR, ThreadPolicy, choose_num_threads

    monkeypatch.delenv(ENV_VAR, raising=False)
    assert choose_num_threads(5_000_000, cores=16) == 1
    assert choose_num_threads(50_000_000, cores=16) == 2
    assert choose_num_threads(7_000_000_000, cores=16) == 16
    assert choose_num_threads(7_000_000_000, cores=16, override=3) == 3
    monkeypatch.setenv(ENV_VAR, "4")
    assert choose_num_threads(1_000, cores=2) == 4
    assert choose_num_threads(1_000, cores=2, override=2) == 2
    monkeypatch.setenv(ENV_VAR, "many")
    with pytest.raises(ValueError, match=ENV_VAR):
        choose_num_threads(1_000)
    with pytest.raises(ValueError, match="threads"):
        ThreadPolicy(0)


def test_analyze_measures_small_models_on_one_thread_and_restores(tiny_model, monkeypatch):
    ENV_VAR = "REVLENS_NUM_THREADS"
    monkeypatch.delenv(ENV_VAR, raising=False)
    seen = []
    measure = ReversionProbe.measure

    def spy(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return measure(self, *args, **kwargs)

    monkeypatch.setattr(ReversionProbe, "measure", spy)
    spec = {"pretrain": shifted(tiny_model, 1, ONES), "align": tiny_model, "finetune": {"r": {1: tiny_model}}}
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        quiet_analyze(spec, PROMPTS, layers=[1])
        assert seen == [1, 1, 1] and torch.get_num_threads() == 3
        seen.clear()
        quiet_analyze(spec, PROMPTS, layers=[1], threads=2)
        assert seen == [2, 2, 2] and torch.get_num_threads() == 3
        seen.clear()
        monkeypatch.setenv(ENV_VAR, "2")
        quiet_analyze(spec, PROMPTS, layers=[1])
        assert seen == [2, 2, 2] and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
