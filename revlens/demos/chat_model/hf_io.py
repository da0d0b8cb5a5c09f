"""Hugging Face folders into the demo: a TransformerBridge over a plain HF module (float32), and a plain
HF copy of its current weights for evaluation. Trained bridges are written with core
:func:`revlens.checkpoint_save.save_checkpoint` (a standard HF folder in the model's dtype).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


class HFBridge:
    """A TransformerBridge booted around an HF causal LM, with that module's original parameter names.

    The bridge wraps the module's submodules in place; ``state`` keeps the module's own
    ``state_dict(keep_vars=True)`` taken before, whose tensors are the very parameters training updates,
    so :meth:`to_hf` copies the trained weights under their HF names.
    """

    def __init__(self, folder: str | os.PathLike, device: str | None = None, dtype: torch.dtype = torch.float32):
        from transformer_lens.model_bridge import TransformerBridge
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from revlens import quiet_hf_progress

        self.folder = Path(folder)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
        with quiet_hf_progress():
            module = AutoModelForCausalLM.from_pretrained(str(self.folder), dtype=dtype, local_files_only=True)
        if device is not None:
            module.to(device)
        self.config = module.config
        self.module_class = type(module)
        self.state = module.state_dict(keep_vars=True)
        self.bridge = TransformerBridge.boot_transformers(
            str(self.folder), hf_model=module, tokenizer=self.tokenizer, dtype=dtype, device=device
        ).eval()

    def hf_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.state.items()}

    def to_hf(self) -> Any:
        """A plain HF model with the current weights (copied): ``generate`` on the bridge's wrapped module
        gives wrong answers, so behaviour is evaluated on this."""
        fresh = self.module_class(self.config)
        fresh.load_state_dict({k: v.clone() for k, v in self.hf_state().items()}, strict=True)
        return fresh.to(next(iter(self.state.values())).device).eval()


def load_hf(folder: str | os.PathLike) -> tuple[Any, Any]:
    """(plain HF causal LM in float32, eval mode; its tokenizer) of an HF folder, read offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from revlens import quiet_hf_progress

    with quiet_hf_progress():
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def load_bridge(folder: str | os.PathLike, device: str | None = None) -> Any:
    """:class:`HFBridge` of an HF folder (float32)."""
    return HFBridge(folder, device)
