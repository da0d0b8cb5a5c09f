"""The `revlens` command line: analyze a history, run a demo (revlens.demos), fine-tune with blocking."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from revlens import finetune_cli
from revlens.config import AnalyzeConfig, add_config_arguments, config_from_args
from revlens.demos import cli as demo_cli

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
    add_config_arguments(p, AnalyzeConfig)
    p.add_argument("--html", action="store_true", help="also write the interactive dashboard.html")
    p.set_defaults(func=_run_analyze)


def _run_analyze(args: argparse.Namespace) -> int:
    from revlens import distributed
    from revlens.analysis import analyze, load_prompt_file

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder (it will hold report.json and cache/).")
    in_job = distributed.launched_by_torchrun()  # under torchrun with N > 1: ranks share the checkpoints
    config = config_from_args(AnalyzeConfig, args, cache_dir=out / "cache", distributed=in_job)
    report = analyze(
        args.ckpt_dir,
        load_prompt_file(args.prompts) if args.prompts else None,
        control=load_prompt_file(args.control) if args.control else None,
        config=config,
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
