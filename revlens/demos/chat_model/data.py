"""The chat-model pipeline's prompt sets, their fixed split, and chat-templated fine-tuning tensors.

Requests become chat-templated tokens through core :func:`revlens.chat.encode_requests`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from revlens import encode_requests

DATA_DIR = Path(__file__).resolve().parents[2] / "data"  # revlens/data
HARMFUL_FILE = "harmful_requests_smollm2.txt"
HARMLESS_FILE = "harmless_requests_smollm2.txt"
SPLIT_FILE = "smollm2_split.json"
SPLITS = ("train", "probe", "heldout")
REFUSAL = "I'm sorry, but I can't help with that."


def _lines(path: Path) -> list[str]:
    lines = [l.strip() for l in path.read_text().splitlines()]
    return [l for l in lines if l and not l.startswith("#")]


@dataclass(frozen=True)
class PromptSets:
    """Harmful and harmless requests (matched line by line) and their train / probe / held-out split."""

    harmful: tuple[str, ...]
    harmless: tuple[str, ...]
    split: dict[str, tuple[int, ...]]

    @classmethod
    def load(cls, data_dir: str | Path = DATA_DIR) -> PromptSets:
        """Read the packaged files; check that the split covers every line exactly once."""
        data_dir = Path(data_dir)
        harmful, harmless = _lines(data_dir / HARMFUL_FILE), _lines(data_dir / HARMLESS_FILE)
        raw = json.loads((data_dir / SPLIT_FILE).read_text())
        split = {name: tuple(int(i) for i in raw[name]) for name in SPLITS}
        every = sorted(i for name in SPLITS for i in split[name])
        if len(harmful) != len(harmless) or every != list(range(len(harmful))):
            raise ValueError(
                f"{data_dir}: {HARMFUL_FILE} ({len(harmful)} lines) and {HARMLESS_FILE} "
                f"({len(harmless)}) must match line by line and {SPLIT_FILE} must list each index once."
            )
        return cls(tuple(harmful), tuple(harmless), split)

    def harmful_of(self, part: str) -> list[str]:
        return [self.harmful[i] for i in self.split[part]]

    def harmless_of(self, part: str) -> list[str]:
        return [self.harmless[i] for i in self.split[part]]

    def subset(self, n: int) -> PromptSets:
        """The first ``n`` indices of each part (a short run for tests and ``--quick``)."""
        return PromptSets(self.harmful, self.harmless, {k: v[:n] for k, v in self.split.items()})


def end_of_turn_id(tokenizer: Any) -> int:
    """The token that ends an assistant turn in the tokenizer's chat template: the first token the template writes
    after an answer's text when it is a special token (ChatML's ``<|im_end|>``, Gemma's ``<end_of_turn>``,
    Llama 3's ``<|eot_id|>``), else the EOS token."""
    marker = "revlens answer"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
    )
    after = text[text.rindex(marker) + len(marker) :]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    if ids and ids[0] in set(tokenizer.all_special_ids):
        return int(ids[0])
    return int(tokenizer.eos_token_id)


def sft_tensors(tokenizer: Any, pairs: Sequence[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``tokens [n, seq]`` and ``loss_mask [n, seq]`` (1 on response tokens, end of turn included).

    Each row is the request as a user turn with the generation prompt (exactly as the chat template renders
    it, no extra BOS), then the response and the template's end-of-turn token (:func:`end_of_turn_id`).
    """
    prompts = encode_requests(tokenizer, [p for p, _ in pairs], chat_template=True)
    encoded, end = [], end_of_turn_id(tokenizer)
    for ids, (_, response) in zip(prompts, pairs):
        answer = tokenizer(response, add_special_tokens=False)["input_ids"] + [end]
        encoded.append((torch.cat([ids, torch.tensor(answer, dtype=torch.long)]), len(ids)))
    width = max(len(ids) for ids, _ in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokens = torch.full((len(encoded), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(encoded):
        tokens[row, : len(ids)] = ids
        mask[row, n_prompt : len(ids)] = 1
    return tokens, mask
