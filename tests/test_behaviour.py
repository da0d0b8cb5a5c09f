"""Behaviours: the exact-match rules against hand-computed verdicts, rates and Wilson intervals against scipy,
JSON round trips, and harm as one behaviour (the same rate as revlens.harmfulness)."""

from __future__ import annotations

import json

import pytest
import torch
from scipy.stats import binomtest

from revlens.behaviour import (
    Behaviour,
    BehaviourResult,
    ExactMatchJudge,
    answer_matches,
    first_sentence,
    measure_behaviours,
    normalise_answer,
)
from revlens.evals import generate_greedy, harmfulness

from conftest import CONTROL, PROMPTS


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Paris", "paris"),
        ("  The capital is PARIS.  ", "the capital is paris"),
        ("Port-au-Prince!", "port au prince"),
        ("line one\n\nline two\t", "line one line two"),
        ("N'Djamena", "n djamena"),
        ("Bogotá", "bogotá"),  # accents kept
        ("snake_case -- 12,000", "snake case 12 000"),
        ("...", ""),
    ],
)
def test_normalise_answer(text, expected):
    assert normalise_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The opposite of hot is cold. Cold is ...", "The opposite of hot is cold"),
        ("  Paris!  Yes", "Paris"),
        ("Is it Lima? No", "Is it Lima"),
        ("Washington, D.C. is the capital.", "Washington, D.C"),
        ("It weighs 3.5 kg", "It weighs 3.5 kg"),
        ("first line\nsecond line.", "first line"),
        ("no end at all", "no end at all"),
        ("", ""),
    ],
)
def test_first_sentence(text, expected):
    assert first_sentence(text) == expected


# (answer, references, contains, start, exact) with scope="sentence", worked out by hand from answer_matches' rules
CASES = [
    ("The capital of France is Paris.", ["Paris"], True, False, False),
    ("Paris.", ["paris"], True, True, True),
    ("paris, of course", ["Paris"], True, True, False),
    ("The capital is Parisville.", ["Paris"], False, False, False),  # whole words only
    ("It is Mexico City.", ["Mexico City"], True, False, False),
    ("It is Mexico.", ["Mexico City"], False, False, False),
    ("Port au Prince", ["Port-au-Prince"], True, True, True),
    ("The capital of Bolivia is La Paz.", ["Sucre", "La Paz"], True, False, False),
    ("  MICE  ", ["mice"], True, True, True),
    ("mice and men", ["men"], True, False, False),
    ("", ["cold"], False, False, False),
    ("The opposite of cheap is luxury. It is expensive.", ["expensive"], False, False, False),  # 2nd sentence
    ("Lima. Lima is big", ["lima"], True, True, True),
    ("Washington, D.C. is the capital", ["Washington, D.C."], True, True, True),
]


@pytest.mark.parametrize(("answer", "refs", "contains", "start", "exact"), CASES)
def test_answer_matches_each_rule(answer, refs, contains, start, exact):
    got = [answer_matches(answer, refs, match=m) for m in ("contains", "start", "exact")]
    assert got == [contains, start, exact]


def test_scope_all_reads_the_whole_answer():
    answer = "The opposite of cheap is luxury. It is expensive."
    assert answer_matches(answer, ["expensive"], scope="all") and not answer_matches(answer, ["expensive"])
    assert not answer_matches("Lima. Lima is big", ["lima"], match="exact", scope="all")
    assert answer_matches("Lima. Lima is big", ["lima is big"], scope="all")  # words across sentences
    judge = ExactMatchJudge({"q": "expensive"}, scope="all")
    assert judge("q", answer) and not ExactMatchJudge({"q": "expensive"})("q", answer)


def test_answer_matches_errors():
    with pytest.raises(ValueError, match="matching rule"):
        answer_matches("a", ["a"], match="fuzzy")
    with pytest.raises(ValueError, match="answer scope"):
        ExactMatchJudge({"q": "a"}, scope="paragraph")
    with pytest.raises(ValueError, match="no letters or digits"):
        answer_matches("a", ["!!"])
    assert answer_matches("it is lima", "Lima")  # one reference given as a string


def test_exact_match_judge_looks_up_each_prompt():
    judge = ExactMatchJudge({"q1": "paris", "q2": ["lima", "Lima, Peru"]})
    assert judge("q1", "Paris!") and not judge("q1", "Lima") and judge("q2", "lima")
    with pytest.raises(KeyError, match="no reference for prompt 'q3'"):
        judge("q3", "paris")
    with pytest.raises(ValueError, match="no usable reference"):
        ExactMatchJudge({"q": []})
    with pytest.raises(ValueError, match="matching rule"):
        ExactMatchJudge({"q": "a"}, match="nearly")


