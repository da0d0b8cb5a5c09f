"""Supervised fine-tuning data: a JSONL file of conversations -> right-padded tokens and a response-only loss mask.

Each line is ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}``
or ``{"prompt": ..., "response": ...}`` (read as one user turn and one assistant turn). With a chat template
the conversation is rendered by the tokenizer (``apply_chat_template(..., tokenize=False)``) and tokenized
without adding special tokens (the template already holds BOS). The loss covers exactly the assistant turns:
each turn's tokens are found by rendering the conversation up to the turn with the generation prompt and up
to its end, and comparing the token prefixes; the turn's span ends at its end-of-turn token (the
tokenizer's EOS) when the template writes one, so the newline after it is not trained on. Without a
template, the tokens are the model's usual ``BOS + prompt`` followed by ``response + EOS``, with the loss on
``response + EOS``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from revlens._util import pad_right

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class SFTData:
    """``tokens`` ``[n, seq]`` (right-padded with ``pad_id``), ``loss_mask`` ``[n, seq]`` (1.0 on response
    tokens), ``lengths`` ``[n]``, and whether the chat template was used."""

    tokens: torch.Tensor
    loss_mask: torch.Tensor
    lengths: torch.Tensor
    pad_id: int
    chat_template: bool


def _conversation(obj: Any, where: str) -> list[dict[str, str]]:
    """One JSONL record as a list of ``{"role", "content"}`` messages ending with an assistant turn."""
    if not isinstance(obj, dict):
        raise ValueError(
            f"{where}: expected a JSON object with 'messages' or 'prompt'/'response', got {type(obj).__name__}."
        )
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role': ..., 'content': ...}}.")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
                raise ValueError(
                    f"{where}: message {i} must be {{'role': one of {ROLES}, 'content': a string}}, "
                    f"got {json.dumps(m)[:120]}."
                )
            out.append({"role": m["role"], "content": m["content"]})
    elif "prompt" in obj or "response" in obj:
        if not isinstance(obj.get("prompt"), str) or not isinstance(obj.get("response"), str):
            raise ValueError(f"{where}: 'prompt' and 'response' must both be strings.")
        out = [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["response"]}]
    else:
        raise ValueError(
            f"{where}: a record needs 'messages' (chat) or 'prompt' and 'response'; got keys {sorted(obj)}."
        )
    if out[-1]["role"] != "assistant":
        raise ValueError(
            f"{where}: the last message must be the assistant's (the response to train on), "
            f"got role {out[-1]['role']!r}."
        )
    return out


def read_jsonl(path: str | os.PathLike) -> list[list[dict[str, str]]]:
    """The conversations of a JSONL file (blank lines skipped); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"training data {path} not found"
            + (" (it is a folder)" if path.is_dir() else "")
            + "; give a .jsonl file with one conversation per line."
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err}); give a .jsonl file.") from err
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg} at column {err.colno}).") from err
        out.append(_conversation(obj, f"{path}, line {number}"))
    if not out:
        raise ValueError(f"{path} holds no conversations; write one JSON object per line.")
    return out


def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _templated(tokenizer: Any, messages: list[dict[str, str]], where: str) -> tuple[list[int], list[float]]:
    full = _ids(tokenizer, _render(tokenizer, messages, False), False)
    mask = [0.0] * len(full)
    eos = tokenizer.eos_token_id
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _ids(tokenizer, _render(tokenizer, messages[:i], True), False) if i else []
        through = _ids(tokenizer, _render(tokenizer, messages[: i + 1], False), False)
        if full[: len(before)] != before or full[: len(through)] != through or len(through) <= len(before):
            if i == len(messages) - 1:
                raise ValueError(
                    f"{where}: the chat template does not render the conversation as a continuation "
                    "of its prompt, so the response tokens cannot be found; use a template that "
                    "renders turns incrementally, or prompt/response pairs without a template."
                )
            warnings.warn(
                f"{where}: the chat template renders assistant turn {i} differently inside the full "
                "conversation; the loss skips that turn.",
                RuntimeWarning,
                stacklevel=3,
            )
            continue
        span = list(range(len(before), len(through)))
        ends = [j for j in span if full[j] == eos]
        for j in span[: span.index(ends[-1]) + 1] if ends else span:
            mask[j] = 1.0
    return full, mask


