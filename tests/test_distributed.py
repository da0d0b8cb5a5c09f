"""torch.distributed on CPU (gloo): 2 ranks started by ``torchrun`` give the numbers of one process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import revlens
from revlens.checkpoint_save import save_checkpoint
from revlens.report import ReversionReport

from conftest import PROMPTS, shifted

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


def torchrun(nproc: int, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``torchrun --standalone --nproc-per-node nproc ARGS`` with this checkout's revlens, one thread each
    (with ``check``, assert that it succeeded)."""
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0 or not check, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.mark.slow  # 10 s; torchrun itself is exercised in make test by the blocked fine-tuning below
def test_two_rank_analyze_matches_one_process_and_measures_each_checkpoint_once(tiny_model, tmp_path):
    d = tiny_model.cfg.d_model
    hist = tmp_path / "hist"
    save_checkpoint(shifted(tiny_model, 0, torch.ones(d)), hist / "pretrain")
    save_checkpoint(tiny_model, hist / "align")
    gen = torch.Generator().manual_seed(0)
    for run in ("seed_0", "seed_1"):
        for step in (1, 2, 3):
            moved = shifted(tiny_model, 0, 0.3 * torch.randn(d, generator=gen))
            save_checkpoint(moved, hist / "finetune" / run / f"step_{step}")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
    out = tmp_path / "out"
    args = [str(hist), "--out", str(out), "--prompts", str(tmp_path / "prompts.txt"), "--batch-size", "2"]

    # An interrupted run: one process measured pretrain and two fine-tuning checkpoints before it stopped.
    reference = revlens.analyze(str(hist), PROMPTS, batch_size=2, progress=False)
    partial = {"pretrain", "finetune/seed_0/step_1", "finetune/seed_1/step_3"}
    revlens.analyze(
        {
            "pretrain": hist / "pretrain",
            "align": hist / "align",
            "finetune": {
                "seed_0": {1: hist / "finetune/seed_0/step_1"},
                "seed_1": {3: hist / "finetune/seed_1/step_3"},
            },
        },
        PROMPTS,
        batch_size=2,
        progress=False,
        cache_dir=out / "cache",
    )
    for entry in (out / "cache").rglob("align-*.safetensors"):
        entry.unlink()

    torchrun(2, str(TESTS / "dist_workers.py"), "analyze", str(tmp_path / "log"), "--", *args)

    loads = [json.loads((tmp_path / "log" / f"rank{r}.json").read_text()) for r in (0, 1)]
    everything = {ref.label for ref in revlens.History.from_dir(hist)}
    measured = loads[0] + loads[1]
    assert sorted(measured) == sorted(everything - partial)  # each missing checkpoint once, on one rank
    assert loads[0] and loads[1]
    got = ReversionReport.load(out)
    reference.save(tmp_path / "single")  # through the same storage (it keeps per-example cosines in float32)
    reference = ReversionReport.load(tmp_path / "single")
    for name in (
        "alignment",
        "alignment_per_example",
        "per_example_cos",
        "drift_norm",
        "p_value",
        "null_p99_activation",
        "v_rev_norm",
    ):
        np.testing.assert_array_equal(getattr(got, name), getattr(reference, name), err_msg=name)
    np.testing.assert_array_equal(got.v_rev.numpy(), reference.v_rev.numpy())
    assert got.runs == reference.runs and got.steps == reference.steps and got.layers == reference.layers


def test_two_rank_blocked_finetune_takes_the_one_process_steps(tmp_path):
    from dist_workers import case_model, finetune_case
    from safetensors.torch import load_file

    torchrun(2, str(TESTS / "dist_workers.py"), "finetune", str(tmp_path / "dist"))

    model, result = finetune_case(tmp_path / "single", distributed=False)
    single = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    ranks = [load_file(str(tmp_path / "dist" / f"rank{r}.safetensors")) for r in (0, 1)]
    assert json.loads((tmp_path / "dist" / "rank0.json").read_text())["world"] == 2
    start = case_model().state_dict()
    assert max((single[k] - start[k]).abs().max().item() for k in single) > 1e-3  # the steps moved the weights
    for name, value in single.items():
        torch.testing.assert_close(ranks[0][name], value, rtol=0, atol=1e-6, msg=name)  # float32, SGD
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # the replicas stay bitwise identical
    losses = json.loads((tmp_path / "dist" / "rank1.json").read_text())["losses"]
    assert [losses[str(s)] for s in (1, 2, 3)] == pytest.approx([result.losses[s] for s in (1, 2, 3)], abs=1e-6)
    # Rank 0 alone wrote the checkpoints and the state; one process resumes the run from it (same settings).
    run_dir = tmp_path / "dist" / "run" / "finetune" / "seed_0"
    assert sorted(p.name for p in run_dir.glob("step_*")) == ["step_2", "step_3"]
    resumed, again = finetune_case(tmp_path / "dist" / "run", distributed=False)
    assert again.resumed_from == 3
    for name, value in resumed.state_dict().items():
        if value.is_floating_point():
            assert torch.equal(value, ranks[0][name]), name


