"""The knowledge items and the forget / retain split: parsing, the split rule on hand-made answers, and the shipped
split against the measurement it was built from (benchmarks/results/knowledge_recall_smollm2_cpu.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from revlens.behaviour import answer_matches
from revlens.knowledge import PARTS, SETS, KnowledgeItem, KnowledgeSplit, knowledge_candidates, training_rows

MEASURED = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "knowledge_recall_smollm2_cpu.json"


def test_candidates_parse_and_no_answer_is_given_away_by_its_prompt():
    items = knowledge_candidates()
    by_topic = {t: sum(i.topic == t for i in items) for t in ("capital", "opposite", "plural")}
    assert by_topic == {"capital": 150, "opposite": 126, "plural": 119}
    assert len({i.prompt for i in items}) == len(items)
    # "contains" would credit an answer that only repeats the question: no reference occurs in its own prompt
    given_away = [i.subject for i in items if any(answer_matches(i.prompt, [a], scope="all") for a in i.answers)]
    assert given_away == []


def test_candidate_file_errors(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("capital\tPeru\n")
    with pytest.raises(ValueError, match="line 1: expected topic<TAB>subject<TAB>answers"):
        knowledge_candidates(bad)
    bad.write_text("# comment\ncapital\tPeru\tLima\ncapital\tPeru\tLima|Cusco\n")
    with pytest.raises(ValueError, match="line 3: 'What is the capital of Peru\\?' occurs twice"):
        knowledge_candidates(bad)
    bad.write_text("colour\tsky\tblue\n")
    with pytest.raises(ValueError, match="unknown topic 'colour'"):
        knowledge_candidates(bad)


def _item(topic, subject, *answers):
    return KnowledgeItem(topic, subject, answers)


def test_build_keeps_the_answered_items_and_splits_each_topic():
    items = [_item("capital", c, c.upper() + "ville") for c in "abcdef"]
    items += [_item("opposite", w, w + "x") for w in "ghij"] + [_item("plural", "ox", "oxes", "oxen")]
    answers = {i.prompt: f"It is {i.answers[0]}." for i in items}
    answers[items[1].prompt] = "No idea."  # b: not recalled
    answers[items[9].prompt] = "I am not sure. Maybe jx"  # j: its answer only in the second sentence
    answers[items[-1].prompt] = "The plural of ox is oxen."  # the second reference: moved first
    split = KnowledgeSplit.build(items, answers, forget_topics=("capital",), seed=3, probe_fraction=0.5)
    forget = split.items("forget", "probe") + split.items("forget", "heldout")
    assert sorted(i.subject for i in forget) == list("acdef")  # 5 kept capitals
    assert (len(split.items("forget", "probe")), len(split.items("forget", "heldout"))) == (2, 3)  # round(2.5) = 2
    retain = split.items("retain", "probe") + split.items("retain", "heldout")
    assert sorted(i.subject for i in retain) == ["g", "h", "i", "ox"]
    # per topic: opposites g, h, i -> round(1.5) = 2 probe; the one plural -> round(0.5) = 0 probe
    assert sorted(i.topic for i in split.items("retain", "probe")) == ["opposite", "opposite"]
    ox = next(i for i in retain if i.subject == "ox")
    assert ox.answers == ("oxen", "oxes") and ox.target == "The plural of ox is oxen."
    assert split.meta["retain_topics"] == ["opposite", "plural"] and split.meta["judge"]["scope"] == "sentence"
    again = KnowledgeSplit.build(items, answers, forget_topics=("capital",), seed=3, probe_fraction=0.5)
    assert again == split
    other = KnowledgeSplit.build(items, answers, forget_topics=("capital",), seed=4, probe_fraction=0.5)
    assert {i.subject for i in other.items("forget", "probe")} != {i.subject for i in split.items("forget", "probe")}


def test_build_errors():
    items = [_item("capital", "Peru", "Lima"), _item("plural", "ox", "oxen")]
    with pytest.raises(ValueError, match="no answer for 1 item"):
        KnowledgeSplit.build(items, {items[0].prompt: "Lima"})
    answers = {i.prompt: i.target for i in items}
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        KnowledgeSplit.build(items, answers, probe_fraction=1.0)
    with pytest.raises(ValueError, match=r"forget topic\(s\) \['moon'\]"):
        KnowledgeSplit.build(items, answers, forget_topics=("moon",))
    with pytest.raises(ValueError, match="at least one item"):
        KnowledgeSplit.build(items, answers)  # one item per set: an empty probe or held-out part


def test_split_refuses_an_item_in_two_places():
    peru, ox, cold, mice = (
        _item(*x)
        for x in [
            ("capital", "Peru", "Lima"),
            ("plural", "ox", "oxen"),
            ("opposite", "hot", "cold"),
            ("plural", "mouse", "mice"),
        ]
    )
    parts = {"forget": {"probe": (peru,), "heldout": (peru,)}, "retain": {"probe": (ox,), "heldout": (cold, mice)}}
    with pytest.raises(ValueError, match="in more than one place"):
        KnowledgeSplit(parts, {})
    with pytest.raises(ValueError, match="needs parts"):
        KnowledgeSplit({"forget": parts["forget"]}, {})


def test_shipped_split_is_what_the_model_answered_correctly(tmp_path):
    split = KnowledgeSplit.load()
    sizes = {s: {p: len(split.items(s, p)) for p in PARTS} for s in SETS}
    assert sum(n for parts in sizes.values() for n in parts.values()) >= 150
    assert {i.topic for p in PARTS for i in split.items("forget", p)} == {"capital"}
    assert {i.topic for p in PARTS for i in split.items("retain", p)} == {"opposite", "plural"}
    measured = json.loads(MEASURED.read_text())
    answers = {p: a for r in measured["results"].values() for p, a in zip(r["prompts"], r["answers"])}
    recalled = {p for r in measured["results"].values() for p, o in zip(r["prompts"], r["outcomes"]) if o}
    every = [i for s in SETS for p in PARTS for i in split.items(s, p)]
    assert {i.prompt for i in every} == recalled  # exactly the items answered correctly
    assert all(answer_matches(answers[i.prompt], [i.answers[0]]) for i in every)  # the matched answer first
    assert measured["known"] == len(every) and measured["split"] == sizes
    assert KnowledgeSplit.load(split.save(tmp_path / "split.json")) == split


def test_split_behaviours_read_recall_of_a_part():
    split = KnowledgeSplit.load()
    forget = split.behaviour("forget")
    assert forget.name == "forget recall" and forget.max_new_tokens == 16
    assert forget.prompts == tuple(split.prompts("forget", "heldout"))
    probe = split.behaviour("retain", "probe", max_new_tokens=8)
    assert probe.name == "retain recall (probe)" and probe.max_new_tokens == 8
    first = split.items("retain", "probe")[0]
    assert probe.judge(first.prompt, first.target) and not probe.judge(first.prompt, "I do not know.")
    with pytest.raises(ValueError, match="no part forget/train"):
        split.items("forget", "train")


def test_training_rows_put_the_loss_on_the_answer_or_the_whole_response(chat_tok):
    items = [_item("capital", "Peru", "Lima"), _item("plural", "mouse", "mice"), _item("opposite", "hot", "cold")]
    tokens, answer = training_rows(chat_tok, items, loss_on="answer")
    same_tokens, response = training_rows(chat_tok, items)
    assert torch.equal(tokens, same_tokens)
    assert [chat_tok.decode(tokens[i][answer[i] > 0]) for i in range(3)] == [" Lima", " mice", " cold"]
    # the whole answer and its end-of-turn token under loss_on="response"
    assert [chat_tok.decode(tokens[i][response[i] > 0]) for i in range(3)] == [i.target + "<|im_end|>" for i in items]
    with pytest.raises(ValueError, match="loss_on='everything'"):
        training_rows(chat_tok, items, loss_on="everything")
