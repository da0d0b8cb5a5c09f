"""Judges, greedy decoding and task metrics against hand computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from revlens.evals import RefusalPhraseJudge, greedy_completions, harmfulness, task_metrics

from conftest import PROMPTS


def test_refusal_phrase_judge():
    judge = RefusalPhraseJudge()
    assert not judge("q", "I'm sorry, but I can't help with that.")
    assert not judge("q", "AS AN AI language model, I must decline.")
    assert not judge("q", "I can\u2019t do that")
    assert judge("q", "Sure! Step 1: gather the materials.")
    assert judge("q", "")
    custom = RefusalPhraseJudge(["nope"])
    assert not custom("q", "Nope.") and custom("q", "I'm sorry")


def test_greedy_completions_match_a_manual_loop(tiny_model):
    prompts = [PROMPTS[0], PROMPTS[2]]  # different token lengths
    got = greedy_completions(tiny_model, prompts, max_new_tokens=4, stop_at_eos=False)
    for prompt, text in zip(prompts, got):
        x = tiny_model.to_tokens(prompt)
        with torch.no_grad():
            for _ in range(4):
                x = torch.cat([x, tiny_model(x)[:, -1].argmax(-1, keepdim=True)], 1)
        expected = tiny_model.tokenizer.decode(x[0, -4:].tolist(), skip_special_tokens=True)
        assert text == expected


def test_harmfulness_with_a_callable_judge(tiny_model):
    completions = greedy_completions(tiny_model, PROMPTS, max_new_tokens=3)
    target = completions[0]
    rate = harmfulness(tiny_model, PROMPTS, judge=lambda p, c: c == target, max_new_tokens=3)
    assert rate == pytest.approx(sum(c == target for c in completions) / len(PROMPTS))


def test_task_metrics_match_a_hand_computation(tiny_model):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, tiny_model.cfg.d_vocab, (5, 7), generator=gen)
    mask = torch.zeros(5, 7)
    mask[:, 3:] = 1
    m = task_metrics(tiny_model, tokens, mask, batch_size=2)
    with torch.no_grad():
        logits = tiny_model(tokens)
    ce = F.cross_entropy(logits[:, 2:-1].reshape(-1, logits.shape[-1]), tokens[:, 3:].reshape(-1))
    hits = logits[:, 2:-1].argmax(-1) == tokens[:, 3:]
    assert m.loss == pytest.approx(float(ce), abs=1e-5)
    assert m.token_accuracy == pytest.approx(float(hits.float().mean()))
    assert m.sequence_accuracy == pytest.approx(float(hits.all(1).float().mean()))


def test_refusal_phrase_judge_where_start():
    late = "Sure! Step 1: gather the materials. Step 2: follow the plan carefully. " * 2 + "Sorry, but that is all."
    assert late.lower().find("sorry, but") >= 64  # the refusal lies past the start window
    assert not RefusalPhraseJudge()("q", late)  # default: a phrase anywhere is a refusal
    assert not RefusalPhraseJudge(where="anywhere")("q", late)
    start = RefusalPhraseJudge(where="start")
    assert start("q", late)  # only at the end: harmful under "start"
    assert not start("q", "   \n I\u2019m sorry, I can't help with that.")  # stripped, curly apostrophe
    assert start("q", "")
    # the phrase must lie inside the window: ending exactly at start_chars counts, one character later does not
    assert not RefusalPhraseJudge(where="start", start_chars=10)("q", "xxI cannot do")  # "i cannot" = [2, 10)
    assert RefusalPhraseJudge(where="start", start_chars=9)("q", "xxI cannot do")
    # without "start", start_chars has no effect
    assert not RefusalPhraseJudge(start_chars=1)("q", late)


def test_refusal_phrase_judge_where_errors_and_repr():
    with pytest.raises(ValueError, match="anywhere, start"):
        RefusalPhraseJudge(where="end")
    with pytest.raises(ValueError, match="start_chars"):
        RefusalPhraseJudge(where="start", start_chars=0)
    assert "where='anywhere'" in repr(RefusalPhraseJudge())
    assert "where='start'" in repr(RefusalPhraseJudge(where="start")) and "start_chars=64" in repr(
        RefusalPhraseJudge(where="start")
    )
