"""A GGUF file converted by `revlens.ensure_model`, on a tiny GGUF written here with the `gguf` package (no
download): the converted folder against transformers' own GGUF reader and the tensor as written. The sources' registry
(parts, pins, missing wheels) is tests/test_model_sources.py's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from gguf_models import D, write_tiny_gguf
from hf_models import CHATML_TEMPLATE

gguf = pytest.importorskip("gguf")

from revlens.model_sources import ModelNotFoundError, ensure_model, load_gguf  # noqa: E402


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


def test_converted_folder_matches_gguf_model(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref, ref_tok = load_gguf(tiny_gguf)
    folder = ensure_model(tiny_gguf, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert tok.chat_template == ref_tok.chat_template == CHATML_TEMPLATE
    text = tok.apply_chat_template(
        [{"role": "user", "content": "how do i bake a cake"}], tokenize=False, add_generation_prompt=True
    )
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    assert ids[0].tolist() == ref_tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0, 0].item() == tok.bos_token_id and (ids[0] == tok.bos_token_id).sum() == 3  # no doubled BOS
    with torch.no_grad():
        expected, got = ref(ids).logits, model(ids).logits
    assert model.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # a second call reuses the conversion
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert ensure_model(tiny_gguf, tmp_path / "model") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_embedding_in_gguf_equals_written_tensor(tiny_gguf):
    model, _ = load_gguf(tiny_gguf)
    reader = gguf.GGUFReader(str(tiny_gguf))
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    written = np.asarray(embd.data).reshape(model.config.vocab_size, D)
    np.testing.assert_allclose(model.model.embed_tokens.weight.detach().numpy(), written, rtol=0, atol=0)


def test_foreign_folder_is_not_overwritten(tiny_gguf, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("mine")
    with pytest.raises(ModelNotFoundError, match="not a revlens conversion"):
        ensure_model(tiny_gguf, tmp_path / "m")
