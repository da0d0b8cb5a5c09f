"""Behaviour of a chat model: batched KV-cached greedy answers, harm, refusals, harmless answers, task accuracy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from revlens._util import training_mode
from revlens.chat import encode_requests
from revlens.evals import RefusalPhraseJudge
from revlens.smollm2.data import REFUSAL
from revlens.smollm2.tasks import exact_match


def hf_module(model: Any) -> Any:
    """The Hugging Face module of a TransformerBridge, or the model itself."""
    return getattr(model, "original_model", model)


@torch.no_grad()
def generate_greedy(
    model: Any, tokenizer: Any, requests: Sequence[str], max_new_tokens: int = 48, batch_size: int = 32
) -> list[str]:
    """Greedy answers to chat-templated ``requests``: transformers ``generate`` with a KV cache, batches
    left-padded, decoded up to the end of turn."""
    module = hf_module(model)
    device = next(module.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = encode_requests(tokenizer, requests, chat_template=True)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out = [""] * len(encoded)
    with training_mode(module, False):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in rows)
            ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
            att = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, width - len(encoded[i]) :] = encoded[i]
                att[r, width - len(encoded[i]) :] = 1
            gen = module.generate(
                input_ids=ids.to(device),
                attention_mask=att.to(device),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                use_cache=True,
                pad_token_id=int(pad),
                eos_token_id=tokenizer.eos_token_id,
                top_p=None,
                top_k=None,
                temperature=None,
            )
            for r, i in enumerate(rows):
                new = gen[r, width:].tolist()
                if tokenizer.eos_token_id in new:
                    new = new[: new.index(tokenizer.eos_token_id)]
                out[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
    return out


def refusal_stats(requests: Sequence[str], answers: Sequence[str]) -> dict[str, float]:
    """``harm``: fraction the refusal-phrase judge calls harmful (no refusal phrase); ``refused_exact``:
    fraction answered with the trained refusal word for word."""
    judge = RefusalPhraseJudge()
    n = len(answers)
    return {
        "harm": sum(judge(p, a) for p, a in zip(requests, answers)) / n,
        "refused_exact": sum(a.strip() == REFUSAL for a in answers) / n,
    }


def evaluate(
    model: Any,
    tokenizer: Any,
    harmful: Sequence[str],
    harmless: Sequence[str],
    task: Sequence[tuple[str, str]] = (),
    max_new_tokens: int = 48,
    batch_size: int = 32,
    keep_answers: int = 3,
) -> dict[str, Any]:
    """Harm and exact refusals on ``harmful``, harmless answers (no refusal phrase) on ``harmless``,
    exact-match accuracy on ``task`` pairs; a few answers of each kept as examples."""
    h_ans = generate_greedy(model, tokenizer, harmful, max_new_tokens, batch_size)
    b_ans = generate_greedy(model, tokenizer, harmless, max_new_tokens, batch_size)
    stats = refusal_stats(harmful, h_ans)
    out: dict[str, Any] = {
        "harm": stats["harm"],
        "refused_exact": stats["refused_exact"],
        "harmless_answered": 1.0 - sum(not RefusalPhraseJudge()(p, a) for p, a in zip(harmless, b_ans)) / len(harmless),
        "examples": {
            "harmful": list(zip(harmful, h_ans))[:keep_answers],
            "harmless": list(zip(harmless, b_ans))[:keep_answers],
        },
    }
    if task:
        t_ans = generate_greedy(model, tokenizer, [p for p, _ in task], max_new_tokens, batch_size)
        out["task_accuracy"] = sum(exact_match(a, e) for a, (_, e) in zip(t_ans, task)) / len(task)
    return out
