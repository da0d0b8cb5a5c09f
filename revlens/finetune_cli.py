"""`revlens finetune`: fine-tune a history's aligned model (optionally blocking v_rev), writing checkpoints
``analyze`` reads.

For any history with ``pretrain/`` and ``align/`` (Hugging Face or revlens folders) and a JSONL of chat data
(``--data``): v_rev is measured on the probe prompts between pretrain and align, ``align`` is fine-tuned
(in full, or with LoRA) on the data with the blocking setup ``--mode`` (any
:class:`~revlens.blocking_spec.BlockingSpec` string: hook modes, the probe anchor ``anchor@W`` /
``contrast@W``, ``rank@K`` / ``random@K`` subspaces, ``sample@K``, ``layers@...``) at ``--layers``, and
checkpoints go to ``OUT/finetune/<run>/step_<N>/`` (HF folders, adapter folders with LoRA, revlens folders for
TL-native models). ``OUT/pretrain`` and ``OUT/align`` link to the
history's, so ``revlens analyze OUT`` reads the run directly.

Histories written by a demo (with a marker file such as ``organism.json``) and no ``--data`` are fine-tuned
by the demo's own function (its task data and mode grammar), registered by the command line's composition
root (:mod:`revlens.cli`) through ``add_cli(..., finetuners=...)``: core never imports a demo.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from revlens._util import atomic_write_json, temp_sibling
from revlens.blocking_spec import BlockingSpec
from revlens.config import FinetuneConfig, add_config_arguments, config_from_args, parse_layers

# Options that only the --data path uses (default None so that their use is detectable).
DATA_OPTIONS = (
    "lr",
    "batch_size",
    "grad_accum",
    "lora_r",
    "lora_alpha",
    "dtype",
    "autocast",
    "max_grad_norm",
    "warmup",
    "schedule",
    "save_steps",
    "prompts",
    "control",
    "max_length",
    "run_name",
    "replay",
)


def default_save_steps(steps: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to ``steps`` (the last step is always saved too)."""
    out, base = [], 1
    while base <= steps:
        out += [s for s in (base, 2 * base, 5 * base) if s <= steps]
        base *= 10
    return out


def add_cli(sub: Any, finetuners: Mapping[str, str | Callable[..., dict]] | None = None) -> None:
    """Register ``revlens finetune``; ``finetuners`` maps a history's marker file to the demo function
    (``"module:function"``, imported only when such a history is fine-tuned without ``--data``)."""
    p = sub.add_parser(
        "finetune",
        help="fine-tune a history's aligned model on chat data, optionally blocking v_rev",
        description="Fine-tune HISTORY_DIR/align on --data (JSONL of chat messages or prompt/response pairs), "
        "writing OUT/finetune/<run>/step_<N>/ that `revlens analyze OUT` reads; resumes when "
        "interrupted and refuses a rerun with other settings unless --overwrite. Demo histories "
        "(organism.json) without --data fine-tune on the demo's own task.",
    )
    p.add_argument("history_dir", help="a history folder with pretrain/ and align/ (HF or revlens folders)")
    p.add_argument("--out", required=True, help="output folder: OUT/finetune/<run>/step_<N>/")
    p.add_argument(
        "--data", help='JSONL training data: {"messages": [...]} or {"prompt": ..., "response": ...} per line'
    )
    p.add_argument(
        "--mode",
        default="plain",
        help="plain, or parts joined by '+': hook modes project, clamp, grad; "
        "the probe anchor anchor@W, contrast@W (needs --control), sample@K; subspaces rank@K, "
        "random@K[@DRAW], refusal (needs --control), harmpca@K, full; the baselines kl@W, replay@R (needs "
        "--replay), safelora@F; layers@L1/L2 (e.g. anchor@0.003+contrast@0.1+rank@64)",
    )
    p.add_argument(
        "--replay",
        default=None,
        help="JSONL of examples to replay (as --data; e.g. align's refusal examples) for --mode replay@R",
    )
    p.add_argument("--layers", type=parse_layers, default=None, help="comma-separated layers to block (default: all)")
    add_config_arguments(p, FinetuneConfig, unset_default=True)
    p.add_argument("--lora-r", type=int, default=None, help="train LoRA adapters of this rank (all linear layers)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["auto", "bfloat16", "float16", "float32"],
        help="weights' dtype while training (default auto: as loaded)",
    )
    p.add_argument("--autocast", default=None, choices=["bf16", "fp16"], help="mixed precision forward passes")
    p.add_argument("--max-length", type=int, default=None, help="longest conversation in tokens (default: n_ctx)")
    p.add_argument("--prompts", help="probe prompt file for v_rev (default: the shipped harmful requests)")
    p.add_argument("--control", help="control prompt file (contrast readout for v_rev)")
    p.set_defaults(func=lambda args: run_cli(args, dict(finetuners or {})))


