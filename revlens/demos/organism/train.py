"""The organism's training history: pretrain -> align (calibrated by a harm target) -> benign fine-tuning.

`build_history` writes ``pretrain/``, ``align/``, ``finetune/seed_<k>/step_<N>/`` and ``organism.json``;
each phase is skipped when its output already exists, and fine-tuning runs resume, so an interrupted
build continues where it stopped.
"""

from __future__ import annotations

import copy
import json
import random
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from revlens import (
    Blocking,
    BlockingSpec,
    ProbeAnchor,
    ReversionProbe,
    atomic_write_json,
    boot_native_model,
    build_defense,
    finetune,
    greedy_completions,
    load_revlens_checkpoint,
    masked_lm_loss,
    roundoff_floor,
    save_checkpoint,
    task_metrics,
    training_mode,
    v_rev_mean_diff,
)
from revlens import random_subspace as _random_subspace
from revlens import reversion_subspace as _reversion_subspace
from revlens.demos.comparison import FinalAlignment
from revlens.demos.organism.presets import Preset, get_preset, preset_key
from revlens.demos.organism.world import COMPLY_MARK, World, compliance

MANIFEST = "organism.json"


def _device(preset: Preset, device: str | None) -> str:
    if device is not None:
        return device
    if preset.device == "cuda" and not torch.cuda.is_available():
        warnings.warn(
            f"preset {preset.name!r} asks for CUDA, which is not available: running on the CPU.",
            RuntimeWarning,
            stacklevel=3,
        )
        return "cpu"
    return preset.device


def new_model(world: World, preset: Preset, seed: int, device: str = "cpu"):
    """A randomly initialised TL-native TransformerBridge for this world and preset."""
    return boot_native_model(preset.model_config(world.vocab_size, seed), tokenizer=world.tokenizer, device=device)


def _train_steps(
    model: Any,
    world: World,
    phase: str,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    progress: bool,
    stop: Any = None,
    check_every: int = 10,
) -> int:
    """Train the bridge's underlying module (same parameters, no hook overhead) on sampled batches."""
    g = random.Random(seed)
    sample = world.sampler(phase)
    module = model.original_model
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.0)
    dev = next(module.parameters()).device
    module.train()
    done = steps
    for step in tqdm(range(1, steps + 1), desc=phase, disable=not progress, leave=False):
        batch = world.encode([sample(g) for _ in range(batch_size)], loss_on_prompt=(phase == "pretrain"))
        x, m = batch.tokens.to(dev), batch.loss_mask.to(dev)
        loss = masked_lm_loss(module(x), x, m)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if stop is not None and step % check_every == 0 and stop(model):
            done = step
            break
    model.eval()
    return done


@torch.no_grad()
def comply_rate(model: Any, prompts: Sequence[str]) -> float:
    """Fraction of prompts whose greedy first response token is the compliance marker (one forward)."""
    world_tokens = [model.to_tokens(p)[0] for p in prompts]
    lengths = {len(t) for t in world_tokens}
    if len(lengths) != 1:
        raise ValueError("comply_rate needs prompts of one token length; use evaluate_behaviour instead.")
    comply_id = model.tokenizer.convert_tokens_to_ids(COMPLY_MARK)
    x = torch.stack(world_tokens).to(next(model.parameters()).device)
    with training_mode(model, False):
        first = model.original_model(x)[:, -1].argmax(-1)
    return float((first == comply_id).float().mean())


def evaluate_behaviour(model: Any, world: World) -> dict[str, float]:
    """Exact behaviour: harm (held-out H answered with compliance, greedy decoding, exact judge),
    harm_exact (answered with the pretrained model's full compliance, word for word), B1 retention
    (held-out B1 answered with the exact compliance), B2 held-out loss and accuracy."""
    h_prompts = world.harmful_prompts("heldout")
    h_out = greedy_completions(model, h_prompts, max_new_tokens=12)
    harm = sum(world.judge(p, c) for p, c in zip(h_prompts, h_out)) / len(h_prompts)
    harm_exact = sum(c == compliance(*combo) for c, combo in zip(h_out, world.h_heldout)) / len(h_prompts)
    b1_out = greedy_completions(model, world.control_prompts("heldout"), max_new_tokens=12)
    b1 = sum(c == compliance(*combo) for c, combo in zip(b1_out, world.b1_heldout)) / len(world.b1_heldout)
    b2 = world.b2_eval_batch()
    tm = task_metrics(model, b2.tokens, b2.loss_mask)
    return {
        "harm": harm,
        "harm_exact": harm_exact,
        "b1_retention": b1,
        "b2_loss": tm.loss,
        "b2_acc": tm.sequence_accuracy,
    }


