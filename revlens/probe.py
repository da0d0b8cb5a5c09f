"""ReversionProbe: per-layer readouts of the residual stream, reduced and accumulated streaming.

A readout h_l(theta, x) is the hook point's activation at layer l reduced over positions: the last
prompt token (``readout="last"``) or the mean over non-padding tokens (``readout="mean"``).
Hooks reduce each batch to ``[batch, n_layers, d_model]`` as the forward runs and the forward
stops after the deepest layer needed, so nothing is cached beyond one batch's readouts and
memory does not grow with the number of prompts. Centroids accumulate in float64.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from revlens._util import training_mode
from revlens.chat import AUTO, check_chat_template_choice, encode_requests, resolve_chat_template, template_for_history
from revlens.readout import (
    READOUTS,
    ProbeError,
    StopForward,
    TokenizedSet,
    check_hook_points,
    hook_name,
    hook_template,
    reduce_positions_unchecked,
)


class _Unset:
    """ "Nothing measured yet"; one instance, also after a probe is pickled to a worker process."""

    def __reduce__(self) -> str:
        return "_UNSET"

    def __repr__(self) -> str:
        return "_UNSET"


_UNSET = _Unset()


@dataclass
class ProbeResult:
    """Readouts of one model on the probe set (and the control set, when given).

    ``centroid`` is the probe centroid, or with a control set the contrast readout
    (probe centroid minus control centroid). ``per_example`` rows are contrast-adjusted the same way.
    """

    centroid: torch.Tensor  # [n_layers, d_model] float64
    probe_centroid: torch.Tensor  # [n_layers, d_model] float64
    control_centroid: torch.Tensor | None  # [n_layers, d_model] float64
    per_example: torch.Tensor | None  # [n_prompts, n_layers, d_model] float32
    covariance: torch.Tensor | None  # [n_layers, d_model, d_model] float64, of probe readouts
    n_prompts: int


def _as_token_list(prompts: Any, name: str) -> list[torch.Tensor] | list[str]:
    if isinstance(prompts, str):
        raise ProbeError(f"{name} must be a list of prompts, got one string; wrap it in a list.")
    if isinstance(prompts, torch.Tensor):
        if prompts.is_floating_point() or prompts.is_complex() or prompts.dtype == torch.bool:
            raise ProbeError(
                f"{name} token ids must be an integer tensor, got dtype {prompts.dtype}. "
                "Convert with .long() after checking the values are ids."
            )
        if prompts.ndim != 2:
            raise ProbeError(
                f"{name} as a tensor must be [n_prompts, seq] token ids, got shape {tuple(prompts.shape)}."
            )
        prompts = list(prompts)
    prompts = list(prompts)
    if not prompts:
        raise ProbeError(f"{name} is empty: give at least one prompt (a string or a 1-D tensor of token ids).")
    if all(isinstance(p, str) for p in prompts):
        return prompts
    if all(isinstance(p, torch.Tensor) and p.ndim == 1 and p.numel() > 0 for p in prompts):
        floats = [i for i, p in enumerate(prompts) if p.is_floating_point() or p.is_complex() or p.dtype == torch.bool]
        if floats:
            raise ProbeError(
                f"{name} token ids must be an integer tensor; prompt {floats[0]} has dtype "
                f"{prompts[floats[0]].dtype}. Convert with .long() after checking the values are ids."
            )
        return [p.long().cpu() for p in prompts]
    raise ProbeError(f"{name} must be all strings or all non-empty 1-D token tensors.")


class ReversionProbe:
    """Reads per-layer residual readouts of any TransformerBridge on a fixed probe set.

    Args:
        prompts: strings (tokenised with each model's tokenizer) or token ids (a list of 1-D tensors,
            or an ``[n, seq]`` tensor of unpadded prompts).
        layers: layer indices (default: all layers of the first model measured).
        hook: ``resid_post`` (default), ``resid_pre``, ``resid_mid``, ``attn_out``, ``mlp_out``, or a template.
        readout: ``last`` prompt token (default) or ``mean`` over non-padding tokens.
        control: an optional control set of the same format; then readouts are contrasts
            (probe minus the control centroid), which removes shifts applied to every prompt alike.
        batch_size, device: forward-pass batching and placement.
        per_example: keep per-example readouts (needed by per-example alignment and the
            ``per_example``/``pca`` estimators; memory grows with the number of prompts).
        chat_template: how string prompts are read: ``"auto"`` (default: each prompt is a user turn
            inside the model tokenizer's chat template, with the generation prompt, when it has one;
            raw prompts otherwise), ``True``, ``False`` or a Jinja template string used for every
            model (see :mod:`revlens.chat`). With ``readout="last"`` the readout is the template's
            last token, where the answer starts. Token-id prompts are read as given.
        system: optional system message for the template.

    Every model one probe measures must read the same rendering: a probe that read raw prompts on
    one model and templated ones on the next raises :class:`ProbeError` instead of comparing them.

    Returns:
        Per model: :meth:`measure` gives a :class:`ProbeResult` (float64 centroids ``[n_layers, d_model]``,
        optional per-example readouts and covariance), :meth:`centroid` the (contrast) centroid alone and
        :meth:`iter_readouts` the ``[batch, n_layers, d_model]`` readouts batch by batch.

    Example:
        >>> probe = ReversionProbe(prompts, layers=[0, 1])  # or revlens.default_prompts()
        >>> probe.centroid(aligned).shape  # [n_layers, d_model], float64
        torch.Size([2, 16])
        >>> moved = probe.centroid(model) - probe.centroid(aligned)  # model: aligned moved 0.6 u + 0.8 w at layer 0
        >>> [round(float(x), 3) for x in moved[0, :2]]
        [0.6, 0.8]
        >>> probe.measure(model).per_example.shape  # [n_prompts, n_layers, d_model]
        torch.Size([5, 2, 16])
    """

    def __init__(
        self,
        prompts: Any,
        *,
        layers: Sequence[int] | None = None,
        hook: str = "resid_post",
        readout: str = "last",
        control: Any = None,
        batch_size: int = 32,
        device: str | torch.device | None = None,
        per_example: bool = True,
        progress: bool = False,
        chat_template: Any = AUTO,
        system: str | None = None,
    ):
        if readout not in READOUTS:
            raise ProbeError(f"unknown readout {readout!r}; choose one of {READOUTS}.")
        if batch_size < 1:
            raise ProbeError(f"batch_size must be >= 1, got {batch_size}.")
        hook_template(hook)
        try:
            check_chat_template_choice(chat_template)
        except ValueError as err:
            raise ProbeError(str(err)) from None
        self.prompts = _as_token_list(prompts, "prompts")
        self.control = None if control is None else _as_token_list(control, "control prompts")
        templated = chat_template is True or (isinstance(chat_template, str) and chat_template != AUTO)
        if not isinstance(self.prompts[0], str) and (templated or system is not None):
            raise ProbeError(
                "token-id prompts are read as given, so chat_template/system do not apply; pass the "
                "request strings, or encode them yourself with revlens.chat.encode_requests."
            )
        self.layers = None if layers is None else _check_layers(layers)
        self.chat_template = chat_template
        self.system = system
        self._rendering: Any = _UNSET
        self.hook = hook
        self.readout = readout
        self.batch_size = batch_size
        self.device = device
        self.per_example = per_example
        self.progress = progress
        self._tokenized: dict[tuple, TokenizedSet] = {}

    @property
    def n_prompts(self) -> int:
        return len(self.prompts)

    @property
    def chat_template_used(self) -> bool | None:
        """Whether prompts are read through a chat template: as measured, else as fixed by the settings
        (None: "auto" and no model measured yet)."""
        if self._rendering is not _UNSET:
            return self._rendering is not None
        if not isinstance(self.prompts[0], str) or self.chat_template is False:
            return False
        return None if self.chat_template is True or self.chat_template == AUTO else True

    @property
    def rendered_template(self) -> str | None:
        """The chat template text string prompts were rendered with on the models measured so far (None: raw
        prompts, token ids, or nothing measured yet)."""
        return None if self._rendering is _UNSET else self._rendering

    def use_template_of(self, reference: Any) -> None:
        """Read every model's string prompts like ``reference`` (a model or checkpoint folder, usually the
        aligned one): ``"auto"``/``True`` become its tokenizer's template text, or False when it has none.
        A base model without a template is then read through its instruct model's template."""
        if isinstance(self.prompts[0], str):
            try:
                self.chat_template = template_for_history(reference, self.chat_template)
            except ValueError as err:
                raise ProbeError(str(err)) from None

    def resolve_layers(self, model: Any) -> list[int]:
        n_layers = model.cfg.n_layers
        layers = list(range(n_layers)) if self.layers is None else self.layers
        bad = [l for l in layers if not 0 <= l < n_layers]
        if bad:
            raise ProbeError(f"layers {bad} are out of range for a model with n_layers={n_layers}.")
        if not layers:
            raise ProbeError("layers is empty; give at least one layer index.")
        check_hook_points(model, self.hook, layers)
        return layers

    def template_for(self, model: Any) -> str | None:
        """The chat template string prompts are rendered with for ``model`` (None: raw prompts)."""
        if not isinstance(self.prompts[0], str):
            return None
        try:
            return resolve_chat_template(getattr(model, "tokenizer", None), self.chat_template)
        except ValueError as err:
            raise ProbeError(str(err)) from None

    def _check_rendering(self, template: str | None) -> None:
        if self._rendering is not _UNSET and self._rendering != template:
            before = "raw prompts" if self._rendering is None else "a chat template"
            now = (
                "raw prompts"
                if template is None
                else ("a chat template" if self._rendering is None else "another chat template")
            )
            raise ProbeError(
                f"this probe read {before} on an earlier model but would read {now} on this one (its tokenizer's "
                "chat template differs), so the readouts would not be comparable. Read every model alike: pass "
                "chat_template=<the template text, e.g. the aligned tokenizer's .chat_template> "
                "or chat_template=False."
            )
        self._rendering = template

    def _tokenize(self, model: Any, prompts: list, which: str) -> TokenizedSet:
        template = self.template_for(model)
        self._check_rendering(template)
        key = (
            _tokenizer_fingerprint(model.tokenizer),
            getattr(model.cfg, "default_prepend_bos", None),
            model.cfg.n_ctx,
            model.cfg.d_vocab,
            template,
            self.system,
            which,
        )
        if key in self._tokenized:
            return self._tokenized[key]
        if isinstance(prompts[0], str):
            if model.tokenizer is None:
                raise ProbeError("string prompts need a model with a tokenizer; pass token ids instead.")
            if template is not None:
                tokens = encode_requests(model.tokenizer, prompts, chat_template=template, system=self.system)
            elif self.system is not None:
                raise ProbeError(
                    "system= needs a chat template, but this model's tokenizer has none and "
                    "chat_template is not a template string; drop system= or pass the template text."
                )
            else:
                tokens = [model.to_tokens(p, move_to_device=False, truncate=False)[0].cpu() for p in prompts]
        else:
            tokens = prompts
        n_ctx = model.cfg.n_ctx
        too_long = [(i, len(t)) for i, t in enumerate(tokens) if len(t) > n_ctx]
        if too_long:
            i, n = too_long[0]
            raise ProbeError(
                f"{len(too_long)} {which} prompt(s) are longer than the model's context (n_ctx={n_ctx}); "
                f"e.g. prompt {i} has {n} tokens. Shorten them or drop them."
            )
        if any(int(t.max()) >= model.cfg.d_vocab or int(t.min()) < 0 for t in tokens):
            raise ProbeError(f"{which} token ids fall outside the model's vocabulary (d_vocab={model.cfg.d_vocab}).")
        out = TokenizedSet(tokens)
        self._tokenized[key] = out
        return out

    def _device(self, model: Any) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        try:
            return next(model.parameters()).device
        except StopIteration:
            return torch.device("cpu")

    def iter_readouts(self, model: Any, which: str = "probe") -> Iterator[torch.Tensor]:
        """Yield readouts batch by batch: ``[batch, n_layers, d_model]`` in the model's dtype."""
        prompts = self.prompts if which == "probe" else self.control
        if prompts is None:
            raise ProbeError("this probe has no control set.")
        layers = self.resolve_layers(model)
        tokset = self._tokenize(model, prompts, which)
        pad_id = _pad_id(model)
        device = self._device(model)
        deepest = max(layers)
        store: dict[int, torch.Tensor] = {}

        def make_hook(layer: int):
            def fn(act: torch.Tensor, hook: Any) -> None:
                store[layer] = reduce_positions_unchecked(act, store["_lengths"], self.readout)
                if layer == deepest and len(store) == len(layers) + 1:
                    raise StopForward

            return fn

        fwd_hooks = [(hook_name(self.hook, l), make_hook(l)) for l in layers]
        with training_mode(model, False):
            with torch.inference_mode(), model.hooks(fwd_hooks=fwd_hooks):
                batches = tokset.device_batches(self.batch_size, pad_id, device)
                for tokens, lengths in tqdm(
                    batches, disable=not self.progress, desc=f"readouts ({which})", leave=False
                ):
                    store.clear()
                    store["_lengths"] = lengths
                    try:
                        model(tokens)
                    except StopForward:
                        pass
                    missing = [l for l in layers if l not in store]
                    if missing:
                        raise ProbeError(f"hook {self.hook!r} did not fire at layers {missing}.")
                    yield torch.stack([store[l] for l in layers], dim=1)

    def measure(self, model: Any, *, covariance: bool = False, per_example: bool | None = None) -> ProbeResult:
        """Centroids (float64, streaming), optional per-example readouts and readout covariance."""
        keep = self.per_example if per_example is None else per_example
        probe_sum, probe_sq, rows, n = None, None, [], 0
        for batch in self.iter_readouts(model, "probe"):
            b = batch.double()
            probe_sum = b.sum(0) if probe_sum is None else probe_sum + b.sum(0)
            if covariance:
                outer = torch.einsum("bld,ble->lde", b, b)
                probe_sq = outer if probe_sq is None else probe_sq + outer
            if keep:
                rows.append(batch.float().cpu())
            n += b.shape[0]
        probe_centroid = (probe_sum / n).cpu()
        cov = None
        if covariance:
            mean = probe_sum / n
            cov = ((probe_sq - n * torch.einsum("ld,le->lde", mean, mean)) / max(n - 1, 1)).cpu()
        control_centroid = None
        if self.control is not None:
            control_centroid = self.control_centroid(model)
        centroid = probe_centroid if control_centroid is None else probe_centroid - control_centroid
        per_ex = None
        if keep:
            per_ex = torch.cat(rows, 0)
            if control_centroid is not None:
                per_ex = per_ex - control_centroid.float()[None]
        return ProbeResult(centroid, probe_centroid, control_centroid, per_ex, cov, n)

    def control_centroid(self, model: Any) -> torch.Tensor:
        """Centroid of the control set's readouts, float64 ``[n_layers, d_model]``."""
        total, n = None, 0
        for batch in self.iter_readouts(model, "control"):
            b = batch.double().sum(0)
            total = b if total is None else total + b
            n += batch.shape[0]
        return (total / n).cpu()

    def centroid(self, model: Any) -> torch.Tensor:
        """The (contrast) centroid alone, without per-example readouts."""
        return self.measure(model, per_example=False).centroid


def _check_layers(layers: Sequence[int]) -> list[int]:
    try:
        if isinstance(layers, (str, bytes)):
            raise TypeError
        out = [operator.index(l) for l in layers]
    except TypeError:
        raise ProbeError(f"layers must be a list of integer layer indices, got {layers!r}.") from None
    repeated = sorted({l for l in out if out.count(l) > 1})
    if repeated:
        raise ProbeError(f"layers {repeated} are listed more than once; give each layer once.")
    return out


def _tokenizer_fingerprint(tokenizer: Any) -> int | None:
    """Equal for tokenizers with the same vocabulary, so checkpoints loaded one by one share one tokenization."""
    if tokenizer is None:
        return None
    return hash(
        (
            type(tokenizer).__name__,
            frozenset(tokenizer.get_vocab().items()),
            getattr(tokenizer, "bos_token_id", None),
            getattr(tokenizer, "pad_token_id", None),
            getattr(tokenizer, "add_bos_token", None),
        )
    )


def _pad_id(model: Any) -> int:
    tok = getattr(model, "tokenizer", None)
    if tok is not None and tok.pad_token_id is not None:
        return int(tok.pad_token_id)
    return 0
