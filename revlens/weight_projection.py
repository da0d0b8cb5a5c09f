"""Safe LoRA (Hsu et al. 2024, NeurIPS): project fine-tuning updates onto the alignment subspace, matrix by matrix.

Alignment (pretrained -> aligned, e.g. base -> chat) moved each decoder weight matrix by ``V = W_align - W_pretrain``.
Safe LoRA treats the column space of ``V`` as the "safety subspace" of that matrix, and a fine-tuning update ``dW``
that points away from it as a risk. For each matrix it builds

- the approximate projection ``C = V V^T / ||V||_F`` (the authors' default: one matrix product, no
  decomposition; it is a projector only when ``V`` has one singular value, e.g. ``V = u v^T`` with unit ``u``,
  ``v``; otherwise it also rescales), or the exact projector onto ``V``'s column space (``exact=True``);
- the similarity ``sim = <dW, C dW>_F / (||dW||_F ||C dW||_F)``, the cosine between the update and its projection
  (in [0, 1]: ``C`` is positive semi-definite);

and replaces ``dW`` by ``C dW`` on the matrices whose similarity is lowest: below ``threshold`` (the reference
code's ``select_layers_type="threshold"``) or the ``ceil(fraction * n)`` least similar (its ``"number"``
mode, as a fraction of the ``n`` matrices considered). Full fine-tuning: ``W <- W_align + C dW``; LoRA
(``dW = scaling * B A``): ``B <- C B``, so the merged update is ``scaling * C B A``.

Conventions (the reference code is github.com/IBM/SafeLoRA, ``model.py``):

- ``dW = 0`` (a matrix fine-tuning left alone): ``sim = 1``; there is nothing to project, and it never takes
  one of ``fraction``'s places. (The reference's ``cosine_similarity`` gives 0 there; projecting a zero update
  changes nothing either way, so only ``fraction``'s count differs.)
- ``C dW = 0`` with ``dW != 0`` (the update is orthogonal to ``V``'s columns; in particular every matrix with
  ``V = 0``, untouched by alignment, where ``C = 0``): ``sim = 0``, as in the reference (its cosine's ``eps``
  floor gives 0). Such a matrix is the first one selected, and projecting it removes its update entirely
  (``W <- W_align``; LoRA: ``B <- 0``). Keep alignment-free matrices out with ``names=`` if that is not wanted.
- Selection is strict, ``sim < threshold`` (the paper's rule; the reference code uses ``<=`` on similarities
  rounded to 5 decimals). ``fraction`` takes exactly ``ceil(fraction * n)`` matrices, ties broken by model
  order (the reference turns its count into a threshold, so ties can add more).
- Matrices are ``[d_out, d_in]`` (``nn.Linear``); ``C`` acts on the output side. On a module, GPT-2's ``Conv1D``
  weights (stored ``[d_in, d_out]``) and peft's ``fan_in_fan_out`` layers are transposed for the computation.

Everything is computed per matrix in float64 on the CPU, one matrix at a time, with ``C X`` evaluated as
``V (V^T X) / ||V||_F`` or ``(V V^T) X / ||V||_F``, whichever is cheaper (so no ``d_out x d_out`` matrix is
built when ``d_out`` is the larger side).
"""

from __future__ import annotations

import difflib
import math
import re
import sys
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float64
from torch import Tensor

from revlens.lora import standard_name
from revlens.shapes import shape_checked

__all__ = ["ProjectionResult", "safe_lora_project", "safe_lora_state"]

# Decoder blocks by index: Llama/Mistral/Qwen/GPT-NeoX/OPT (`layers.3.`), BERT (`layer.3.`), TransformerLens and
# MPT (`blocks.3.`), T5 (`block.3.`), GPT-2/Falcon/Bloom (`h.3.`). Embeddings and the unembedding do not match.
_DECODER_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|blocks|block|h)\.\d+\.")
_PEFT_PREFIX = "base_model.model."
_EPS64 = torch.finfo(torch.float64).eps

NameFilter = str | Collection[str] | Callable[[str], bool] | None


