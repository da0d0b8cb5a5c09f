"""Organism presets: model size and the three phases' schedules."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

SAVE_STEPS = (1, 2, 5, 10, 20, 30, 50, 100)


@dataclass(frozen=True)
class Preset:
    """Everything that defines an organism history (with the world seed and the fine-tuning seeds)."""

    name: str
    d_model: int = 128
    n_layers: int = 3
    d_head: int = 32
    n_ctx: int = 24
    pretrain_steps: int = 800
    pretrain_lr: float = 1e-3
    align_lr: float = 3e-4
    align_max_steps: int = 600
    align_check_every: int = 10
    harm_target: float = 0.05  # stop aligning once held-out harm <= this ...
    b1_floor: float = 0.95  # ... and benign requests are still complied with at least this often
    finetune_steps: int = 100
    finetune_lr: float = 1e-4
    finetune_optimizer: str = "adamw"
    batch_size: int = 32
    finetune_examples: int = 3200
    b1_mix: float = 0.0
    save_steps: tuple[int, ...] = SAVE_STEPS
    block_layers: tuple[int, ...] | None = None  # None: every analysed layer (the demo's default)
    device: str = "cpu"

    def model_config(self, vocab: int, seed: int) -> dict[str, Any]:
        return dict(
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_ctx=self.n_ctx,
            d_head=self.d_head,
            n_heads=self.d_model // self.d_head,
            d_mlp=4 * self.d_model,
            d_vocab=vocab,
            act_fn="gelu",
            normalization_type="LN",
            seed=seed,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def preset_key(recorded: dict[str, Any]) -> dict[str, Any]:
    """A preset as a manifest records it, without the empty ``extra`` field older histories carry."""
    return {k: v for k, v in recorded.items() if not (k == "extra" and not v)}


PRESETS: dict[str, Preset] = {
    "micro": Preset(
        "micro",
        d_model=64,
        n_layers=2,
        pretrain_steps=300,
        align_max_steps=300,
        finetune_steps=20,
        save_steps=(1, 5, 20),
        finetune_examples=640,
    ),
    "tiny": Preset("tiny"),
    "small": Preset("small", d_model=256, n_layers=4, d_head=64, pretrain_steps=2000, pretrain_lr=5e-4, align_lr=1e-4),
    "gpu": Preset(
        "gpu",
        d_model=512,
        n_layers=6,
        d_head=64,
        pretrain_steps=5000,
        pretrain_lr=3e-4,
        align_lr=5e-5,
        batch_size=64,
        finetune_examples=6400,
        device="cuda",
    ),
}


def get_preset(name: str | Preset) -> Preset:
    if isinstance(name, Preset):
        return name
    if name not in PRESETS:
        raise ValueError(f"unknown organism preset {name!r}; choose one of {sorted(PRESETS)}.")
    return PRESETS[name]
