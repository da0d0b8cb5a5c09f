"""The public API: every exported name resolves, the entry points document Args, Returns and an Example (their
examples run in test_doctests.py; the readout helpers are checked in test_readout.py)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import revlens

DOCUMENTED = (
    "analyze",
    "AnalyzeConfig",
    "ReversionProbe",
    "Blocking",
    "ProbeAnchor",
    "finetune",
    "FinetuneConfig",
    "ReversionReport",
    "ReversionDirections",
    "build_defense",
    "ensure_model",
    "Behaviour",
    "measure_behaviours",
    "unlearn",
    "npo_loss",
    "gradient_difference_loss",
)


def test_every_exported_name_resolves():
    assert len(set(revlens.__all__)) == len(revlens.__all__)
    missing = [n for n in revlens.__all__ if getattr(revlens, n, None) is None]
    assert missing == []


@pytest.mark.parametrize("name", DOCUMENTED)
def test_entry_points_document_args_returns_and_an_example(name):
    doc = inspect.getdoc(getattr(revlens, name)) or ""
    sections = set(re.findall(r"^(Args|Returns|Example):$", doc, flags=re.M))
    assert sections == {"Args", "Returns", "Example"}, f"{name} documents only {sorted(sections)}"


# Every error revlens raises for a user's input or environment, exported so that callers can catch it by name.
ERRORS = {
    "CheckpointError": ValueError,
    "WeightValueError": ValueError,
    "ProbeError": ValueError,
    "InterventionError": ValueError,
    "HookError": ValueError,
    "FinetuneStateError": ValueError,
    "RunLockedError": ValueError,
    "NonFiniteLossError": ValueError,
    "JobFailed": RuntimeError,
    "DistributedError": RuntimeError,
    "DiskFullError": OSError,
    "MissingDataPackage": ValueError,
    "ModelNotFoundError": FileNotFoundError,
    "GGUFError": ValueError,
}


def test_the_error_classes_are_exported():
    exported = {n for n in revlens.__all__ if isinstance(getattr(revlens, n), type)}
    assert {n for n in exported if issubclass(getattr(revlens, n), Exception)} == set(ERRORS)
    assert issubclass(revlens.WeightValueError, revlens.CheckpointError)
    assert issubclass(revlens.RunLockedError, revlens.FinetuneStateError)
    for name, base in ERRORS.items():
        assert issubclass(getattr(revlens, name), base), name


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_each_exported_error_is_one_line_and_exit_2_from_the_command_line(name, monkeypatch, capsys):
    from revlens import cli

    cls = getattr(revlens, name)
    err = cls("out/report.json") if name == "DiskFullError" else cls("the problem; the fix.")

    def command(args):
        raise err

    monkeypatch.setattr(cli, "_run_analyze", command)
    assert cli.main(["analyze", "history", "--out", "unused"]) == 2
    assert capsys.readouterr().err == f"revlens analyze: error: {err}\n" and "\n" not in str(err)


def test_every_exported_name_is_on_an_api_page():
    """The API reference shows what mkdocstrings sees (griffe reads the source): ``docs/api/revlens.md``
    (``::: revlens``) renders each exported name that has a docstring; a name that is also a submodule's
    (``revlens.finetune``, ``revlens.defense_table``) resolves to the module there, so that module needs its own
    page under ``docs/api/``."""
    import griffe

    root = Path(revlens.__file__).resolve().parent.parent
    pages = "\n".join(p.read_text() for p in (root / "docs" / "api").glob("*.md"))
    assert "::: revlens\n" in pages
    package = griffe.load("revlens", search_paths=[str(root)])
    undocumented, unpaged = [], []
    for name in revlens.__all__:
        member = package.members[name]
        if member.is_module:
            if f"::: revlens.{name}\n" not in pages:
                unpaged.append(name)
        elif not (member.final_target if member.is_alias else member).docstring:
            undocumented.append(name)
    assert undocumented == [], f"exported without a docstring (not rendered): {undocumented}"
    assert unpaged == [], f"exported names shadowed by their module, which has no docs/api page: {unpaged}"
