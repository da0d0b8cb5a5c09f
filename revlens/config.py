"""The settings of :func:`revlens.analyze` as one dataclass, :class:`AnalyzeConfig`, and the command-line options
built from its fields (so nothing is repeated by hand between the function, the CLI and ``report.config``).

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


def _setting(default: Any, help: str, *, record: bool = False, cli: bool = True, **argparse_kwargs: Any) -> Any:
    """A config field: its default, its help text, whether ``report.config`` records it, and how the CLI reads it."""
    meta = {"help": help, "record": record, "cli": cli, "argparse": argparse_kwargs}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class AnalyzeConfig:
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

    @classmethod
    def of(cls, config: AnalyzeConfig | None = None, settings: Mapping[str, Any] | None = None) -> AnalyzeConfig:
        """``config`` (default: the defaults) with ``settings`` (field names) replaced; an unknown name is a
        TypeError that lists the fields."""
        base = cls() if config is None else config
        if not isinstance(base, cls):
            raise TypeError(f"config must be an {cls.__name__}, got {type(base).__name__}.")
        return base.replace(**(settings or {}))

    def replace(self, **settings: Any) -> AnalyzeConfig:
        """A copy with ``settings`` changed."""
        unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(
                f"unknown {type(self).__name__} setting(s) {unknown}; the settings are "
                f"{[f.name for f in dataclasses.fields(self)]}."
            )
        return dataclasses.replace(self, **settings) if settings else self

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


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, skip: Iterable[str] = ()) -> None:
    """Add one ``--option`` per command-line field of the dataclass ``cls`` (its help, choices and type)."""
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", False) or f.name in skip:
            continue
        kwargs = dict(f.metadata["argparse"])
        default = None if kwargs.get("action") is argparse.BooleanOptionalAction else f.default
        parser.add_argument(
            "--" + f.name.replace("_", "-"), default=default, help=f.metadata["help"], dest=f.name, **kwargs
        )


def config_from_args(cls: type, args: argparse.Namespace, **settings: Any) -> Any:
    """The ``cls`` config the parsed ``args`` give (a boolean flag left unset keeps the field's default), with
    ``settings`` on top."""
    values = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli", False) and hasattr(args, f.name):
            value = getattr(args, f.name)
            if value is not None or f.default is None:
                values[f.name] = value
    return cls(**{**values, **settings})
