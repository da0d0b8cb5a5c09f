"""The `revlens` command line: analyze a history, run a demo (revlens.demos), fine-tune with blocking."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from revlens import finetune_cli
from revlens.demos import cli as demo_cli
from revlens.finetune_cli import parse_layers

# Demo histories (by marker file) that `revlens finetune` fine-tunes on the demo's own task when no --data is
# given; named here, at the composition root, and imported only for such a history.
DEMO_FINETUNERS = {"organism.json": "revlens.demos.organism.train:finetune_from_history"}


def _add_analyze(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="measure drift along v_rev over a checkpoint folder",
        description="Read CKPT_DIR (pretrain/, align/, finetune/<run>/step_<N>/), write "
        "report.json to --out and print the summary table.",
    )
    p.add_argument("ckpt_dir", help="history folder: pretrain/ align/ finetune/<run>/step_<N>/")
    p.add_argument("--out", required=True, help="folder for report.json (and dashboard.html with --html)")
    p.add_argument("--prompts", help="probe prompt file, one per line (default: the packaged harmful_requests.txt)")
    p.add_argument("--control", help="control prompt file; enables the contrast readout")
    p.add_argument("--layers", type=parse_layers, help="comma-separated layer indices (default: all)")
    p.add_argument("--hook", default="resid_post")
    p.add_argument("--readout", default="last", choices=["last", "mean"])
    p.add_argument("--estimator", default="mean_diff", choices=["mean_diff", "per_example", "pca"])
    p.add_argument("--k", type=int, default=1, help="subspace rank for --estimator pca")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--device", default=None, help="torch device: cpu, cuda, cuda:N, mps (default: where the model loads)"
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights dtype; auto (default) keeps each checkpoint's own",
    )
    p.add_argument(
        "--device-map",
        default=None,
        help="'auto' spreads a Hugging Face model over all visible GPUs (instead of --device)",
    )
    p.add_argument(
        "--base", default=None, help="base model folder for LoRA adapter checkpoints whose base is not a local folder"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 1 for models under 20M parameters, more for larger ones; "
        "or set REVLENS_NUM_THREADS)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes measuring checkpoints side by side on the CPU (the cores shared out as threads; "
        "default 1); under torchrun the ranks share them instead",
    )
    p.add_argument(
        "--chat-template",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="read each prompt as a user turn in the aligned model's chat template (default: when its "
        "tokenizer has one)",
    )
    p.add_argument("--system", default=None, help="system message for the chat template")
    p.add_argument("--html", action="store_true", help="also write the interactive dashboard.html")
    p.set_defaults(func=_run_analyze)


def _run_analyze(args: argparse.Namespace) -> int:
    from revlens import distributed
    from revlens.analysis import analyze, load_prompt_file

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder (it will hold report.json and cache/).")
    in_job = distributed.launched_by_torchrun()  # under torchrun with N > 1: ranks share the checkpoints
    report = analyze(
        args.ckpt_dir,
        load_prompt_file(args.prompts) if args.prompts else None,
        control=load_prompt_file(args.control) if args.control else None,
        layers=args.layers,
        hook=args.hook,
        readout=args.readout,
        estimator=args.estimator,
        k=args.k,
        batch_size=args.batch_size,
        device=args.device,
        cache_dir=out / "cache",
        threads=args.threads,
        dtype=args.dtype,
        device_map=args.device_map,
        base=args.base,
        distributed=in_job,
        workers=args.workers,
        chat_template="auto" if args.chat_template is None else args.chat_template,
        system=args.system,
    )
    if in_job and not distributed.current().is_main:
        return 0
    path = report.save(out)
    print(report.summary())
    print(f"report written to {path}")
    if args.html:
        print(f"dashboard written to {report.save_html(out / 'dashboard.html')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="revlens", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_analyze(sub)
    finetune_cli.add_cli(sub, finetuners=DEMO_FINETUNERS)
    demo_cli.add_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `revlens` command; user errors print one line and exit 2.

    That includes a job that failed in a ``--workers`` process (:class:`revlens.jobpool.JobFailed`: its one line
    names the job and the error), a non-finite fine-tuning loss and a run folder held by another process."""
    from revlens.checkpoint_format import CheckpointError
    from revlens.distributed import DistributedError, shutdown
    from revlens.finetune import FinetuneStateError, NonFiniteLossError
    from revlens.jobpool import JobFailed
    from revlens.probe import ProbeError

    args = build_parser().parse_args(argv)
    named = (CheckpointError, ProbeError, FinetuneStateError, NonFiniteLossError, DistributedError, JobFailed)
    try:
        return int(args.func(args) or 0)
    except (*named, OSError, ValueError) as err:
        print(f"revlens {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"revlens {args.command}: interrupted; finished work is kept and a rerun resumes it.", file=sys.stderr)
        return 130
    finally:
        shutdown()


if __name__ == "__main__":
    sys.exit(main())