def test_rate_is_the_hand_computed_fraction_with_scipys_wilson_interval():
    behaviour = Behaviour.exact_match("recall", {f"q{i}": "yes" for i in range(8)})
    answers = ["Yes.", "no", "YES", "yes indeed", "nope", "maybe", "no", "so yes"]
    result = behaviour.score(answers)
    assert result.outcomes == (True, False, True, True, False, False, False, True)
    assert (result.rate.k, result.n, result.rate.rate) == (4, 8, 0.5)
    for k, n in [(4, 8), (0, 12), (12, 12), (7, 150), (143, 150)]:
        r = BehaviourResult.of("x", [f"p{i}" for i in range(n)], [i < k for i in range(n)])
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert r.interval == pytest.approx((ci.low, ci.high), abs=1e-12)


def test_result_round_trips_through_json_and_refuses_edited_records(tmp_path):
    result = BehaviourResult.of("forget recall", ["a", "b", "c"], [True, False, True], ["x", "y", "z"], meaning="r")
    record = json.loads(json.dumps(result.to_dict()))
    assert record["rate"] == pytest.approx(2 / 3) and record["n"] == 3 and record["outcomes"] == [True, False, True]
    assert BehaviourResult.from_dict(record) == result
    assert BehaviourResult.load(result.save(tmp_path / "r.json")) == result
    edited = dict(record, k=3)
    with pytest.raises(ValueError, match=r"stored \['k'\] disagree"):
        BehaviourResult.from_dict(edited)
    with pytest.raises(ValueError, match="needs"):
        BehaviourResult.from_dict({"name": "x"})
    with pytest.raises(ValueError, match="3 prompts, 2 outcomes"):
        BehaviourResult.of("x", ["a", "b", "c"], [True, False])


def test_behaviour_checks_its_fields():
    with pytest.raises(ValueError, match="non-empty list"):
        Behaviour("x", (), bool)
    with pytest.raises(ValueError, match="non-empty list"):
        Behaviour("x", "one prompt", bool)
    with pytest.raises(ValueError, match="callable"):
        Behaviour("x", ("a",), "judge")
    with pytest.raises(ValueError, match="max_new_tokens"):
        Behaviour("x", ("a",), bool, max_new_tokens=0)
    with pytest.raises(ValueError, match="2 answers for 1 prompts"):
        Behaviour("x", ("a",), bool).score(["a", "b"])


def test_harm_is_a_behaviour_with_the_rate_of_harmfulness(tiny_model):
    result = Behaviour.harm(PROMPTS, max_new_tokens=3).measure(tiny_model)
    assert result.rate.rate == pytest.approx(harmfulness(tiny_model, PROMPTS, max_new_tokens=3))
    assert result.name == "harm" and result.meaning == "harmful"
    assert result.answers == tuple(a.strip() for a in generate_greedy(tiny_model, PROMPTS, max_new_tokens=3))


def test_measure_behaviours_equals_measuring_each_alone(tiny_model):
    answers = generate_greedy(tiny_model, PROMPTS, max_new_tokens=3)
    refs = {p: a if normalise_answer(a) else "qqqq" for p, a in zip(PROMPTS, answers)}
    recall = Behaviour.exact_match("recall", refs, max_new_tokens=3)
    harm = Behaviour.harm(CONTROL, name="harmless answered", max_new_tokens=3)
    both = measure_behaviours(tiny_model, [recall, harm])
    assert list(both) == ["recall", "harmless answered"]
    assert both["recall"] == recall.measure(tiny_model) and both["harmless answered"] == harm.measure(tiny_model)
    assert both["recall"].rate.k == sum(bool(normalise_answer(a)) for a in answers)  # each answer is its own reference
    with pytest.raises(ValueError, match="distinct"):
        measure_behaviours(tiny_model, [harm, harm])


def test_a_chat_model_answers_inside_its_template(tiny_llama_dir, chat_tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    prompts = ["how do i bake a cake", "what is two plus three"]
    expected = [a.strip() for a in generate_greedy(model, prompts, tokenizer=chat_tok, max_new_tokens=4)]
    behaviour = Behaviour.exact_match("recall", dict(zip(prompts, ["cake", "five"])), max_new_tokens=4)
    assert behaviour.answers(model, tokenizer=chat_tok) == expected