def test_micro_batches_are_dealt_once_and_distributed_analyze_needs_a_cache_on_disk(tiny_model):
    from revlens.distributed import DistContext, step_micro_batches

    idx = torch.arange(10)  # 5 micro-batches of 2 over 3 ranks: 2, 2, 1
    shares = [step_micro_batches(idx, 2, DistContext(rank=r, world_size=3)) for r in range(3)]
    assert [len(s) for s in shares] == [2, 2, 1]
    assert sorted(torch.cat([m for s in shares for m in s]).tolist()) == list(range(10))
    with pytest.raises(ValueError, match="needs cache_dir"):
        revlens.analyze({"pretrain": "p", "align": "a", "finetune": {"r": {1: "f"}}}, PROMPTS, distributed=True)
    with pytest.raises(ValueError, match="in-memory"):
        revlens.analyze(
            {"pretrain": tiny_model, "align": tiny_model, "finetune": {"r": {1: tiny_model}}},
            PROMPTS,
            distributed=True,
            cache_dir="c",
        )


@pytest.mark.slow
def test_a_bad_checkpoint_under_torchrun_is_one_line_and_exit_2_on_every_rank(tiny_model, tmp_path, capsys):
    """A checkpoint with a NaN weight stops `revlens analyze` under torchrun as it does in one process: the rank
    that loads it prints the single-process line and exits 2; the other rank prints one line naming that rank and
    the error and exits 2, unless torchrun ends it first (SIGTERM); no revlens traceback is printed (torchrun's
    own launcher then reports the exit codes and exits 1)."""
    from revlens import cli

    d = tiny_model.cfg.d_model
    hist = tmp_path / "hist"
    save_checkpoint(shifted(tiny_model, 0, torch.ones(d)), hist / "pretrain")
    save_checkpoint(tiny_model, hist / "align")
    for run in ("seed_0", "seed_1"):
        save_checkpoint(shifted(tiny_model, 0, 0.1 * torch.ones(d)), hist / "finetune" / run / "step_1")
    bad = shifted(tiny_model, 0, 0.2 * torch.ones(d))
    with torch.no_grad():
        bad.blocks[1].mlp.out.bias[3] = float("nan")
    save_checkpoint(bad, hist / "finetune" / "seed_1" / "step_2")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
    args = ["analyze", str(hist), "--prompts", str(tmp_path / "prompts.txt")]

    assert cli.main([*args, "--out", str(tmp_path / "single")]) == 2
    line = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert line == (
        f"revlens analyze: error: [finetune/seed_1/step_2] checkpoint {hist / 'finetune/seed_1/step_2'} "
        "(model.safetensors): the weight 'blocks.1.mlp.out.bias' holds NaN values: the run that wrote it diverged "
        "or the file is damaged. Replace the checkpoint (re-save it, or use an earlier step), or leave it out of "
        "the history."
    )

    proc = torchrun(2, "-m", "revlens", *args, "--out", str(tmp_path / "dist"), check=False)
    out = proc.stdout + proc.stderr
    # each rank's line (one may follow the other rank's unfinished progress bar on the shared stderr)
    errors = re.findall(r"revlens analyze: error: [^\r\n]*", out)
    assert line in errors and len(errors) in (1, 2), out[-4000:]
    prefix = r"revlens analyze: error: measuring checkpoints failed on rank\(s\) [01]: CheckpointError: "
    for other in (e for e in errors if e != line):  # the other rank, unless torchrun ended it first
        assert re.fullmatch(prefix + re.escape(line.removeprefix("revlens analyze: error: ")), other)
    assert re.search(r"Root Cause.*?exitcode\s*: 2 ", out, flags=re.S), out[-4000:]
    # every rank exited 2, or was ended by torchrun (SIGTERM) once the first rank had failed
    assert set(re.findall(r"exitcode\s*: (-?\d+)", out)) <= {"2", "-15"}, out[-4000:]
    assert not re.search(r'File "[^"]*revlens[/\\]', out), out[-4000:]  # no traceback through revlens' code
