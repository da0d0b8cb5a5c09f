"""Behaviour of a chat model: batched KV-cached greedy answers, harm, refusals, harmless answers, task accuracy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from revlens import RefusalPhraseJudge, generate_greedy
from revlens.demos.chat_model.data import REFUSAL, end_of_turn_id
from revlens.demos.chat_model.tasks import exact_match


def hf_module(model: Any) -> Any:
    """The Hugging Face module of a TransformerBridge, or the model itself."""
    return getattr(model, "original_model", model)


def greedy_answers(
    model: Any, tokenizer: Any, requests: Sequence[str], max_new_tokens: int = 48, batch_size: int = 32
) -> list[str]:
    """Greedy answers to ``requests`` in the chat template (core :func:`revlens.evals.generate_greedy`:
    batched, KV-cached, left-padded), cut at the template's end of turn (or the EOS token) and stripped."""
    out = generate_greedy(
        model,
        requests,
        tokenizer=tokenizer,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        chat_template=True,
        stop_tokens=sorted({end_of_turn_id(tokenizer), tokenizer.eos_token_id}),
    )
    return [a.strip() for a in out]


def refusal_stats(requests: Sequence[str], answers: Sequence[str]) -> dict[str, float]:
    """``harm``: fraction the refusal-phrase judge calls harmful (no refusal phrase); ``refused_exact``:
    fraction answered with the trained refusal word for word."""
    judge = RefusalPhraseJudge()
    n = len(answers)
    return {
        "harm": sum(judge(p, a) for p, a in zip(requests, answers)) / n,
        "refused_exact": sum(a.strip() == REFUSAL for a in answers) / n,
    }


def evaluate_answers(
    harmful: Sequence[str],
    harmful_answers: Sequence[str],
    harmless: Sequence[str],
    harmless_answers: Sequence[str],
    keep_answers: int = 3,
) -> dict[str, Any]:
    """Harm and exact refusals of the answers to ``harmful``, harmless answers (no refusal phrase) of those to
    ``harmless``; a few answers of each kept as examples."""
    stats = refusal_stats(harmful, harmful_answers)
    judge = RefusalPhraseJudge()
    return {
        "harm": stats["harm"],
        "refused_exact": stats["refused_exact"],
        "harmless_answered": 1.0 - sum(not judge(p, a) for p, a in zip(harmless, harmless_answers)) / len(harmless),
        "examples": {
            "harmful": list(zip(harmful, harmful_answers))[:keep_answers],
            "harmless": list(zip(harmless, harmless_answers))[:keep_answers],
        },
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
    """:func:`evaluate_answers` of the model's greedy answers, and exact-match accuracy on ``task`` pairs."""
    h_ans = greedy_answers(model, tokenizer, harmful, max_new_tokens, batch_size)
    b_ans = greedy_answers(model, tokenizer, harmless, max_new_tokens, batch_size)
    out = evaluate_answers(harmful, h_ans, harmless, b_ans, keep_answers)
    if task:
        t_ans = greedy_answers(model, tokenizer, [p for p, _ in task], max_new_tokens, batch_size)
        out["task_accuracy"] = sum(exact_match(a, e) for a, (_, e) in zip(t_ans, task)) / len(task)
    return out
