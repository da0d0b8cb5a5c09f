"""Reliability of `finetune` (issue 9 items 3, 7, 8, 13): settings checked on resume, the last step saved,
a kill during the state save loses nothing, run names stay inside out_dir."""

from __future__ import annotations

import copy
import importlib
import json
import math
import os
import socket
import subprocess

import pytest
import torch

from revlens.finetune import FinetuneStateError, finetune

ft = importlib.import_module("revlens.finetune")  # the module (revlens.finetune is also the function)


def toy_data(model, n: int = 16):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, model.cfg.d_vocab, (n, 8), generator=gen)
    mask = torch.zeros(n, 8)
    mask[:, 4:] = 1.0
    return tokens, mask


def same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


KW = dict(steps=4, lr=1e-3, batch_size=4, seed=1, progress=False)


def test_resume_refused_when_settings_differ_and_overwrite_starts_over(tiny_model, tmp_path):
    """Item 3: a finished run in out_dir is not silently returned for a call with another lr, seed or data."""
    tokens, mask = toy_data(tiny_model)
    finetune(copy.deepcopy(tiny_model), tokens, mask, out_dir=tmp_path, save_steps=(2,), **KW)
    with pytest.raises(FinetuneStateError, match=r"lr: saved 0.001, now 0.002.*overwrite=True"):
        finetune(copy.deepcopy(tiny_model), tokens, mask, out_dir=tmp_path, **{**KW, "lr": 2e-3})
    with pytest.raises(FinetuneStateError, match="seed: saved 1, now 2"):
        finetune(copy.deepcopy(tiny_model), tokens, mask, out_dir=tmp_path, **{**KW, "seed": 2})
    with pytest.raises(FinetuneStateError, match="data: saved"):
        finetune(copy.deepcopy(tiny_model), tokens.flip(0), mask, out_dir=tmp_path, **KW)
    with pytest.raises(FinetuneStateError, match="schedule: saved 'constant', now 'cosine'"):
        finetune(copy.deepcopy(tiny_model), tokens, mask, out_dir=tmp_path, schedule="cosine", **KW)
    # overwrite=True: the new run from scratch, equal to the same run in an empty folder.
    fresh, overwritten = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    finetune(fresh, tokens, mask, out_dir=tmp_path / "empty", **{**KW, "lr": 2e-3})
    result = finetune(overwritten, tokens, mask, out_dir=tmp_path, overwrite=True, **{**KW, "lr": 2e-3})
    assert result.resumed_from == 0 and same_weights(fresh, overwritten)
    assert not (tmp_path / "finetune" / "seed_0" / "step_2").exists()  # the old run's checkpoints are gone


def test_steps_may_grow_with_a_constant_schedule(tiny_model, tmp_path):
    """Item 3, the documented exception: continuing a run to more steps is the same run."""
    tokens, mask = toy_data(tiny_model)
    straight = copy.deepcopy(tiny_model)
    finetune(straight, tokens, mask, out_dir=tmp_path / "a", **{**KW, "steps": 6})
    finetune(copy.deepcopy(tiny_model), tokens, mask, out_dir=tmp_path / "b", **KW)
    longer = copy.deepcopy(tiny_model)
    result = finetune(longer, tokens, mask, out_dir=tmp_path / "b", **{**KW, "steps": 6})
    assert result.resumed_from == 4 and same_weights(straight, longer)
    with pytest.raises(FinetuneStateError, match="already at step 6, beyond steps=4"):
        finetune(copy.deepcopy(tiny_model), tokens, mask, out_dir=tmp_path / "b", **KW)


def test_last_step_is_always_saved(tiny_model, tmp_path):
    """Item 7: steps=5 with save steps (1, 2) still writes step_5 and a state at step 5."""
    tokens, mask = toy_data(tiny_model)
    model = copy.deepcopy(tiny_model)
    result = finetune(model, tokens, mask, out_dir=tmp_path, save_steps=(1, 2), **{**KW, "steps": 5})
    run = tmp_path / "finetune" / "seed_0"
    assert sorted(result.checkpoints) == [1, 2, 5]
    from revlens.checkpoint_loader import load_checkpoint

    assert same_weights(load_checkpoint(run / "step_5"), model)
    assert json.loads((run / "state" / "latest.json").read_text())["step"] == 5


