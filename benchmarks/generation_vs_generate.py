"""``generate_greedy`` against transformers ``generate`` on the SmolLM2 demo's behaviour evaluation.

The 48 held-out harmful and 48 harmless requests in SmolLM2-135M-Instruct's chat template, 48 new tokens,
stop at end of turn, batches of 48, float32, as every behaviour figure of the demo. ``generate`` keeps a
finished row in the batch until the last one ends and runs the shared system turn once per row;
``generate_greedy`` retires finished rows and runs the shared prefix once. Each model folder (default: the
shipped model and the kept align, where refusals end early) is timed ``--repeats`` times, alternating the
two, and the answers compared.
Writes benchmarks/results/generation_vs_generate_cpu.json.

    .venv/bin/python benchmarks/generation_vs_generate.py [FOLDER ...] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from _results import environment, write_result


def hf_generate(model, tokenizer, encoded: list[torch.Tensor], new: int, batch: int) -> list[list[int]]:
    """transformers ``generate`` (greedy, KV cache) on left-padded batches sorted by length."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=new,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers: list[list[int]] = [[] for _ in encoded]
    for start in range(0, len(order), batch):
        rows = order[start : start + batch]
        width = max(len(encoded[i]) for i in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(rows):
            ids[r, width - len(encoded[i]) :] = encoded[i]
            mask[r, width - len(encoded[i]) :] = 1
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        for r, i in enumerate(rows):
            tokens = out[r, width:].tolist()
            answers[i] = tokens[: tokens.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in tokens else tokens
    return answers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("folders", nargs="*")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--new", type=int, default=48)
    p.add_argument("--batch", type=int, default=48)
    args = p.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from revlens.chat import encode_requests
    from revlens.demos.chat_model.data import PromptSets
    from revlens.evals import _generate_batched, _shared_prefix

    folders = [Path(f) for f in args.folders] or [
        Path("revlens_out/models/smollm2-135m-instruct"),
        *sorted(Path("revlens_out/models/aligned").glob("*/")),
    ]
    sets = PromptSets.load()
    requests = {"harmful": sets.harmful_of("heldout"), "harmless": sets.harmless_of("heldout")}
    result = {"environment": environment("cpu"), "new_tokens": args.new, "batch": args.batch, "models": {}}
    for folder in folders:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True).eval()
        times: dict[str, list[float]] = {"generate": [], "generate_greedy": []}
        same, tokens_generated, shared = 0, 0, []
        for _ in range(args.repeats):
            for name in times:
                t0 = time.perf_counter()
                answers = []
                with torch.no_grad():
                    for part in requests.values():
                        encoded = encode_requests(tok, part, chat_template=True)
                        shared.append(_shared_prefix(encoded))
                        if name == "generate":
                            answers += hf_generate(model, tok, encoded, args.new, args.batch)
                        else:
                            raw = _generate_batched(
                                model, encoded, args.new, args.batch, [tok.eos_token_id], tok.pad_token_id
                            )
                            answers += [a[: a.index(tok.eos_token_id)] if tok.eos_token_id in a else a for a in raw]
                times[name].append(time.perf_counter() - t0)
                if name == "generate":
                    reference = answers
                else:
                    same = sum(a == b for a, b in zip(answers, reference))
                    tokens_generated = sum(map(len, answers))
        result["models"][folder.name] = {
            "seconds": times,
            "median_s": {k: statistics.median(v) for k, v in times.items()},
            "speedup": statistics.median(times["generate"]) / statistics.median(times["generate_greedy"]),
            "identical_answers": same,
            "answers": len(reference),
            "mean_answer_tokens": tokens_generated / len(reference),
            "shared_prefix_tokens": max(shared),
        }
    write_result("generation_vs_generate", "cpu", result)


if __name__ == "__main__":
    main()
