"""The model organism: a small transformer trained from scratch on a synthetic chat world whose
pretrain -> align -> benign fine-tune history reverts, with an exact harmfulness judge."""

from revlens.demos.organism.presets import PRESETS, Preset, get_preset
from revlens.demos.organism.train import analysis_kwargs, behaviour_summary, build_history, evaluate_behaviour
from revlens.demos.organism.world import World

__all__ = [
    "PRESETS",
    "Preset",
    "World",
    "analysis_kwargs",
    "behaviour_summary",
    "build_history",
    "evaluate_behaviour",
    "get_preset",
]
