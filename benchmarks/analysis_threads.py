"""`analyze` over many small checkpoints: torch's default CPU threads versus revlens' thread policy.

Builds a history of small organism-sized checkpoints (d_model 128, 3 layers: 0.3M parameters), then times
`revlens.analyze` on it with ``threads=<torch's default>`` and with the policy (``threads=None``: one
thread below 20M parameters), alternating the two, and checks both give the same numbers. Records the
load average, since the gap grows when other jobs compete for the cores.
Writes benchmarks/results/analysis_threads_cpu.json.

    .venv/bin/python benchmarks/analysis_threads.py [--runs 5 --steps 8 --repeats 2] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from _results import environment, write_result

VOCAB = 500
SEQ = 12


def build_history(root: Path, runs: int, steps: int, d_model: int, n_layers: int) -> int:
    """pretrain, align and ``runs x steps`` fine-tuning checkpoints, each a perturbed copy; returns n_params."""
    from revlens.checkpoint_loader import boot_native_model
    from revlens.checkpoint_save import save_checkpoint
    from revlens.threads import count_parameters

    cfg = dict(
        d_model=d_model,
        n_layers=n_layers,
        n_ctx=24,
        d_head=32,
        n_heads=d_model // 32,
        d_mlp=4 * d_model,
        d_vocab=VOCAB,
        act_fn="gelu",
        normalization_type="LN",
        seed=0,
    )
    model = boot_native_model(cfg).eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)

    def save_perturbed(path: Path, scale: float) -> None:
        with torch.no_grad():
            for name, p in model.state_dict().items():
                if p.is_floating_point():
                    p.copy_(base[name] + scale * torch.randn(p.shape, generator=gen))
        save_checkpoint(model, path)

    save_perturbed(root / "pretrain", 0.02)
    save_perturbed(root / "align", 0.0)
    for r in range(runs):
        for s in range(1, steps + 1):
            save_perturbed(root / "finetune" / f"seed_{r}" / f"step_{s}", 0.002 * s)
    return count_parameters(model)


def prompts(n: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (SEQ,), generator=gen) for _ in range(n)]


def time_analysis(root: Path, threads: int | None, n_prompts: int) -> tuple[float, np.ndarray]:
    from revlens.analysis import analyze

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        report = analyze(
            str(root), prompts(n_prompts, 1), control=prompts(n_prompts, 2), threads=threads, progress=False
        )
    return time.perf_counter() - start, report.alignment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=72)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2 runs x 4 steps, one repeat")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.steps, args.repeats = 2, 4, 1
    from revlens.threads import choose_num_threads

    default_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        n_params = build_history(root, args.runs, args.steps, args.d_model, args.layers)
        policy_threads = choose_num_threads(n_params)
        times: dict[str, list[float]] = {"default": [], "policy": []}
        loads = [os.getloadavg()[0]]
        results = {}
        for _ in range(args.repeats):
            for arm, threads in (("default", default_threads), ("policy", None)):
                seconds, alignment = time_analysis(root, threads, args.prompts)
                times[arm].append(seconds)
                results[arm] = alignment
                loads.append(os.getloadavg()[0])
        assert torch.get_num_threads() == default_threads, "analyze did not restore torch's thread count"
    same = bool(np.allclose(results["default"], results["policy"], atol=1e-5, equal_nan=True))
    n_ckpts = 2 + args.runs * args.steps
    result = {
        "benchmark": "analysis_threads",
        "env": environment("cpu"),
        "cores": os.cpu_count(),
        "history": {
            "checkpoints": n_ckpts,
            "d_model": args.d_model,
            "n_layers": args.layers,
            "n_params": n_params,
            "prompts": args.prompts,
            "control": args.prompts,
            "tokens_per_prompt": SEQ,
        },
        "threads": {"default": default_threads, "policy": policy_threads},
        "seconds": times,
        "median_seconds": {k: statistics.median(v) for k, v in times.items()},
        "speedup": statistics.median(times["default"]) / statistics.median(times["policy"]),
        "load_average_1min": loads,
        "same_alignment": same,
    }
    write_result("analysis_threads", "cpu", result)


if __name__ == "__main__":
    main()
