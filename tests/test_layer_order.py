"""The layer diagram of CONTRIBUTING.md holds: every core module imports (at any depth, lazy imports included)
only modules of lower rows. The demos (revlens.demos) and the command line sit above all rows."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "revlens"
ROWS = [
    {
        "_util",
        "shapes",
        "losses",
        "devices",
        "threads",
        "chat",
        "prompts",
        "blocking_spec",
        "lora",
        "wordtok",
        "distributed",
        "integrations",
        "stats",
        "benchmark_prompts",
        "defense_table",
        "metric_labels",
        "checkpoint_format",
    },
    {
        "readout",
        "directions",
        "nulls",
        "evals",
        "sft_data",
        "dashboard",
        "hf_writer",
        "jobpool",
        "replay",
        "checkpoint_folder",
    },
    {
        "probe",
        "checkpoint_loader",
        "checkpoint_save",
        "selection",
        "integrations.hf_hooks",
        "penalties",
        "weight_projection",
        "config",
        "behaviour",
    },
    {"history", "knowledge", "unlearning"},
    {"subspace", "reversion_directions", "hooks"},
    {"report", "anchor", "model_sources"},
    {"analysis", "paper", "blocking"},
    {"finetune", "integrations.transformers"},
    {"finetune_cli", "defenses"},
    {""},
]
ABOVE_ALL = ("cli", "__main__", "demos")
ROW = {name: i for i, row in enumerate(ROWS) for name in row}


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path, known: set[str]) -> set[str]:
    """The revlens modules ``path`` imports anywhere in the file, as names relative to the package."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            subs = [f"{node.module}.{a.name}" for a in node.names]
            names = [sub if _relative(sub) in known else node.module for sub in subs]
        else:
            continue
        out |= {_relative(n) for n in names if n == "revlens" or n.startswith("revlens.")} & known
    return out


def _relative(module: str) -> str:
    return module.removeprefix("revlens").removeprefix(".")


MODULES = {_name(p): p for p in PACKAGE.rglob("*.py")}
CORE = sorted(n for n in MODULES if not any(n == a or n.startswith(a + ".") for a in ABOVE_ALL))


@pytest.mark.parametrize("name", CORE)
def test_core_module_imports_only_lower_rows(name):
    assert name in ROW, (
        f"revlens.{name or '__init__'} has no row in the layer diagram: add it to ROWS here and to "
        "the diagram in CONTRIBUTING.md (the row above everything it imports)."
    )
    upward = sorted(m for m in _imported(MODULES[name], set(MODULES)) - {name} if ROW.get(m, len(ROWS)) >= ROW[name])
    assert upward == [], f"revlens.{name or '__init__'} (row {ROW[name]}) imports {upward}, which are not below it"


CONTRIBUTING = (PACKAGE.parent / "CONTRIBUTING.md").read_text()


def _diagram_rows() -> list[set[str]]:
    """CONTRIBUTING.md's layer diagram, row 0 first: each ``row N`` line and its continuation lines, without the
    parenthesised notes; ``__init__`` is the package's own (``""`` here)."""
    block = CONTRIBUTING.split("## Layers: what may import what", 1)[1].split("```", 2)[1]
    rows: dict[int, set[str]] = {}
    current = None
    for line in block.splitlines():
        head = re.match(r"\s*row (\d+)\s", line)
        if head:
            current = int(head.group(1))
            line = line[head.end() :]
        elif current is None or not line.startswith(" " * 8):
            continue
        names = re.sub(r"\([^)]*\)", " ", line).split()
        rows.setdefault(current, set()).update("" if n == "__init__" else n for n in names)
    return [rows[i] for i in sorted(rows)]


def test_the_diagram_in_contributing_is_rows():
    assert _diagram_rows() == ROWS


def _layout_paths() -> set[str]:
    """The files and folders CONTRIBUTING.md's layout tree names, relative to revlens/."""
    block = CONTRIBUTING.split("## Layout: one line per module", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    stack: list[str] = []
    paths = set()
    for line in block.splitlines()[2:]:  # after "revlens/"
        entry = re.match(r"((?:[│ ] {3})*)[├└]── (\S+)", line)
        assert entry, f"not a tree line: {line!r}"
        depth = len(entry.group(1)) // 4
        stack[depth:] = [entry.group(2).rstrip("/")]
        paths.add("/".join(stack))
    return paths


def test_the_layout_in_contributing_names_every_module():
    modules = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")}
    folders = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*") if p.is_dir() and p.name != "__pycache__"}
    paths = _layout_paths()
    assert sorted(modules - paths) == [], "modules missing from CONTRIBUTING.md's layout: add a line with its role"
    assert sorted(paths - modules - folders) == [], "CONTRIBUTING.md's layout names files that do not exist"