def test_a_kill_inside_the_state_save_keeps_the_previous_state(tiny_model, tmp_path, monkeypatch):
    """Item 8: killed after the new state folder is renamed into place but before the pointer moves to it
    (the two renames of a save), the run resumes from the previous state and ends bitwise equal."""
    tokens, mask = toy_data(tiny_model)
    kw = {**KW, "steps": 6, "save_steps": (2, 4)}
    straight = copy.deepcopy(tiny_model)
    finetune(straight, tokens, mask, out_dir=tmp_path / "a", **kw)

    real = ft.atomic_write_json

    def pointer_write(path, obj, **k):
        if obj["step"] == 4:
            raise KeyboardInterrupt  # the kill between the folder rename and the pointer rename
        return real(path, obj, **k)

    monkeypatch.setattr(ft, "atomic_write_json", pointer_write)
    with pytest.raises(KeyboardInterrupt):
        finetune(copy.deepcopy(tiny_model), tokens, mask, out_dir=tmp_path / "b", **kw)
    monkeypatch.setattr(ft, "atomic_write_json", real)
    state = tmp_path / "b" / "finetune" / "seed_0" / "state"
    assert json.loads((state / "latest.json").read_text())["step"] == 2
    assert sorted(p.name.split("-")[0] for p in state.iterdir() if p.is_dir()) == ["2", "4"]  # old kept

    resumed = copy.deepcopy(tiny_model)
    result = finetune(resumed, tokens, mask, out_dir=tmp_path / "b", **kw)
    assert result.resumed_from == 2 and same_weights(straight, resumed)

    # Killed while the new state folder is being written: the pointer still names the previous state.
    real_save = torch.save

    def torn_save(obj, f, *a, **k):
        if "optimizer" in obj and obj["scheduler"]["last_epoch"] == 4:
            raise KeyboardInterrupt
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ft.torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        finetune(copy.deepcopy(tiny_model), tokens, mask, out_dir=tmp_path / "c", **kw)
    monkeypatch.undo()
    again = copy.deepcopy(tiny_model)
    assert finetune(again, tokens, mask, out_dir=tmp_path / "c", **kw).resumed_from == 2
    assert same_weights(straight, again)


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", ".", "", "a\\b", "x/../y"])
def test_run_names_that_leave_out_dir_are_rejected(tiny_model, tmp_path, name):
    """Item 13: run_name is one folder name under out_dir/finetune/."""
    tokens, mask = toy_data(tiny_model)
    with pytest.raises(ValueError, match="one plain folder name"):
        finetune(tiny_model, tokens, mask, out_dir=tmp_path / "out", run_name=name, **KW)
    assert not any(tmp_path.rglob("step_*"))


# ---------------------------------------------------------------------------------------------------------
# Reliability round 3: a non-finite loss stops the run before its update; one process per run folder.


class NaNFrom:
    """A penalty that is exactly zero (adding zero gradient) before step ``bad`` and NaN from it on."""

    def __init__(self, bad: int):
        self.bad = bad

    def description(self):
        return {"kind": "nan_from_test"}  # ``bad`` is not a setting: a resume may change it

    def penalty(self, model, step):
        zero = next(model.parameters()).sum() * 0.0
        return zero + (float("nan") if step >= self.bad else 0.0)


class InfiniteSlope:
    """A penalty worth 0 whose gradient is NaN (d sqrt(u)/du at u = 0): a finite loss with a broken gradient."""

    def description(self):
        return {"kind": "infinite_slope_test"}

    def penalty(self, model, step):
        w = next(model.parameters())
        return torch.sqrt(((w - w.detach()) ** 2).sum())


def test_a_non_finite_penalty_stops_before_the_update_and_keeps_the_saved_state(tiny_model, tmp_path):
    """Item 1: the step whose penalty is NaN is not applied; weights, checkpoints and state are the last finite
    ones (equal to a clean run of that length), the lock is gone, and both the state and the checkpoint can be
    started from."""
    from revlens.checkpoint_loader import load_checkpoint
    from revlens.finetune import NonFiniteLossError

    tokens, mask = toy_data(tiny_model)
    kw = {**KW, "steps": 4, "save_steps": (2,), "spec": "anchor@1e308"}
    model = copy.deepcopy(tiny_model)
    with pytest.raises(NonFiniteLossError) as err:
        finetune(model, tokens, mask, out_dir=tmp_path / "b", anchor=NaNFrom(3), **kw)
    message = str(err.value)
    assert "\n" not in message and "stopped at step 3: the penalty on the probe prompts is nan" in message
    assert "blocking spec 'anchor@1e308'" in message and "up to step 2" in message and "lower the penalty" in message

    straight = copy.deepcopy(tiny_model)  # the truth: two clean steps (the zero penalty adds exactly nothing)
    finetune(straight, tokens, mask, out_dir=tmp_path / "a", **{**KW, "steps": 2})
    assert same_weights(straight, model)
    run = tmp_path / "b" / "finetune" / "seed_0"
    assert sorted(p.name for p in run.glob("step_*")) == ["step_2"] and not (run / ".lock").exists()
    assert json.loads((run / "state" / "latest.json").read_text())["step"] == 2
    assert same_weights(load_checkpoint(run / "step_2"), straight)

    # The saved state resumes (same settings, the cause gone) and ends like a run that never failed ...
    resumed, clean = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    assert finetune(resumed, tokens, mask, out_dir=tmp_path / "b", anchor=NaNFrom(99), **kw).resumed_from == 2
    finetune(clean, tokens, mask, out_dir=tmp_path / "c", anchor=NaNFrom(99), **kw)
    assert same_weights(clean, resumed)
    # ... and the checkpoint starts a new run with other settings (a lower learning rate here).
    again = finetune(load_checkpoint(run / "step_2"), tokens, mask, out_dir=tmp_path / "d", **{**KW, "lr": 1e-4})
    assert all(math.isfinite(v) for v in again.losses.values())


