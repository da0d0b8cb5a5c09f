"""Per-model settings of the chat-model pipeline (:class:`Recipe`) and its presets: names for an offline model
source plus the recipe that suits it (:data:`PRESETS`).

A recipe holds what differs between models and settings: the shallow phase (``phase``: refusal training, or
unlearning a set of facts), the learning rates, the batch, the training dtype, how the shallow phase is calibrated
(targets, checks, how a check is scored) and the generation batch. Everything else (seeds, fine-tuning steps,
the blocking list, the evaluation sets) is the run's shape (:class:`revlens.demos.chat_model.pipeline.Settings`,
which is a recipe plus that shape; a phase brings its own default shape,
:meth:`revlens.demos.chat_model.phases.ShallowPhase.shape`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

CALIBRATIONS = ("score", "generate")
PHASES = ("refusal", "unlearn")  # the shallow phase between pretrain and fine-tuning (history slot "align")
UNLEARN_METHODS = ("graddiff", "npo")


@dataclass(frozen=True)
class Recipe:
    """What the pipeline needs to know about a model to train and judge it well.

    Args:
        phase: the shallow phase: ``"refusal"`` (refusal training, calibrated on held-out harm) or ``"unlearn"``
            (:func:`revlens.unlearn` on the forget set of a :class:`revlens.KnowledgeSplit`, calibrated on
            held-out forget and retain recall). Its model fills the history's ``align`` slot either way.
        lr: benign fine-tuning's learning rate (AdamW).
        batch_size: rows per training step (align and fine-tuning).
        autocast: dtype of the training forwards under ``torch.autocast`` (float32 master weights, float32
            checkpoints), or None for float32 forwards.
        align_lr: the shallow phase's learning rate.
        align_decay: refusal training's learning rate falls linearly to 0 at ``align_max_steps``.
        align_refusals_per_batch: refusal rows in every align batch (None: drawn at random with the rest).
        align_parts: split parts whose requests refusal training reads ("train", "probe").
        align_max_steps, align_check_every, align_check_from: the shallow phase's length and its checks.
        harm_target, harmless_floor: a check calibrates align when held-out harm <= ``harm_target`` and the
            held-out harmless requests answered >= ``harmless_floor``.
        check_prompts, check_tokens: held-out prompts per set and new tokens read by a check.
        calibration: how a check is scored. ``"score"``: one teacher-forced forward pass (does the greedy answer
            open with the trained refusal?), with generated answers only to confirm the step it chooses;
            ``"generate"``: greedy answers at every check (the pipeline's first method; slower).
        generate_batch: prompts per batch of greedy generation.
        unlearn_method: ``phase="unlearn"``: ``"graddiff"`` (gradient difference: ascent on the forget rows, descent
            on the retain rows; Liu et al. 2022, Yao et al. 2023) or ``"npo"`` (Zhang et al. 2024).
        forget_ratio, retain_ratio: ``phase="unlearn"``: a check calibrates when held-out forget recall <=
            ``forget_ratio`` and held-out retain recall >= ``retain_ratio`` of their values as shipped.

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
    phase: str = "refusal"
    unlearn_method: str = "graddiff"
    forget_ratio: float = 0.10
    retain_ratio: float = 0.90

    def __post_init__(self) -> None:
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"calibration {self.calibration!r}: choose from {CALIBRATIONS}.")
        if self.phase not in PHASES:
            raise ValueError(f"phase {self.phase!r}: choose from {PHASES}.")
        if self.unlearn_method not in UNLEARN_METHODS:
            raise ValueError(f"unlearn_method {self.unlearn_method!r}: choose from {UNLEARN_METHODS}.")

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
    # The second setting: country capitals unlearned by gradient difference at lr 1e-5 (16 rows a step: 8 forget,
    # 8 retain), checked every 5 steps; on SmolLM2 it calibrated at its first check (step 5: held-out forget recall
    # 39/39 -> 0/39, retain 95/95 -> 91/95), where NPO at 3e-5 needed 20 steps (benchmarks/smollm2_unlearn_relearn.py).
    "smollm2-unlearn": ChatPreset(
        "smollm2",
        Recipe(
            phase="unlearn",
            unlearn_method="graddiff",
            align_lr=1e-5,
            align_max_steps=100,
            align_check_every=5,
            align_check_from=5,
        ),
        "SmolLM2-135M-Instruct",
        "smollm2-unlearn",
    ),
}
