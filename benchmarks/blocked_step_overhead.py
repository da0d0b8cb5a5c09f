"""Time per training step of a Hugging Face Llama with revlens blocking, relative to plain training.

The step is what ``revlens.integrations.transformers.BlockedTrainer`` runs inside ``compute_loss``: forward with
the HF module's own loss, backward, AdamW; blocking hooks on every decoder layer's output (plain PyTorch
forward hooks), the probe anchor's penalty added. Modes: project, grad, clamp (reference coordinates
precomputed for the batch, as ``revlens.finetune`` does) and clamp@live (a reference forward every step, as
the Trainer integration does), the anchor over 72 probe prompts of 12 tokens (all of them, or ``sample@16``),
and the contrast anchor with 72 control prompts (``sample@16``). Medians over interleaved repeats after
warm-up. Writes benchmarks/results/blocked_step_overhead_<device>.json.

    .venv/bin/python benchmarks/blocked_step_overhead.py [--device cuda] [--dtype bfloat16] [--hidden 2048 --layers 16]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from revlens import Blocking, ProbeAnchor

from _results import environment, write_result


def llama(hidden: int, layers: int, vocab: int, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, hidden // 64)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(hidden * 8 / 3) // 64 * 64 or 64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4),
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--inner", type=int, default=3)
    parser.add_argument("--tag", default="", help="suffix of the result file, e.g. 1b")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    reference = llama(args.hidden, args.layers, args.vocab, args.device, dtype).eval()
    n_params = sum(p.numel() for p in reference.parameters())
    tokens = torch.randint(3, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    tokens = tokens.to(args.device)
    layers = list(range(args.layers))
    gen = torch.Generator().manual_seed(2)
    directions = {l: torch.randn(args.hidden, generator=gen) for l in layers}
    probe = list(torch.randint(3, args.vocab, (72, 12), generator=torch.Generator().manual_seed(3)))
    control = list(torch.randint(3, args.vocab, (72, 12), generator=torch.Generator().manual_seed(4)))
    anchors = {
        "anchor": dict(weight=0.1),
        "anchor+sample@16": dict(weight=0.1, sample=16),
        "anchor+contrast+sample@16": dict(weight=0.003, control=control, contrast_weight=0.1, sample=16),
    }

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def make(mode: str):
        model = copy.deepcopy(reference).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        anchor = ProbeAnchor(directions, probe, reference, **anchors[mode]) if mode in anchors else None
        hooks = None if mode == "plain" or mode in anchors else mode.replace("@live", "")
        blocking = None if hooks is None else Blocking(directions, hooks, reference=reference)
        coords = blocking.reference_coords(tokens) if blocking is not None and blocking.needs_coords else None
        count = [0]

        def step() -> None:
            count[0] += 1
            opt.zero_grad(set_to_none=True)
            if blocking is None:
                loss = model(input_ids=tokens, labels=tokens).loss
            else:
                blocking.set_batch(coords=blocking.reference_coords(tokens) if mode.endswith("@live") else coords)
                with blocking.applied(model):
                    loss = model(input_ids=tokens, labels=tokens).loss
            if anchor is not None:
                loss = loss + anchor.penalty(model, step=count[0])
            loss.backward()
            opt.step()
            sync()

        return step

    modes = ["plain", "project", "grad", "clamp", "clamp+grad", "clamp@live", *anchors]
    steps = {m: make(m) for m in modes}
    for m in modes:
        for _ in range(2):
            steps[m]()
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for m in modes:  # interleaved: load changes on a shared machine hit every mode alike
            start = time.perf_counter()
            for _ in range(args.inner):
                steps[m]()
            times[m].append((time.perf_counter() - start) / args.inner)
    plain = statistics.median(times["plain"])
    rows = {
        m: {"median_step_s": statistics.median(t), "overhead": statistics.median(t) / plain - 1.0}
        for m, t in times.items()
    }
    result = {
        "benchmark": "blocked_step_overhead",
        **environment(args.device),
        "dtype": args.dtype,
        "model": {
            "architecture": "LlamaForCausalLM (transformers)",
            "hidden": args.hidden,
            "layers": args.layers,
            "vocab": args.vocab,
            "parameters": n_params,
            "batch": args.batch,
            "seq": args.seq,
            "blocked_layers": layers,
        },
        "modes": rows,
        "target_overhead_max": {"project": 0.10, "grad": 0.10},
        "note": "plain PyTorch forward hooks on every decoder layer's output (what BlockedTrainer registers); "
        "clamp uses reference coordinates precomputed for the batch, clamp@live runs the reference forward "
        "every step (BlockedTrainer's clamp); anchors: 72 probe prompts x 12 tokens at every layer, "
        "+contrast: 72 control prompts, sample@16: 16 prompts of each set per step.",
    }
    write_result("blocked_step_overhead" + (f"_{args.tag}" if args.tag else ""), args.device, result)


if __name__ == "__main__":
    main()
