"""Bad checkpoint folders give a CheckpointError that names the problem and the fix (issue 9 item 11)."""

from __future__ import annotations

import json

import pytest
import torch

from revlens.checkpoint_format import CheckpointError
from revlens.checkpoint_loader import load_checkpoint
from revlens.checkpoint_save import save_checkpoint

from conftest import PROMPTS
from hf_models import save_tiny_llama, tiny_llama


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _edit_config(folder, edit):
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_revlens_config_without_bridge_config(tiny_model, tmp_path):
    save_checkpoint(tiny_model, tmp_path / "c")
    _edit_config(tmp_path / "c", lambda cfg: cfg.pop("bridge_config"))
    with pytest.raises(CheckpointError, match=r"no bridge_config .* revlens.save_checkpoint"):
        load_checkpoint(tmp_path / "c")
    _edit_config(tmp_path / "c", lambda cfg: cfg.pop("revlens_format"))
    with pytest.raises(CheckpointError, match="neither model_type"):
        load_checkpoint(tmp_path / "c")


def test_d_mlp_disagreeing_with_the_weights(tiny_model, tmp_path):
    save_checkpoint(tiny_model, tmp_path / "c")
    _edit_config(tmp_path / "c", lambda cfg: cfg["bridge_config"].update(d_mlp=48))
    with pytest.raises(CheckpointError, match=r"does not match its config.json .*shape mismatch.*d_mlp"):
        load_checkpoint(tmp_path / "c")


def test_hf_intermediate_size_disagreeing_with_the_weights(tmp_path, chat_tok):
    folder = save_tiny_llama(tmp_path / "m", chat_tok)
    _edit_config(folder, lambda cfg: cfg.update(intermediate_size=48))
    with pytest.raises(CheckpointError, match=r"could not load .*config.json matches the weights"):
        load_checkpoint(folder, device="cpu")


def _bin_folder(tmp_path, chat_tok):
    """An HF folder whose weights are a plain-tensor pytorch_model.bin (loadable with weights_only=True)."""
    model = tiny_llama(chat_tok, seed=2)
    folder = save_tiny_llama(tmp_path / "bin", chat_tok, model=model)
    (folder / "model.safetensors").unlink()
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, folder / "pytorch_model.bin")
    return folder, model


def test_plain_tensor_bin_loads_and_truncated_or_empty_bin_is_clear(tmp_path, chat_tok):
    folder, model = _bin_folder(tmp_path, chat_tok)
    bridge = load_checkpoint(folder, device="cpu")
    assert next(bridge.parameters()).dtype == torch.bfloat16
    layer = bridge.original_model.model.layers[1].mlp.down_proj
    torch.testing.assert_close(layer.weight, model.model.layers[1].mlp.down_proj.weight, atol=0, rtol=0)
    weights = folder / "pytorch_model.bin"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(folder)
    weights.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty \(zero bytes\)"):
        load_checkpoint(folder)


def test_pickled_objects_are_refused_without_suggesting_weights_only_false(tmp_path, tiny_model, chat_tok):
    marker = tmp_path / "UNPICKLED"
    folder, _ = _bin_folder(tmp_path, chat_tok)
    torch.save({"model.embed_tokens.weight": _Evil(marker)}, folder / "pytorch_model.bin")
    save_checkpoint(tiny_model, tmp_path / "native")
    (tmp_path / "native" / "model.safetensors").unlink()
    torch.save({"x": _Evil(marker)}, tmp_path / "native" / "model.pt")
    for target in (folder, tmp_path / "native"):
        with pytest.raises(CheckpointError, match=r"refuses to load it.*safetensors") as err:
            load_checkpoint(target)
        assert "weights_only=False" not in str(err.value)
    assert not marker.exists()


def test_truncated_safetensors_shard_is_named(tmp_path, chat_tok):
    folder = save_tiny_llama(tmp_path / "m", chat_tok)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"model.safetensors is corrupt or truncated"):
        load_checkpoint(folder)
    weights.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"model.safetensors is corrupt or truncated"):
        load_checkpoint(folder)


def test_native_checkpoint_still_reads_prompts(tiny_model, tmp_path):
    save_checkpoint(tiny_model, tmp_path / "c")
    loaded = load_checkpoint(tmp_path / "c", dtype="bfloat16")
    assert next(loaded.parameters()).dtype == torch.bfloat16
    assert loaded.to_tokens(PROMPTS[0]).shape[1] > 1
