"""How the probe ends a forward early: its own exception raised in the deepest hook, or TransformerLens'
``stop_at_layer``. Both give the same readouts; this times them on the probe's workload. Result (CPU):
equal when a middle layer is the deepest read; when the last layer is read, ``stop_at_layer`` cannot stop
before the unembedding and is 2.4x slower at d512 x 6 layers (15x on the tiny model), so the probe keeps its
exception.

Writes benchmarks/results/probe_stop_<device>.json.

    .venv/bin/python benchmarks/probe_stop.py [--device cpu] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _results import environment, write_result

VOCAB = 49152  # SmolLM2's vocabulary: the unembedding is what a forward stopped early saves
SEQ = 24


class _Stop(Exception):
    pass


def build_model(d_model: int, n_layers: int, device: str):
    from revlens.checkpoint_loader import boot_native_model

    d_head = min(64, d_model // 4)
    cfg = dict(
        d_model=d_model,
        n_layers=n_layers,
        n_ctx=64,
        d_head=d_head,
        n_heads=d_model // d_head,
        d_mlp=4 * d_model,
        d_vocab=VOCAB,
        act_fn="gelu",
        normalization_type="LN",
        seed=0,
    )
    return boot_native_model(cfg, device=device).eval()


def run(model, batches, layers, how: str) -> list[torch.Tensor]:
    """Last-token resid_post readouts of ``layers`` per batch, stopping after the deepest one."""
    from revlens.readout import reduce_positions_unchecked

    deepest, store, out = max(layers), {}, []

    def make_hook(layer):
        def fn(act, hook):
            store[layer] = reduce_positions_unchecked(act, store["_lengths"], "last")
            if how == "exception" and layer == deepest:
                raise _Stop

        return fn

    hooks = [(f"blocks.{l}.hook_resid_post", make_hook(l)) for l in layers]
    with torch.inference_mode(), model.hooks(fwd_hooks=hooks):
        for tokens, lengths in batches:
            store.clear()
            store["_lengths"] = lengths
            if how == "exception":
                try:
                    model(tokens)
                except _Stop:
                    pass
            else:
                model(tokens, stop_at_layer=deepest + 1)
            out.append(torch.stack([store[l] for l in layers], 1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for d_model, n_layers, n_prompts in ((32, 3, 64), (512, 6, 64)):
        model = build_model(d_model, n_layers, args.device)
        batches = [
            (
                torch.randint(1, VOCAB, (16, SEQ), generator=gen).to(args.device),
                torch.full((16,), SEQ, device=args.device),
            )
            for _ in range(n_prompts // 16)
        ]
        for layers in ([1], list(range(n_layers))):
            a, b = run(model, batches, layers, "exception"), run(model, batches, layers, "stop_at_layer")
            assert all(torch.equal(x, y) for x, y in zip(a, b)), "the two ways must read the same numbers"
            times = {"exception": [], "stop_at_layer": []}
            for _ in range(args.repeats):
                for how in times:
                    t0 = time.perf_counter()
                    run(model, batches, layers, how)
                    times[how].append(time.perf_counter() - t0)
            med = {how: statistics.median(t) for how, t in times.items()}
            rows.append(
                {
                    "d_model": d_model,
                    "n_layers": n_layers,
                    "layers": layers,
                    "n_prompts": n_prompts,
                    "seconds_exception": med["exception"],
                    "seconds_stop_at_layer": med["stop_at_layer"],
                    "stop_at_layer_over_exception": med["stop_at_layer"] / med["exception"],
                }
            )
            print(rows[-1])
    write_result("probe_stop", args.device, {"environment": environment(args.device), "rows": rows})


if __name__ == "__main__":
    main()
