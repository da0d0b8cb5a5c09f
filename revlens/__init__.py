"""revlens: measure and control fine-tuning reversion along v_rev in TransformerLens models."""

from revlens.analysis import analyze, default_control, default_prompts
from revlens.blocking_spec import BlockingSpec
from revlens.checkpoints import CheckpointError, CheckpointRef, History, load_checkpoint, save_checkpoint
from revlens.finetune import ReversionMonitor, finetune
from revlens.intervention import Blocking, ProbeAnchor, anchor_from_report, blocking_from_report, blocking_from_spec
from revlens.probe import ProbeError, ReversionProbe
from revlens.report import ReversionReport

__all__ = [
    "Blocking", "BlockingSpec", "CheckpointError", "ProbeAnchor", "anchor_from_report", "blocking_from_report",
    "blocking_from_spec", "CheckpointRef", "History", "ProbeError", "ReversionMonitor", "ReversionProbe",
    "ReversionReport", "analyze", "default_control", "default_prompts", "finetune", "load_checkpoint",
    "save_checkpoint",
]
__version__ = "0.1.0"
