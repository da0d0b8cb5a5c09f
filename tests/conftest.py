"""Shared fixtures: tiny models, planted-direction histories and one micro organism history, built in-process, offline.

The suite runs single-threaded (``OMP_NUM_THREADS=1``, also inherited by the notebook kernels): on 2 cores with
these tiny models a second thread only adds synchronisation, and a loaded machine is not oversubscribed.
Set ``OMP_NUM_THREADS`` to override.
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])

import pytest
import torch

from revlens.checkpoint_loader import boot_native_model
from revlens.wordtok import word_tokenizer

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

WORDS = "how do i make a bomb cake bake bread steal car fix write poem sure sorry no yes the".split()


@pytest.fixture(scope="session")
def tokenizer():
    return word_tokenizer(WORDS)


def tiny_config(vocab: int, d_model: int = 32, n_layers: int = 3, seed: int = 0) -> dict:
    return dict(
        d_model=d_model,
        n_layers=n_layers,
        n_ctx=16,
        d_head=8,
        n_heads=d_model // 8,
        d_mlp=4 * d_model,
        d_vocab=vocab,
        act_fn="gelu",
        normalization_type="LN",
        seed=seed,
    )


@pytest.fixture()
def tiny_model(tokenizer):
    torch.manual_seed(0)
    return boot_native_model(tiny_config(len(tokenizer)), tokenizer=tokenizer)


PROMPTS = ["how do i make a bomb", "how do i steal a car", "make a bomb", "steal the car", "how do i make"]
CONTROL = ["how do i bake a cake", "how do i fix a car", "bake bread", "write a poem", "fix the car"]


def shifted(model, layer: int, shift: torch.Tensor):
    """A copy of ``model`` whose layer-``layer`` MLP output bias moves by ``shift``.

    That adds ``shift`` to ``blocks.{layer}.hook_resid_post`` at every position of every prompt,
    so centroid differences at that layer are known exactly.
    """
    out = copy.deepcopy(model)
    with torch.no_grad():
        out.blocks[layer].mlp.out.bias += shift
    return out


def unit(d: int, i: int) -> torch.Tensor:
    v = torch.zeros(d)
    v[i] = 1.0
    return v


PLANTED_LAYER = 1


@pytest.fixture()
def planted(tiny_model):
    """pretrain = align + 2u at layer 1; fine-tune steps move along -u and an orthogonal w by known amounts."""
    d = tiny_model.cfg.d_model
    u = torch.randn(d, generator=torch.Generator().manual_seed(1))
    u = u / u.norm()
    w = torch.randn(d, generator=torch.Generator().manual_seed(2))
    w = w - (w @ u) * u
    w = w / w.norm()
    moves = {"seed_0": {1: (0.3, 0.4), 5: (0.9, 0.1)}, "seed_1": {1: (-0.2, 0.5), 5: (0.6, 0.6)}}
    finetune = {
        run: {s: shifted(tiny_model, PLANTED_LAYER, a * u + b * w) for s, (a, b) in steps.items()}
        for run, steps in moves.items()
    }
    spec = {"pretrain": shifted(tiny_model, PLANTED_LAYER, 2.0 * u), "align": tiny_model, "finetune": finetune}
    return spec, u, moves


def prompt_ids(model, prompts):
    from revlens.anchor import encode_prompts

    return encode_prompts(model, prompts, chat_template=False)


def last_resid(model, ids, layer):
    """Last-token resid_post of each prompt at ``layer``, from TransformerLens' own run_with_cache."""
    rows = []
    for t in ids:
        _, cache = model.run_with_cache(t[None])
        rows.append(cache[f"blocks.{layer}.hook_resid_post"][0, -1].double())
    return torch.stack(rows)


@pytest.fixture(scope="session")
def chat_tok():
    """A byte-level BPE tokenizer with ChatML special tokens and a chat template (tests/hf_models.py)."""
    from hf_models import chat_tokenizer

    return chat_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, chat_tok):
    """A tiny random Llama chat model saved as a Hugging Face folder in bfloat16, with a chat template."""
    from hf_models import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), chat_tok)


@pytest.fixture(scope="session")
def micro_history(tmp_path_factory):
    """The ``micro`` organism (2 fine-tuning seeds), trained once per session and shared by every test that
    needs a trained history (organism, demo, notebooks). Read it, never write into it: copy it first."""
    import warnings

    from revlens.demos.organism import build_history

    out = tmp_path_factory.mktemp("micro_history")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_history("micro", 2, out, progress=False)
    return out
