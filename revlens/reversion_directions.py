"""ReversionDirections: the directions v_rev (or a rank-k reversion subspace) per layer, with how they were read.

Blocking (:class:`revlens.Blocking`), the probe anchor (:class:`revlens.ProbeAnchor`), the defense builder
(:func:`revlens.build_defense`), :class:`revlens.ReversionMonitor` and the Trainer callback take this one
object. Besides the bases it records what a consumer must agree with: the hook point and the readout position,
whether the readout was a probe-minus-control contrast, the chat template the prompts were rendered with (its
sha256) and a fingerprint of the pretrain and aligned models it came from. It comes from a report
(:meth:`revlens.ReversionReport.directions`), from two models (:meth:`ReversionDirections.from_models`) or from
``{layer: tensor}`` given by hand, and saves as ``directions.json`` + ``directions.safetensors`` (atomic writes;
the JSON records the tensors file's sha256, so :meth:`ReversionDirections.load` refuses a pair that does not
belong together; no pickle).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from revlens import directions as dirs
from revlens._util import atomic_save_tensors, atomic_write_json, file_sha256, tensor_digest, weights_fingerprint
from revlens.blocking_spec import InterventionError
from revlens.chat import AUTO, template_digest
from revlens.probe import ReversionProbe
from revlens.readout import READOUTS, hook_template

DIRECTIONS_JSON = "directions.json"
DIRECTIONS_TENSORS = "directions.safetensors"
DIRECTIONS_FORMAT = 1
RAW = "raw"  # ``chat_template`` of string prompts read without a template
_META = ("hook", "readout", "estimator", "contrast", "chat_template", "models", "checkpoints", "n_prompts")


@dataclass(frozen=True, eq=False, repr=False)
class ReversionDirections:
    """Per-layer direction bases (rows spanning v_rev or the rank-k reversion subspace) and how they were read.

    Args:
        bases: ``{layer: Tensor[k, d_model]}`` (a ``[d_model]`` vector is one row); kept as float32.
        hook: the hook point they were read at (an alias such as ``resid_post``, or its template).
        readout: the position read, ``last`` or ``mean`` (the anchor reads the last token only).
        estimator: what made the bases: ``mean_diff`` / ``per_example`` (v_rev), ``pca`` (nested principal
            directions, so the first k rows are the rank-k subspace), or ``given`` (by hand).
        contrast: whether the readouts were probe minus control (None: unknown).
        chat_template: sha256 of the chat template string prompts were rendered with, ``"raw"`` for string
            prompts read without one, None when unknown (token-id prompts, bases given by hand).
        models: a fingerprint of the pretrain and aligned models (None: unknown).
        checkpoints: where the pretrain and aligned models came from (labels), when known.
        n_prompts: the number of probe prompts, when known.

    Returns:
        :attr:`layers`, :attr:`rank`, :attr:`d_model`; :meth:`at` picks layers, :meth:`stacked` gives
        ``[n_layers, k, d_model]``; :meth:`save` / :meth:`load` write and read the two files.

    Example:
        >>> directions = report.directions()  # every analysed layer, the report's own basis (v_rev)
        >>> directions.layers, directions.rank, directions.hook, directions.readout
        ([0, 1], 1, 'resid_post', 'last')
        >>> directions.save(tmp / "directions").name
        'directions.json'
        >>> ReversionDirections.load(tmp / "directions").at([0]).bases[0].shape
        torch.Size([1, 16])
    """

    bases: Mapping[int, torch.Tensor]
    hook: str = "resid_post"
    readout: str = "last"
    estimator: str = "given"
    contrast: bool | None = None
    chat_template: str | None = None
    models: str | None = None
    checkpoints: Mapping[str, Any] | None = field(default=None)
    n_prompts: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.bases, Mapping) or not self.bases:
            raise InterventionError("no directions given; pass report.directions() or {layer: v_rev[layer]}.")
        first = next(iter(self.bases.values()))
        d_model = int(first.shape[-1]) if isinstance(first, torch.Tensor) and first.ndim else 0
        bases = {}
        for layer, v in sorted(self.bases.items(), key=lambda kv: int(kv[0])):
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise InterventionError(f"direction layers must be integers >= 0, got {layer!r}.")
            if not isinstance(v, torch.Tensor) or v.ndim not in (1, 2) or v.shape[-1] != d_model or not d_model:
                shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise InterventionError(
                    f"a direction must be [d_model] or [k, d_model] with d_model={d_model}, got shape {shape} at "
                    f"layer {layer}."
                )
            bases[int(layer)] = v.detach().float().reshape(-1, d_model)
        object.__setattr__(self, "bases", bases)
        hook_template(self.hook)
        if self.readout not in READOUTS:
            raise InterventionError(f"unknown readout {self.readout!r}; choose one of {READOUTS}.")

    def __repr__(self) -> str:
        ranks = sorted({int(b.shape[0]) for b in self.bases.values()})
        rank = ranks[0] if len(ranks) == 1 else ranks
        return (
            f"ReversionDirections(layers={self.layers}, rank={rank}, d_model={self.d_model}, hook={self.hook!r}, "
            f"readout={self.readout!r}, estimator={self.estimator!r}, contrast={self.contrast})"
        )

    @classmethod
    def of(cls, directions: ReversionDirections | Mapping[int, torch.Tensor], hook: str | None = None):
        """``directions`` as a :class:`ReversionDirections`: itself (``hook``, when given, must be its hook), or
        a ``{layer: tensor}`` mapping read at ``hook`` (default ``resid_post``)."""
        if isinstance(directions, cls):
            if hook is not None and hook_template(hook) != hook_template(directions.hook):
                raise InterventionError(
                    f"the directions were read at hook {directions.hook!r}, not {hook!r}: leave hook= out, or "
                    f"measure the directions at {hook!r}."
                )
            return directions
        if not isinstance(directions, Mapping) or not directions:
            raise InterventionError("no directions given; pass report.directions() or {layer: v_rev[layer]}.")
        return cls(dict(directions), hook="resid_post" if hook is None else hook)

    @property
    def layers(self) -> list[int]:
        return list(self.bases)

    @property
    def d_model(self) -> int:
        return int(next(iter(self.bases.values())).shape[-1])

    @property
    def rank(self) -> int:
        """Rows per layer (1: v_rev); an error when layers differ."""
        ranks = {int(b.shape[0]) for b in self.bases.values()}
        if len(ranks) != 1:
            raise InterventionError(f"the directions have different ranks by layer ({sorted(ranks)}).")
        return ranks.pop()

    def _meta(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _META}

    def at(self, layers: Sequence[int]) -> ReversionDirections:
        """The same directions at ``layers`` only (each must be one of :attr:`layers`)."""
        layers = [int(l) for l in layers]
        missing = [l for l in layers if l not in self.bases]
        if missing or not layers:
            raise InterventionError(
                f"layers {missing or layers} have no direction; the directions hold layers {self.layers}."
            )
        return ReversionDirections({l: self.bases[l] for l in layers}, **self._meta())

    def with_bases(self, bases: Mapping[int, torch.Tensor], estimator: str) -> ReversionDirections:
        """Other bases (a subspace chosen by a blocking spec) with this provenance."""
        return ReversionDirections(dict(bases), **{**self._meta(), "estimator": estimator})

    def stacked(self) -> torch.Tensor:
        """``[n_layers, k, d_model]`` float32, one row block per entry of :attr:`layers`."""
        self.rank  # noqa: B018 - refuses mixed ranks
        return torch.stack([self.bases[l] for l in self.layers])

    def probe(self, prompts: Any, control: Any = None, **kwargs: Any) -> ReversionProbe:
        """A :class:`~revlens.ReversionProbe` of ``prompts`` (and ``control``) that reads these directions' layers at
        their hook and readout; ``kwargs`` go to the probe (``per_example``, ``chat_template``, ...)."""
        return ReversionProbe(
            prompts, control=control, layers=self.layers, hook=self.hook, readout=self.readout, **kwargs
        )

    def digest(self) -> str:
        """A digest of the bases and the metadata (what a consumer's settings record)."""
        meta = json.dumps(self._meta(), sort_keys=True, default=str)
        return hashlib.sha256((meta + tensor_digest(*self.bases.values())).encode()).hexdigest()[:16]

    def check_contrast(self, control: Any, what: str) -> None:
        """Refuse a control set where the directions were read without one, and the reverse."""
        if self.contrast is not None and self.contrast != (control is not None):
            which = "with" if self.contrast else "without"
            raise InterventionError(
                f"the directions were read {which} a control set; give {what} the same (control=...)."
            )

    def check_template(self, template: str | None, what: str) -> None:
        """Refuse to read string prompts rendered with ``template`` (None: raw) when the directions were read
        with another rendering: the readout would sit at other positions than v_rev was measured at."""
        if self.chat_template is None:
            return
        now = template_digest(template) or RAW
        if now != self.chat_template:
            raise InterventionError(
                f"{what} would read the prompts {_rendering_text(now)}, but the directions were read "
                f"{_rendering_text(self.chat_template)}: pass chat_template= as the report was analysed (the "
                "template text, or False for raw prompts)."
            )

    # ---------------------------------------------------------------------------------------------- measuring
    @classmethod
    def from_models(
        cls,
        pretrain: Any,
        align: Any,
        prompts: Any,
        *,
        control: Any = None,
        layers: Sequence[int] | None = None,
        hook: str = "resid_post",
        readout: str = "last",
        rank: int | None = None,
        chat_template: Any = "auto",
        system: str | None = None,
        batch_size: int = 32,
        device: str | None = None,
    ) -> ReversionDirections:
        """v_rev (``rank=None``: the unit mean difference) or the rank-k reversion subspace (``rank=k``: the top-k
        principal directions of the per-prompt differences) of two TransformerBridges, measured here.

        String prompts are read like :func:`revlens.analyze` reads them: inside the aligned model's chat template
        when it has one (``chat_template``, ``system``: see :class:`revlens.ReversionProbe`).

        Example:
            >>> pretrain = revlens.load_checkpoint(f"{ckpts}/pretrain")
            >>> d = ReversionDirections.from_models(pretrain, aligned, prompts, layers=[0])
            >>> round(float(d.bases[0][0] @ report.v_rev[0]), 3), d.estimator  # the report's v_rev
            (1.0, 'mean_diff')
        """
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise InterventionError(f"rank must be a positive integer, got {rank!r}.")
        probe = ReversionProbe(
            prompts,
            control=control,
            layers=layers,
            hook=hook,
            readout=readout,
            per_example=rank is not None,
            chat_template=chat_template,
            system=system,
            batch_size=batch_size,
            device=device,
        )
        probe.use_template_of(align)
        pre, ali = probe.measure(pretrain), probe.measure(align)
        if rank is None:
            basis = dirs.v_rev_mean_diff(pre.centroid, ali.centroid).float()[:, None, :]
        else:
            basis = dirs.v_rev_pca(pre.per_example, ali.per_example, rank).float()
        return cls(
            {l: basis[i] for i, l in enumerate(probe.resolve_layers(align))},
            hook=hook,
            readout=readout,
            estimator="mean_diff" if rank is None else "pca",
            contrast=control is not None,
            chat_template=rendering_of(probe),
            models=models_fingerprint(weights_fingerprint(pretrain), weights_fingerprint(align)),
            n_prompts=probe.n_prompts,
        )

    # ---------------------------------------------------------------------------------------------- files
    def save(self, directory: str | Path) -> Path:
        """Write ``directions.safetensors`` (one ``[k, d_model]`` float32 tensor per layer), then ``directions.json``
        (the metadata, each tensor's shape and the tensors file's sha256), each atomically.

        Returns:
            The path of ``directions.json``.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"layer_{l}": b.cpu().contiguous() for l, b in self.bases.items()}
        atomic_save_tensors(tensors, directory / DIRECTIONS_TENSORS)
        header = {
            "format": DIRECTIONS_FORMAT,
            "layers": self.layers,
            "d_model": self.d_model,
            "shapes": {name: list(t.shape) for name, t in tensors.items()},
            **self._meta(),
            "tensors_sha256": file_sha256(directory / DIRECTIONS_TENSORS),
        }
        return atomic_write_json(directory / DIRECTIONS_JSON, header, indent=1)

    @classmethod
    def load(cls, directory: str | Path) -> ReversionDirections:
        """Read what :meth:`save` wrote; a tensors file that is not the one ``directions.json`` recorded (another
        save, edited, truncated) is refused with an error that names both files."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        path, tpath = directory / DIRECTIONS_JSON, directory / DIRECTIONS_TENSORS
        for p in (path, tpath):
            if not p.is_file():
                raise FileNotFoundError(
                    f"{p} is missing: saved directions are {DIRECTIONS_JSON} and {DIRECTIONS_TENSORS} together; "
                    "write them with directions.save(folder)."
                )
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON ({err}); save the directions again.") from err
        if not isinstance(d, dict) or d.get("format") != DIRECTIONS_FORMAT or not isinstance(d.get("shapes"), dict):
            raise ValueError(
                f"{path} is not a revlens directions file of format {DIRECTIONS_FORMAT} (format "
                f"{d.get('format') if isinstance(d, dict) else None!r}); save the directions with this revlens."
            )
        if d.get("tensors_sha256") != file_sha256(tpath):
            raise ValueError(
                f"{tpath} is not the tensors file {path} was saved with (its sha256 differs from the one recorded): "
                f"copy {DIRECTIONS_JSON} and {DIRECTIONS_TENSORS} together from one directions.save()."
            )
        try:
            tensors = load_file(str(tpath))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{tpath} cannot be read as safetensors ({err}); save the directions again.") from err
        shapes = {name: list(t.shape) for name, t in tensors.items()}
        if shapes != d["shapes"] or any(t.dtype != torch.float32 for t in tensors.values()):
            raise ValueError(
                f"{tpath} holds {shapes} but {path} records {d['shapes']} (float32): the files do not belong "
                "together; save the directions again."
            )
        bases = {int(name.removeprefix("layer_")): tensors[name] for name in tensors}
        return cls(bases, **{name: d.get(name) for name in _META})


def rendering_of(probe: ReversionProbe) -> str | None:
    """The ``chat_template`` record of a probe (after :meth:`~revlens.ReversionProbe.use_template_of` or a
    measurement): the template's sha256, ``"raw"``, or None for token-id prompts and a template not yet known."""
    if not isinstance(probe.prompts[0], str):
        return None
    if probe.chat_template_used is False:
        return RAW
    template = probe.rendered_template
    if template is None and isinstance(probe.chat_template, str) and probe.chat_template != AUTO:
        template = probe.chat_template
    return template_digest(template)


def _rendering_text(record: str) -> str:
    return "raw (no chat template)" if record == RAW else f"through the chat template with sha256 {record[:12]}..."


def models_fingerprint(pretrain: str | None, align: str | None) -> str | None:
    """One fingerprint of the pretrain and aligned models' own fingerprints (None when either is unknown)."""
    if pretrain is None or align is None:
        return None
    return hashlib.sha256(json.dumps([pretrain, align]).encode()).hexdigest()[:16]