@dataclass
class ProjectionResult:
    """What :func:`safe_lora_project` / :func:`safe_lora_state` measured and changed.

    Attributes:
        similarity: every considered matrix (HF weight name, model order) -> ``<dW, C dW>_F / (||dW|| ||C dW||)``.
        projected: the names whose update was replaced by ``C dW`` (model order).
        threshold: the threshold used (``None`` in fraction mode).
        fraction: the fraction used (``None`` in threshold mode).
        exact: True for the exact projector onto ``V``'s column space, False for ``V V^T / ||V||_F``.
    """

    similarity: dict[str, float] = field(default_factory=dict)
    projected: list[str] = field(default_factory=list)
    threshold: float | None = None
    fraction: float | None = None
    exact: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The result as plain JSON types (``json.dumps`` takes it as it is)."""
        return {
            "similarity": {k: float(v) for k, v in self.similarity.items()},
            "projected": list(self.projected),
            "threshold": None if self.threshold is None else float(self.threshold),
            "fraction": None if self.fraction is None else float(self.fraction),
            "exact": bool(self.exact),
        }

    def summary(self) -> str:
        """One line: how many matrices were projected, by which rule, and the spread of similarities."""
        kind = "exact projector" if self.exact else "approximate C"
        rule = f"sim < {self.threshold:g}" if self.threshold is not None else f"fraction {self.fraction:g}"
        sims = sorted(self.similarity.values())
        spread = ""
        if sims:
            half = len(sims) // 2
            median = sims[half] if len(sims) % 2 else (sims[half - 1] + sims[half]) / 2
            spread = f"; sim min {sims[0]:.3f}, median {median:.3f}, max {sims[-1]:.3f}"
        return f"Safe LoRA, {kind}: projected {len(self.projected)} of {len(sims)} matrices ({rule}){spread}"


def _hf_name(name: str) -> str:
    """A parameter name in plain HF spelling: bridge ``_original_component`` segments, peft's
    ``base_model.model.`` prefix and ``.base_layer`` removed."""
    name = standard_name(name)
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX) :]
    return name.replace(".base_layer.", ".")


def _name_filter(names: NameFilter) -> Callable[[str], bool]:
    if names is None:
        return lambda n: _DECODER_BLOCK.search(n) is not None
    if isinstance(names, str):
        pattern = re.compile(names)
        return lambda n: pattern.search(n) is not None
    if callable(names):
        return names
    subs = list(names)
    if not subs or not all(isinstance(s, str) for s in subs):
        raise ValueError(
            f"names={names!r}: give a regular expression, a non-empty list of name substrings "
            "(e.g. ['q_proj', 'v_proj']), a predicate name -> bool, or None (every decoder-block matrix)."
        )
    return lambda n: any(s in n for s in subs)


def _check_options(threshold: float | None, fraction: float | None, exact: bool) -> None:
    if (threshold is None) == (fraction is None):
        got = "both" if threshold is not None else "neither"
        raise ValueError(
            f"give exactly one of threshold= (project every matrix whose similarity is below it) or fraction= "
            f"(project the ceil(fraction * n) least similar matrices); got {got}."
        )
    if threshold is not None and (
        isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold)
    ):
        raise ValueError(f"threshold={threshold!r} must be a number (similarities lie in [0, 1]; Safe LoRA uses 0.5).")
    if fraction is not None and (
        isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0
    ):
        raise ValueError(f"fraction={fraction!r} must be a number in [0, 1] (the share of matrices to project).")
    if not isinstance(exact, bool):
        raise ValueError(f"exact={exact!r} must be True or False.")


class _Lookup:
    """Find a weight of an aligned / pretrained state dict by HF name (exact, else a unique dotted suffix match)."""

    def __init__(self, state: Mapping[str, Tensor], label: str):
        if not isinstance(state, Mapping):
            raise ValueError(
                f"{label} must be a state dict (name -> tensor, as model.state_dict() gives), "
                f"got {type(state).__name__}."
            )
        self.state = state
        self.label = label
        self.keys: dict[str, str] = {}
        for key in state:
            self.keys.setdefault(_hf_name(key), key)

    def find(self, name: str) -> str | None:
        if name in self.keys:
            return self.keys[name]
        hits = [k for k in self.keys if k.endswith("." + name) or name.endswith("." + k)]
        return self.keys[hits[0]] if len(hits) == 1 else None

    def get(self, name: str) -> Tensor:
        key = self.find(name)
        if key is None:
            near = difflib.get_close_matches(name, list(self.keys), n=3, cutoff=0.5)
            raise ValueError(
                f"weight {name!r} has no counterpart in the {self.label} state dict (closest names: {near}). Pass the "
                f"full model's state_dict() in HF naming, or leave this weight out with names=."
            )
        value = self.state[key]
        if not isinstance(value, Tensor):
            raise ValueError(f"{self.label}[{key!r}] is a {type(value).__name__}, not a tensor.")
        return value


def _check_finite(name: str, label: str, tensor: Tensor) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"weight {name!r}: the {label} tensor has NaN or infinite entries; check that checkpoint.")


def _as64(tensor: Tensor, transpose: bool = False) -> Tensor:
    out = tensor.detach().to(device="cpu", dtype=torch.float64)
    return out.T if transpose else out


class _Projection:
    """``X -> C X`` for one alignment matrix ``V`` (float64, CPU)."""

    def __init__(self, v: Float64[Tensor, "d_out d_in"], exact: bool):
        self.v = v
        self.exact = exact
        if exact:
            # The column space of V: left singular vectors above numpy's / torch.linalg.pinv's default rank
            # tolerance, max(d_out, d_in) * eps * sigma_max (V = 0 keeps none: C = 0).
            u, s, _ = torch.linalg.svd(v, full_matrices=False)
            tol = max(v.shape) * _EPS64 * (float(s.max()) if s.numel() else 0.0)
            self.basis = u[:, s > tol]
        else:
            self.norm = float(torch.linalg.matrix_norm(v))

    def __call__(self, x: Float64[Tensor, "d_out n"]) -> Float64[Tensor, "d_out n"]:
        if self.exact:
            return self.basis @ (self.basis.T @ x)
        if self.norm == 0.0:
            return torch.zeros_like(x)
        d_out, d_in = self.v.shape
        n = x.shape[1]
        if 2 * d_in * n <= d_out * (d_in + n):  # V (V^T X): no d_out x d_out matrix
            return self.v @ (self.v.T @ x) / self.norm
        return (self.v @ self.v.T) @ x / self.norm  # cheaper when d_out is the small side (e.g. down_proj)


def _similarity(dw: Float64[Tensor, "d_out d_in"], cdw: Float64[Tensor, "d_out d_in"]) -> float:
    """``<dW, C dW>_F / (||dW||_F ||C dW||_F)``; 1 when ``dW = 0``, 0 when only ``C dW = 0``."""
    n_dw = float(torch.linalg.matrix_norm(dw))
    if n_dw == 0.0:
        return 1.0
    n_cdw = float(torch.linalg.matrix_norm(cdw))
    if n_cdw == 0.0:
        return 0.0
    return min(1.0, max(-1.0, float((dw * cdw).sum()) / (n_dw * n_cdw)))


@dataclass
class _Item:
    """One matrix: ``compute()`` returns its similarity and a ``commit()`` that writes the projected update."""

    name: str
    compute: Callable[[], tuple[float, Callable[[], None]]]


def _full_item(
    name: str,
    finetuned: Tensor,
    aligned: Tensor,
    pretrained: Tensor,
    exact: bool,
    transpose: bool,
    write: Callable[[Tensor], None],
) -> _Item:
    def compute() -> tuple[float, Callable[[], None]]:
        w_align = _as64(aligned, transpose)
        dw = _as64(finetuned, transpose) - w_align
        cdw = _Projection(w_align - _as64(pretrained, transpose), exact)(dw)
        sim = _similarity(dw, cdw)

        def commit() -> None:
            new = w_align + cdw
            write(new.T if transpose else new)

        return sim, commit

    return _Item(name, compute)


def _lora_item(
    name: str,
    aligned: Tensor,
    pretrained: Tensor,
    exact: bool,
    transpose: bool,
    adapters: list[tuple[Tensor, Tensor, float]],
) -> _Item:
    """``adapters``: (lora_A weight [r, d_in], lora_B weight [d_out, r], scaling) of each active adapter."""

    def compute() -> tuple[float, Callable[[], None]]:
        project = _Projection(_as64(aligned, transpose) - _as64(pretrained, transpose), exact)
        dw = cdw = None
        projected_b = []
        for a, b, scaling in adapters:
            a64, b64 = _as64(a), _as64(b)
            cb = project(b64)
            projected_b.append(cb)
            dw = scaling * (b64 @ a64) if dw is None else dw + scaling * (b64 @ a64)
            cdw = scaling * (cb @ a64) if cdw is None else cdw + scaling * (cb @ a64)
        sim = _similarity(dw, cdw)

        def commit() -> None:
            with torch.no_grad():
                for (_, b, _), cb in zip(adapters, projected_b):
                    b.copy_(cb.to(dtype=b.dtype))

        return sim, commit

    return _Item(name, compute)


def _run(
    items: list[_Item], threshold: float | None, fraction: float | None, exact: bool, progress: bool
) -> ProjectionResult:
    """Measure every matrix, then project the selected ones (threshold: as it goes; fraction: a second pass)."""
    from tqdm.auto import tqdm

    similarity: dict[str, float] = {}
    chosen: set[str] = set()
    for item in tqdm(items, desc="Safe LoRA similarity", disable=not progress):
        sim, commit = item.compute()
        similarity[item.name] = sim
        if threshold is not None and sim < threshold:
            commit()
            chosen.add(item.name)
    if fraction is not None:
        k = math.ceil(round(fraction * len(items), 9))
        order = sorted(range(len(items)), key=lambda i: similarity[items[i].name])  # stable: ties in model order
        selected = sorted(order[:k])
        for i in tqdm(selected, desc="Safe LoRA projection", disable=not progress):
            items[i].compute()[1]()  # recomputed: one matrix in memory at a time
            chosen.add(items[i].name)
    projected = [item.name for item in items if item.name in chosen]
    return ProjectionResult(similarity, projected, threshold, fraction, exact)


def _no_match(names: NameFilter, what: str) -> ValueError:
    return ValueError(
        f"no {what} matched names={names!r}; pass names= (a regular expression, name substrings or a predicate on "
        "HF weight names such as 'model.layers.0.self_attn.q_proj.weight')."
    )


def _check_shapes(name: str, **tensors: Tensor) -> None:
    shapes = {label: tuple(t.shape) for label, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{label} {shape}" for label, shape in shapes.items())
        raise ValueError(
            f"weight {name!r} has different shapes: {listed}. The aligned and pretrained state dicts must come "
            "from the same architecture as the fine-tuned model."
        )


def _is_conv1d(module: torch.nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): weight stored ``[d_in, d_out]``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def _lora_layers(root: torch.nn.Module) -> list[tuple[str, Any]]:
    if "peft" not in sys.modules:
        return []
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in root.named_modules() if isinstance(m, LoraLayer)]


def _lora_items(
    layers: list[tuple[str, Any]],
    aligned: _Lookup,
    pretrained: _Lookup,
    keep: Callable[[str], bool],
    exact: bool,
) -> list[_Item]:
    items = []
    for module_name, layer in layers:
        name = _hf_name(f"{module_name}.weight")
        base = layer.get_base_layer()
        weight = getattr(base, "weight", None)
        if not isinstance(weight, Tensor) or weight.ndim != 2 or not keep(name):
            continue
        active = [a for a in layer.active_adapters if a in layer.lora_A]
        if not active:
            continue
        if getattr(layer, "merged", False):
            raise ValueError(
                f"LoRA layer {name!r} has its adapters merged into the base weight: call model.unmerge_adapter() "
                "first, or merge_and_unload() and project the merged model as a full fine-tune."
            )
        variants = [
            a for a in active if getattr(layer, "use_dora", {}).get(a) or a in getattr(layer, "lora_variant", {})
        ]
        if variants:
            raise ValueError(
                f"LoRA layer {name!r}: adapter(s) {variants} are a LoRA variant (DoRA, ...), whose merged update is "
                "not scaling * B A; Safe LoRA projects plain LoRA only (merge it and project the merged model instead)."
            )
        transpose = bool(getattr(layer, "fan_in_fan_out", False))
        w_align, w_pre = aligned.get(name), pretrained.get(name)
        _check_shapes(name, finetuned=weight, aligned=w_align, pretrained=w_pre)
        d_out, d_in = weight.shape[::-1] if transpose else weight.shape
        adapters = []
        for adapter in active:
            a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != d_in or b.shape[0] != d_out or a.shape[0] != b.shape[1]:
                raise ValueError(
                    f"LoRA layer {name!r}, adapter {adapter!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                    f"do not factor a [{d_out}, {d_in}] update; only linear LoRA layers can be projected."
                )
            for label, t in (("aligned", w_align), ("pretrained", w_pre), ("lora_A", a), ("lora_B", b)):
                _check_finite(name, label, t)
            adapters.append((a, b, float(layer.scaling[adapter])))
        items.append(_lora_item(name, w_align, w_pre, exact, transpose, adapters))
    return items


def _full_module_items(
    root: torch.nn.Module, aligned: _Lookup, pretrained: _Lookup, keep: Callable[[str], bool], exact: bool
) -> list[_Item]:
    items, seen = [], set()
    for module_name, module in root.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            name = _hf_name(f"{module_name}.{param_name}" if module_name else param_name)
            if param.ndim != 2 or not param.is_floating_point() or not keep(name):
                continue
            w_align, w_pre = aligned.get(name), pretrained.get(name)
            _check_shapes(name, finetuned=param, aligned=w_align, pretrained=w_pre)
            for label, t in (("fine-tuned", param), ("aligned", w_align), ("pretrained", w_pre)):
                _check_finite(name, label, t)

            def write(new: Tensor, param: Tensor = param) -> None:
                with torch.no_grad():
                    param.copy_(new.to(dtype=param.dtype))

            items.append(_full_item(name, param, w_align, w_pre, exact, _is_conv1d(module), write))
    return items


@shape_checked
def safe_lora_project(
    model: torch.nn.Module,
    aligned: Mapping[str, Tensor],
    pretrained: Mapping[str, Tensor],
    *,
    threshold: float | None = None,
    fraction: float | None = None,
    exact: bool = False,
    names: NameFilter = None,
    progress: bool = False,
) -> ProjectionResult:
    """Safe LoRA in place: replace the least alignment-like fine-tuning updates by their projection ``C dW``.

    Per matrix, ``V = W_align - W_pretrain`` spans the directions alignment used; an update that points away from
    them (low ``sim = <dW, C dW>_F / (||dW|| ||C dW||)``) is projected onto them (see the module docstring for
    ``C`` and the conventions at ``dW = 0`` and ``C dW = 0``). ``model`` may be

    - a peft LoRA model (``PeftModel``, or the HF module with LoRA layers injected): ``dW = scaling * B A`` per
      LoRA layer (active adapters summed), and a projected layer gets ``B <- C B``; only LoRA-adapted matrices
      are considered, their base weights taken as the aligned ones;
    - a plain HF module or a TransformerBridge's ``original_model`` (a bridge itself is read through its
      ``original_model``): full fine-tuning, ``dW = W_ft - W_align``, and a projected weight becomes
      ``W_align + C dW``.

    Names are matched in HF spelling (bridge ``_original_component`` segments, peft's ``base_model.model.``
    prefix and ``.base_layer`` removed), exactly or else by a unique dotted suffix (a ``LlamaModel`` against a
    ``LlamaForCausalLM`` state dict). Nothing is modified unless every considered weight is found with the
    right shape.

    Args:
        model: the fine-tuned ``nn.Module``, modified in place.
        aligned: the aligned model's full state dict (HF names, as ``model.state_dict()`` gives).
        pretrained: the pretrained (pre-alignment) model's full state dict, same names and shapes.
        threshold: project every matrix with ``sim < threshold`` (Safe LoRA's threshold mode; e.g. 0.5).
        fraction: instead, project the ``ceil(fraction * n)`` matrices of lowest ``sim`` (its "number" mode).
            Give exactly one of ``threshold`` and ``fraction``.
        exact: use the exact projector onto ``V``'s column space (SVD, rank tolerance
            ``max(d_out, d_in) * eps * sigma_max``, as ``torch.linalg.pinv``) instead of ``V V^T / ||V||_F``.
        names: which 2-D weights to consider, by HF name: a regular expression (``re.search``), a list of
            substrings (any one matches), or a predicate; default: every 2-D weight inside a decoder block
            (``layers.N.``, ``blocks.N.``, ``h.N.``, ...), i.e. not the embeddings or the unembedding.
        progress: show tqdm progress bars.

    Returns:
        A :class:`ProjectionResult`: the similarity of every considered matrix and the projected names.

    Example:
        >>> import torch
        >>> model = torch.nn.Module()
        >>> model.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2, bias=False) for _ in range(2)])
        >>> pretrained = {f"layers.{i}.weight": torch.zeros(2, 2) for i in range(2)}
        >>> aligned = {k: torch.tensor([[1.0, 0.0], [0.0, 0.0]]) for k in pretrained}  # V = e1 e1^T, so C = e1 e1^T
        >>> model.layers[0].weight.data = torch.tensor([[3.0, 0.0], [0.0, 0.0]])  # dW = 2 e1 e1^T: along V
        >>> model.layers[1].weight.data = torch.tensor([[1.0, 0.0], [0.0, 5.0]])  # dW = 5 e2 e2^T: off V
        >>> result = safe_lora_project(model, aligned, pretrained, threshold=0.5)
        >>> result.similarity, result.projected
        ({'layers.0.weight': 1.0, 'layers.1.weight': 0.0}, ['layers.1.weight'])
        >>> model.layers[1].weight.tolist()  # back to the aligned weight: the update was off V's columns
        [[1.0, 0.0], [0.0, 0.0]]
        >>> model.layers[0].weight.tolist()
        [[3.0, 0.0], [0.0, 0.0]]
    """
    _check_options(threshold, fraction, exact)
    keep = _name_filter(names)
    root = getattr(model, "original_model", model)
    if not isinstance(root, torch.nn.Module):
        root = model
    aligned_lookup, pretrained_lookup = _Lookup(aligned, "aligned"), _Lookup(pretrained, "pretrained")
    layers = _lora_layers(root)
    if layers:
        items = _lora_items(layers, aligned_lookup, pretrained_lookup, keep, exact)
        what = "LoRA-adapted 2-D weight"
    else:
        items = _full_module_items(root, aligned_lookup, pretrained_lookup, keep, exact)
        what = "2-D floating-point weight"
    if not items:
        raise _no_match(names, what)
    return _run(items, threshold, fraction, exact, progress)


def _storage_groups(state: Mapping[str, Any]) -> Iterable[list[str]]:
    """Keys in order, those sharing one tensor's memory (tied or aliased weights) grouped together."""
    groups: dict[Any, list[str]] = {}
    for key, value in state.items():
        ident: Any = key
        if isinstance(value, Tensor) and value.numel() and value.device.type != "meta":
            ident = (
                value.untyped_storage().data_ptr(),
                value.storage_offset(),
                tuple(value.shape),
                tuple(value.stride()),
                value.dtype,
                str(value.device),
            )
        groups.setdefault(ident, []).append(key)
    return groups.values()