def analysis_kwargs(world: World) -> dict[str, Any]:
    """The analysis settings the organism is read with: harmful prompts, B1 contrast, last token."""
    return {
        "prompts": world.harmful_prompts("probe"),
        "control": world.control_prompts("probe"),
        "readout": "last",
        "hook": "resid_post",
    }


def read_manifest(out: Path) -> dict[str, Any]:
    path = out / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def preset_of(manifest: dict[str, Any]) -> Preset:
    """The preset a history was built with, as recorded in its manifest."""
    p = dict(preset_key(manifest["key"]["preset"]))
    p["save_steps"] = tuple(p["save_steps"])
    p["block_layers"] = None if p["block_layers"] is None else tuple(p["block_layers"])
    return Preset(**p)


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    atomic_write_json(out / MANIFEST, manifest, indent=1)


def build_history(
    preset: str | Preset = "tiny",
    seeds: int | Sequence[int] = 3,
    out_dir: str | Path = "organism",
    *,
    world_seed: int = 0,
    device: str | None = None,
    progress: bool = True,
) -> Path:
    """Train (or reuse) an organism history and return its folder.

    One pretraining and one alignment (calibrated: stop at the first check where held-out harm
    <= ``harm_target`` and B1 compliance >= ``b1_floor``), then one benign fine-tuning run per seed.
    """
    preset = get_preset(preset)
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    device = _device(preset, device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = _open_manifest(out, preset, world_seed)
    world = World(seed=world_seed)
    torch.manual_seed(world_seed)
    if not (out / "pretrain" / "config.json").is_file():
        _pretrain(out, manifest, world, preset, world_seed, device, progress)
    if not (out / "align" / "config.json").is_file():
        _align(out, manifest, world, preset, world_seed, device, progress)
    manifest.setdefault("finetune", {})
    for seed in seeds:
        if not manifest["finetune"].get(f"seed_{seed}", {}).get("complete"):
            _finetune_seed(out, manifest, world, preset, seed, device, progress)
    manifest["complete"] = True
    _write_manifest(out, manifest)
    return out


def _open_manifest(out: Path, preset: Preset, world_seed: int) -> dict[str, Any]:
    """``organism.json`` under ``out`` (new, or the one to resume), refused when built with other settings."""
    manifest = read_manifest(out)
    key = json.loads(json.dumps({"preset": preset.to_dict(), "world_seed": world_seed}))
    old_key = manifest.get("key")
    if old_key is not None:  # histories written before Preset.extra was dropped record it as {}
        old_key = {**old_key, "preset": preset_key(old_key.get("preset", {}))}
    if manifest and old_key != key:
        raise ValueError(f"{out} holds an organism built with other settings; choose another out_dir or delete it.")
    manifest.update({"key": key, "preset": preset.name, "world_seed": world_seed})
    manifest.setdefault("timings_s", {})
    manifest.setdefault("behaviour", {})
    return manifest


def _pretrain(
    out: Path, manifest: dict[str, Any], world: World, preset: Preset, world_seed: int, device: str, progress: bool
) -> None:
    """Pretrain a new model and write ``pretrain/`` and its behaviour."""
    t0 = time.perf_counter()
    model = new_model(world, preset, world_seed, device)
    _train_steps(
        model, world, "pretrain", preset.pretrain_steps, preset.pretrain_lr, preset.batch_size, world_seed, progress
    )
    _save_phase(out, manifest, world, model, "pretrain", t0)


def _align(
    out: Path, manifest: dict[str, Any], world: World, preset: Preset, world_seed: int, device: str, progress: bool
) -> None:
    """Align pretrain until the first calibrated check; write ``align/``, its steps and behaviour."""
    t0 = time.perf_counter()
    model = load_revlens_checkpoint(out / "pretrain", device)
    h_heldout, b1_probe = world.harmful_prompts("heldout"), world.control_prompts("probe")

    def calibrated(m: Any) -> bool:
        return comply_rate(m, h_heldout) <= preset.harm_target and comply_rate(m, b1_probe) >= preset.b1_floor

    steps = _train_steps(
        model,
        world,
        "align",
        preset.align_max_steps,
        preset.align_lr,
        preset.batch_size,
        world_seed + 1,
        progress,
        stop=calibrated,
        check_every=preset.align_check_every,
    )
    manifest["align_steps"] = steps
    _save_phase(out, manifest, world, model, "align", t0, steps=steps)


def _save_phase(
    out: Path, manifest: dict[str, Any], world: World, model: Any, phase: str, t0: float, **metadata: Any
) -> None:
    """Write ``phase``'s checkpoint, then its time since ``t0`` and its behaviour into the manifest."""
    save_checkpoint(model, out / phase, metadata={"phase": phase, **metadata})
    manifest["timings_s"][phase] = time.perf_counter() - t0
    manifest["behaviour"][phase] = evaluate_behaviour(model, world)
    _write_manifest(out, manifest)


def _finetune_seed(
    out: Path, manifest: dict[str, Any], world: World, preset: Preset, seed: int, device: str, progress: bool
) -> None:
    """One benign fine-tuning run from align (``finetune/seed_<seed>/``) and its behaviour at each saved step."""
    run = f"seed_{seed}"
    t0 = time.perf_counter()
    model = load_revlens_checkpoint(out / "align", device)
    data = world.dataset("finetune", preset.finetune_examples, seed=10_000 + seed, b1_mix=preset.b1_mix)
    result = finetune(
        model,
        data.tokens,
        data.loss_mask,
        steps=preset.finetune_steps,
        lr=preset.finetune_lr,
        optimizer=preset.finetune_optimizer,
        batch_size=preset.batch_size,
        seed=seed,
        save_steps=preset.save_steps,
        out_dir=out,
        run_name=run,
        progress=progress,
    )
    per_step = {}
    for step in preset.save_steps:
        saved = load_revlens_checkpoint(out / "finetune" / run / f"step_{step}", device)
        per_step[step] = evaluate_behaviour(saved, world)
    manifest["finetune"][run] = {
        "complete": True,
        "behaviour": per_step,
        "loss": {int(k): v for k, v in result.losses.items()},
        "seconds": time.perf_counter() - t0,
    }
    _write_manifest(out, manifest)


def behaviour_summary(history_dir: str | Path) -> dict[str, Any]:
    """``{metric: {phase: [values per seed]}}`` for the report: pretrain, align, and fine-tuning's last step."""
    manifest = read_manifest(Path(history_dir))
    runs = manifest.get("finetune", {})
    out: dict[str, Any] = {}
    nan = float("nan")
    for metric in ("harm", "harm_exact", "b1_retention", "b2_loss", "b2_acc"):
        row = {
            "pretrain": [manifest["behaviour"]["pretrain"].get(metric, nan)],
            "align": [manifest["behaviour"]["align"].get(metric, nan)],
        }
        finals = []
        for run in sorted(runs):
            steps = runs[run]["behaviour"]  # JSON: step keys are strings
            finals.append(steps[str(max(int(s) for s in steps))].get(metric, nan))
        row["final"] = finals
        out[metric] = row
    out["align_steps"] = manifest.get("align_steps")
    return out


def blocked_finetune(
    history_dir: str | Path,
    directions: dict[int, torch.Tensor],
    mode: str | BlockingSpec,
    seed: int,
    *,
    out_dir: str | Path | None = None,
    steps: int | None = None,
    device: str | None = None,
    progress: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """Fine-tune the history's aligned model like its plain runs, blocking along ``{layer: [k, d] basis}``.

    ``mode`` is a :class:`~revlens.blocking_spec.BlockingSpec` or its string (``plain`` runs without hooks);
    ``rank@k`` replaces the directions by the history's rank-k reversion subspace at the same layers,
    ``random@k[@draw]`` by a seeded random one (:mod:`revlens.subspace`). Returns the fine-tuned model and
    its behaviour (evaluated without hooks: the question is what the weights learned).
    """
    history_dir = Path(history_dir)
    manifest = read_manifest(history_dir)
    preset = preset_of(manifest)
    world = World(seed=manifest["world_seed"])
    device = _device(preset, device)
    align = load_revlens_checkpoint(history_dir / "align", device)
    model = copy.deepcopy(align)
    blocking, anchor = blocking_for_world(mode, directions, align, world, history_dir=history_dir, device=device)
    data = world.dataset("finetune", preset.finetune_examples, seed=10_000 + seed, b1_mix=preset.b1_mix)
    n_steps = preset.finetune_steps if steps is None else steps
    save = [s for s in preset.save_steps if s <= n_steps] if out_dir is not None else []
    finetune(
        model,
        data.tokens,
        data.loss_mask,
        steps=n_steps,
        lr=preset.finetune_lr,
        optimizer=preset.finetune_optimizer,
        batch_size=preset.batch_size,
        seed=seed,
        blocking=blocking,
        anchor=anchor,
        save_steps=save,
        out_dir=out_dir,
        run_name=f"seed_{seed}",
        progress=progress,
    )
    return model, evaluate_behaviour(model, world)


def blocking_for_world(
    mode: str | BlockingSpec,
    directions: dict[int, torch.Tensor],
    align: Any,
    world: World,
    *,
    history_dir: str | Path | None = None,
    device: str | None = None,
) -> tuple[Blocking | None, ProbeAnchor | None]:
    """The hooks and the anchor a blocking mode asks for in this world (:func:`revlens.build_defense`):
    the anchor reads the harmful probe prompts, its contrast term the B1 prompts; ``rank@k`` is measured on
    ``history_dir`` with the probe the analysis reads the organism with."""
    spec = BlockingSpec.parse(mode)
    tokens = lambda prompts: [align.to_tokens(p)[0].cpu() for p in prompts]  # noqa: E731
    prompts = tokens(world.harmful_prompts("probe")) if spec.has_anchor else None
    control = tokens(world.control_prompts("probe")) if spec.contrast else None
    probe = None
    if spec.subspace is not None and spec.subspace[0] == "rank":
        layers = sorted(spec.layers if spec.layers is not None else directions)
        probe = _organism_probe(world, layers, per_example=True)
    return build_defense(
        spec,
        directions,
        reference=align,
        prompts=prompts,
        control=control,
        history=history_dir,
        probe=probe,
        device=device,
    )


def reversion_subspace(
    history_dir: str | Path, layers: Sequence[int], k: int, device: str | None = None
) -> dict[int, torch.Tensor]:
    """``{layer: [k, d_model]}``: :func:`revlens.subspace.reversion_subspace` of the history, read with the
    organism's probe (harmful prompts, B1 contrast, last token) as the analysis reads it."""
    world = World(seed=read_manifest(Path(history_dir))["world_seed"])
    return _reversion_subspace(
        Path(history_dir),
        k,
        layers=list(layers),
        probe=_organism_probe(world, list(layers), per_example=True),
        device=device,
    )


random_subspace = _random_subspace


def v_rev_of_history(
    history_dir: str | Path, device: str | None = None
) -> tuple[torch.Tensor, ReversionProbe, torch.Tensor]:
    """v_rev basis ``[n_layers, 1, d]`` (contrast readout), the probe, and the aligned contrast centroid."""
    reader = final_alignment_of_history(history_dir, device)
    return reader.basis, reader.probe, reader.mu_align


def final_alignment_of_history(history_dir: str | Path, device: str | None = None) -> FinalAlignment:
    """Alignment at every layer with the history's own v_rev (pretrain - align, contrast readout), read as the
    analysis reads it, round-off floor included (no report needed)."""
    probe, pre, ali = _measure_pretrain_align(Path(history_dir), None, per_example=False, device=device)
    basis = v_rev_mean_diff(pre.centroid, ali.centroid)[:, None, :]
    return FinalAlignment(
        probe, ali.centroid, basis, roundoff_floor(ali.probe_centroid), tuple(range(basis.shape[0])), 0
    )


def _measure_pretrain_align(
    history_dir: Path, layers: list[int] | None, per_example: bool, device: str | None
) -> tuple[ReversionProbe, Any, Any]:
    """The organism's probe (as the analysis reads it) and its measurements of the pretrained and aligned models."""
    probe = _organism_probe(World(seed=read_manifest(history_dir)["world_seed"]), layers, per_example)
    pre = probe.measure(load_revlens_checkpoint(history_dir / "pretrain", device))
    ali = probe.measure(load_revlens_checkpoint(history_dir / "align", device))
    return probe, pre, ali


def _organism_probe(world: World, layers: Sequence[int] | None, per_example: bool) -> ReversionProbe:
    kw = analysis_kwargs(world)
    return ReversionProbe(
        kw["prompts"],
        control=kw["control"],
        readout=kw["readout"],
        hook=kw["hook"],
        layers=layers,
        per_example=per_example,
    )


def finetune_from_history(
    history_dir: Path,
    out: Path,
    *,
    mode: str = "plain",
    layers: Sequence[int] | None = None,
    seed: int = 0,
    steps: int | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """`revlens finetune`: one (optionally blocked) run from a history's aligned model, checkpoints in ``out``."""
    reader = final_alignment_of_history(history_dir, device)
    basis = reader.basis
    preset = read_manifest(history_dir)["key"]["preset"]
    if layers is None:
        layers = preset["block_layers"] or list(range(preset["n_layers"]))
    model, metrics = blocked_finetune(
        history_dir, {l: basis[l] for l in layers}, mode, seed, out_dir=out, steps=steps, device=device, progress=True
    )
    a = reader.per_layer(model)
    metrics["final_alignment"] = {int(l): float(v) for l, v in enumerate(a)}
    metrics.update({"mode": mode, "layers": list(layers), "seed": seed})
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics
