"""The default prompt files ship inside the wheel and importlib.resources finds them there."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import revlens
from revlens.prompts import default_control, default_prompts, packaged_prompt_files

ROOT = Path(__file__).resolve().parent.parent

# Import revlens.prompts from an unpacked wheel without running revlens/__init__ (which imports torch):
# the package module is created from its spec but not executed.
LOAD_FROM_WHEEL = """
import importlib.util, sys
root = sys.argv[1]
spec = importlib.util.spec_from_file_location("revlens", root + "/revlens/__init__.py",
                                              submodule_search_locations=[root + "/revlens"])
sys.modules["revlens"] = importlib.util.module_from_spec(spec)  # created, not executed
import revlens.prompts as p
assert p.__file__.startswith(root), p.__file__
print(p.packaged_prompt_files(), len(p.default_prompts()), len(p.default_control()))
"""


def test_wheel_contains_the_prompt_files_and_resources_find_them(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src)
    shutil.copy(ROOT / "README.md", src)
    shutil.copytree(ROOT / "revlens", src / "revlens", ignore=shutil.ignore_patterns("__pycache__"))
    # What `pip wheel --no-build-isolation .` runs, without pip's start-up: the PEP 517 backend itself.
    assert 'build-backend = "setuptools.build_meta"' in (ROOT / "pyproject.toml").read_text()
    build = "import sys; from setuptools import build_meta; build_meta.build_wheel(sys.argv[1])"
    subprocess.run(
        [sys.executable, "-c", build, str(tmp_path / "dist")], cwd=src, check=True, timeout=120, capture_output=True
    )
    wheel = next((tmp_path / "dist").glob("revlens-*.whl"))
    shipped = packaged_prompt_files()
    assert {"harmful_requests.txt", "harmless_requests.txt"} <= set(shipped)
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert {f"revlens/data/{name}" for name in shipped} <= names
        assert {"revlens/data/knowledge_candidates.tsv", "revlens/data/knowledge_split_smollm2.json"} <= names
        zf.extractall(tmp_path / "site")
    out = subprocess.run(
        [sys.executable, "-c", LOAD_FROM_WHEEL, str(tmp_path / "site")],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert out.split("]")[0] + "]" == str(shipped)
    assert out.split("]")[1].split() == [str(len(default_prompts())), str(len(default_control()))]


def test_prompt_api_is_still_reachable_from_the_old_places():
    from revlens import analysis

    assert revlens.default_prompts() == analysis.default_prompts() == default_prompts()
    assert analysis.load_prompt_file("harmless_requests.txt") == default_control()
