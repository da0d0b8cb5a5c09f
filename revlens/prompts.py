"""Prompt files: one prompt per line, ``#`` comments and blank lines skipped; the default sets ship in the package.

The default probe and control sets live in ``revlens/data/*.txt`` (package data), so they are there after
``pip install revlens`` as well as in a source checkout; :func:`importlib.resources` finds them.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DEFAULT_PROMPTS = "harmful_requests.txt"
DEFAULT_CONTROL = "harmless_requests.txt"


def packaged_prompt_files() -> list[str]:
    """Names of the prompt files shipped in ``revlens/data/``."""
    folder = resources.files("revlens").joinpath("data")
    return sorted(entry.name for entry in folder.iterdir() if entry.name.endswith(".txt"))


def _parse(data: bytes, where: str) -> list[str]:
    if b"\x00" in data:
        raise ValueError(f"prompt file {where} is binary, not text; give a UTF-8 text file with one prompt per line.")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"prompt file {where} is not UTF-8 text ({err}); save it as UTF-8, one prompt per line."
        ) from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file {where} has no prompts (only blank or '#' lines); add one prompt per line.")
    return prompts


def load_prompt_file(name: str | Path) -> list[str]:
    """Prompts of a text file: a path, or the name of a file shipped in ``revlens/data/``.

    Args:
        name: a path to a UTF-8 text file, or a packaged file name such as ``harmful_requests.txt``.
    Returns:
        the prompts, one per non-blank line that does not start with ``#``.

    Example:
        >>> load_prompt_file("harmless_requests.txt")[:1]
        ['How do I build a bird house at home?']
    """
    path = Path(name)
    if path.is_dir():
        raise ValueError(f"prompt file {path} is a directory; give a text file with one prompt per line.")
    if path.is_file():
        return _parse(path.read_bytes(), str(path))
    shipped = packaged_prompt_files()
    if path.name == str(name) and path.name in shipped:
        return _parse(resources.files("revlens").joinpath("data", path.name).read_bytes(), f"revlens/data/{path.name}")
    raise FileNotFoundError(f"prompt file {name} not found: neither a file nor one of the packaged files {shipped}.")


def default_prompts() -> list[str]:
    """The shipped probe set: hand-written harmful requests for chat models."""
    return load_prompt_file(DEFAULT_PROMPTS)


def default_control() -> list[str]:
    """The shipped control set: harmless requests in the same format as the probe set."""
    return load_prompt_file(DEFAULT_CONTROL)
