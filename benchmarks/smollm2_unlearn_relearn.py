"""Does unlearned knowledge come back under benign fine-tuning? SmolLM2-135M-Instruct, country capitals.

History: ``pretrain`` = the model as shipped; ``unlearn`` = NPO (Zhang et al. 2024) or gradient difference on
the forget probe capitals (``revlens/data/knowledge_split_smollm2.json``) with a retain loss on the retain probe
items (opposites, plurals; the forget loss on the whole answer sentence, or with ``--forget-loss-on answer`` on
the capital's tokens only), stopped at the first check (every ``--check-every`` steps) where held-out forget
recall <= 10 % and held-out retain recall >= 90 % of their shipped values (``revlens.unlearn``); then plain
benign fine-tuning from the unlearned model on word reversal (the SmolLM2 demo's task, no capital, opposite or
plural in it) with AdamW, recall read at ``--finetune-checks``. ``--start shipped`` (or ``both``) fine-tunes
the shipped model the same way: the control, what the benign task does to recall without unlearning. Recall is
greedy, chat-templated, 16 new tokens, judged by the exact-match judge (a reference among the words of the
first sentence), with 95 % Wilson intervals; beside it, teacher-forced recall of the answer tokens after the
start of the target sentence ("The capital of Peru is"), which does not depend on the answer's format.

Writes benchmarks/results/smollm2_unlearn_relearn_<method, or shipped for --start shipped>[_<tag>]_cpu.json
after every check (a long run can be read while it goes); the unlearned model is saved to ``--out``/unlearn (an
HF folder) for the v_rev analysis.

    .venv/bin/python benchmarks/smollm2_unlearn_relearn.py [--model DIR] [--method npo|graddiff] [--lr 3e-5]
        [--max-steps 200] [--check-every 10] [--finetune-steps 50] [--seeds 1] [--start unlearn|shipped|both]
        [--tag NAME]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from pathlib import Path

import torch
from knowledge_recall import load_model

from revlens._util import atomic_write_json
from revlens.behaviour import measure_behaviours
from revlens.evals import task_metrics
from revlens.knowledge import LOSS_ON, KnowledgeSplit, training_rows
from revlens.losses import model_lm_loss
from revlens.sft_data import encode_sft
from revlens.unlearning import unlearn

from _results import RESULTS, environment


def rows(tokenizer, pairs):
    data = encode_sft(
        tokenizer, [[{"role": "user", "content": p}, {"role": "assistant", "content": a}] for p, a in pairs]
    )
    return data.tokens, data.loss_mask


def summary(result) -> dict:
    return {
        "rate": result.rate.rate,
        "low": result.rate.low,
        "high": result.rate.high,
        "k": result.rate.k,
        "n": result.n,
    }


class ForcedRecall:
    """Teacher-forced recall, blind to the answer's format: each held-out item's prompt and the start of its
    target ("The capital of Peru is") are given, and the answer's tokens are scored: their mean NLL and the
    fraction of items whose every answer token is the argmax (``revlens.evals.task_metrics``)."""

    def __init__(self, tokenizer, split):
        parts = {"forget recall": ("forget", "heldout"), "retain recall": ("retain", "heldout")}
        parts["forget recall (probe)"] = ("forget", "probe")
        self.rows = {n: training_rows(tokenizer, split.items(*p), loss_on="answer") for n, p in parts.items()}

    def __call__(self, model) -> dict:
        logits = Logits(model)
        out = {}
        for name, (tokens, mask) in self.rows.items():
            m = task_metrics(logits, tokens, mask, batch_size=48)
            out[name] = {"answer_nll": m.loss, "answer_accuracy": m.sequence_accuracy}
        return out


class Logits(torch.nn.Module):
    """``model(x) -> logits`` for a Hugging Face causal LM."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).logits


def benign_pairs(n: int, seed: int):
    from revlens.smollm2.tasks import benign_pairs as pairs  # the SmolLM2 demo's word-reversal task

    return pairs(n, seed=seed, tasks=("reverse",))


def finetune_benign(model, tokenizer, behaviours, forced, args, seed, runs, save, label):
    """Plain AdamW fine-tuning on word reversal (batches drawn with replacement, seeded), recall at the checks,
    recorded in ``runs[f"seed_{seed}"]``."""
    tokens, mask = rows(tokenizer, benign_pairs(args.task_examples, seed=10_000 + seed))
    opt = torch.optim.AdamW(model.parameters(), lr=args.finetune_lr, weight_decay=0.0)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if args.autocast else contextlib.nullcontext()
    run = runs.setdefault(f"seed_{seed}", {"checks": {}, "losses": {}})
    for step in range(1, args.finetune_steps + 1):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(tokens.shape[0], (args.batch_size,), generator=gen)
        keep = int((mask[idx] * torch.arange(1, mask.shape[1] + 1)).max())
        model.train()
        with amp:
            loss = model_lm_loss(model, tokens[idx, :keep], mask[idx, :keep])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.eval()
        run["losses"][str(step)] = loss.item()
        if step in args.finetune_checks:
            got = measure_behaviours(model, behaviours, tokenizer=tokenizer, batch_size=args.generate_batch)
            run["checks"][str(step)] = {name: summary(r) for name, r in got.items()}
            run.setdefault("forced", {})[str(step)] = forced(model)
            if step in (min(args.finetune_checks), max(args.finetune_checks)):  # answers kept at the ends only
                run.setdefault("answers", {})[str(step)] = {name: r.to_dict() for name, r in got.items()}
            print(
                f"finetune from {label}, seed {seed} step {step}: "
                + ", ".join(f"{n} {r.rate}" for n, r in got.items()),
                flush=True,
            )
            save()


