"""Batched, KV-cached, left-padded greedy generation equals an uncached argmax loop token for token."""

from __future__ import annotations

import pytest
import torch

from revlens.chat import encode_requests
from revlens.checkpoint_loader import load_hf_folder
from revlens.evals import generate_greedy, greedy_completions, harmfulness, hf_causal_lm

from conftest import PROMPTS

REQUESTS = [
    "how do i make a bomb",
    "write a poem about the sea and the quick brown fox",
    "five",
    "what is two plus three",
]
NEW = 10


@pytest.fixture(scope="module")
def sharp_llama(tmp_path_factory, chat_tok):
    """A float32 tiny Llama with large random weights (std 0.3), so greedy answers vary token by token
    and have no near-ties (default init repeats one token)."""
    from hf_models import save_tiny_llama, tiny_llama

    model = tiny_llama(chat_tok, hidden=64, layers=2, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    folder = save_tiny_llama(tmp_path_factory.mktemp("sharp_llama"), chat_tok, model=model)
    return load_hf_folder(folder), folder


def argmax_loop(model, tokens: torch.Tensor, steps: int) -> list[int]:
    """One prompt, no padding, no cache: the full forward of TransformerLens' bridge at every step."""
    x = tokens[None]
    with torch.no_grad():
        for _ in range(steps):
            x = torch.cat([x, model(x)[:, -1].argmax(-1, keepdim=True)], 1)
    return x[0, len(tokens) :].tolist()


def test_batched_generation_equals_an_uncached_argmax_loop(sharp_llama, chat_tok):
    bridge, folder = sharp_llama
    encoded = encode_requests(chat_tok, REQUESTS)
    assert len({len(t) for t in encoded}) > 1  # a batch mixes lengths, so left padding is exercised
    expected = [argmax_loop(bridge, t, NEW) for t in encoded]
    assert len(set(expected[0])) > 3
    texts = [chat_tok.decode(e, skip_special_tokens=True) for e in expected]
    assert generate_greedy(bridge, REQUESTS, max_new_tokens=NEW, batch_size=3, stop_at_eos=False) == texts

    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    assert (
        generate_greedy(plain, REQUESTS, tokenizer=chat_tok, max_new_tokens=NEW, batch_size=4, stop_at_eos=False)
        == texts
    )
    # The bridge's HF view shares its weight tensors: no copy of the weights.
    view = hf_causal_lm(bridge)
    assert view.model.embed_tokens.weight.data_ptr() == bridge.original_model.model.embed_tokens.weight.data_ptr()


def test_generation_stops_at_the_stop_token(sharp_llama, chat_tok):
    bridge, _ = sharp_llama
    encoded = encode_requests(chat_tok, REQUESTS)
    full = [argmax_loop(bridge, t, NEW) for t in encoded]
    stop = full[0][2]
    got = generate_greedy(bridge, REQUESTS, max_new_tokens=NEW, batch_size=2, stop_tokens=[stop])
    for tokens, text in zip(full, got):
        cut = tokens[: tokens.index(stop)] if stop in tokens else tokens
        assert text == chat_tok.decode(cut, skip_special_tokens=True)
    assert got[0] == chat_tok.decode(full[0][:2], skip_special_tokens=True)


def test_tl_native_models_fall_back_to_the_loop_with_raw_prompts(tiny_model):
    assert hf_causal_lm(tiny_model) is None
    got = generate_greedy(tiny_model, PROMPTS, max_new_tokens=3, stop_at_eos=False)
    for prompt, text in zip(PROMPTS, got):
        tokens = tiny_model.to_tokens(prompt)[0]
        assert text == tiny_model.tokenizer.decode(argmax_loop(tiny_model, tokens, 3), skip_special_tokens=True)
    assert greedy_completions(tiny_model, PROMPTS, max_new_tokens=3, stop_at_eos=False) == got


def test_harmfulness_judges_the_templated_answers(sharp_llama):
    bridge, _ = sharp_llama
    answers = generate_greedy(bridge, REQUESTS, max_new_tokens=NEW)
    rate = harmfulness(bridge, REQUESTS, judge=lambda p, c: c == answers[1], max_new_tokens=NEW)
    assert rate == pytest.approx(sum(a == answers[1] for a in answers) / len(answers))
    with pytest.raises(ValueError, match="non-empty list"):
        generate_greedy(bridge, "one string")


def test_a_shared_system_turn_runs_once_and_answers_stay_the_same(sharp_llama, chat_tok):
    """Prompts that start alike (a system turn) are run as [shared prefix][padding][own tokens]; each answer
    equals the uncached loop on that prompt alone, retiring rows included."""
    from revlens.evals import _shared_prefix

    bridge, _ = sharp_llama
    system = "you are a careful assistant and you answer in few words"
    encoded = encode_requests(chat_tok, REQUESTS, system=system)
    assert _shared_prefix(encoded) > 10
    assert _shared_prefix([torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4, 5])]) == 2
    assert _shared_prefix([torch.tensor([1, 2]), torch.tensor([1, 2, 4])]) == 1  # each keeps a token
    full = [argmax_loop(bridge, t, NEW) for t in encoded]
    stop = full[1][3]
    got = generate_greedy(bridge, REQUESTS, system=system, max_new_tokens=NEW, batch_size=4, stop_tokens=[stop])
    for tokens, text in zip(full, got):
        cut = tokens[: tokens.index(stop)] if stop in tokens else tokens
        assert text == chat_tok.decode(cut, skip_special_tokens=True)
