"""The README holds what a newcomer reads first: at most 150 lines, an example that runs, and links that lead
somewhere."""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_is_short_and_its_links_exist():
    assert len(README.splitlines()) <= 150
    for section in ("## Quick start", "## Example", "## Defenses", "## On your own checkpoints", "## Documentation"):
        assert section in README
    assert "make demo" in README and "make test" in README
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    missing = [t for t in targets if not t.startswith("http") and not (ROOT / t).exists()]
    assert targets and missing == []


def test_readme_example_runs(micro_history, tmp_path, monkeypatch, capsys):
    """The Example block as written, on a copy of the session's micro organism instead of training the tiny one."""
    import revlens
    import revlens.demos.organism as organism

    code = re.search(r"## Example\n```python\n(.*?)```", README, re.S).group(1)
    assert len(code.splitlines()) <= 16
    history = tmp_path / "history"
    shutil.copytree(micro_history, history)
    asked = []
    monkeypatch.setattr(organism, "build_history", lambda *args, **kwargs: asked.append((args, kwargs)) or history)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        exec(compile(code, "README.md", "exec"), namespace)
    assert asked == [(("tiny",), {"seeds": 3, "out_dir": "revlens_out/demo/history"})]
    report = namespace["report"]
    assert report.runs == ["seed_0", "seed_1"] and f"L{report.best_layer}" in capsys.readouterr().out
    assert (tmp_path / "dashboard.html").is_file()
    saved = revlens.ReversionReport.load(tmp_path / "out")
    np.testing.assert_array_equal(saved.alignment, report.alignment)
