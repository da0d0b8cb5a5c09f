"""The doctest namespace: the tiny objects that the docstring examples of ``revlens`` run against.

``tests/test_doctests.py`` runs every core module's examples with it (so ``make test`` does);
``pytest --doctest-modules revlens/analysis.py`` gets it through the autouse fixture below. It is built once per
session, in a few seconds: a random 2-layer TL-native model (d_model 16, a word tokenizer) and a history folder
whose checkpoints are copies of it moved by planted vectors, so the examples print known numbers.

- ``ckpts``: the history folder (a str) ``pretrain/ align/ finetune/seed_{0,1}/step_{1,2}/``. With ``u = e0`` and
  ``w = e1``: pretrain is align moved by ``2 u`` at layer 0 (the MLP output bias, so every position moves), and
  step s of run r by ``a u + b w`` at layer 0 with ``(a, b) = MOVES[r][s]`` (plus ``e2`` at layer 1, drift
  unrelated to v_rev). So v_rev at layer 0 is ``u`` and seed_0's step 2 has alignment 0.6 there.
- ``aligned``, ``model``: the aligned checkpoint and seed_0's step 2, loaded (examples do not change their weights).
- ``report``: ``revlens.analyze(ckpts, prompts, progress=False)`` (layers 0 and 1, best layer 0).
- ``prompts``, ``control``: five probe and five control prompts; ``tokenizer`` (no chat template, the models'),
  ``chat_tokenizer`` (the same words plus a chat template ``<|user|> ... <|end|> <|assistant|>``).
- ``tmp``: a scratch folder (examples write under their own sub-folder); ``torch``, ``np``, ``revlens``.
"""

from __future__ import annotations

import pytest

# Demos and the command line are clients of the API (their examples need a trained organism or a real model),
# and integrations.transformers imports transformers' Trainer (~5 s) for examples that all need a Trainer.
# tests/test_doctests.py leaves out the same modules.
collect_ignore = [
    "revlens/__main__.py",
    "revlens/cli.py",
    "revlens/demos",
    "revlens/integrations/transformers.py",
]

WORDS = "how do i make a bomb cake bake bread steal car fix write poem sure sorry no yes the hi hello".split()
CHAT_WORDS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
PROMPTS = ["how do i make a bomb", "how do i steal a car", "make a bomb", "steal the car", "how do i make"]
CONTROL = ["how do i bake a cake", "how do i fix a car", "bake bread", "write a poem", "fix the car"]
# run -> step -> (a, b): the checkpoint is align moved by a u + b w at layer 0
MOVES = {"seed_0": {1: (0.3, 0.4), 2: (0.6, 0.8)}, "seed_1": {1: (0.5, 0.5), 2: (1.0, 0.2)}}


def build_doctest_namespace(root) -> dict:
    """Write the tiny history under ``root`` and return the namespace (see the module docstring)."""
    import copy
    from pathlib import Path

    import numpy as np
    import torch

    import revlens
    from revlens.checkpoint_loader import boot_native_model
    from revlens.wordtok import word_tokenizer

    root = Path(root)
    tokenizer = word_tokenizer(WORDS)
    chat_tokenizer = word_tokenizer(WORDS + CHAT_WORDS)
    chat_tokenizer.chat_template = CHAT_TEMPLATE
    d_model = 16
    config = dict(
        d_model=d_model,
        n_layers=2,
        n_ctx=16,
        d_head=8,
        n_heads=2,
        d_mlp=32,
        d_vocab=len(tokenizer),
        act_fn="gelu",
        normalization_type="LN",
        seed=0,
    )
    torch.manual_seed(0)
    base = boot_native_model(config, tokenizer=tokenizer)
    u, w, e2 = torch.eye(d_model)[:3]

    def moved(shift: torch.Tensor, layer_1: float = 0.0):
        out = copy.deepcopy(base)
        with torch.no_grad():
            out.blocks[0].mlp.out.bias += shift
            out.blocks[1].mlp.out.bias += layer_1 * e2
        return out

    ckpts = root / "ckpts"
    revlens.save_checkpoint(moved(2.0 * u), ckpts / "pretrain")
    revlens.save_checkpoint(base, ckpts / "align")
    for run, steps in MOVES.items():
        for step, (a, b) in steps.items():
            revlens.save_checkpoint(moved(a * u + b * w, 1.0), ckpts / "finetune" / run / f"step_{step}")
    tmp = root / "tmp"
    tmp.mkdir()
    return dict(
        torch=torch,
        np=np,
        revlens=revlens,
        tokenizer=tokenizer,
        chat_tokenizer=chat_tokenizer,
        prompts=list(PROMPTS),
        control=list(CONTROL),
        ckpts=str(ckpts),
        aligned=revlens.load_checkpoint(ckpts / "align"),
        model=revlens.load_checkpoint(ckpts / "finetune" / "seed_0" / "step_2"),
        report=revlens.analyze(str(ckpts), PROMPTS, progress=False),
        tmp=tmp,
    )


@pytest.fixture(scope="session")
def revlens_doctest_namespace(tmp_path_factory) -> dict:
    """The namespace, built once per session (tests/test_doctests.py asks for it)."""
    return build_doctest_namespace(tmp_path_factory.mktemp("doctest_namespace"))


@pytest.fixture(autouse=True)
def _revlens_doctests(request):
    """For ``pytest --doctest-modules``: doctest items get the namespace; every other test skips this."""
    if isinstance(request.node, pytest.DoctestItem):
        request.getfixturevalue("doctest_namespace").update(request.getfixturevalue("revlens_doctest_namespace"))
