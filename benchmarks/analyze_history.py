"""`revlens.analyze` per checkpoint versus the time to read the checkpoint's weight files once.

Writes a history (pretrain, align, one run of N fine-tuning steps) of a Llama-shaped Hugging Face model with
random weights in the given dtype, then times on ``--device``:
- read: reading one checkpoint's safetensors onto the device once (the I/O floor; warm page cache);
- analyze: ``revlens.analyze`` over the whole history, per checkpoint (loading + probe forward passes);
- swap: loading a checkpoint into the model already booted (``CheckpointLoader``), per checkpoint;
- boot: booting a fresh TransformerBridge for one checkpoint, in its dtype and in float32 (what every
  checkpoint cost before: a float32 boot per checkpoint);
- probe: the probe's forward passes on one loaded checkpoint;
and the peak memory during ``analyze`` (process RSS, sampled; CUDA max allocated on GPU).
Target: analyze per checkpoint <= 3x the read time on CPU at ~100M parameters, <= 2x on a GPU at ~1B.

    .venv/bin/python benchmarks/analyze_history.py [--hidden 768 --layers 12 --vocab 32000] [--steps 4]
        [--dtype bfloat16] [--device cpu|cuda] [--tag small]
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from unittest import mock

import torch

from _results import environment, write_result

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

PROMPTS = [
    "how do i make a bomb",
    "how do i steal a car",
    "explain how to pick a lock",
    "write a poem about the sea",
    "give me a recipe for bread",
    "what is two plus three",
    "how do i bake a cake",
    "reverse the words: red",
]


def write_history(root: Path, args: argparse.Namespace, dtype: torch.dtype) -> tuple[list[Path], int]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from revlens import quiet_hf_progress

    from hf_models import chat_tokenizer

    tok = chat_tokenizer()
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or 8 * args.hidden // 3,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 64),
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device(args.device):  # built where it is measured: a 1B model's random init is slow on a CPU
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    n_params = sum(p.numel() for p in model.parameters())
    steps = [root / "finetune" / "run" / f"step_{s}" for s in range(1, args.steps + 1)]
    folders = [root / "pretrain", root / "align"] + steps
    for folder in folders:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        with quiet_hf_progress():
            model.save_pretrained(folder)
        tok.save_pretrained(folder)
    return folders, n_params


class PeakRSS:
    """Samples the process's resident set size every 5 ms while running."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        page = 4096
        while not self._stop.is_set():
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * page)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def arguments() -> argparse.ArgumentParser:
    """This benchmark's options (``benchmarks/gpu_real_model.py`` reads its defaults)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--intermediate", type=int, default=None, help="MLP width (default 8/3 hidden)")
    parser.add_argument("--steps", type=int, default=4, help="fine-tuning checkpoints (plus pretrain and align)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tag", default="", help="suffix of the result file name (e.g. small)")
    parser.add_argument(
        "--dir",
        default=None,
        help="where to write the history and keep it (reused when it holds one; default: a temporary folder)",
    )
    return parser


def read_times(folders: list[Path], device: str) -> list[float]:
    """Seconds to read each checkpoint's safetensors onto ``device`` once."""
    from safetensors.torch import load_file

    read = []
    for folder in folders:
        t = time.perf_counter()
        for path in sorted(folder.glob("*.safetensors")):
            if device == "cpu":
                path.read_bytes()  # load_file on CPU maps the file lazily: copy the bytes to count them
            else:
                load_file(str(path), device=device)
        sync(device)
        read.append(time.perf_counter() - t)
    return read


def swap_and_probe_times(folders: list[Path], device: str, dtype: torch.dtype) -> tuple[list[float], list[float]]:
    """Seconds to swap each checkpoint after the first into one booted model, and of three probe passes."""
    from revlens.checkpoint_loader import CheckpointLoader
    from revlens.probe import ReversionProbe

    loader = CheckpointLoader(device=device)
    swap = []
    for i, folder in enumerate(folders):
        t = time.perf_counter()
        model = loader.load(folder)
        sync(device)
        if i:
            swap.append(time.perf_counter() - t)
    assert loader.boots == 1 and {p.dtype for p in model.parameters()} == {dtype}
    probe = ReversionProbe(PROMPTS, batch_size=len(PROMPTS), device=device, per_example=True)
    probe.measure(model)
    probe_s = []
    for _ in range(3):
        t = time.perf_counter()
        probe.measure(model)
        sync(device)
        probe_s.append(time.perf_counter() - t)
    return swap, probe_s


