"""Probe cost versus a bare forward pass, and peak memory versus an unfiltered run_with_cache.

Writes benchmarks/results/probe_throughput_<device>.json. Targets: the probe costs at most 10% more time
than a bare forward over the same batches; its peak memory stays flat as the prompt count grows.

    .venv/bin/python benchmarks/probe_throughput.py [--device cuda] [--quick]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from _results import environment, write_result

VOCAB = 4000
SEQ = 32


def build_model(d_model: int, n_layers: int, device: str):
    from revlens.checkpoint_loader import boot_native_model

    cfg = dict(
        d_model=d_model,
        n_layers=n_layers,
        n_ctx=64,
        d_head=64,
        n_heads=d_model // 64,
        d_mlp=4 * d_model,
        d_vocab=VOCAB,
        act_fn="gelu",
        normalization_type="LN",
        seed=0,
    )
    return boot_native_model(cfg, device=device).eval()


def prompts(n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(1, VOCAB, (SEQ,), generator=gen) for _ in range(n)]


def time_throughput(d_model: int, n_layers: int, n_prompts: int, batch_size: int, device: str, repeats: int) -> dict:
    from revlens.probe import ReversionProbe

    model = build_model(d_model, n_layers, device)
    data = prompts(n_prompts)
    probe = ReversionProbe(data, batch_size=batch_size, device=device, per_example=False)
    batches = [torch.stack(data[i : i + batch_size]).to(device) for i in range(0, n_prompts, batch_size)]

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def bare():
        with torch.inference_mode():
            for b in batches:
                model(b)
        sync()

    def probed():
        probe.measure(model, per_example=False)
        sync()

    bare(), probed()
    t_bare, t_probe = [], []
    for _ in range(repeats):
        for fn, sink in ((bare, t_bare), (probed, t_probe)):
            start = time.perf_counter()
            fn()
            sink.append(time.perf_counter() - start)
    tokens = n_prompts * SEQ
    mb, mp = statistics.median(t_bare), statistics.median(t_probe)
    return {
        "d_model": d_model,
        "n_layers": n_layers,
        "n_prompts": n_prompts,
        "seq": SEQ,
        "batch_size": batch_size,
        "layers_read": n_layers,
        "bare_tokens_per_s": tokens / mb,
        "probe_tokens_per_s": tokens / mp,
        "probe_overhead": mp / mb - 1.0,
        "repeats": repeats,
    }


def peak_memory_child(method: str, n_prompts: int, d_model: int, n_layers: int) -> None:
    """Runs in a subprocess: prints peak RSS growth (MiB) over the loaded model for one method."""
    from revlens.probe import ReversionProbe

    model = build_model(d_model, n_layers, "cpu")
    data = prompts(n_prompts)
    batch = torch.stack(data)
    with torch.inference_mode():
        model(batch[:8])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if method == "probe":
        ReversionProbe(data, batch_size=32, per_example=False).measure(model, per_example=False)
    else:
        with torch.inference_mode():
            _, cache = model.run_with_cache(batch)
            means = {k: v.double().mean(0) for k, v in cache.items() if k.endswith("hook_resid_post")}
            del cache, means
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth_mib": (peak - base) / 1024}))


def measure_memory(method: str, n_prompts: int, d_model: int, n_layers: int) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--child", method, str(n_prompts), str(d_model), str(n_layers)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["growth_mib"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", nargs=4)
    args = parser.parse_args()
    if args.child:
        method, n, d, l = args.child
        peak_memory_child(method, int(n), int(d), int(l))
        return
    torch.manual_seed(0)
    repeats = 3 if args.quick else 7
    sizes = [(256, 4)] if args.quick else [(256, 4), (512, 6)]
    throughput = [time_throughput(d, l, 256, 32, args.device, repeats) for d, l in sizes]
    counts = [64, 256] if args.quick else [64, 256, 1024]
    memory = []
    for n in counts:
        row = {"n_prompts": n, "probe_peak_growth_mib": measure_memory("probe", n, 256, 4)}
        row["run_with_cache_peak_growth_mib"] = measure_memory("cache", n, 256, 4)
        memory.append(row)
    result = {
        "benchmark": "probe_throughput",
        **environment(args.device),
        "throughput": throughput,
        "memory": memory,
        "targets": {"probe_overhead_max": 0.10, "probe_memory": "flat in n_prompts"},
        "probe_overhead_ok": all(r["probe_overhead"] <= 0.10 for r in throughput),
    }
    write_result("probe_throughput", args.device, result)


if __name__ == "__main__":
    main()