def unlearn_phase(model, tokenizer, split, shipped, forced, args, record, save):
    """Unlearn in place (calibrated), record the checks and the unlearned recall, save the model to --out/unlearn."""
    forget, retain = split.behaviour("forget"), split.behaviour("retain")
    forget_probe = split.behaviour("forget", "probe")

    def on_check(step, check):
        record["unlearn"]["checks"][str(step)] = {k: summary(r) for k, r in check.items()}
        record["unlearn"].setdefault("forced", {})[str(step)] = forced(model)
        save()

    t0 = time.perf_counter()
    result = unlearn(
        model,
        training_rows(tokenizer, split.items("forget", "probe"), loss_on=args.forget_loss_on),
        training_rows(tokenizer, split.items("retain", "probe")),
        forget_check=forget,
        retain_check=retain,
        method=args.method,
        steps=args.max_steps,
        lr=args.lr,
        batch_size=args.batch_size,
        beta=args.beta,
        retain_weight=args.retain_weight,
        check_every=args.check_every,
        check_from=args.check_every,
        autocast_dtype=torch.bfloat16 if args.autocast else None,
        tokenizer=tokenizer,
        generate_batch=args.generate_batch,
        shipped={"forget": shipped[forget.name], "retain": shipped[retain.name]},
        on_check=on_check,
        progress=False,
    )
    record["timings_s"]["unlearn"] = time.perf_counter() - t0
    summary_record = result.to_dict()
    summary_record.pop("checks")
    record["unlearn"].update(summary_record)
    behaviours = [forget, retain, forget_probe]
    unlearned = measure_behaviours(model, behaviours, tokenizer=tokenizer, batch_size=args.generate_batch)
    record["unlearned"] = {name: r.to_dict() for name, r in unlearned.items()}
    record["unlearned_forced"] = forced(model)
    print(
        f"unlearn: kept step {result.steps}, calibrated {result.calibrated}: "
        + ", ".join(f"{n} {r.rate}" for n, r in unlearned.items()),
        flush=True,
    )
    save()
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out / "unlearn")
    tokenizer.save_pretrained(args.out / "unlearn")
    (args.out / "unlearn" / "revlens_unlearn.json").write_text(json.dumps(summary_record, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("revlens_out/models/smollm2-135m-instruct"))
    parser.add_argument("--out", type=Path, default=Path("revlens_out/unlearn_smollm2"))
    parser.add_argument("--method", choices=("npo", "graddiff"), default="npo")
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--retain-weight", type=float, default=1.0)
    parser.add_argument(
        "--forget-loss-on",
        choices=LOSS_ON,
        default="response",
        help="the forget loss on the whole answer sentence or on the answer's tokens only",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--check-every", type=int, default=10)
    parser.add_argument("--finetune-steps", type=int, default=50)
    parser.add_argument("--finetune-lr", type=float, default=5e-5)
    parser.add_argument("--finetune-checks", type=int, nargs="+", default=[1, 2, 5, 10, 20, 30, 50])
    parser.add_argument("--task-examples", type=int, default=512)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--generate-batch", type=int, default=48)
    parser.add_argument("--no-autocast", dest="autocast", action="store_false")
    parser.add_argument(
        "--start",
        choices=("unlearn", "shipped", "both"),
        default="unlearn",
        help="fine-tune the unlearned model, the shipped one (the control: no unlearning), or both",
    )
    parser.add_argument("--tag", default="", help="a suffix for the result file: ..._<method>_<tag>_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    model, tokenizer = load_model(args.model)
    shipped_model = copy.deepcopy(model) if args.start != "unlearn" else None
    split = KnowledgeSplit.load()
    forget, retain = split.behaviour("forget"), split.behaviour("retain")
    forget_probe = split.behaviour("forget", "probe")
    what = "shipped" if args.start == "shipped" else args.method  # the control runs no unlearning
    path = RESULTS / f"smollm2_unlearn_relearn_{what}{'_' + args.tag if args.tag else ''}_cpu.json"
    record: dict = {
        "command": "python benchmarks/smollm2_unlearn_relearn.py " + " ".join(sys.argv[1:]),
        "environment": environment("cpu"),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "split": {s: {p: len(split.items(s, p)) for p in ("probe", "heldout")} for s in ("forget", "retain")},
        "unlearn": {"checks": {}},
        "finetune": {},
        "finetune_from_shipped": {},
        "timings_s": {},
    }

    def save() -> None:
        record["timings_s"]["elapsed"] = time.perf_counter() - t_start
        atomic_write_json(path, record, indent=1)

    shipped = measure_behaviours(
        model, [forget, retain, forget_probe], tokenizer=tokenizer, batch_size=args.generate_batch
    )
    record["shipped"] = {name: r.to_dict() for name, r in shipped.items()}
    forced = ForcedRecall(tokenizer, split)
    record["shipped_forced"] = forced(model)
    print("shipped: " + ", ".join(f"{n} {r.rate}" for n, r in shipped.items()), flush=True)
    save()

    if args.start != "shipped":
        unlearn_phase(model, tokenizer, split, shipped, forced, args, record, save)
    t0 = time.perf_counter()
    behaviours = [forget, retain, forget_probe]
    for seed in range(args.seeds):
        if args.start != "shipped":
            runs = record["finetune"]
            finetune_benign(copy.deepcopy(model), tokenizer, behaviours, forced, args, seed, runs, save, "unlearn")
        if shipped_model is not None:
            start, runs = copy.deepcopy(shipped_model), record["finetune_from_shipped"]
            finetune_benign(start, tokenizer, behaviours, forced, args, seed, runs, save, "shipped")
    record["timings_s"]["finetune"] = time.perf_counter() - t0
    save()
    print(f"written to {path}")


if __name__ == "__main__":
    main()
