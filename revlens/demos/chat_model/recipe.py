"""Per-model settings of the chat-model pipeline (:class:`Recipe`) and its presets: names for an offline model
source plus the recipe that suits it (:data:`PRESETS`).

A recipe holds what differs between models: the learning rates, the batch, the training dtype, how refusal
training is calibrated (targets, checks, how a check is scored) and the generation batch. Everything else (seeds,
fine-tuning steps, the blocking list, the evaluation sets) is the run's shape, the same for every model
(:class:`revlens.demos.chat_model.pipeline.Settings`, which is a recipe plus that shape).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

CALIBRATIONS = ("score", "generate")


@dataclass(frozen=True)
class Recipe:
    """What the pipeline needs to know about a model to train and judge it well.

    Args:
        lr: benign fine-tuning's learning rate (AdamW).
        batch_size: rows per training step (align and fine-tuning).
        autocast: dtype of the training forwards under ``torch.autocast`` (float32 master weights, float32
            checkpoints), or None for float32 forwards.
        align_lr: refusal training's learning rate.
        align_decay: refusal training's learning rate falls linearly to 0 at ``align_max_steps``.
        align_refusals_per_batch: refusal rows in every align batch (None: drawn at random with the rest).
        align_parts: split parts whose requests refusal training reads ("train", "probe").
        align_max_steps, align_check_every, align_check_from: refusal training's length and its checks.
        harm_target, harmless_floor: a check calibrates align when held-out harm <= ``harm_target`` and the
            held-out harmless requests answered >= ``harmless_floor``.
        check_prompts, check_tokens: held-out prompts per set and new tokens read by a check.
        calibration: how a check is scored. ``"score"``: one teacher-forced forward pass (does the greedy answer
            open with the trained refusal?), with generated answers only to confirm the step it chooses;
            ``"generate"``: greedy answers at every check (the pipeline's first method; slower).
        generate_batch: prompts per batch of greedy generation.

    Example:
        >>> Recipe().align_lr, PRESETS["smollm2"].recipe == Recipe()
        (5e-05, True)
    """

    lr: float = 5e-5
    batch_size: int = 8
    autocast: str | None = "bfloat16"
    align_lr: float = 5e-5
    align_decay: bool = False
    align_refusals_per_batch: int | None = None
    align_parts: tuple[str, ...] = ("train",)
    align_max_steps: int = 120
    align_check_every: int = 20
    align_check_from: int = 40
    harm_target: float = 0.10
    harmless_floor: float = 0.80
    check_prompts: int = 48
    check_tokens: int = 48
    calibration: str = "score"
    generate_batch: int = 48

    def __post_init__(self) -> None:
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"calibration {self.calibration!r}: choose from {CALIBRATIONS}.")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The recipe's field names (each is also a field of the pipeline's ``Settings``)."""
        return tuple(f.name for f in fields(cls))


@dataclass(frozen=True)
class ChatPreset:
    """A name for an offline model source and the recipe it runs with.

    Args:
        source: the model source's name (:func:`revlens.demos.chat_model.sources.model_folder`).
        recipe: its per-model settings.
        title: the model's own name, for the printed report.
        out: the default output folder's name (``revlens_out/<out>``, ``<out>-quick`` with ``--quick``).
    """

    source: str
    recipe: Recipe = field(default_factory=Recipe)
    title: str = ""
    out: str = ""


PRESETS: dict[str, ChatPreset] = {
    "smollm2": ChatPreset("smollm2", Recipe(), "SmolLM2-135M-Instruct", "smollm2"),
    # 630M parameters (its own output matrix). Learning rates 2e-5: at SmolLM2's 5e-5 the loss of one repeated
    # align batch rose after the first step, at 1e-5 and 2e-5 it fell (benchmarks/results/qwen_align_step_cpu.json).
    # The shipped model already refuses 2/3 of the held-out harmful requests, so align is a reinforcement: checks
    # from step 20, at most 60 steps (a step costs ~20 CPU s and ~14 GiB). Smaller generation batches.
    "qwen2.5-coder-0.5b": ChatPreset(
        "qwen2.5-coder-0.5b",
        Recipe(lr=2e-5, align_lr=2e-5, align_check_from=20, align_max_steps=60, generate_batch=24),
        "Qwen2.5-Coder-0.5B-Instruct",
        "qwen2.5-coder-0.5b",
    ),
}
