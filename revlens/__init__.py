"""revlens: measure and control fine-tuning reversion along v_rev in TransformerLens models.

Measure: :func:`analyze` a :class:`History` of checkpoints into a :class:`ReversionReport` (read with a
:class:`ReversionProbe`). Control: fine-tune with :func:`finetune` under :class:`Blocking` hooks and a
:class:`ProbeAnchor` built from a report (:func:`blocking_from_spec`, :func:`anchor_from_report`), watched by a
:class:`ReversionMonitor`. Behaviour: a :class:`Behaviour` (prompts, greedy answers, a judge) measured into a
:class:`BehaviourResult` (harm, fact recall, ...), :func:`harmfulness`, :func:`generate_greedy`, :func:`task_metrics`.

The examples in these docstrings run as doctests (``tests/test_doctests.py``) on a tiny random model: ``ckpts``
is a history folder (``pretrain/ align/ finetune/<run>/step_<N>/``) whose fine-tuning checkpoints moved by planted
vectors at layer 0, ``aligned`` and ``model`` its aligned and one fine-tuned checkpoint, ``prompts`` / ``control``
five probe / control prompts and ``report = revlens.analyze(ckpts, prompts)`` (the namespace: ``conftest.py``).

Example:
    >>> report = revlens.analyze(ckpts, prompts, progress=False)  # or revlens.default_prompts()
    >>> print(report.summary().splitlines()[0])
    revlens report: 2 run(s) x 2 step(s), 2 layer(s) (L0, L1), d_model 16
    >>> report.best_layer, round(float(report.alignment[0, -1, 0]), 3)  # seed_0's last step: 0.6 along v_rev
    (0, 0.6)
"""

from revlens.analysis import analyze
from revlens.behaviour import Behaviour, BehaviourResult, ExactMatchJudge, measure_behaviours
from revlens.benchmark_prompts import MissingDataPackage, PromptSource, harmbench_prompts, load_prompt_source
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
from revlens.defenses import BehaviourSet, defense_grid, defense_rows, train_defense
from revlens.evals import RefusalPhraseJudge, generate_greedy, harmfulness, task_metrics
from revlens.finetune import FinetuneResult, ReversionMonitor, finetune
from revlens.intervention import Blocking, ProbeAnchor, anchor_from_report, blocking_from_report, blocking_from_spec
from revlens.knowledge import KnowledgeItem, KnowledgeSplit, knowledge_candidates
from revlens.penalties import KLAnchor, PenaltySum
from revlens.probe import ProbeResult, ReversionProbe
from revlens.prompts import default_control, default_prompts, load_prompt_file
from revlens.readout import ProbeError
from revlens.replay import ReplayMix
from revlens.report import ReversionReport
from revlens.selection import selection_test
from revlens.stats import Rate, mcnemar_exact, wilson_interval
from revlens.subspace import random_subspace, readout_pca, refusal_direction, reversion_subspace
from revlens.unlearning import UnlearnResult, gradient_difference_loss, npo_loss, unlearn
from revlens.weight_projection import safe_lora_project

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
    # defenses: the field's baselines beside v_rev blocking
    "train_defense",
    "defense_grid",
    "defense_rows",
    "KLAnchor",
    "PenaltySum",
    "ReplayMix",
    "refusal_direction",
    "readout_pca",
    "safe_lora_project",
    # behaviour
    "Behaviour",
    "BehaviourResult",
    "ExactMatchJudge",
    "measure_behaviours",
    "KnowledgeItem",
    "KnowledgeSplit",
    "knowledge_candidates",
    # unlearning: the shallow phase of the second setting
    "unlearn",
    "UnlearnResult",
    "npo_loss",
    "gradient_difference_loss",
    "harmfulness",
    "generate_greedy",
    "RefusalPhraseJudge",
    "task_metrics",
    "BehaviourSet",
    "harmbench_prompts",
    "load_prompt_source",
    "PromptSource",
    "Rate",
    "wilson_interval",
    "mcnemar_exact",
    # errors
    "MissingDataPackage",
    "CheckpointError",
    "ProbeError",
    "InterventionError",
]
__version__ = "0.1.0"