def _raw(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[float]]:
    prompt = "\n".join(m["content"] for m in messages[:-1])
    head = _ids(tokenizer, prompt, True)
    tail = _ids(tokenizer, messages[-1]["content"], False)
    if tokenizer.eos_token_id is not None:
        tail.append(tokenizer.eos_token_id)
    return head + tail, [0.0] * len(head) + [1.0] * len(tail)


def encode_sft(
    tokenizer: Any,
    conversations: Sequence[list[dict[str, str]]],
    *,
    chat_template: Any = "auto",
    max_length: int | None = None,
    source: str = "data",
) -> SFTData:
    """Tokenize conversations (each ending with an assistant turn) into right-padded tokens and a loss mask.

    Args:
        tokenizer: a Hugging Face tokenizer (the model's).
        conversations: lists of ``{"role", "content"}`` messages (:func:`read_jsonl` gives them).
        chat_template: ``"auto"`` (use the tokenizer's template when it has one), ``True`` or ``False``.
        max_length: refuse (naming the record) conversations longer than this many tokens.
    Returns:
        :class:`SFTData`; the mask is 1.0 on the assistant turns' tokens (through their end-of-turn token).

    Example:
        >>> chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
        >>> data = encode_sft(chat_tokenizer, [chat])  # rendered by the tokenizer's chat template
        >>> chat_tokenizer.convert_ids_to_tokens(data.tokens[0].tolist())
        ['<|user|>', 'hi', '<|end|>', '<|assistant|>', 'hello', '<|end|>']
        >>> data.loss_mask[0].tolist()  # the assistant's answer through its end-of-turn token
        [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    use = has_template if chat_template == "auto" else bool(chat_template)
    if use and not has_template:
        raise ValueError(
            "chat_template=True but the tokenizer has no chat template; pass chat_template=False "
            "to train on raw prompt + response text."
        )
    if not conversations:
        raise ValueError(f"{source} holds no conversations.")
    rows, masks = [], []
    for number, messages in enumerate(conversations, 1):
        where = f"{source}, record {number}"
        ids, mask = _templated(tokenizer, messages, where) if use else _raw(tokenizer, messages)
        if not any(mask):
            raise ValueError(f"{where}: the response is empty, nothing to train on.")
        if max_length is not None and len(ids) > max_length:
            raise ValueError(
                f"{where}: {len(ids)} tokens, more than max_length={max_length}; shorten it or raise "
                "the limit (CLI: --max-length)."
            )
        rows.append(torch.tensor(ids, dtype=torch.long))
        masks.append(torch.tensor(mask))
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    tokens, lengths = pad_right(rows, pad_id)
    loss_mask = torch.zeros(tokens.shape)
    for i, m in enumerate(masks):
        loss_mask[i, : len(m)] = m
    return SFTData(tokens, loss_mask, lengths, int(pad_id), use)


def load_sft_jsonl(
    path: str | os.PathLike, tokenizer: Any, *, chat_template: Any = "auto", max_length: int | None = None
) -> SFTData:
    """:func:`read_jsonl` then :func:`encode_sft`: a JSONL training file ready for :func:`revlens.finetune.finetune`.

    Example:
        >>> path = tmp / "sft" / "train.jsonl"
        >>> path.parent.mkdir(exist_ok=True)
        >>> _ = path.write_text('{"prompt": "how do i bake bread", "response": "sure"}\\n')
        >>> student = revlens.load_checkpoint(f"{ckpts}/align")
        >>> data = load_sft_jsonl(path, student.tokenizer)  # no chat template: BOS + prompt, response + EOS
        >>> data.loss_mask.tolist()
        [[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0]]
        >>> result = revlens.finetune(student, data.tokens, data.loss_mask, steps=2, lr=1e-3, progress=False)
        >>> sorted(result.losses)
        [1, 2]
    """
    return encode_sft(tokenizer, read_jsonl(path), chat_template=chat_template, max_length=max_length, source=str(path))
