"""Unlearning: gradient difference and NPO against hand-written losses on a tiny chat Llama, the calibrated stop
(scripted recall), and a planted-fact history: a tiny model learns facts, unlearns some, and relearns them."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from revlens.behaviour import Behaviour
from revlens.losses import sequence_logprobs
from revlens.sft_data import encode_sft
from revlens.unlearning import gradient_difference_loss, npo_loss, reference_logprobs, unlearn

from hf_models import tiny_llama


def _rows(tokenizer, pairs):
    chats = [[{"role": "user", "content": p}, {"role": "assistant", "content": a}] for p, a in pairs]
    data = encode_sft(tokenizer, chats)
    return data.tokens, data.loss_mask


FORGET = [("what is two plus three", "five"), ("how do i bake a cake", "sure, here is how")]
RETAIN = [("write a poem about the sea", "the sea is blue"), ("reverse the words: red green", "green red")]


def _hand_logps(model, tokens, mask):
    """Per row, the sum over scored targets of log softmax, written out position by position in float64."""
    with torch.no_grad():
        logits = model(tokens).logits.double()
    out = []
    for row in range(tokens.shape[0]):
        total = 0.0
        for i in range(1, tokens.shape[1]):
            if mask[row, i]:
                total += float(logits[row, i - 1].log_softmax(-1)[tokens[row, i]])
        out.append(total)
    return out


def _hand_nll(model, tokens, mask):
    """Mean negative log-likelihood per scored token over the batch."""
    return -sum(_hand_logps(model, tokens, mask)) / float(mask[:, 1:].sum())


@pytest.fixture(scope="module")
def llama(chat_tok):
    return tiny_llama(chat_tok, hidden=32, seed=1, dtype=torch.float32)


def test_sequence_logprobs_match_a_hand_sum(llama, chat_tok):
    tokens, mask = _rows(chat_tok, FORGET + RETAIN)
    got = sequence_logprobs(llama, tokens, mask)  # through logits_to_keep
    assert got.tolist() == pytest.approx(_hand_logps(llama, tokens, mask), abs=1e-4)
    full = sequence_logprobs(llama, tokens, mask, keep_logits=False)
    assert torch.allclose(got, full, atol=1e-5)
    assert reference_logprobs(llama, tokens, mask, batch_size=3).tolist() == pytest.approx(got.tolist(), abs=1e-4)


def test_gradient_difference_is_minus_forget_nll_plus_weighted_retain_nll(llama, chat_tok):
    f, fm = _rows(chat_tok, FORGET)
    r, rm = _rows(chat_tok, RETAIN)
    expected = -_hand_nll(llama, f, fm) + 0.3 * _hand_nll(llama, r, rm)
    with torch.no_grad():
        got = gradient_difference_loss(llama, f, fm, r, rm, retain_weight=0.3)
        ascent = gradient_difference_loss(llama, f, fm)
    assert float(got) == pytest.approx(expected, abs=1e-4)
    assert float(ascent) == pytest.approx(-_hand_nll(llama, f, fm), abs=1e-4)
    with pytest.raises(ValueError, match="together"):
        gradient_difference_loss(llama, f, fm, r, None)


def test_npo_matches_the_papers_formula(llama, chat_tok):
    f, fm = _rows(chat_tok, FORGET)
    r, rm = _rows(chat_tok, RETAIN)
    reference_model = tiny_llama(chat_tok, hidden=32, seed=2, dtype=torch.float32)
    ref = torch.tensor(_hand_logps(reference_model, f, fm), dtype=torch.float32)
    beta, weight = 0.5, 2.0
    # (2 / beta) * E[log(1 + (pi / pi_ref)^beta)], with the ratio of sequence probabilities, plus the retain NLL
    ratios = [math.exp(a - b) for a, b in zip(_hand_logps(llama, f, fm), ref.tolist())]
    forget_term = (2 / beta) * sum(math.log(1 + q**beta) for q in ratios) / len(ratios)
    expected = forget_term + weight * _hand_nll(llama, r, rm)
    with torch.no_grad():
        got = npo_loss(llama, f, fm, ref, r, rm, beta=beta, retain_weight=weight)
        at_reference = npo_loss(llama, f, fm, reference_logprobs(llama, f, fm), beta=beta)
    assert float(got) == pytest.approx(expected, rel=1e-4)
    assert float(at_reference) == pytest.approx((2 / beta) * math.log(2), abs=1e-4)
    with pytest.raises(ValueError, match="beta must be > 0"):
        npo_loss(llama, f, fm, ref, beta=0.0)


def test_npo_gradient_is_the_papers_weighted_ascent(llama, chat_tok):
    """Zhang et al.: grad L_NPO = E[W grad log pi(y|x)], W = 2 pi^beta / (pi^beta + pi_ref^beta) (1 at the reference,
    where NPO's gradient is gradient ascent's on the sequence log-likelihood)."""
    f, fm = _rows(chat_tok, FORGET)
    model = copy.deepcopy(llama)
    ref = reference_logprobs(model, f, fm) + torch.tensor([1.5, -2.0])  # pi / pi_ref = e^-1.5, e^2
    beta = 0.7
    npo_loss(model, f, fm, ref, beta=beta).backward()
    npo_grad = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logp = sequence_logprobs(model, f, fm)
    ratio = [math.exp(-1.5), math.exp(2.0)]
    weights = torch.tensor(
        [2 * q**beta / (q**beta + 1.0) for q in ratio]
    )  # pi^b / (pi^b + pi_ref^b), divided by pi_ref^b
    (weights * logp).mean().backward()
    for a, b in zip(npo_grad, [p.grad for p in model.parameters()]):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


class ScriptedRecall:
    """A judge whose recall at the k-th measurement is ``rates[k]`` of its prompts (answers ignored)."""

    def __init__(self, rates, n):
        self.rates, self.n, self.calls = list(rates), n, 0

    def __call__(self, prompt, answer):
        check, index = divmod(self.calls, self.n)
        self.calls += 1
        return index < round(self.rates[check] * self.n)


def _scripted(name, prompts, rates):
    return Behaviour(name, tuple(prompts), ScriptedRecall(rates, len(prompts)), max_new_tokens=1)


def test_unlearn_stops_at_the_first_check_meeting_both_targets(llama, chat_tok):
    model = copy.deepcopy(llama)
    prompts = [f"q{i}" for i in range(10)]
    # checks at steps 0 (before), 2, 4, 6: forget 1.0, 0.5, 0.1, 0.0; retain 1.0, 1.0, 0.9, 1.0
    forget = _scripted("forget recall", prompts, [1.0, 0.5, 0.1, 0.0])
    retain = _scripted("retain recall", [f"r{i}" for i in range(10)], [1.0, 1.0, 0.9, 1.0])
    seen = []
    result = unlearn(
        model, _rows(chat_tok, FORGET), _rows(chat_tok, RETAIN), forget_check=forget, retain_check=retain,
        tokenizer=chat_tok, method="graddiff", steps=6, lr=1e-3, batch_size=2, check_every=2, check_from=2,
        on_check=lambda step, c: seen.append((step, c["forget"].rate.rate, c["retain"].rate.rate)), progress=False,
    )  # fmt: skip
    assert seen == [(0, 1.0, 1.0), (2, 0.5, 1.0), (4, 0.1, 0.9)]
    assert (result.steps, result.trained_steps, result.calibrated) == (4, 4, True)
    assert result.targets == pytest.approx({"forget": 0.1, "retain": 0.9})
    assert sorted(result.losses) == [1, 2, 3, 4]
    assert result.to_dict()["checks"]["4"]["forget"]["k"] == 1


def test_unlearn_keeps_the_closest_check_when_none_meets_both(llama, chat_tok):
    model = copy.deepcopy(llama)
    prompts = [f"q{i}" for i in range(10)]
    # steps 2, 4, 6: shortfalls 0.4 + 0, 0.1 + 0.2, 0.4 + 0 -> step 4 is the closest
    forget = _scripted("forget recall", prompts, [1.0, 0.5, 0.2, 0.5])
    retain = _scripted("retain recall", prompts, [1.0, 1.0, 0.7, 1.0])
    states = {}

    def record(step, check):
        states[step] = {k: v.clone() for k, v in model.state_dict().items()}

    with pytest.warns(RuntimeWarning, match="keeping step 4"):
        result = unlearn(
            model, _rows(chat_tok, FORGET), None, forget_check=forget, retain_check=retain, tokenizer=chat_tok,
            method="npo", steps=6, lr=1e-3, batch_size=2, check_every=2, check_from=2, on_check=record,
            progress=False,
        )  # fmt: skip
    assert (result.steps, result.trained_steps, result.calibrated) == (4, 6, False)
    assert all(torch.equal(v, states[4][k]) for k, v in model.state_dict().items())
    assert not all(torch.equal(v, states[6][k]) for k, v in model.state_dict().items())


def test_unlearn_refuses_bad_settings(llama, chat_tok):
    rows = _rows(chat_tok, FORGET)
    b = Behaviour.exact_match("f", {"q": "a"})
    with pytest.raises(ValueError, match="not an unlearning method"):
        unlearn(llama, rows, None, forget_check=b, retain_check=b, method="ga")
    with pytest.raises(ValueError, match="fractions"):
        unlearn(llama, rows, None, forget_check=b, retain_check=b, forget_ratio=10)


# A planted world: facts the tiny model learns (the "pretrain" phase), then unlearns and relearns.
WORDS = "red green blue cake bread sea car poem lock dog fox bomb five sure quick lazy".split()
NAMES = ["alpha", "bravo", "charlie", "delta", "echo", "golf", "hotel", "india"]


def _train(model, rows, steps, lr, seed=0, batch=8):
    from revlens.losses import model_lm_loss

    tokens, mask = rows
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(tokens.shape[0], (batch,), generator=gen)
        loss = model_lm_loss(model, tokens[idx], mask[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["npo", "graddiff"])
def test_planted_facts_are_learned_unlearned_and_relearned(chat_tok, method):
    g = torch.Generator().manual_seed(0)
    codes = [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (2,), generator=g)) for _ in NAMES]
    facts = [(f"what is the code of {n}", c) for n, c in zip(NAMES, codes)]
    forget, retain = facts[:4], facts[4:]
    forget_check = Behaviour.exact_match("forget recall", dict(forget), match="exact", max_new_tokens=5)
    retain_check = Behaviour.exact_match("retain recall", dict(retain), match="exact", max_new_tokens=5)
    model = tiny_llama(chat_tok, hidden=64, seed=0, dtype=torch.float32)
    _train(model, _rows(chat_tok, facts), steps=300, lr=3e-3)  # learn
    assert forget_check.measure(model, tokenizer=chat_tok).rate.rate == 1.0
    assert retain_check.measure(model, tokenizer=chat_tok).rate.rate == 1.0

    result = unlearn(
        model, _rows(chat_tok, forget), _rows(chat_tok, retain), forget_check=forget_check,
        retain_check=retain_check, tokenizer=chat_tok, method=method, steps=100, lr=3e-4, batch_size=4,
        check_every=5, check_from=5, progress=False,
    )  # fmt: skip
    assert result.calibrated
    kept = result.checks[result.steps]
    assert kept["forget"].rate.rate <= 0.1 and kept["retain"].rate.rate >= 0.9
    assert forget_check.measure(model, tokenizer=chat_tok).rate.rate <= 0.1  # the model holds the kept step

    # Relearning: a few steps on the forget facts bring them back, far faster than learning them from scratch.
    relearned, fresh = copy.deepcopy(model), tiny_llama(chat_tok, hidden=64, seed=0, dtype=torch.float32)
    for m in (relearned, fresh):
        _train(m, _rows(chat_tok, forget), steps=10, lr=3e-3, seed=1, batch=4)
    assert forget_check.measure(relearned, tokenizer=chat_tok).rate.rate == 1.0
    assert forget_check.measure(fresh, tokenizer=chat_tok).rate.rate == 0.0
