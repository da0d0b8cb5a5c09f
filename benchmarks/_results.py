"""Where benchmarks write their JSON, with the environment every result records."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def environment(device: str) -> dict[str, Any]:
    return {
        "device": device,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }


def write_result(name: str, device: str, result: dict[str, Any]) -> Path:
    """Print ``result`` and write it to ``benchmarks/results/<name>_<device type>.json``."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}_{device.split(':')[0]}.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(f"written to {path}")
    return path
