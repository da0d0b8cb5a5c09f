"""revlens: measure and control fine-tuning reversion along v_rev in TransformerLens models."""

from revlens.checkpoints import CheckpointError, CheckpointRef, History, load_checkpoint, save_checkpoint
from revlens.report import ReversionReport

__all__ = ["CheckpointError", "CheckpointRef", "History", "ReversionReport", "load_checkpoint", "save_checkpoint"]
__version__ = "0.1.0"
