"""revlens: measure and control fine-tuning reversion along v_rev in TransformerLens models.

Measure: :func:`analyze` a :class:`History` of checkpoints into a :class:`ReversionReport` (read with a
:class:`ReversionProbe`). Control: fine-tune with :func:`finetune` under :class:`Blocking` hooks and a
:class:`ProbeAnchor`, built by :func:`build_defense` from a :class:`BlockingSpec` and the report's
:class:`ReversionDirections` (``report.directions()``), watched by a :class:`ReversionMonitor`.
Behaviour: a :class:`Behaviour` (prompts, greedy answers, a judge) measured into a :class:`BehaviourResult`
(harm, fact recall, ...), :func:`harmfulness`, :func:`generate_greedy`, :func:`task_metrics`.

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

from revlens._util import DiskFullError, atomic_write_json, replace_dir, temp_sibling, training_mode
from revlens.analysis import analyze
from revlens.anchor import ProbeAnchor
from revlens.behaviour import Behaviour, BehaviourResult, ExactMatchJudge, measure_behaviours
from revlens.benchmark_prompts import (
    MissingDataPackage,
    PromptSource,
    harmbench_prompts,
    harmless_eval_prompts,
    load_prompt_source,
)
from revlens.blocking import Blocking, Defense, build_defense
from revlens.blocking_spec import BlockingSpec, InterventionError
from revlens.chat import encode_requests
from revlens.checkpoint_format import CheckpointError, WeightValueError
from revlens.checkpoint_loader import (
    CheckpointLoader,
    CheckpointRef,
    boot_native_model,
    load_checkpoint,
    load_revlens_checkpoint,
    quiet_hf_progress,
)
from revlens.checkpoint_save import save_checkpoint
from revlens.config import AnalyzeConfig, FinetuneConfig
from revlens.defense_table import defense_table
from revlens.defenses import (
    BehaviourSet,
    behaviour_outcomes,
    defense_grid,
    defense_rows,
    project_update,
    train_defense,
    write_answers,
)
from revlens.directions import alignment, drift, roundoff_floor, v_rev_mean_diff
from revlens.distributed import DistributedError
from revlens.evals import RefusalPhraseJudge, generate_greedy, greedy_completions, harmfulness, task_metrics
from revlens.finetune import (
    FinetuneResult,
    FinetuneStateError,
    NonFiniteLossError,
    ReversionMonitor,
    RunLockedError,
    finetune,
    make_optimizer,
)
from revlens.finetune_cli import parse_layers
from revlens.history import History
from revlens.integrations.hf_hooks import HookError
from revlens.jobpool import JobFailed, JobPool, default_workers
from revlens.knowledge import KnowledgeItem, KnowledgeSplit, knowledge_candidates
from revlens.losses import masked_lm_loss, model_lm_loss, takes_logits_to_keep
from revlens.metric_labels import metric_labels, table_labels
from revlens.model_sources import (
    MODEL_SOURCES,
    GGUFError,
    ModelNotFoundError,
    ModelSource,
    conversion_folder,
    ensure_model,
    save_hf_model,
)
from revlens.paper import comparison_rows, comparison_table
from revlens.penalties import KLAnchor, PenaltySum
from revlens.probe import ProbeResult, ReversionProbe
from revlens.prompts import default_control, default_prompts, load_prompt_file
from revlens.readout import ProbeError
from revlens.replay import ReplayMix
from revlens.report import ReversionReport, fmt_pm
from revlens.reversion_directions import ReversionDirections
from revlens.selection import selection_test
from revlens.stats import Rate, mcnemar_exact, wilson_interval
from revlens.subspace import (
    random_subspace,
    readout_pca,
    refusal_direction,
    reversion_subspace,
    subspace_directions,
)
from revlens.unlearning import UnlearnResult, gradient_difference_loss, npo_loss, unlearn
from revlens.weight_projection import safe_lora_project
from revlens.wordtok import word_tokenizer

__all__ = [
    # measure
    "analyze",
    "AnalyzeConfig",
    "History",
    "CheckpointRef",
    "CheckpointLoader",
    "load_checkpoint",
    "save_checkpoint",
    "ReversionProbe",
    "ProbeResult",
    "ReversionReport",
    "ReversionDirections",
    "selection_test",
    "default_prompts",
    "default_control",
    "load_prompt_file",
    "encode_requests",
    # control
    "finetune",
    "FinetuneConfig",
    "FinetuneResult",
    "ReversionMonitor",
    "Blocking",
    "ProbeAnchor",
    "BlockingSpec",
    "build_defense",
    "Defense",
    "reversion_subspace",
    "random_subspace",
    "subspace_directions",
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
    # real models from offline sources
    "ensure_model",
    "conversion_folder",
    "save_hf_model",
    "ModelSource",
    "MODEL_SOURCES",
    "Rate",
    "wilson_interval",
    "mcnemar_exact",
    # errors (each names the problem and the fix; `revlens` prints it as one line and exits 2)
    "CheckpointError",
    "WeightValueError",
    "ProbeError",
    "InterventionError",
    "HookError",
    "FinetuneStateError",
    "RunLockedError",
    "NonFiniteLossError",
    "JobFailed",
    "DistributedError",
    "DiskFullError",
    "MissingDataPackage",
    "ModelNotFoundError",
    "GGUFError",
    # building blocks of pipelines like the demos (revlens.demos use only the names of this list)
    "drift",
    "alignment",
    "roundoff_floor",
    "v_rev_mean_diff",
    "make_optimizer",
    "masked_lm_loss",
    "model_lm_loss",
    "takes_logits_to_keep",
    "greedy_completions",
    "harmless_eval_prompts",
    "behaviour_outcomes",
    "write_answers",
    "project_update",
    "defense_table",
    "comparison_rows",
    "comparison_table",
    "fmt_pm",
    "boot_native_model",
    "load_revlens_checkpoint",
    "quiet_hf_progress",
    "word_tokenizer",
    "parse_layers",
    "JobPool",
    "default_workers",
    "atomic_write_json",
    "replace_dir",
    "temp_sibling",
    "training_mode",
    "metric_labels",
    "table_labels",
]
__version__ = "0.1.0"
