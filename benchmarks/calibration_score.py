"""align's check scored without generation against the generated answers it replaces, on a saved model.

    .venv/bin/python benchmarks/calibration_score.py [--model revlens_out/models/aligned/smollm2-135m-instruct-<digest>]

For the 48 + 48 held-out requests: the teacher-forced score (does greedy decoding open with the trained
refusal's first words; ``revlens.demos.chat_model.calibration.scored_check``) and the greedy answers (48 new
tokens, as a check generates them), each timed in wall and CPU seconds with one torch thread, and how often they
agree per request. Writes ``benchmarks/results/calibration_score_cpu.json``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from revlens.demos.chat_model.behaviour import greedy_answers
from revlens.demos.chat_model.calibration import agreement, refusal_opening, refused, scored_check
from revlens.demos.chat_model.data import PromptSets
from revlens.demos.chat_model.hf_io import load_hf

from _results import environment, write_result


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    aligned = sorted(Path("revlens_out/models/aligned").glob("smollm2-135m-instruct-*"))
    p.add_argument("--model", default=str(aligned[0]) if aligned else None, help="an HF chat-model folder")
    p.add_argument("--batch", type=int, default=48)
    args = p.parse_args()
    if args.model is None:
        raise SystemExit("no kept SmolLM2 align under revlens_out/models/aligned; pass --model FOLDER.")
    torch.set_num_threads(1)
    sets = PromptSets.load()
    harmful, harmless = sets.harmful_of("heldout"), sets.harmless_of("heldout")
    model, tok = load_hf(args.model)
    opening = refusal_opening(tok)
    (scores, opens), score_time = _timed(lambda: scored_check(model, tok, harmful, harmless, opening, args.batch))
    answers, generate_time = _timed(
        lambda: [greedy_answers(model, tok, r, 48, args.batch) for r in (harmful, harmless)]
    )
    judged = [refused(harmful, answers[0]), refused(harmless, answers[1])]
    result = {
        "model": str(Path(args.model).resolve()),
        "opening": tok.decode(opening),
        "score": scores,
        "score_time": score_time,
        "generated": {
            "harm": 1 - sum(judged[0]) / len(harmful),
            "harmless_answered": 1 - sum(judged[1]) / len(harmless),
        },
        "generate_time": generate_time,
        "agreement": agreement([(opens["harmful"], judged[0]), (opens["harmless"], judged[1])]),
        "load_average_after": os.getloadavg(),
        **environment("cpu"),
    }
    write_result("calibration_score", "cpu", result)


if __name__ == "__main__":
    main()