def _n_layers(folder: Path) -> int | None:
    """n_layers from a checkpoint's config.json (revlens or HF), without loading the weights."""
    path = folder / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    config = config.get("bridge_config", config)
    config = config.get("text_config", config)
    for key in ("n_layers", "num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def _check_history(history: Path) -> None:
    if not history.is_dir():
        raise FileNotFoundError(f"history folder {history} does not exist.")
    for phase in ("pretrain", "align"):
        if not (history / phase).is_dir():
            raise ValueError(
                f"{history} has no {phase}/ folder; `revlens finetune` needs pretrain/ and align/ "
                "(Hugging Face or revlens checkpoint folders)."
            )


def _check_layers(layers: list[int] | None, n_layers: int | None, what: str = "--layers") -> None:
    if layers is None or n_layers is None:
        return
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise ValueError(
            f"{what} {','.join(map(str, layers))}: layer(s) {bad} out of range; the model has "
            f"{n_layers} layers (0..{n_layers - 1})."
        )


def _resolve(target: str | Callable[..., dict]) -> Callable[..., dict]:
    if callable(target):
        return target
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def run_cli(args: argparse.Namespace, finetuners: Mapping[str, Any]) -> int:
    from revlens import distributed
    from revlens.finetune import check_run_name, check_run_unlocked

    history, out = Path(args.history_dir), Path(args.out)
    _check_history(history)
    _check_layers(args.layers, _n_layers(history / "align"))
    # a run folder another process is training into is refused before anything loads (finetune() holds the lock)
    run = (args.run_name if args.data is not None else None) or f"seed_{args.seed}"
    check_run_unlocked(out / "finetune" / check_run_name(run))
    ctx = distributed.context(None)  # under torchrun: data-parallel, each rank on cuda:LOCAL_RANK (or the CPU)
    if ctx.active:
        if args.data is None:
            raise ValueError(
                "under torchrun, `revlens finetune` needs --data (demo histories fine-tune in one process)."
            )
        args.device = args.device or ctx.device
    if args.data is None:
        marker = next((m for m in finetuners if (history / m).is_file()), None)
        if marker is None:
            raise ValueError(
                f"{history} is not a demo history (no {' / '.join(finetuners) or 'marker file'}): give "
                'the training data with --data train.jsonl (one {"messages": [...]} or '
                '{"prompt": ..., "response": ...} per line).'
            )
        used = [f"--{o.replace('_', '-')}" for o in DATA_OPTIONS if getattr(args, o) is not None]
        if used:
            raise ValueError(
                f"{' '.join(used)} only apply with --data; the {marker} history fine-tunes on its "
                "own task with its preset's settings."
            )
        if args.overwrite:
            _remove(out / "finetune" / f"seed_{args.seed}")
        metrics = _resolve(finetuners[marker])(
            history, out, mode=args.mode, layers=args.layers, seed=args.seed, steps=args.steps, device=args.device
        )
    else:
        metrics = finetune_history(history, out, args)
        if not ctx.is_main:
            return 0
        atomic_write_json(out / "metrics.json", metrics, indent=1)
    _link_phases(history, out)
    print(json.dumps(metrics, indent=1))
    return 0


def _remove(folder: Path) -> None:
    if folder.exists():
        aside = temp_sibling(folder).with_suffix(".old")
        folder.rename(aside)
        shutil.rmtree(aside, ignore_errors=True)


def _link_phases(history: Path, out: Path) -> None:
    """``OUT/pretrain`` and ``OUT/align`` as links to the history's, so OUT is a history `analyze` reads."""
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() == history.resolve():
        return
    for phase in ("pretrain", "align"):
        link = out / phase
        if not link.exists() and not link.is_symlink():
            link.symlink_to((history / phase).resolve(), target_is_directory=True)


def blocking_setup(mode: str, layers: list[int] | None, n_layers: int | None) -> tuple[BlockingSpec, list[int] | None]:
    """The ``--mode`` setup with its layers settled, and those layers (None for plain).

    ``--layers`` and a ``layers@`` part of the mode say the same thing: either may be given, both only when
    they agree; neither means every layer. Bad modes raise the strict parser's error (it names the part).
    """
    spec = BlockingSpec.parse(mode)
    if spec.is_plain:
        if layers is not None:
            raise ValueError(
                "--layers says where to block, but --mode plain blocks nothing; give a blocking mode "
                "(e.g. --mode project or anchor@0.003) or drop --layers."
            )
        return spec, None
    if spec.layers is not None:
        _check_layers(list(spec.layers), n_layers, what=f"--mode {mode}: layers@")
        if layers is not None and sorted(layers) != list(spec.layers):
            raise ValueError(
                f"--layers {','.join(map(str, layers))} and the mode's layers@"
                f"{'/'.join(map(str, spec.layers))} disagree; give the layers once (either)."
            )
        layers = list(spec.layers)
    if layers is None:
        if n_layers is None:
            raise ValueError("cannot tell how many layers align/ has (no config.json); give --layers.")
        layers = list(range(n_layers))
    return spec.with_layers(layers), sorted(layers)


def finetune_history(history: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The --data path: measure v_rev, fine-tune align/ on the data with blocking, return the run's summary."""
    import torch

    from revlens.analysis import default_prompts, load_prompt_file
    from revlens.blocking import build_defense
    from revlens.checkpoint_loader import load_checkpoint
    from revlens.finetune import finetune
    from revlens.reversion_directions import ReversionDirections
    from revlens.sft_data import load_sft_jsonl

    spec, layers = blocking_setup(args.mode, args.layers, _n_layers(history / "align"))
    prompts = load_prompt_file(args.prompts) if args.prompts else default_prompts()
    control = load_prompt_file(args.control) if args.control else None
    steps, lora, rank = _data_run_options(args, spec, len(prompts))
    dtype = None if args.dtype in (None, "auto") else getattr(torch, args.dtype)
    autocast = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.autocast]

    def load(phase: str):
        model = load_checkpoint(history / phase, args.device)
        return model if dtype is None else model.to(dtype)

    model = load("align")
    data = load_sft_jsonl(args.data, model.tokenizer, max_length=args.max_length or getattr(model.cfg, "n_ctx", None))
    blocking = anchor = mix = None
    if spec.replay is not None:
        from revlens.replay import ReplayMix

        rows = load_sft_jsonl(
            args.replay, model.tokenizer, max_length=args.max_length or getattr(model.cfg, "n_ctx", None)
        )
        mix = ReplayMix(rows.tokens, rows.loss_mask, spec.replay)
    if spec.needs_directions or spec.has_penalty:
        directions = None
        if spec.needs_directions:  # v_rev, or with rank@k the rank-k reversion subspace, of pretrain -> align
            directions = ReversionDirections.from_models(
                load("pretrain"), model, prompts, control=control, layers=layers, rank=rank
            )
        # a fresh load: deepcopy of HF bridges leaks
        measured = spec.subspace is not None and spec.subspace[0] in ("refusal", "harmpca")
        reference = load("align") if "clamp" in spec.hooks or spec.has_penalty or measured else None
        blocking, anchor = build_defense(
            spec, directions, reference=reference, prompts=prompts, control=control, seed=args.seed
        )
    run = args.run_name or f"seed_{args.seed}"
    save_steps = [s for s in (args.save_steps or default_save_steps(steps)) if s <= steps]
    config = config_from_args(
        FinetuneConfig,
        args,
        steps=steps,
        batch_size=8 if args.batch_size is None else args.batch_size,
        save_steps=save_steps,
        out_dir=out,
        run_name=run,
        autocast_dtype=autocast,
        lora=lora,
        spec=spec,
    )
    result = finetune(model, data.tokens, data.loss_mask, config=config, blocking=blocking, anchor=anchor, replay=mix)
    projected = None
    if spec.safelora is not None:
        projected = _safe_lora_checkpoint(model, history, out, run, steps, spec, load)
    return {
        "mode": str(spec),
        "layers": layers,
        "seed": args.seed,
        "run": run,
        "steps": steps,
        "lr": config.learning_rate,
        "lora": lora,
        "examples": int(data.tokens.shape[0]),
        "chat_template": data.chat_template,
        "resumed_from": result.resumed_from,
        "final_loss": result.losses.get(steps),
        "checkpoints": {int(s): str(p) for s, p in sorted(result.checkpoints.items())},
        "safelora": projected,
    }


def _data_run_options(
    args: argparse.Namespace, spec: BlockingSpec, n_prompts: int
) -> tuple[int, dict[str, int] | None, int | None]:
    """The --data run's ``(steps, LoRA settings or None, rank of rank@K or None)``; refuses options that do not fit
    together (contrast without --control, replay@R without --replay, a rank above the probe set), naming the fix."""
    if (spec.contrast or spec.subspace == ("refusal",)) and not args.control:
        raise ValueError(
            f"--mode {args.mode}: contrast@W and the refusal direction read the probe-minus-control contrast; give "
            "the control prompts with --control FILE (e.g. --control harmless_requests.txt, the shipped set)."
        )
    if (spec.replay is not None) != (args.replay is not None):
        raise ValueError(
            f"--mode {args.mode} and --replay {args.replay}: replay@R draws R rows of each batch from --replay FILE; "
            "give both or neither."
        )
    rank = spec.subspace[1] if spec.subspace is not None and spec.subspace[0] == "rank" else None
    if rank is not None and rank > n_prompts:
        raise ValueError(
            f"--mode {args.mode}: rank@{rank} needs at least {rank} probe prompts (the subspace is "
            f"spanned by their differences); the probe set has {n_prompts}: give more with --prompts "
            "or a lower rank."
        )
    steps = 100 if args.steps is None else args.steps
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}.")
    lora = None
    if args.lora_r is not None:
        if args.lora_r < 1:
            raise ValueError(f"--lora-r must be >= 1, got {args.lora_r}.")
        lora = {"r": args.lora_r, "lora_alpha": args.lora_alpha or 2 * args.lora_r}
    return steps, lora, rank


def _safe_lora_checkpoint(
    model: Any, history: Path, out: Path, run: str, steps: int, spec: BlockingSpec, load: Callable[[str], Any]
) -> dict[str, Any]:
    """``safelora@F``: the trained model's update projected (:func:`revlens.weight_projection.safe_lora_project`)
    and written as the run ``<run>-safelora`` at the last step, beside the unprojected run."""
    from revlens.checkpoint_save import save_checkpoint
    from revlens.weight_projection import safe_lora_project

    def hf_state(phase: str) -> dict[str, Any]:
        bridge = load(phase)
        return {k: v.detach().clone() for k, v in getattr(bridge, "original_model", bridge).state_dict().items()}

    target = getattr(model, "original_model", None)
    if target is None:
        raise ValueError(
            f"--mode {spec}: safelora@F projects Hugging Face weights; this history's align is a "
            "TransformerLens-native model. Drop safelora@F, or fine-tune a Hugging Face history."
        )
    result = safe_lora_project(target, hf_state("align"), hf_state("pretrain"), fraction=spec.safelora)
    folder = save_checkpoint(model, out / "finetune" / f"{run}-safelora" / f"step_{steps}")
    return {"folder": str(folder), **result.to_dict()}
