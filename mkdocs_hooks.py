"""MkDocs hook: the docstrings' Sphinx roles (:class:`~revlens.X`, :func:`analyze`, ...) as API links.

mkdocstrings reads Google-style docstrings and leaves ``:func:`x``` as the text ``:func:`` before ``x`` in code.
Each becomes an optional cross-reference that mkdocs-autorefs resolves across the site: the name as written, else
``revlens.<name>`` (the public API, where most short names live). A leading ``~`` shows the last part only, as in
Sphinx. A name that no page documents stays code, without a link and without a warning.
"""

from __future__ import annotations

import re

ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):<code>(~?)([\w.]+)(\(\))?</code>")


def _link(match: re.Match) -> str:
    short, name, call = match.group(1), match.group(2), match.group(3) or ""
    shown = (name.rsplit(".", 1)[-1] if short else name) + call
    fallback = name if name.startswith("revlens") else f"revlens.{name}"
    return f'<autoref identifier="{name}" slug="{fallback}" optional><code>{shown}</code></autoref>'


def on_page_content(html: str, **kwargs) -> str:
    return ROLE.sub(_link, html)
