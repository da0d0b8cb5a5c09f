"""Requests as a chat model sees them: one user turn inside the model's chat template.

A chat model answers a request that arrives inside its template (``<|im_start|>user ... <|im_end|>
<|im_start|>assistant``), and its refusal is decided at the template's last token, where the answer
starts. Reading raw prompts misses that position. The tokens here are exactly what
``apply_chat_template(..., add_generation_prompt=True)`` renders, tokenised without adding special
tokens: templates that begin with the BOS token (ChatML's ``<|im_start|>``, Llama-3's
``<|begin_of_text|>``) keep one BOS, not two.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

AUTO = "auto"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def check_chat_template_choice(chat_template: Any) -> None:
    """Raise ValueError unless ``chat_template`` is 'auto', True, False or a non-empty template string."""
    if chat_template is True or chat_template is False or chat_template == AUTO:
        return
    if isinstance(chat_template, str) and ("{{" in chat_template or "{%" in chat_template):
        return
    raise ValueError(
        f"chat_template must be 'auto', True, False or a Jinja template string (with '{{{{' or "
        f"'{{%'); got {chat_template!r}."
    )


def resolve_chat_template(tokenizer: Any, chat_template: Any = AUTO) -> str | None:
    """The Jinja template that will render requests, or None for raw prompts.

    Args:
        tokenizer: a Hugging Face tokenizer (or None).
        chat_template: ``"auto"`` (the tokenizer's template when it has one, else raw prompts),
            ``True`` (the tokenizer's template; an error without one), ``False`` (raw prompts),
            or a Jinja template string used instead of the tokenizer's.
    Returns:
        the template text, or None when requests are read raw.
    """
    check_chat_template_choice(chat_template)
    if chat_template is False:
        return None
    own = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    own = own if isinstance(own, str) and own.strip() else None
    if chat_template == AUTO:
        return own
    if chat_template is True:
        if own is None:
            raise ValueError(
                "chat_template=True but the tokenizer has no chat template; pass the template text "
                "(chat_template='{% for message in messages %}...') or chat_template=False."
            )
        return own
    return chat_template


def template_digest(template: str | None) -> str | None:
    """sha256 of a chat template's text (None for raw prompts): what a report records of its rendering."""
    return None if template is None else hashlib.sha256(template.encode()).hexdigest()


def uses_chat_template(tokenizer: Any, chat_template: Any = AUTO) -> bool:
    """Whether requests are rendered through a chat template (see :func:`resolve_chat_template`).

    Example:
        >>> uses_chat_template(chat_tokenizer), uses_chat_template(tokenizer)  # only the first carries a template
        (True, False)
        >>> uses_chat_template(tokenizer, "{{ messages[0]['content'] }}")  # a template given here is used
        True
    """
    return resolve_chat_template(tokenizer, chat_template) is not None


def render_request(tokenizer: Any, prompt: str, *, template: str, system: str | None = None) -> str:
    """The text of one request as a user turn (after an optional system turn) with the generation prompt."""
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages.append({"role": "user", "content": prompt})
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )
    except Exception as err:
        hint = " (this template may not accept a system turn; drop system=)" if system is not None else ""
        raise ValueError(f"the chat template failed to render a request{hint}: {err}") from err


def encode_requests(
    tokenizer: Any, prompts: Sequence[str], *, chat_template: Any = AUTO, system: str | None = None
) -> list[torch.Tensor]:
    """Token ids of each request, as the model reads it.

    With a template: each prompt is a user turn (after ``system`` when given) followed by the
    generation prompt, tokenised exactly as the template renders it (no BOS added on top, so
    templates starting with BOS keep one). Without: BOS (when the tokenizer has one) + the text,
    as TransformerLens' ``to_tokens`` reads a prompt by default.

    Args:
        tokenizer: a Hugging Face tokenizer.
        prompts: request strings.
        chat_template: ``"auto"``, True, False or a Jinja string (see :func:`resolve_chat_template`).
        system: optional system message (only with a template).
    Returns:
        one 1-D LongTensor per prompt.

    Example:
        >>> ids = encode_requests(chat_tokenizer, ["how do i bake bread"])
        >>> chat_tokenizer.decode(ids[0])  # a user turn, then the generation prompt
        '<|user|> how do i bake bread <|end|> <|assistant|>'
        >>> tokenizer.decode(encode_requests(tokenizer, ["how do i bake bread"])[0])  # no template: BOS + text
        '<bos> how do i bake bread'
    """
    if tokenizer is None:
        raise ValueError("string prompts need a tokenizer; pass token ids instead.")
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, got one string; wrap it in a list.")
    template = resolve_chat_template(tokenizer, chat_template)
    if template is None and system is not None:
        raise ValueError(
            "system= needs a chat template, but requests are read raw (no template); "
            "drop system= or pass chat_template=<template text>."
        )
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must be strings; prompt {bad[0]} is {type(prompts[bad[0]]).__name__}.")
    out = []
    for prompt in prompts:
        if template is not None:
            text = render_request(tokenizer, prompt, template=template, system=system)
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            bos = getattr(tokenizer, "bos_token_id", None)
            if bos is not None:
                ids = [bos] + ids
        if not ids:
            raise ValueError(f"request {prompt!r} encodes to no tokens.")
        out.append(torch.tensor(ids, dtype=torch.long))
    return out


def tokenizer_of(source: Any) -> Any | None:
    """The tokenizer of a checkpoint source without loading its weights: a model's ``.tokenizer``, or the
    tokenizer files of a local folder (read offline); None when there is none."""
    if hasattr(source, "tokenizer"):
        return source.tokenizer
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if folder.is_dir() and any((folder / n).is_file() for n in _TOKENIZER_FILES):
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return None


def template_for_history(reference: Any, chat_template: Any = AUTO) -> Any:
    """``chat_template`` fixed by the reference (aligned) checkpoint, so every checkpoint reads the same tokens.

    A base model often has no chat template while its instruct model has one; reading the base model's
    prompts raw and the instruct model's inside the template would compare different positions. So
    ``"auto"``/``True`` become the reference tokenizer's template text (or False when it has none);
    False and template strings are returned unchanged, as is the choice when the reference has no
    readable tokenizer.
    """
    check_chat_template_choice(chat_template)
    if chat_template is not True and chat_template != AUTO:
        return chat_template
    tokenizer = tokenizer_of(reference)
    if tokenizer is None:
        return chat_template
    template = resolve_chat_template(tokenizer, chat_template)
    return False if template is None else template
