"""Entry points that tests/test_distributed.py starts under ``torchrun`` (one process per rank).

``python tests/dist_workers.py analyze LOG_DIR -- <revlens analyze args>`` runs the ``revlens analyze``
command line and writes, per rank, the labels of the checkpoints that rank loaded (``LOG_DIR/rank<R>.json``),
so the test can check that every checkpoint was measured exactly once across ranks.

``python tests/dist_workers.py finetune OUT_DIR`` runs :func:`finetune_case` (a blocked, anchored SGD
fine-tune of a tiny model) as one rank of the job and writes that rank's final weights and losses.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def _record_loads(log: list[str]) -> None:
    """Note the label of every checkpoint this process loads (through the loader or a ref's own load)."""
    from revlens.checkpoint_loader import CheckpointLoader, CheckpointRef

    loader_load, ref_load = CheckpointLoader.load, CheckpointRef.load

    def load_via_loader(self, source, *args, **kwargs):
        log.append(getattr(source, "label", str(source)))
        return loader_load(self, source, *args, **kwargs)

    def load_ref(self, *args, **kwargs):
        log.append(self.label)
        return ref_load(self, *args, **kwargs)

    CheckpointLoader.load = load_via_loader
    CheckpointRef.load = load_ref


def analyze(log_dir: str, argv: list[str]) -> int:
    from revlens.cli import main

    log: list[str] = []
    _record_loads(log)
    rank = int(os.environ.get("RANK", "0"))
    try:
        return main(["analyze", *argv])
    finally:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        (Path(log_dir) / f"rank{rank}.json").write_text(json.dumps(log))


def case_model():
    """The tiny TL-native model (d_model 32, 3 layers) that :func:`finetune_case` starts from."""
    import torch

    from revlens.checkpoint_loader import boot_native_model
    from revlens.wordtok import word_tokenizer

    from conftest import WORDS, tiny_config

    tok = word_tokenizer(WORDS)
    torch.manual_seed(0)
    return boot_native_model(tiny_config(len(tok)), tokenizer=tok)


def finetune_case(out_dir: str | Path, distributed: bool | None = None):
    """A clamp-blocked, anchored, clipped SGD fine-tune of a tiny TL-native model: 3 steps of 4 micro-batches
    of 2 rows. Returns ``(model, FinetuneResult)``; the same on every rank and in one process."""
    import copy

    import torch

    from revlens.anchor import ProbeAnchor
    from revlens.blocking import Blocking
    from revlens.finetune import finetune

    model = case_model()
    vocab = model.cfg.d_vocab
    reference = copy.deepcopy(model).eval()
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, vocab, (12, 8), generator=gen)
    mask = (torch.rand(12, 8, generator=gen) > 0.3).long()
    v = {1: torch.randn(32, generator=gen), 2: torch.randn(2, 32, generator=gen)}
    blocking = Blocking({1: v[1]}, "clamp", reference=reference)
    anchor = ProbeAnchor({2: v[2]}, [tokens[0, :5], tokens[1, :7]], reference, weight=0.5)
    result = finetune(
        model,
        tokens,
        mask,
        steps=3,
        lr=0.2,
        optimizer="sgd",
        weight_decay=0.01,
        batch_size=2,
        grad_accum=4,
        max_grad_norm=1.0,
        blocking=blocking,
        anchor=anchor,
        save_steps=[2],
        out_dir=out_dir,
        progress=False,
        distributed=distributed,
    )
    return model, result


def finetune_rank(out_dir: str) -> int:
    import torch
    from safetensors.torch import save_file

    model, result = finetune_case(Path(out_dir) / "run")
    rank = int(os.environ.get("RANK", "0"))
    save_file(
        {k: v.detach().contiguous() for k, v in model.state_dict().items() if v.is_floating_point()},
        str(Path(out_dir) / f"rank{rank}.safetensors"),
    )
    (Path(out_dir) / f"rank{rank}.json").write_text(
        json.dumps({"losses": result.losses, "world": torch.distributed.get_world_size()})
    )
    return 0


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    if command == "analyze":
        log_dir, sep, *argv = rest
        assert sep == "--", sys.argv
        sys.exit(analyze(log_dir, argv))
    assert command == "finetune", sys.argv
    sys.exit(finetune_rank(rest[0]))