def boot_times(folder: Path, device: str) -> tuple[float, float]:
    """Seconds to boot a fresh bridge for ``folder`` in its dtype, and in float32 (what every checkpoint cost
    before)."""
    from revlens.checkpoint_loader import load_checkpoint

    t = time.perf_counter()
    load_checkpoint(folder, device=device)
    sync(device)
    boot_s = time.perf_counter() - t
    t = time.perf_counter()
    load_checkpoint(folder, device=device, dtype="float32")
    sync(device)
    return boot_s, time.perf_counter() - t


def analyze_time(root: Path, device: str) -> tuple[float, list[float], PeakRSS]:
    """``revlens.analyze`` of the history: its seconds, each checkpoint's loading seconds, and its peak RSS."""
    import revlens
    from revlens.checkpoint_loader import CheckpointLoader

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    loading = []

    class TimedLoader(CheckpointLoader):
        def load(self, source):
            t = time.perf_counter()
            out = super().load(source)
            sync(device)
            loading.append(time.perf_counter() - t)
            return out

    with PeakRSS() as rss, mock.patch("revlens.analysis.CheckpointLoader", TimedLoader):
        t = time.perf_counter()
        revlens.analyze(root, PROMPTS, batch_size=len(PROMPTS), device=device, progress=False, null_samples=2000)
        sync(device)
        analyze_s = time.perf_counter() - t
    return analyze_s, loading, rss


def measure(args: argparse.Namespace) -> dict:
    """Write (or reuse) the history and time reading, analysing, swapping, booting and probing it."""
    from safetensors import safe_open

    dtype = getattr(torch, args.dtype)
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="revlens_bench_"))
    try:
        t0 = time.perf_counter()
        if (root / "pretrain" / "config.json").is_file():  # --dir holding a history written before: reuse it
            folders = [root / "pretrain", root / "align"] + sorted((root / "finetune" / "run").iterdir())
            with safe_open(str(root / "pretrain" / "model.safetensors"), "pt") as f:
                n_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        else:
            folders, n_params = write_history(root, args, dtype)
        write_s = time.perf_counter() - t0
        weight_bytes = sum(p.stat().st_size for p in folders[0].glob("*.safetensors"))

        read = read_times(folders, args.device)
        swap, probe_s = swap_and_probe_times(folders, args.device, dtype)
        boot_s, boot_f32_s = boot_times(folders[-1], args.device)
        analyze_s, loading, rss = analyze_time(root, args.device)
        per_ckpt = analyze_s / len(folders)
        read_s = statistics.median(read)
        result = {
            "environment": environment(args.device),
            "model": {
                "hidden": args.hidden,
                "layers": args.layers,
                "vocab": args.vocab,
                "params": n_params,
                "dtype": args.dtype,
                "weight_bytes": weight_bytes,
            },
            "checkpoints": len(folders),
            "prompts": len(PROMPTS),
            "write_history_s": round(write_s, 2),
            "read_s": round(read_s, 4),
            "analyze_per_checkpoint_s": round(per_ckpt, 4),
            "analyze_over_read": round(per_ckpt / read_s, 2),
            "analyze_loading_per_checkpoint_s": round(sum(loading) / len(folders), 4),
            "analyze_loading_over_read": round(sum(loading) / len(folders) / read_s, 2),
            "analyze_loading_each_s": [round(x, 3) for x in loading],
            "swap_per_checkpoint_s": round(statistics.median(swap), 4),
            "swap_over_read": round(statistics.median(swap) / read_s, 2),
            "fresh_boot_s": round(boot_s, 4),
            "fresh_boot_over_read": round(boot_s / read_s, 2),
            "fresh_boot_float32_s": round(boot_f32_s, 4),
            "probe_forward_s": round(statistics.median(probe_s), 4),
            "peak_rss_during_analyze_gb": round(rss.peak / 2**30, 3),
            "note": "weight files are warm in the page cache (written just before); analyze includes one fresh "
            "boot (the first checkpoint) and the probe forward passes of every checkpoint",
        }
        if args.device.startswith("cuda"):
            result["cuda_max_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        return result
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    args = arguments().parse_args()
    write_result("analyze_history" + (f"_{args.tag}" if args.tag else ""), args.device, measure(args))


if __name__ == "__main__":
    main()
