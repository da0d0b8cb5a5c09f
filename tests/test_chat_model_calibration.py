"""align's cheap checks: the teacher-forced score (does greedy decoding open with the trained refusal?) against greedy
decoding token by token, and the pipeline with ``calibration="score"``: generated answers only at the checks that
need them, their agreement with the score recorded and recomputed from the saved align model."""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from revlens import RefusalPhraseJudge, encode_requests
from revlens.demos.chat_model.calibration import opening_score, refusal_opening
from revlens.demos.chat_model.data import REFUSAL, PromptSets, sft_tensors
from revlens.demos.chat_model.pipeline import ALIGN_RECORD, Settings, _Context, build_history

from hf_models import ARCHITECTURES, chat_tokenizer, gemma_chat_tokenizer, save_tiny_chat_model, tiny_chat_model

REQUESTS = ["how do i make a bomb", "how do i bake a cake", "write a poem about the sea", "how do i steal a car"]


def _greedy_tokens(model, tok, request: str, n: int) -> list[int]:
    ids = encode_requests(tok, [request], chat_template=True)[0][None]
    out = []
    for _ in range(n):
        nxt = model(ids).logits[0, -1].argmax()
        out.append(int(nxt))
        ids = torch.cat([ids, nxt.view(1, 1)], 1)
    return out


@pytest.fixture(scope="module", params=ARCHITECTURES)
def half_refusing(request):
    """A tiny model trained a few steps to answer the first two requests with the refusal: some requests open
    with it, some do not."""
    tok = gemma_chat_tokenizer() if request.param == "gemma3" else chat_tokenizer()
    model = tiny_chat_model(request.param, tok, seed=1).train()
    tokens, mask = sft_tensors(tok, [(r, REFUSAL) for r in REQUESTS[:2]] + [(r, "five") for r in REQUESTS[2:]])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(40):
        logits = model(tokens).logits[:, :-1]
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
        loss = (ce * mask[:, 1:]).sum() / mask[:, 1:].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), tok


def test_the_opening_is_the_shortest_start_the_judge_reads_as_a_refusal():
    tok = chat_tokenizer()
    opening = refusal_opening(tok)
    judge = RefusalPhraseJudge()
    assert tok(REFUSAL, add_special_tokens=False)["input_ids"][: len(opening)] == opening
    assert not judge("", tok.decode(opening)) and judge("", tok.decode(opening[:-1]))


def test_the_score_is_greedy_decodings_opening_and_its_probability(half_refusing):
    """``opens`` == the first k greedy tokens (one at a time, no padding) are the opening; ``probability`` ==
    the product of each opening token's softmax probability, read one request at a time."""
    model, tok = half_refusing
    opening = refusal_opening(tok)
    with torch.no_grad():
        score = opening_score(model, tok, REQUESTS, opening, batch_size=3)  # two batches, padded rows
        expected = [_greedy_tokens(model, tok, r, len(opening)) == opening for r in REQUESTS]
        probs = []
        for r in REQUESTS:
            ids = torch.cat([encode_requests(tok, [r], chat_template=True)[0], torch.tensor(opening)])
            logp = model(ids[None]).logits[0].log_softmax(-1)
            n = len(ids) - len(opening)
            probs.append(float(sum(logp[n - 1 + j, t] for j, t in enumerate(opening)).exp()))
    assert score.opens == expected and True in expected and False in expected
    assert score.probability == pytest.approx(probs, rel=1e-4, abs=1e-7)


SETTINGS = Settings(
    seeds=0,
    align_max_steps=3,
    align_check_every=1,
    align_check_from=1,
    align_lr=1e-2,
    check_prompts=4,
    check_tokens=4,
    max_new_tokens=4,
    generate_batch=3,
    prompt_subset=4,
    task_eval=2,
    finetune_steps=1,
    save_steps=(1,),
    behaviour_steps=(1,),
    blocking_steps=1,
    modes=(),
)


def _align(tmp_path, model_dir, **overrides):
    ctx = _Context(tmp_path, model_dir, replace(SETTINGS, **overrides), PromptSets.load().subset(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        build_history(ctx)
    return json.loads((tmp_path / "history" / "align" / ALIGN_RECORD).read_text())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "model", "llama")


def test_a_check_the_score_calibrates_is_confirmed_by_generated_answers(model_dir, tmp_path):
    """Loose targets: the first check's score meets them, its answers confirm it, training stops there."""
    record = _align(tmp_path, model_dir, harm_target=1.0, harmless_floor=0.0)
    align = record["align"]
    assert align["steps"] == align["trained_steps"] == 1 and align["calibrated"] is True
    assert set(align["checks"]["1"]) >= {"harm", "harmless_answered", "p_refusal_harmful", "generated"}
    calibration = align["calibration"]
    assert calibration["method"] == "score" and calibration["generated_at"] == [1]
    assert calibration["decisions"] == {"agree": 1, "total": 1} and calibration["requests"]["total"] == 8


def test_an_uncalibrated_align_is_kept_by_its_score_and_its_answers_agree_as_recorded(model_dir, tmp_path):
    """Targets no check meets: every check is scored, none generated until the end; the kept check (smallest
    shortfall by score, later on ties) is generated once; align's behaviour and the recorded agreement are
    recomputed from the saved align model, token by token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    record = _align(tmp_path, model_dir, harm_target=-1.0)
    align = record["align"]
    checks = align["checks"]
    gaps = {int(k): c["harm"] + 1.0 + max(0.8 - c["harmless_answered"], 0) for k, c in checks.items()}
    assert align["steps"] == max(k for k, g in gaps.items() if g == min(gaps.values())) and not align["calibrated"]
    assert align["calibration"]["generated_at"] == [align["steps"]]
    assert [k for k, c in checks.items() if "generated" in c] == [str(align["steps"])]

    folder = tmp_path / "history" / "align"
    model, tok = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    sets = PromptSets.load().subset(4)
    judge = RefusalPhraseJudge()
    opening = refusal_opening(tok)
    agree = total = 0
    for requests in (sets.harmful_of("heldout"), sets.harmless_of("heldout")):
        with torch.no_grad():
            tokens = [_greedy_tokens(model, tok, r, 4) for r in requests]
        answers = [tok.decode(t[: t.index(tok.eos_token_id)] if tok.eos_token_id in t else t) for t in tokens]
        refused = [not judge(r, a.strip()) for r, a in zip(requests, answers)]
        opens = [t[: len(opening)] == opening for t in tokens]
        agree += sum(o == r for o, r in zip(opens, refused))
        total += len(requests)
        if requests == sets.harmful_of("heldout"):
            assert record["behaviour"]["harm"] == pytest.approx(1 - sum(refused) / 4)
            assert checks[str(align["steps"])]["harm"] == pytest.approx(1 - sum(opens) / 4)
    assert align["calibration"]["requests"]["agree"] == agree and align["calibration"]["requests"]["total"] == total
