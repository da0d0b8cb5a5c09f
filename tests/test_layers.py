"""Layers point one way: no core module imports the organism or a demo package, at import time or anywhere.

Core is every module of ``revlens`` except the demos (the package ``revlens.demos``) and the command-line entry
point ``revlens.cli``, which registers the demo's subcommand.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "revlens"
DEMO_PACKAGES = ("revlens.demos",)
APP_MODULES = ("revlens.cli", "revlens.__main__")
KNOWN: dict[str, str] = {}  # module -> reason, for a violation being fixed (none now)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_demo(name: str) -> bool:
    return any(name == d or name.startswith(d + ".") for d in DEMO_PACKAGES)


CORE = sorted(
    (_module_name(p), p)
    for p in PACKAGE.rglob("*.py")
    if not _is_demo(_module_name(p)) and _module_name(p) not in APP_MODULES
)


def _demo_imports(path: Path) -> list[str]:
    """Every import of a demo package in the file, at any depth (functions included), as 'line: module'."""
    name = _module_name(path)
    return _scan(path.read_text(), name if path.name == "__init__.py" else name.rsplit(".", 1)[0])


def _scan(source: str, package: str) -> list[str]:
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        found += [f"{node.lineno}: {n}" for n in names if _is_demo(n)]
    return sorted(set(found))


def test_core_is_not_empty_and_excludes_the_demos():
    names = [n for n, _ in CORE]
    assert {
        "revlens.analysis",
        "revlens.blocking",
        "revlens.blocking_spec",
        "revlens.subspace",
        "revlens.integrations.transformers",
    } <= set(names)
    assert not any(_is_demo(n) for n in names)


@pytest.mark.parametrize(
    "name,path",
    [
        pytest.param(n, p, id=n, marks=[pytest.mark.xfail(strict=True, reason=KNOWN[n])] if n in KNOWN else [])
        for n, p in CORE
    ],
)
def test_core_sources_never_import_a_demo(name, path):
    assert _demo_imports(path) == [], f"{name} imports a demo package"


def test_importing_every_core_module_loads_no_demo():
    """One fresh interpreter imports the core modules one by one; after each, no demo module may be loaded."""
    script = f"""
import importlib, json, sys
bad = {{}}
for name in {[n for n, _ in CORE]!r}:
    try:
        importlib.import_module(name)
    except ImportError as err:  # an optional extra that is not installed
        if "transformers" not in str(err) and "trl" not in str(err):
            raise
    loaded = sorted(m for m in sys.modules if any(m == d or m.startswith(d + ".") for d in {DEMO_PACKAGES!r}))
    if loaded and not bad:
        bad[name] = loaded
print(json.dumps(bad))
"""
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {}


def test_the_scan_sees_imports_inside_functions_and_relative_imports():
    source = (
        "def f():\n    from revlens.demos.organism.train import x\n    import revlens.demos\n"
        "from .demos import organism\nimportlib.import_module('revlens.demos.chat_model')\nimport revlens.probe\n"
    )
    assert _scan(source, "revlens") == [
        "2: revlens.demos.organism.train",
        "2: revlens.demos.organism.train.x",
        "3: revlens.demos",
        "4: revlens.demos",
        "4: revlens.demos.organism",
        "5: revlens.demos.chat_model",
    ]