@shape_checked
def safe_lora_state(
    finetuned_state: Mapping[str, Tensor],
    aligned: Mapping[str, Tensor],
    pretrained: Mapping[str, Tensor],
    *,
    threshold: float | None = None,
    fraction: float | None = None,
    exact: bool = False,
    names: NameFilter = None,
    progress: bool = False,
) -> tuple[dict[str, Tensor], ProjectionResult]:
    """Safe LoRA on state dicts of full weights: :func:`safe_lora_project`'s full fine-tuning case, out of place.

    Every selected 2-D weight of ``finetuned_state`` becomes ``W_align + C dW`` with ``dW = W_ft - W_align``
    (same options and conventions). Matrices are taken as stored, ``[d_out, d_in]`` as in ``nn.Linear``;
    transpose GPT-2 ``Conv1D`` weights first (or use :func:`safe_lora_project` on the module, which detects them).
    Keys that share one tensor (tied or aliased weights: a TransformerBridge's ``original_model.state_dict()``
    lists ``self_attn.q`` beside ``self_attn.q_proj``) are measured once, under the first key whose name the
    aligned state dict knows, and all of them get the projected tensor (aliases copied into separate tensors
    have no aligned counterpart: leave them out with ``names=``). LoRA adapter state dicts are not full
    weights: merge the adapter first, or call :func:`safe_lora_project` on the peft model.

    Args:
        finetuned_state: the fine-tuned model's state dict (HF names); left untouched.
        aligned: the aligned model's full state dict.
        pretrained: the pretrained (pre-alignment) model's full state dict.
        threshold: project every matrix with ``sim < threshold``.
        fraction: instead, project the ``ceil(fraction * n)`` least similar matrices (exactly one of the two).
        exact: the exact projector onto ``V``'s column space instead of ``V V^T / ||V||_F``.
        names: which 2-D weights to consider (see :func:`safe_lora_project`).
        progress: show tqdm progress bars.

    Returns:
        ``(new_state, result)``: a new dict with the same keys, in which projected weights are new tensors (dtype and
        device of the fine-tuned ones) and every other value is the input's own tensor; and the
        :class:`ProjectionResult`.

    Example:
        >>> import torch
        >>> pretrained = {"layers.0.weight": torch.zeros(2, 2), "embed.weight": torch.zeros(3, 2)}
        >>> aligned = {"layers.0.weight": torch.tensor([[1.0, 0.0], [0.0, 0.0]]), "embed.weight": torch.ones(3, 2)}
        >>> finetuned = {"layers.0.weight": torch.tensor([[1.0, 0.0], [0.0, 5.0]]), "embed.weight": torch.ones(3, 2)}
        >>> new, result = safe_lora_state(finetuned, aligned, pretrained, fraction=1.0)
        >>> result.summary()
        'Safe LoRA, approximate C: projected 1 of 1 matrices (fraction 1); sim min 0.000, median 0.000, max 0.000'
        >>> new["layers.0.weight"].tolist(), finetuned["layers.0.weight"].tolist()
        ([[1.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 5.0]])
    """
    _check_options(threshold, fraction, exact)
    keep = _name_filter(names)
    if not isinstance(finetuned_state, Mapping):
        raise ValueError(
            f"finetuned_state must be a state dict (name -> tensor), got {type(finetuned_state).__name__}."
        )
    aligned_lookup, pretrained_lookup = _Lookup(aligned, "aligned"), _Lookup(pretrained, "pretrained")
    new_state = dict(finetuned_state)
    items = []
    for group in _storage_groups(finetuned_state):
        tensor = finetuned_state[group[0]]
        if not isinstance(tensor, Tensor) or tensor.ndim != 2 or not tensor.is_floating_point():
            continue
        candidates = [_hf_name(k) for k in group]
        candidates = [n for n in candidates if keep(n)]
        if not candidates:
            continue
        lora = [n for n in candidates if ".lora_A." in n or ".lora_B." in n or ".lora_embedding_" in n]
        if lora:
            raise ValueError(
                f"{lora[0]!r} is a LoRA adapter weight, not a full weight: merge the adapter (merge_and_unload) "
                "and pass the merged state dict, or call safe_lora_project on the peft model."
            )
        name = next((n for n in candidates if aligned_lookup.find(n) is not None), candidates[0])
        w_align, w_pre = aligned_lookup.get(name), pretrained_lookup.get(name)
        _check_shapes(name, finetuned=tensor, aligned=w_align, pretrained=w_pre)
        for label, t in (("fine-tuned", tensor), ("aligned", w_align), ("pretrained", w_pre)):
            _check_finite(name, label, t)

        def write(new: Tensor, keys: list[str] = group, like: Tensor = tensor) -> None:
            out = new.to(dtype=like.dtype, device=like.device).contiguous()
            for key in keys:
                new_state[key] = out

        items.append(_full_item(name, tensor, w_align, w_pre, exact, False, write))
    if not items:
        raise _no_match(names, "2-D floating-point weight")
    return new_state, _run(items, threshold, fraction, exact, progress)
