"""revlens: measure and control fine-tuning reversion along v_rev in TransformerLens models.

Measure: :func:`analyze` a :class:`History` of checkpoints into a :class:`ReversionReport` (read with a
:class:`ReversionProbe`). Control: fine-tune with :func:`finetune` under :class:`Blocking` hooks and a
:class:`ProbeAnchor` built from a report (:func:`blocking_from_spec`, :func:`anchor_from_report`), watched by a
:class:`ReversionMonitor`. Behaviour: :func:`harmfulness`, :func:`generate_greedy`, :func:`task_metrics`.

Example:
    >>> report = revlens.analyze("ckpts/", revlens.default_prompts(),   # doctest: +SKIP
    ...                          control=revlens.default_control())
    >>> print(report.summary())                                         # doctest: +SKIP
"""

from revlens.analysis import analyze
from revlens.blocking_spec import BlockingSpec, InterventionError
from revlens.chat import encode_requests
from revlens.checkpoints import (
    CheckpointError,
    CheckpointLoader,
    CheckpointRef,
    History,
    load_checkpoint,
    save_checkpoint,
)
from revlens.evals import RefusalPhraseJudge, generate_greedy, harmfulness, task_metrics
from revlens.finetune import FinetuneResult, ReversionMonitor, finetune
from revlens.intervention import Blocking, ProbeAnchor, anchor_from_report, blocking_from_report, blocking_from_spec
from revlens.probe import ProbeResult, ReversionProbe
from revlens.prompts import default_control, default_prompts, load_prompt_file
from revlens.readout import ProbeError
from revlens.report import ReversionReport
from revlens.selection import selection_test
from revlens.subspace import random_subspace, reversion_subspace

__all__ = [
    # measure
    "analyze",
    "History",
    "CheckpointRef",
    "CheckpointLoader",
    "load_checkpoint",
    "save_checkpoint",
    "ReversionProbe",
    "ProbeResult",
    "ReversionReport",
    "selection_test",
    "default_prompts",
    "default_control",
    "load_prompt_file",
    "encode_requests",
    # control
    "finetune",
    "FinetuneResult",
    "ReversionMonitor",
    "Blocking",
    "ProbeAnchor",
    "BlockingSpec",
    "blocking_from_report",
    "blocking_from_spec",
    "anchor_from_report",
    "reversion_subspace",
    "random_subspace",
    # behaviour
    "harmfulness",
    "generate_greedy",
    "RefusalPhraseJudge",
    "task_metrics",
    # errors
    "CheckpointError",
    "ProbeError",
    "InterventionError",
]
__version__ = "0.1.0"
