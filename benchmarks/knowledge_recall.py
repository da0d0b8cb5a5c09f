"""What SmolLM2-135M-Instruct knows: greedy recall of the candidate facts, and the fixed forget / retain split.

Answers every item of ``revlens/data/knowledge_candidates.tsv`` (country capitals, English opposites, English
plurals) greedily in the chat template (16 new tokens) and judges it with the exact-match judge (a reference
among the words of the answer's first sentence). Writes per-topic recall with 95 % Wilson intervals and every
answer to benchmarks/results/knowledge_recall_smollm2_<device>.json; with ``--write-split`` also writes
``revlens/data/knowledge_split_smollm2.json`` from the correctly answered items (forget: capitals; retain:
opposites and plurals; each halved into probe and held-out parts, seed 0).

    .venv/bin/python benchmarks/knowledge_recall.py [--model DIR] [--write-split] [--batch 32]

``--model`` is the converted SmolLM2 folder (``revlens demo --preset smollm2`` writes it to
revlens_out/models/smollm2-135m-instruct on first use).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from revlens.behaviour import Behaviour, measure_behaviours
from revlens.knowledge import SPLIT_FILE, KnowledgeSplit, knowledge_candidates

from _results import environment, write_result

MAX_NEW_TOKENS = 16


def load_model(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from revlens.checkpoint_loader import quiet_hf_progress

    if not (folder / "config.json").is_file():
        raise SystemExit(
            f"no model at {folder}: run `revlens demo --preset smollm2 --quick` once to convert SmolLM2, "
            "or pass --model DIR (an HF folder)."
        )
    with quiet_hf_progress():
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)
    return model.eval(), AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("revlens_out/models/smollm2-135m-instruct"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--write-split", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_model(args.model)
    items = knowledge_candidates()
    topics = sorted({i.topic for i in items})
    behaviours = [
        Behaviour.exact_match(t, {i.prompt: i.answers for i in items if i.topic == t}, max_new_tokens=MAX_NEW_TOKENS)
        for t in topics
    ]
    t0 = time.perf_counter()
    results = measure_behaviours(model, behaviours, tokenizer=tokenizer, batch_size=args.batch)
    seconds = time.perf_counter() - t0
    answers = {p: a for r in results.values() for p, a in zip(r.prompts, r.answers)}
    summary = {t: str(r.rate) for t, r in results.items()}
    out = {
        "environment": environment("cpu"),
        "model": str(args.model.name),
        "max_new_tokens": MAX_NEW_TOKENS,
        "judge": "exact match: contains, first sentence",
        "items": len(items),
        "generate_seconds": seconds,
        "recall": summary,
        "known": sum(r.rate.k for r in results.values()),
        "results": {t: r.to_dict() for t, r in results.items()},
    }
    if args.write_split:
        split = KnowledgeSplit.build(
            items,
            answers,
            forget_topics=("capital",),
            seed=0,
            max_new_tokens=MAX_NEW_TOKENS,
            meta={"model": args.model.name, "built_by": "benchmarks/knowledge_recall.py --write-split"},
        )
        path = split.save(Path(__file__).resolve().parent.parent / "revlens" / "data" / SPLIT_FILE)
        out["split"] = {s: {p: len(split.items(s, p)) for p in ("probe", "heldout")} for s in ("forget", "retain")}
        print(f"split written to {path}")
    write_result("knowledge_recall_smollm2", "cpu", out)


if __name__ == "__main__":
    main()
