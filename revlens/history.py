"""Training histories: the pretrain witness, the aligned model and fine-tuning runs, as :class:`History`.

Histories are read from ``pretrain/ align/ finetune/<run>/step_<N>/`` (Hugging Face Trainer ``checkpoint-<N>/``
folders count as step N), from a Trainer output folder, or from a dict; each checkpoint is a
:class:`~revlens.checkpoint_loader.CheckpointRef`, loaded only when asked (a :meth:`History.loader` boots the first
and copies each later checkpoint's weights into the live model when the architecture is the same).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from revlens.checkpoint_folder import STEP_DIR
from revlens.checkpoint_format import CheckpointError
from revlens.checkpoint_loader import CheckpointLoader, CheckpointRef

PHASES = ("pretrain", "align", "finetune")


def _is_checkpoint_dir(path: Path) -> bool:
    return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()


# Folders a run holds that are known not to be checkpoints: revlens.finetune's resume state, TensorBoard logs.
_NOT_CHECKPOINTS = {"state", "runs"}


def _read_run(run_dir: Path, *, warn_all: bool = True) -> dict[int, Path]:
    """The ``step_<N>/`` and ``checkpoint-<N>/`` folders of one run; warns on every other folder skipped
    (but the known ``state/`` and ``runs/``) and refuses two folders with one step number."""
    steps: dict[int, Path] = {}
    for path in sorted(run_dir.iterdir()):
        m = STEP_DIR.match(path.name)
        reason = None
        if path.is_symlink() and not path.exists():
            reason = f"a broken symlink (to {os.readlink(path)})"
        elif not path.is_dir():
            continue
        elif m is None:
            if not warn_all or path.name in _NOT_CHECKPOINTS:
                continue
            reason = "its name is not step_<N> or checkpoint-<N> with an integer N"
        elif not _is_checkpoint_dir(path):
            reason = "it has no config.json (or adapter_config.json for a LoRA adapter)"
        if reason is not None:
            warnings.warn(f"skipping {path}: {reason}.", RuntimeWarning, stacklevel=3)
            continue
        step = int(m.group(1))
        if step in steps:
            raise CheckpointError(
                f"{steps[step].name} and {path.name} in {run_dir} are both step {step}; keep one of them "
                "(rename or remove the other)."
            )
        steps[step] = path
    return dict(sorted(steps.items()))


@dataclass
class History:
    """A training history: the pretrain witness, the aligned model, and fine-tuning runs.

    ``finetune`` maps a run name (a seed) to ``{step: checkpoint}``. When ``pretrain`` or
    ``align`` has several checkpoints, the last is the phase's representative. ``base`` is the
    base model folder for LoRA adapter checkpoints whose own ``base_model_name_or_path`` is not
    a local folder.
    """

    pretrain: CheckpointRef
    align: CheckpointRef
    finetune: dict[str, dict[int, CheckpointRef]] = field(default_factory=dict)
    base: str | os.PathLike | None = None

    @property
    def runs(self) -> list[str]:
        return list(self.finetune)

    @property
    def steps(self) -> list[int]:
        return sorted({s for steps in self.finetune.values() for s in steps})

    def __iter__(self) -> Iterator[CheckpointRef]:
        yield self.pretrain
        yield self.align
        for run in self.finetune.values():
            yield from (run[s] for s in sorted(run))

    def __len__(self) -> int:
        return 2 + sum(len(r) for r in self.finetune.values())

    def loader(
        self, device: str | None = None, dtype: str | torch.dtype | None = "auto", device_map: Any = None
    ) -> CheckpointLoader:
        """A :class:`CheckpointLoader` for this history's checkpoints (with its ``base``)."""
        return CheckpointLoader(device, dtype, device_map, self.base)

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any], base: str | os.PathLike | None = None) -> History:
        """Build from ``{"pretrain": src, "align": src, "finetune": {run: {step: src}}}``."""
        for phase in PHASES:
            if phase not in spec or spec[phase] is None:
                raise CheckpointError(
                    f"the history has no {phase!r} phase; give "
                    '{"pretrain": src, "align": src, "finetune": {run: {step: src}}}.'
                )
        pretrain, align = spec["pretrain"], spec["align"]
        if isinstance(pretrain, (list, tuple)):
            pretrain = pretrain[-1]
        if isinstance(align, (list, tuple)):
            align = align[-1]
        finetune = spec["finetune"]
        if not isinstance(finetune, Mapping) or not finetune:
            raise CheckpointError("the 'finetune' phase is empty; give {run_name: {step: checkpoint}}.")
        runs: dict[str, dict[int, CheckpointRef]] = {}
        for run, steps in finetune.items():
            if not isinstance(steps, Mapping) or not steps:
                raise CheckpointError(f"fine-tuning run {run!r} has no checkpoints; give {{step: checkpoint}}.")
            runs[str(run)] = {int(s): CheckpointRef("finetune", src, str(run), int(s)) for s, src in steps.items()}
        return cls(CheckpointRef("pretrain", pretrain), CheckpointRef("align", align), runs, base)

    @classmethod
    def from_dir(cls, root: str | os.PathLike, base: str | os.PathLike | None = None) -> History:
        """Read the layout ``pretrain/``, ``align/``, ``finetune/<run>/step_<N>/``.

        Hugging Face Trainer output is read too: ``finetune/<run>/checkpoint-<N>/`` is step N. Every
        folder skipped under ``finetune/`` is named in a RuntimeWarning; two folders with one step
        number (``step_5`` and ``step_05``, or ``step_5`` and ``checkpoint-5``) are refused.

        Example:
            >>> history = History.from_dir(ckpts)  # LoRA adapters on a remote base: base="models/Llama-3.2-1B"
            >>> history.runs, history.steps, len(history)
            (['seed_0', 'seed_1'], [1, 2], 6)
        """
        root = Path(root)
        if not root.exists():
            raise CheckpointError(f"history folder {root} does not exist.")
        if not root.is_dir():
            raise CheckpointError(f"history path {root} is not a folder.")
        for phase in PHASES:
            if not (root / phase).is_dir():
                raise CheckpointError(
                    f"{root} has no {phase}/ folder; expected pretrain/, align/ and "
                    "finetune/<run>/step_<N>/ (or checkpoint-<N>/, as the Hugging Face Trainer writes)."
                )
        finetune: dict[str, dict[int, Path]] = {}
        for run_dir in sorted((root / "finetune").iterdir()):
            if run_dir.is_symlink() and not run_dir.exists():
                warnings.warn(f"skipping {run_dir}: a broken symlink.", RuntimeWarning, stacklevel=2)
                continue
            if not run_dir.is_dir():
                continue
            steps = _read_run(run_dir)
            if steps:
                finetune[run_dir.name] = steps
            else:
                warnings.warn(
                    f"skipping {run_dir}: it holds no step_<N>/ or checkpoint-<N>/ checkpoint.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        if not finetune:
            raise CheckpointError(f"{root}/finetune/ holds no <run>/step_<N>/ (or checkpoint-<N>/) checkpoint folders.")
        return cls.from_dict({"pretrain": root / "pretrain", "align": root / "align", "finetune": finetune}, base)

    @classmethod
    def from_trainer(
        cls,
        output_dir: str | os.PathLike,
        *,
        pretrain: Any,
        align: Any,
        run: str | None = None,
        base: str | os.PathLike | None = None,
    ) -> History:
        """A history whose one fine-tuning run is a Hugging Face Trainer ``output_dir``.

        Its ``checkpoint-<N>/`` folders (full weights or LoRA adapters) are the steps; only model
        weights are read (never optimizer.pt, rng_state.pth or training_args.bin).

        Args:
            output_dir: the Trainer's output folder.
            pretrain, align: the base (pretrained) model and its aligned (instruct) model.
            run: the run's name (default: the output folder's name).
            base: base model folder for adapters whose ``base_model_name_or_path`` is not local.

        Example:
            >>> _ = revlens.save_checkpoint(model, tmp / "trainer" / "sft" / "checkpoint-5")  # as the Trainer saves
            >>> history = History.from_trainer(tmp / "trainer" / "sft", pretrain=f"{ckpts}/pretrain",
            ...                                align=f"{ckpts}/align")
            >>> history.runs, history.steps
            (['sft'], [5])
        """
        output_dir = Path(output_dir)
        if not output_dir.is_dir():
            raise CheckpointError(f"Trainer output folder {output_dir} does not exist or is not a folder.")
        steps = _read_run(output_dir, warn_all=False)
        if not steps:
            raise CheckpointError(
                f"{output_dir} holds no checkpoint-<N>/ folders; train with save_strategy='steps' "
                "(or 'epoch') so the Trainer writes them."
            )
        return cls.from_dict({"pretrain": pretrain, "align": align, "finetune": {run or output_dir.name: steps}}, base)

    @classmethod
    def coerce(cls, ckpts: Any, base: str | os.PathLike | None = None) -> History:
        """Accept a History, a folder in the standard layout, or a dict spec."""
        if isinstance(ckpts, History):
            return ckpts
        if isinstance(ckpts, (str, os.PathLike)):
            return cls.from_dir(ckpts, base)
        if isinstance(ckpts, Mapping):
            return cls.from_dict(ckpts, base)
        raise CheckpointError(
            f"cannot read a training history from {type(ckpts).__name__}: give a History, a folder "
            "laid out as pretrain/ align/ finetune/<run>/step_<N>/, or a dict."
        )


def check_same_architecture(reference: Any, model: Any, label: str, reference_label: str = "align") -> None:
    """Raise when ``model`` differs from ``reference`` in d_model or n_layers."""
    for attr in ("d_model", "n_layers"):
        a, b = getattr(reference.cfg, attr), getattr(model.cfg, attr)
        if a != b:
            raise CheckpointError(
                f"checkpoint {label} has {attr}={b} but {reference_label} has {attr}={a}: every "
                "checkpoint of a history must share one architecture."
            )
