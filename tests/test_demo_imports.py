"""The demos are clients of the public API: every module of ``revlens.demos`` imports ``revlens`` only as
``from revlens import NAME`` with NAME in ``revlens.__all__``, or another module of ``revlens.demos``; at any depth
(imports inside functions, relative imports and ``importlib.import_module`` included), as tests/test_layers.py
checks that core never imports a demo."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import revlens

ROOT = Path(__file__).resolve().parent.parent
DEMOS = ROOT / "revlens" / "demos"
PUBLIC = frozenset(revlens.__all__)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _in_demos(module: str) -> bool:
    return module == "revlens.demos" or module.startswith("revlens.demos.")


def private_imports(source: str, package: str) -> list[str]:
    """Every import of ``revlens`` in ``source`` that is neither a public name nor a demos module, as
    'line: what' (``package``: the package relative imports start from)."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            bad += [f"{node.lineno}: import {a.name}" for a in node.names if _revlens(a.name) and not _in_demos(a.name)]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            if base == "revlens":
                bad += [f"{node.lineno}: from revlens import {a.name}" for a in node.names if a.name not in PUBLIC]
            elif _revlens(base) and not _in_demos(base):
                bad.append(f"{node.lineno}: from {base} import {', '.join(a.name for a in node.names)}")
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            bad += [f"{node.lineno}: import_module({n!r})" for n in names if _revlens(n) and not _in_demos(n)]
    return sorted(bad)


def _revlens(module: str) -> bool:
    return module == "revlens" or module.startswith("revlens.")


DEMO_FILES = sorted(DEMOS.rglob("*.py"))


def test_the_demos_are_found():
    names = {_module_name(p) for p in DEMO_FILES}
    assert {"revlens.demos.organism.demo", "revlens.demos.chat_model.pipeline", "revlens.demos.cli"} <= names


@pytest.mark.parametrize("path", DEMO_FILES, ids=[_module_name(p) for p in DEMO_FILES])
def test_demos_import_only_the_public_api(path):
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    assert private_imports(path.read_text(), package) == [], (
        f"{name} reaches past the public API: import the name from `revlens` (add it to revlens/__init__.py's "
        "__all__ and tests/test_public_api.py if it is new) or from revlens.demos"
    )


def test_the_scan_sees_private_imports_at_any_depth():
    source = (
        "from revlens import analyze, _util\n"
        "def f():\n    from revlens.probe import ReversionProbe\n    import revlens.directions\n"
        "from ... import jobpool\nfrom ..comparison import best_mode\nfrom . import pipeline\n"
        "importlib.import_module('revlens.evals')\nimport revlens.demos.organism\n"
    )
    assert private_imports(source, "revlens.demos.chat_model") == [
        "1: from revlens import _util",
        "3: from revlens.probe import ReversionProbe",
        "4: import revlens.directions",
        "5: from revlens import jobpool",
        "8: import_module('revlens.evals')",
    ]


def _public_names_used() -> list[str]:
    names = set()
    for path in DEMO_FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "revlens":
                names |= {a.name for a in node.names}
    return sorted(names)


@pytest.mark.parametrize("name", _public_names_used())
def test_the_public_names_the_demos_use_say_what_they_do(name):
    assert name in PUBLIC
    assert len(inspect.getdoc(getattr(revlens, name)) or "") > 30, f"revlens.{name} needs a docstring"
