"""Time per fine-tuning step with each blocking mode, relative to plain fine-tuning.

Same model, same batch, fwd + bwd + AdamW step through the TransformerBridge; medians over
repeats after warm-up. Writes benchmarks/results/intervention_overhead_<device>.json.
Target: at most 10% overhead per mode (clamp with coordinates precomputed once, as the loop does).

    .venv/bin/python benchmarks/intervention_overhead.py [--device cuda] [--dtype bfloat16] [--quick] [--tag NAME]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch

from revlens import Blocking, ProbeAnchor
from revlens.checkpoint_loader import boot_native_model
from revlens.losses import masked_lm_loss

from _results import environment, write_result

MODES = [
    "plain",
    "project",
    "clamp",
    "grad",
    "clamp+grad",
    "clamp@live",
    "anchor",
    "anchor+contrast",
    "anchor+contrast@sample16",
]


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=24)
    parser.add_argument("--tag", default="", help="suffix of the result file, e.g. bf16_large")
    return parser.parse_args()


def step_functions(args: argparse.Namespace) -> dict[str, Callable[[], None]]:
    """Per mode, one training step (forward, backward, AdamW) of its own copy of a random model, blocked at the
    last layer along a random direction."""
    cfg = dict(
        d_model=args.d_model,
        n_layers=args.layers,
        n_ctx=max(64, args.seq),
        d_head=32,
        n_heads=args.d_model // 32,
        d_mlp=4 * args.d_model,
        d_vocab=200,
        act_fn="gelu",
        normalization_type="LN",
        seed=0,
    )
    reference = boot_native_model(cfg, device=args.device).to(getattr(torch, args.dtype)).eval()
    tokens = torch.randint(1, 200, (args.batch, args.seq), device=args.device)
    mask = torch.ones_like(tokens, dtype=torch.float)
    block_layer = args.layers - 1
    v = torch.randn(args.d_model, generator=torch.Generator().manual_seed(1))
    probe_prompts = list(torch.randint(1, 200, (72, 12), generator=torch.Generator().manual_seed(2)))
    control_prompts = list(torch.randint(1, 200, (72, 12), generator=torch.Generator().manual_seed(3)))
    anchors = {
        "anchor": dict(weight=0.1),
        "anchor+contrast": dict(weight=0.1, control=control_prompts, contrast_weight=1.0),
        "anchor+contrast@sample16": dict(weight=0.1, control=control_prompts, contrast_weight=1.0, sample=16),
    }

    def make(mode: str) -> Callable[[], None]:
        model = copy.deepcopy(reference).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        anchor = ProbeAnchor({block_layer: v}, probe_prompts, reference, **anchors[mode]) if mode in anchors else None
        blocking = (
            None
            if mode == "plain" or mode in anchors
            else Blocking({block_layer: v}, mode.replace("@live", ""), reference=reference)
        )
        coords = blocking.reference_coords(tokens) if blocking is not None and blocking.needs_coords else None

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            if blocking is None:
                loss = masked_lm_loss(model(tokens), tokens, mask)
            else:
                if mode.endswith("@live"):
                    blocking.set_batch(tokens)  # reference forward every step
                else:
                    blocking.set_batch(coords=coords)
                with blocking.applied(model):
                    loss = masked_lm_loss(model(tokens), tokens, mask)
            loss.backward()
            if anchor is not None:
                anchor.penalty(model).backward()  # sampled anchors count their own steps
            opt.step()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()

        return step

    return {m: make(m) for m in MODES}


def main() -> None:
    args = arguments()
    torch.manual_seed(0)
    steps = step_functions(args)
    warmup, repeats, inner = (3, 5, 5) if args.quick else (5, 15, 10)
    for m in MODES:
        for _ in range(warmup):
            steps[m]()
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(repeats):
        for m in MODES:  # interleaved, so drifts in machine load hit every mode alike
            start = time.perf_counter()
            for _ in range(inner):
                steps[m]()
            times[m].append((time.perf_counter() - start) / inner)
    plain = statistics.median(times["plain"])
    rows = {
        m: {"median_step_s": statistics.median(t), "overhead": statistics.median(t) / plain - 1.0}
        for m, t in times.items()
    }
    result = {
        "benchmark": "intervention_overhead",
        **environment(args.device),
        "dtype": args.dtype,
        "model": {
            "d_model": args.d_model,
            "n_layers": args.layers,
            "batch": args.batch,
            "seq": args.seq,
            "blocked_layer": args.layers - 1,
        },
        "modes": rows,
        "target_overhead_max": 0.10,
        "note": "clamp uses reference coordinates precomputed once (as revlens.finetune does); "
        "clamp@live runs the reference model's forward every step; anchor adds a forward and backward "
        "pass over 72 probe prompts of 12 tokens per step (the organism's probe set size); anchor+contrast "
        "adds the same over 72 control prompts; @sample16 uses 16 prompts of each set per step.",
        "within_target": {m: r["overhead"] <= 0.10 for m, r in rows.items() if m != "plain"},
    }
    write_result("intervention_overhead" + (f"_{args.tag}" if args.tag else ""), args.device, result)


if __name__ == "__main__":
    main()
