"""The settings of :func:`revlens.analyze` and :func:`revlens.finetune` as dataclasses, :class:`AnalyzeConfig` and
:class:`FinetuneConfig`, and the command-line options built from their fields (so nothing is repeated by hand
between the functions, the CLI and ``report.config``).

Each field carries its help text and, where the command line needs them, its choices and argument type in the
field's ``metadata``; fields marked ``record`` (the settings that change the numbers) go to ``report.config``
(:meth:`AnalyzeConfig.recorded`). :meth:`AnalyzeConfig.from_report_config` reads them back from any report,
older ones included (missing settings take their defaults).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from revlens.blocking_spec import BlockingSpec
from revlens.directions import ESTIMATORS
from revlens.readout import READOUTS

DTYPES = ("auto", "float32", "bfloat16", "float16")


def parse_layers(text: str) -> list[int]:
    """``"3,5"`` -> [3, 5]; repeated or non-integer layers are errors."""
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes comma-separated integers like 0,3,5; got {text!r}") from None
    if not layers:
        raise argparse.ArgumentTypeError("--layers is empty; give comma-separated integers like 0,3,5.")
    repeated = sorted({l for l in layers if layers.count(l) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"--layers {text}: layer(s) {repeated} given more than once; list each once.")
    return layers


def parse_steps(text: str) -> list[int]:
    """``"1,2,5"`` -> [1, 2, 5] (positive, increasing)."""
    try:
        steps = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--save-steps takes comma-separated integers like 1,10,100; got {text!r}"
        ) from None
    if not steps or steps[0] < 1:
        raise argparse.ArgumentTypeError(f"--save-steps {text}: steps must be >= 1.")
    return steps


_UNSET = object()


def _setting(
    default: Any,
    help: str,
    *,
    record: bool = False,
    cli: bool = True,
    cli_name: str | None = None,
    cli_help: str | None = None,
    cli_default: Any = _UNSET,
    **argparse_kwargs: Any,
) -> Any:
    """A config field: its default, its help text, whether ``report.config`` records it, and how the command line
    reads it (``cli_name``: the option's name and dest when not the field's; ``cli_help`` / ``cli_default``: where
    the command line documents or defaults it otherwise)."""
    meta = {
        "help": help,
        "record": record,
        "cli": cli,
        "cli_name": cli_name,
        "cli_help": cli_help,
        "cli_default": cli_default,
        "argparse": argparse_kwargs,
    }
    return field(default=default, metadata=meta)


class _Config:
    """What both configs share: building one from another with some settings replaced."""

    @classmethod
    def of(cls, config: Any = None, settings: Mapping[str, Any] | None = None) -> Any:
        """``config`` (default: the defaults) with ``settings`` (field names) replaced; an unknown name is a
        TypeError that lists the fields."""
        base = cls() if config is None else config
        if not isinstance(base, cls):
            raise TypeError(f"config must be a {cls.__name__}, got {type(base).__name__}.")
        return base.replace(**(settings or {}))

    def replace(self, **settings: Any) -> Any:
        """A copy with ``settings`` changed."""
        names = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(settings) - set(names))
        if unknown:
            raise TypeError(f"unknown {type(self).__name__} setting(s) {unknown}; the settings are {names}.")
        return dataclasses.replace(self, **settings) if settings else self


@dataclass(frozen=True)
class AnalyzeConfig(_Config):
    """Every setting of :func:`revlens.analyze`, with its default.

    Args:
        layers: layers to read (default: all).
        hook: the hook point read (``resid_post``, ``resid_pre``, ``resid_mid``, ``attn_out``, ``mlp_out``).
        readout: ``last`` prompt token or ``mean`` over the prompt.
        estimator: ``mean_diff`` (default), ``per_example`` or ``pca`` (rank ``k`` subspace).
        k: the subspace rank for ``estimator="pca"``.
        batch_size: prompts per forward pass.
        device: torch device (default: where each model loads).
        null_samples, seed: Monte Carlo draws and seed of the activation-space null.
        cache_dir: where per-checkpoint measurements are kept, so a rerun only measures what is missing.
        progress: show a progress bar.
        dtype: ``"auto"`` keeps each checkpoint's dtype; ``"float32"``, ``"bfloat16"``, ``"float16"`` cast.
        device_map: ``"auto"`` spreads a Hugging Face model over all visible GPUs (exclusive with ``device``).
        base: base model folder for LoRA adapter checkpoints whose base is not a local folder.
        threads: torch CPU threads (default: :func:`revlens.threads.choose_num_threads`).
        chat_template, system: how string prompts are read (see :class:`revlens.ReversionProbe`).
        distributed: inside a ``torchrun`` job, split the checkpoints across ranks (needs ``cache_dir``).
        workers: processes measuring checkpoints side by side on the CPU (needs ``cache_dir``).

    Returns:
        :meth:`recorded` (what ``report.config`` keeps), :meth:`replace`, and :meth:`from_report_config`.

    Example:
        >>> cfg = AnalyzeConfig(layers=[0, 1], progress=False)
        >>> revlens.analyze(ckpts, prompts, config=cfg).layers
        [0, 1]
        >>> sorted(cfg.recorded())[:4]
        ['base', 'batch_size', 'dtype', 'estimator']
    """

    layers: Sequence[int] | None = _setting(
        None, "comma-separated layer indices (default: all)", record=True, type=parse_layers
    )
    hook: str = _setting("resid_post", "hook point read at each layer", record=True)
    readout: str = _setting("last", "position read: the last prompt token or the mean", record=True, choices=READOUTS)
    estimator: str = _setting("mean_diff", "how v_rev is estimated", record=True, choices=ESTIMATORS)
    k: int = _setting(1, "subspace rank for --estimator pca", record=True, type=int)
    batch_size: int = _setting(32, "prompts per forward pass", record=True, type=int)
    device: str | None = _setting(None, "torch device: cpu, cuda, cuda:N, mps (default: where the model loads)")
    null_samples: int = _setting(20_000, "Monte Carlo draws of the activation-space null", record=True, type=int)
    seed: int = _setting(0, "seed of the activation-space null", record=True, type=int)
    cache_dir: str | os.PathLike | None = _setting(None, "per-checkpoint measurement cache", cli=False)
    progress: bool = _setting(True, "show a progress bar", cli=False)
    dtype: Any = _setting(
        "auto", "weights dtype; auto (default) keeps each checkpoint's own", record=True, choices=DTYPES
    )
    device_map: Any = _setting(None, "'auto' spreads a Hugging Face model over all visible GPUs (instead of --device)")
    base: str | os.PathLike | None = _setting(
        None, "base model folder for LoRA adapter checkpoints whose base is not a local folder", record=True
    )
    threads: int | None = _setting(
        None,
        "torch CPU threads (default: 1 for models under 20M parameters, more for larger ones; or set "
        "REVLENS_NUM_THREADS)",
        type=int,
    )
    chat_template: Any = _setting(
        "auto",
        "read each prompt as a user turn in the aligned model's chat template (default: when its tokenizer has one)",
        action=argparse.BooleanOptionalAction,
    )
    system: str | None = _setting(None, "system message for the chat template", record=True)
    distributed: bool = _setting(False, "split the checkpoints across the ranks of a torchrun job", cli=False)
    workers: int = _setting(
        1,
        "processes measuring checkpoints side by side on the CPU (the cores shared out as threads; default 1); "
        "under torchrun the ranks share them instead",
        type=int,
    )

    def __post_init__(self) -> None:
        n = self.null_samples
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(
                f"null_samples={n!r}: the activation-space null needs at least one Monte Carlo "
                "draw; give a positive integer (default 20000)."
            )
        w = self.workers
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise ValueError(f"workers={w!r}: give a whole number of processes >= 1 (1: measure in this process).")
        if self.estimator != "pca" and self.k != 1:
            raise ValueError(f"k={self.k} needs estimator='pca'; mean_diff and per_example give one direction.")

    def recorded(self) -> dict[str, Any]:
        """The settings that change the numbers, JSON-ready: what ``report.config`` keeps of this config."""
        out = {}
        for f in dataclasses.fields(self):
            if f.metadata["record"]:
                value = getattr(self, f.name)
                if f.name == "layers" and value is not None:
                    value = [int(l) for l in value]
                elif f.name in ("dtype", "base") and value is not None:
                    value = str(value)
                out[f.name] = value
        return out

    @classmethod
    def from_report_config(cls, config: Mapping[str, Any]) -> AnalyzeConfig:
        """The recorded settings of a ``report.config`` (older reports: those they recorded, defaults for the rest)."""
        names = {f.name for f in dataclasses.fields(cls) if f.metadata["record"]}
        return cls(**{name: value for name, value in config.items() if name in names})


def _cli_name(f: dataclasses.Field) -> str:
    return f.metadata.get("cli_name") or f.name


def add_config_arguments(
    parser: argparse.ArgumentParser, cls: type, skip: Iterable[str] = (), unset_default: bool = False
) -> None:
    """Add one ``--option`` per command-line field of the dataclass ``cls`` (its help, choices and type). With
    ``unset_default``, an option left out parses as None (so a command can tell it was not given), unless the
    field names a ``cli_default``."""
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", False) or f.name in skip:
            continue
        kwargs = dict(f.metadata["argparse"])
        if kwargs.get("action") is argparse.BooleanOptionalAction:
            default = None
        elif kwargs.get("action") == "store_true":
            default = False
        elif f.metadata["cli_default"] is not _UNSET:
            default = f.metadata["cli_default"]
        else:
            default = None if unset_default else f.default
        name = _cli_name(f)
        parser.add_argument(
            "--" + name.replace("_", "-"),
            default=default,
            help=f.metadata["cli_help"] or f.metadata["help"],
            dest=name,
            **kwargs,
        )


def config_from_args(cls: type, args: argparse.Namespace, **settings: Any) -> Any:
    """The ``cls`` config the parsed ``args`` give (an option left unset keeps the field's default), with
    ``settings`` on top."""
    values = {}
    for f in dataclasses.fields(cls):
        name = _cli_name(f)
        if f.metadata.get("cli", False) and hasattr(args, name):
            value = getattr(args, name)
            if value is not None or f.default is None:
                values[f.name] = value
    return cls(**{**values, **settings})


@dataclass(frozen=True)
class FinetuneConfig(_Config):
    """Every setting of :func:`revlens.finetune` (the model, data, hooks and penalties are its arguments).

    Args:
        steps, lr: optimizer steps and peak learning rate (``lr=None``: 1e-5, or 2e-4 with ``lora``).
        optimizer, weight_decay: ``adamw`` or ``sgd``, and its weight decay.
        batch_size, grad_accum: rows per micro-batch and micro-batches per optimizer step.
        seed: seeds the batches, each step's random state and the LoRA initialisation.
        save_steps, out_dir, run_name: checkpoints of these steps (and the last) go to
            ``out_dir/finetune/<run_name>/step_<N>/``, with the training state.
        device: where the model trains (default: where it is).
        monitor_steps: steps the monitor reads (default: ``save_steps``).
        resume, overwrite: continue a saved run with the same settings; delete it first.
        progress: show a progress bar.
        autocast_dtype: e.g. ``torch.bfloat16`` for mixed-precision forward passes.
        max_grad_norm: clip the gradient's global norm (None: no clipping).
        warmup_steps, schedule: linear warmup, then ``constant`` or ``cosine``.
        lora: a ``peft.LoraConfig`` or a dict of its fields: train LoRA adapters instead of every weight.
        spec: the :class:`~revlens.blocking_spec.BlockingSpec` (or its string) the blocking and the anchor were
            built from, recorded with the settings so a resume refuses another mode.
        distributed: data-parallel over a ``torchrun`` job's ranks (default: when one is running).

    Returns:
        :meth:`replace` gives a copy with some settings changed; :attr:`learning_rate` the ``lr`` used.

    Example:
        >>> cfg = FinetuneConfig(steps=2, lr=1e-4, batch_size=2, spec="grad", progress=False)
        >>> str(cfg.spec), cfg.learning_rate, cfg.replace(lora={"r": 4}, lr=None).learning_rate
        ('grad', 0.0001, 0.0002)
    """

    steps: int = _setting(100, "optimizer steps", type=int, cli_help="optimizer steps (default 100; demo: its preset)")
    lr: float | None = _setting(None, "peak learning rate (default 1e-5, with LoRA 2e-4)", type=float)
    optimizer: str = _setting("adamw", "optimizer: adamw or sgd", cli=False)
    batch_size: int = _setting(
        32,
        "rows per micro-batch; a step reads batch_size x grad_accum rows",
        type=int,
        cli_help="rows per micro-batch (default 8); a step reads batch size x grad accum rows",
    )
    grad_accum: int = _setting(
        1,
        "micro-batches of batch_size rows per optimizer step (default 1); under torchrun they are dealt across "
        "the ranks, so give a multiple of the number of processes",
        type=int,
    )
    weight_decay: float = _setting(0.0, "the optimizer's weight decay", cli=False)
    seed: int = _setting(
        0, "seed of the batches, the random state and the LoRA initialisation", type=int, cli_default=0
    )
    save_steps: Sequence[int] = _setting(
        (),
        "steps whose weights and training state are written (the last step always)",
        type=parse_steps,
        cli_help="steps to write checkpoints at (default 1,2,5,10,...; the last step always)",
    )
    out_dir: str | os.PathLike | None = _setting(None, "where checkpoints go", cli=False)
    run_name: str = _setting("seed_0", "run folder name", cli_help="run folder name (default seed_<seed>)")
    device: str | None = _setting(None, "torch device the model trains on (default: where it is)")
    monitor_steps: Sequence[int] | None = _setting(None, "steps the monitor reads (default: save_steps)", cli=False)
    resume: bool = _setting(True, "continue a saved run with the same settings", cli=False)
    overwrite: bool = _setting(
        False,
        "delete the run folder and start over",
        cli_help="delete OUT/finetune/<run>/ and start over",
        action="store_true",
    )
    progress: bool = _setting(True, "show a progress bar", cli=False)
    autocast_dtype: Any = _setting(None, "torch dtype of mixed-precision forward passes", cli=False)
    max_grad_norm: float | None = _setting(None, "clip the gradient norm (default: no clipping)", type=float)
    warmup_steps: int = _setting(0, "linear warmup steps (default 0)", type=int, cli_name="warmup")
    schedule: str = _setting("constant", "after warmup (default constant)", choices=("constant", "cosine"))
    lora: Any = _setting(None, "LoRA adapters to train (a peft.LoraConfig or a dict of its fields)", cli=False)
    spec: Any = _setting(None, "the BlockingSpec the blocking and the anchor were built from", cli=False)
    distributed: bool | None = _setting(None, "data-parallel over a torchrun job's ranks", cli=False)

    def __post_init__(self) -> None:
        if self.spec is not None:
            object.__setattr__(self, "spec", BlockingSpec.parse(self.spec))

    @property
    def learning_rate(self) -> float:
        """``lr``, or its default: 1e-5, and 2e-4 when LoRA adapters are trained."""
        if self.lr is not None:
            return float(self.lr)
        return 2e-4 if self.lora is not None else 1e-5