def test_a_non_finite_task_loss_or_gradient_is_named_with_its_fix(tiny_model, tmp_path, monkeypatch):
    """Item 1: NaN task loss at step 1 (nothing to lower yet) and a NaN gradient under clipping."""
    from revlens.finetune import NonFiniteLossError

    tokens, mask = toy_data(tiny_model)
    model = copy.deepcopy(tiny_model)
    start = copy.deepcopy(model)
    real = ft.model_lm_loss
    monkeypatch.setattr(ft, "model_lm_loss", lambda *a: real(*a) * float("inf"))
    with pytest.raises(NonFiniteLossError, match=r"stopped at step 1: the task loss is inf with blocking spec 'plain'"):
        finetune(model, tokens, mask, out_dir=tmp_path, spec="plain", **KW)
    assert same_weights(model, start) and not any((tmp_path / "finetune" / "seed_0").glob("*"))
    monkeypatch.undo()
    with pytest.raises(NonFiniteLossError, match=r"step 1: the gradient norm is nan .*not recorded \(pass spec="):
        finetune(model, tokens, mask, anchor=InfiniteSlope(), max_grad_norm=1.0, **KW)
    assert same_weights(model, start)


def test_weights_made_non_finite_by_a_finite_step_are_not_saved(tiny_model, tmp_path):
    """Item 1: the save-time check (an update that overflowed: here a weight set to inf after step 2)."""
    from revlens.finetune import NonFiniteLossError

    tokens, mask = toy_data(tiny_model)

    def overflow(step, model):
        if step == 2:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("inf")

    with pytest.raises(NonFiniteLossError, match=r"step 2: its loss was finite but the update made 1 parameter"):
        finetune(copy.deepcopy(tiny_model), tokens, mask, out_dir=tmp_path, save_steps=(1, 2), on_step=overflow, **KW)
    run = tmp_path / "finetune" / "seed_0"
    assert sorted(p.name for p in run.glob("step_*")) == ["step_1"] and not (run / ".lock").exists()
    assert json.loads((run / "state" / "latest.json").read_text())["step"] == 1


def write_lock(run_dir, pid, host=None):
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"pid": pid, "host": host or socket.gethostname(), "since": "earlier"}
    (run_dir / ".lock").write_text(json.dumps(record))


def test_a_run_folder_held_by_a_live_process_is_refused_naming_it(tiny_model, tmp_path):
    """Item 2: a lock of a live pid on this host (this test's own) or of another host refuses at once."""
    from revlens.finetune import RunLockedError

    tokens, mask = toy_data(tiny_model)
    run = tmp_path / "finetune" / "seed_0"
    write_lock(run, os.getpid())
    before = (run / ".lock").read_text()
    with pytest.raises(RunLockedError, match=rf"held by pid {os.getpid()} on host '{socket.gethostname()}'"):
        finetune(copy.deepcopy(tiny_model), tokens, mask, out_dir=tmp_path, **KW)
    assert (run / ".lock").read_text() == before and sorted(p.name for p in run.iterdir()) == [".lock"]
    write_lock(run, 1, host="another-node")  # cannot be judged from here: refused with the way out
    with pytest.raises(RunLockedError, match=r"on host 'another-node'.*delete .*\.lock"):
        finetune(copy.deepcopy(tiny_model), tokens, mask, out_dir=tmp_path, overwrite=True, **KW)
    assert not (run / "state").exists()


def test_a_dead_processes_lock_is_replaced_with_a_warning_and_removed_at_the_end(tiny_model, tmp_path):
    """Item 2: the holder's pid no longer runs (a finished `true`): replaced, warned, held while training
    (also through overwrite=True, which clears everything else), removed at the end."""
    tokens, mask = toy_data(tiny_model)
    gone = subprocess.Popen(["true"])
    gone.wait()
    run = tmp_path / "finetune" / "seed_0"
    write_lock(run, gone.pid)
    held = []

    def look(step, model):
        held.append(json.loads((run / ".lock").read_text())["pid"])

    with pytest.warns(RuntimeWarning, match=rf"stale lock of pid {gone.pid}"):
        finetune(copy.deepcopy(tiny_model), tokens, mask, out_dir=tmp_path, on_step=look, **KW)
    assert held == [os.getpid()] * KW["steps"] and not (run / ".lock").exists()
    held.clear()
    finetune(copy.deepcopy(tiny_model), tokens, mask, out_dir=tmp_path, on_step=look, overwrite=True, **KW)
    assert held == [os.getpid()] * KW["steps"] and not (run / ".lock").exists()
    assert (run / f"step_{KW['steps']}").is_dir()
