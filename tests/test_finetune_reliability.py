"""Reliability of `finetune` (issue 9 items 3, 7, 8, 13): settings checked on resume, the last step saved,
a kill during the state save loses nothing, run names stay inside out_dir."""

from __future__ import annotations

import copy
import importlib
import json

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
    from revlens.checkpoints import load_checkpoint

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
