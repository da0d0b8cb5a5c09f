"""A full disk (issue 26): every write that runs out of space raises one DiskFullError naming the file and the fix,
leaves no temporary file, keeps what was there before, and is one line with exit 2 from the command line.

The writers are replaced by fakes that fail the way the real libraries do on a full disk (checked on a 64 KiB
tmpfs): safetensors raises ``SafetensorError("Error while serializing: I/O error: No space left on device (os error
28)")``, Python's file writes ``OSError(28, 'No space left on device')`` and ``torch.save`` a bare
``RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")``. Each fake first writes
a few bytes, as a real write does before the disk fills.
"""

from __future__ import annotations

import copy
import errno
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from safetensors import SafetensorError

import revlens
from revlens import DiskFullError
from revlens.checkpoint_loader import load_checkpoint
from revlens.checkpoint_save import save_checkpoint
from revlens.report import REPORT_JSON, REPORT_TENSORS, ReversionReport

from conftest import PROMPTS, shifted

FIX = (
    "nothing half-written was kept. Free space on that disk, or write to a folder on another disk (--out / out_dir=), "
    "and run again."
)
Usage = namedtuple("Usage", "total used free")


def message(path) -> str:
    return f"no space left on the disk while writing {path} (0 bytes free there); {FIX}"


def fill_disk(monkeypatch):
    """The disk reports no free space; safetensors, Python's text writes and torch.save fail as they do then."""
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(2**30, 2**30, 0))

    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 64)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def full_text_writes(monkeypatch):
    write_text = Path.write_text

    def failing(self, data, *args, **kwargs):
        write_text(self, data[:16], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", failing)


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp" in p.name or ".old" in p.name)


def small_report() -> ReversionReport:
    from test_reliability_round3 import small_report as build

    return build()


def test_report_save_on_a_full_disk_names_the_file_and_keeps_the_old_report(tmp_path, monkeypatch):
    small_report().save(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in (REPORT_JSON, REPORT_TENSORS)}
    with monkeypatch.context() as m:
        fill_disk(m)
        with pytest.raises(DiskFullError) as err:
            small_report().save(tmp_path)
    assert str(err.value) == message(tmp_path / REPORT_TENSORS)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(tmp_path / REPORT_TENSORS)
    assert isinstance(err.value.__cause__, SafetensorError)
    assert {name: (tmp_path / name).read_bytes() for name in before} == before and leftovers(tmp_path) == []
    np.testing.assert_array_equal(ReversionReport.load(tmp_path).alignment, small_report().alignment)

    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(2**30, 2**30, 0))
    full_text_writes(monkeypatch)
    with pytest.raises(DiskFullError) as err:
        small_report().save(tmp_path)
    assert str(err.value) == message(tmp_path / REPORT_JSON) and leftovers(tmp_path) == []


def test_checkpoint_saves_on_a_full_disk_name_the_folder_and_leave_no_temporary_folder(
    tiny_model, tiny_llama_dir, tmp_path, monkeypatch
):
    native = save_checkpoint(tiny_model, tmp_path / "native")
    hf = load_checkpoint(tiny_llama_dir, device="cpu")
    saved = {p.name: p.read_bytes() for p in native.iterdir()}
    with monkeypatch.context() as m:
        fill_disk(m)
        for model, path in ((shifted(tiny_model, 0, torch.ones(32)), native), (hf, tmp_path / "hf")):
            with pytest.raises(DiskFullError) as err:  # a revlens folder, and a Hugging Face folder (hf_writer)
                save_checkpoint(model, path)
            assert str(err.value) == message(path)
    assert {p.name: p.read_bytes() for p in native.iterdir()} == saved  # the earlier checkpoint is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["native"]


