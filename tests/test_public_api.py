"""The public API: every exported name resolves, the entry points document Args, Returns and an Example (their
examples run in test_doctests.py; the readout helpers are checked in test_readout.py)."""

from __future__ import annotations

import inspect
import re

import pytest

import revlens

DOCUMENTED = (
    "analyze",
    "ReversionProbe",
    "Blocking",
    "ProbeAnchor",
    "finetune",
    "ReversionReport",
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
