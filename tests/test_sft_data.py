"""SFT data: JSONL conversations -> chat-templated tokens with the loss on exactly the response tokens."""

from __future__ import annotations

import json

import pytest

from revlens.sft_data import encode_sft, load_sft_jsonl, read_jsonl


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def masked_text(tok, data, i):
    n = int(data.lengths[i])
    ids = data.tokens[i, :n]
    return tok.decode(ids[data.loss_mask[i, :n].bool()].tolist())


def test_mask_covers_exactly_the_response_and_its_end_of_turn(chat_tok, tmp_path):
    records = [
        {"prompt": "how do i bake a cake", "response": "give me a recipe for bread"},
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "what is two plus three"},
                {"role": "assistant", "content": "five"},
                {"role": "user", "content": "and the sea?"},
                {"role": "assistant", "content": "sure, here is how"},
            ]
        },
    ]
    data = load_sft_jsonl(write_jsonl(tmp_path / "train.jsonl", records), chat_tok)
    assert data.chat_template and data.tokens.shape[0] == 2
    eot = chat_tok.eos_token  # <|im_end|>
    # Independent check: decoding the masked tokens gives the assistant text and its end-of-turn marker.
    assert masked_text(chat_tok, data, 0) == "give me a recipe for bread" + eot
    assert masked_text(chat_tok, data, 1) == "five" + eot + "sure, here is how" + eot
    # The tokens are the template's rendering, with one BOS (the template's own), right-padded.
    for i, rec in enumerate(records):
        messages = rec.get("messages") or [
            {"role": "user", "content": rec["prompt"]},
            {"role": "assistant", "content": rec["response"]},
        ]
        text = chat_tok.apply_chat_template(messages, tokenize=False)
        n = int(data.lengths[i])
        assert chat_tok.decode(data.tokens[i, :n].tolist()) == text
        assert data.tokens[i, :2].tolist().count(chat_tok.bos_token_id) == 1
        assert (data.tokens[i, n:] == data.pad_id).all() and not data.loss_mask[i, n:].any()


def test_without_a_template_the_text_is_prompt_then_response(chat_tok):
    data = encode_sft(
        chat_tok,
        [[{"role": "user", "content": "what is two plus three"}, {"role": "assistant", "content": " five"}]],
        chat_template=False,
    )
    assert not data.chat_template
    n = int(data.lengths[0])
    assert chat_tok.decode(data.tokens[0, :n].tolist()) == "what is two plus three five" + chat_tok.eos_token
    assert masked_text(chat_tok, data, 0) == " five" + chat_tok.eos_token


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "hi", "response": "yo"', "line 2: not valid JSON"),
        ('{"text": "hi"}', "line 2: a record needs 'messages'"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "line 2: the last message must be the assistant"),
        ('{"messages": [{"role": "robot", "content": "hi"}]}', "line 2: message 0 must be"),
        ('{"prompt": "hi", "response": 3}', "line 2: 'prompt' and 'response' must both be strings"),
        ("[1, 2]", "line 2: expected a JSON object"),
    ],
)
def test_bad_jsonl_names_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        read_jsonl(path)


def test_missing_empty_and_too_long_data_are_clear_errors(chat_tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no conversations"):
        read_jsonl(tmp_path / "empty.jsonl")
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "how do i make a bomb " * 5, "response": "no"}])
    with pytest.raises(ValueError, match="record 1: .* more than max_length=8"):
        load_sft_jsonl(path, chat_tok, max_length=8)