def test_a_full_disk_while_caching_a_measurement_names_the_cache_entry(tiny_model, tmp_path, monkeypatch):
    spec = {
        "pretrain": shifted(tiny_model, 0, torch.ones(32)),
        "align": tiny_model,
        "finetune": {"seed_0": {1: save_checkpoint(tiny_model, tmp_path / "hist" / "step_1")}},
    }
    written = []
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(2**30, 2**30, 0))

    def save_file(tensors, filename, metadata=None):
        written.append(Path(filename))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with pytest.raises(DiskFullError) as err:
        revlens.analyze(spec, PROMPTS, progress=False, cache_dir=tmp_path / "cache")
    entry = Path(err.value.filename)
    assert str(err.value) == message(entry)
    assert written[0].parent == entry.parent and written[0].name.startswith(f".{entry.name}.")  # its temporary
    assert entry.parent.parent == tmp_path / "cache" and entry.suffix == ".safetensors"
    assert leftovers(tmp_path / "cache") == [] and not entry.exists()


def test_a_full_disk_while_saving_the_training_state_is_named_and_the_lock_released(tiny_model, tmp_path, monkeypatch):
    from revlens.finetune import finetune

    tokens = torch.randint(4, tiny_model.cfg.d_vocab, (8, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(8, 8)
    kw = dict(steps=2, lr=1e-3, batch_size=4, seed=1, progress=False, save_steps=(1,))
    torch_save = torch.save
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    def save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04")
        raise torch_error

    monkeypatch.setattr(torch, "save", save)
    run = tmp_path / "finetune" / "seed_0"
    # With room on the disk, torch's bare serializer error is not called a full disk.
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(2**40, 0, 2**40))
    with pytest.raises(RuntimeError) as err:
        finetune(copy.deepcopy(tiny_model), tokens, mask, out_dir=tmp_path / "roomy", **kw)
    assert err.value is torch_error
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(2**30, 2**30, 0))
    with pytest.raises(DiskFullError) as err:
        finetune(copy.deepcopy(tiny_model), tokens, mask, out_dir=tmp_path, **kw)
    state = Path(err.value.filename)
    assert str(err.value) == message(state) and state.parent == run / "state" and state.name.startswith("1-")
    assert err.value.__cause__ is torch_error
    assert leftovers(tmp_path) == [] and not (run / ".lock").exists()
    assert [p.name for p in run.rglob("*")] == ["state"]  # the step's checkpoint went with its state
    monkeypatch.setattr(torch, "save", torch_save)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(2**40, 0, 2**40))
    rerun, clean = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    finetune(rerun, tokens, mask, out_dir=tmp_path, **kw)  # once there is room: the run of an empty folder
    finetune(clean, tokens, mask, out_dir=tmp_path / "clean", **kw)
    assert all(torch.equal(a, b) for a, b in zip(rerun.state_dict().values(), clean.state_dict().values(), strict=True))


def test_the_command_line_prints_one_line_and_exits_2(tiny_model, tmp_path, monkeypatch, capsys):
    from revlens import cli

    hist = tmp_path / "hist"
    save_checkpoint(shifted(tiny_model, 0, torch.ones(32)), hist / "pretrain")
    save_checkpoint(tiny_model, hist / "align")
    save_checkpoint(shifted(tiny_model, 0, 0.1 * torch.ones(32)), hist / "finetune" / "seed_0" / "step_1")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
    out = tmp_path / "out"
    real_save_file = safetensors.torch.save_file
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(2**30, 2**30, 0))

    def save_file(tensors, filename, metadata=None):  # the cache fits; the report's tensors do not
        if not Path(filename).name.startswith(f".{REPORT_TENSORS}."):
            return real_save_file(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(b"\0" * 64)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    argv = ["analyze", str(hist), "--out", str(out), "--prompts", str(tmp_path / "prompts.txt")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err  # the progress bars (carriage returns), then one line
    assert err.endswith(f"\nrevlens analyze: error: {message(out / REPORT_TENSORS)}\n")
    assert err.count("error") == 1 and "Traceback" not in err
    assert leftovers(out) == [] and not (out / REPORT_TENSORS).exists()
