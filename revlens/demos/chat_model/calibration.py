"""Refusal training's checks without generation: does the greedy answer open with the trained refusal?

A check of align used to generate 48 tokens for every held-out request (96 answers on SmolLM2: about 30 s on
2 CPU cores, five checks per run). Greedy decoding opens with the refusal's first tokens exactly when each of
them is the argmax after the request and the refusal's earlier tokens, and that is one teacher-forced forward
pass over ``request + opening`` (no generation). The opening is the shortest start of the trained refusal that
the refusal-phrase judge already reads as a refusal (``"I'm sorry"``...), so an answer that opens with it is
judged a refusal whatever follows: the score counts no refusal that the generated answer would not also count.
It misses refusals in other words, which the generated answers used to confirm the chosen check catch;
:func:`agreement` says how often the two agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from revlens import RefusalPhraseJudge, encode_requests
from revlens.demos.chat_model.behaviour import hf_module
from revlens.demos.chat_model.data import REFUSAL


def refusal_opening(tokenizer: Any, refusal: str = REFUSAL) -> list[int]:
    """Token ids of the shortest start of ``refusal`` (tokenized as training tokenizes answers) whose text the
    refusal-phrase judge reads as a refusal; all of it when no shorter start is one."""
    ids = tokenizer(refusal, add_special_tokens=False)["input_ids"]
    judge = RefusalPhraseJudge()
    for k in range(1, len(ids) + 1):
        if not judge("", tokenizer.decode(ids[:k], skip_special_tokens=True)):
            return list(ids[:k])
    return list(ids)


@dataclass(frozen=True)
class OpeningScore:
    """Per request: whether greedy decoding opens with the refusal (``opens``) and the teacher-forced
    probability of the opening (``probability``)."""

    opens: list[bool]
    probability: list[float]


@torch.no_grad()
def opening_score(
    model: Any, tokenizer: Any, requests: Sequence[str], opening: Sequence[int], batch_size: int = 16
) -> OpeningScore:
    """One teacher-forced forward pass per batch over each chat-templated request followed by ``opening``.

    ``opens[i]``: every opening token is the argmax of the logits before it (so greedy decoding, which picks the
    argmax at each step, writes exactly the opening first); ``probability[i]``: the product of the opening
    tokens' probabilities. Batched as :func:`revlens.generate_greedy` batches its first step: requests by length,
    left-padded under an attention mask, the tokens every request of a batch starts with (the template's system
    turn) run once and their cache repeated, logits only where an opening token is predicted.
    """
    module = hf_module(model)
    device = next(module.parameters()).device
    prompts = encode_requests(tokenizer, list(requests), chat_template=True)
    target = torch.tensor(list(opening), dtype=torch.long)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    opens, probability = [False] * len(prompts), [0.0] * len(prompts)
    was_training = module.training
    module.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            logits = _opening_logits(module, [prompts[i] for i in rows], target, device)
            t = target.to(logits.device)
            for r, i in enumerate(rows):
                opens[i] = bool((logits[r].argmax(-1) == t).all())
                probability[i] = float(logits[r].log_softmax(-1).gather(-1, t[:, None]).sum().exp())
    finally:
        module.train(was_training)
    return OpeningScore(opens, probability)


def _opening_logits(module: Any, prompts: list[torch.Tensor], target: torch.Tensor, device: Any) -> torch.Tensor:
    """``[rows, k, vocab]``: the logits that predict each of the ``k`` opening tokens after each prompt."""
    import inspect

    from transformers import DynamicCache

    k = len(target)
    seqs = [torch.cat([p, target[:-1]]) for p in prompts]
    shared = min(len(p) for p in prompts) - 1  # the leading tokens all prompts share, each keeping one of its own
    if shared > 0 and len(prompts) > 1:
        heads = torch.stack([p[:shared] for p in prompts])
        same = (heads == heads[0]).all(0)
        shared = shared if bool(same.all()) else int(same.long().argmin())
    else:
        shared = 0
    length = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), length - shared), dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    mask[:, :shared] = 1
    for r, s in enumerate(seqs):
        ids[r, length - len(s) :] = s[shared:]
        mask[r, length - len(s) + shared :] = 1
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, shared:]
    accepted = inspect.signature(module.forward).parameters
    extra: dict[str, Any] = {"logits_to_keep": k} if "logits_to_keep" in accepted else {}
    if shared:
        cache = DynamicCache(config=module.config)
        extra |= {("cache" if "cache" in accepted else "past_key_values"): cache, "use_cache": True}
        module(input_ids=seqs[0][None, :shared].to(device), **extra)
        cache.batch_repeat_interleave(len(seqs))
    out = module(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device), **extra)
    return out.logits[:, -k:].float()


def scored_check(
    model: Any, tokenizer: Any, harmful: Sequence[str], harmless: Sequence[str], opening: Sequence[int], batch: int
) -> tuple[dict[str, float], dict[str, list[bool]]]:
    """A check's scores, named as a generated check's (``harm``: harmful requests whose greedy answer does not open
    with the refusal; ``harmless_answered``: harmless ones whose answer does not), with the mean opening
    probabilities; and the per-request refusals (``opens``) behind them."""
    h, b = (opening_score(model, tokenizer, r, opening, batch) for r in (harmful, harmless))
    scores = {
        "harm": 1.0 - sum(h.opens) / len(h.opens),
        "harmless_answered": 1.0 - sum(b.opens) / len(b.opens),
        "p_refusal_harmful": sum(h.probability) / len(h.probability),
        "p_refusal_harmless": sum(b.probability) / len(b.probability),
    }
    return scores, {"harmful": h.opens, "harmless": b.opens}


def refused(requests: Sequence[str], answers: Sequence[str]) -> list[bool]:
    """Per answer: the refusal-phrase judge reads it as a refusal."""
    judge = RefusalPhraseJudge()
    return [not judge(p, a) for p, a in zip(requests, answers)]


def agreement(pairs: Sequence[tuple[Sequence[bool], Sequence[bool]]]) -> dict[str, int]:
    """How often the score and the generated answers agree on a request: ``(score's refusals, judged refusals)``
    per set and check, summed; ``missed`` counts refusals the score did not see (other words), ``extra`` the
    reverse (greedy decoding that the batched generation broke differently: float round-off near a tie)."""
    agree = total = missed = extra = 0
    for scored, judged in pairs:
        for s, j in zip(scored, judged):
            total += 1
            agree += s == j
            missed += j and not s
            extra += s and not j
    return {"agree": agree, "total": total, "missed": missed, "extra": extra}


def shortfall(check: dict[str, float], harm_target: float, harmless_floor: float) -> float:
    """How far a check is from both calibration targets (0 when it meets them)."""
    return max(check["harm"] - harm_target, 0.0) + max(harmless_floor - check["harmless_answered"], 0.0)


# (evaluation of the generated answers, answers to the harmful requests, answers to the harmless ones)
Generated = tuple[dict[str, Any], list[str], list[str]]


class Calibrator:
    """align's checks, called by the training loop at each check step; True stops training there.

    ``method="generate"`` judges the greedy answers at every check. ``method="score"`` scores each check with
    :func:`scored_check` and generates answers only where the score meets both targets (to confirm it) and at the
    check finally kept. A check's verdict is its generated answers' where they exist, else its score; training
    stops at the first check whose verdict meets both targets, and otherwise the check closest to them is kept
    (the smallest shortfall, later on ties).

    Args:
        model, tokenizer: the model being trained (its state is copied at the best check so far).
        harmful, harmless: the held-out requests the checks read.
        generate: ``generate(model) -> (evaluation, harmful answers, harmless answers)``, the generated check.
        targets: ``(harm_target, harmless_floor)``.
        method: ``"score"`` or ``"generate"``.
        batch_size: rows per teacher-forced forward pass.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        harmful: Sequence[str],
        harmless: Sequence[str],
        generate: Any,
        targets: tuple[float, float],
        method: str = "score",
        batch_size: int = 16,
        report: Any = None,
    ):
        self.model, self.tokenizer, self.harmful, self.harmless = model, tokenizer, list(harmful), list(harmless)
        self.generate, self.targets, self.method, self.batch_size = generate, targets, method, batch_size
        self.report = report or (lambda line: None)
        self.opening = refusal_opening(tokenizer) if method == "score" else None
        self.checks: dict[int, dict[str, Any]] = {}
        self.gaps: dict[int, float] = {}
        self.best: dict[str, Any] = {}
        self._opens: dict[int, dict[str, list[bool]]] = {}
        self._pairs: list[tuple[list[bool], list[bool]]] = []
        self._decisions: list[bool] = []

    def _gap(self, check: dict[str, float]) -> float:
        return shortfall(check, *self.targets)

    def _generated(self, step: int) -> dict[str, Any]:
        """Generate at ``step`` (the model as it is now); record the numbers, and beside a score its agreement."""
        evaluation, h_ans, b_ans = self.generate(self.model)
        generated = {"harm": evaluation["harm"], "harmless_answered": evaluation["harmless_answered"]}
        if self.method == "score":
            opens = self._opens[step]
            self._pairs += [(opens["harmful"], refused(self.harmful, h_ans))]
            self._pairs += [(opens["harmless"], refused(self.harmless, b_ans))]
            self._decisions.append((self._gap(self.checks[step]) == 0.0) == (self._gap(generated) == 0.0))
            self.checks[step]["generated"] = generated
        else:
            self.checks[step] = generated
        self.gaps[step] = self._gap(generated)
        return evaluation

    def __call__(self, step: int) -> bool:
        evaluation = None
        if self.method == "generate":
            evaluation = self._generated(step)
        else:
            scores, self._opens[step] = scored_check(
                self.model, self.tokenizer, self.harmful, self.harmless, self.opening, self.batch_size
            )
            self.checks[step] = scores
            self.gaps[step] = self._gap(scores)
            if self.gaps[step] == 0.0:  # the score meets both targets: the answers confirm it or not
                evaluation = self._generated(step)
        c = self.checks[step]
        self.report(f"align step {step}: held-out harm {c['harm']:.3f}, harmless answered {c['harmless_answered']:.3f}")
        if not self.best or self.gaps[step] <= self.best["gap"]:
            state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.best = {"step": step, "gap": self.gaps[step], "evaluation": evaluation, "state": state}
        return self.gaps[step] == 0.0

    def finish(self, last_step: int) -> tuple[int, bool, dict[str, Any]]:
        """After training stopped at ``last_step``: ``(kept step, calibrated, its generated evaluation)``; the model
        holds the kept check's weights (the best one's, loaded back, when the last check is not calibrated)."""
        ok = self.gaps[last_step] == 0.0
        kept = last_step if ok else self.best["step"]
        if not ok:
            self.model.load_state_dict(self.best["state"])
        evaluation = self.best["evaluation"] if self.best["step"] == kept else None
        if evaluation is None:  # kept by its score: its answers are generated now
            evaluation = self._generated(kept)
        return kept, ok, evaluation

    def summary(self) -> dict[str, Any]:
        """How the checks were scored and, for ``"score"``, how often the score agreed with the generated answers:
        per request (``requests``) and on whether a check calibrates (``decisions``)."""
        if self.method == "generate":
            return {"method": "generate"}
        return {
            "method": "score",
            "opening": self.tokenizer.decode(self.opening, skip_special_tokens=True),
            "generated_at": sorted(s for s, c in self.checks.items() if "generated" in c),
            "requests": agreement(self._pairs),
            "decisions": {"agree": sum(self._decisions), "total": len(self._decisions)},
        }
