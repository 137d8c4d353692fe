"""Which code produced a result: the package version (single-sourced from ``pyproject.toml`` through
the installed metadata) and, when the sources are a git checkout, the commit and whether the tree
had uncommitted changes. No medssl imports: every layer may record it."""

from __future__ import annotations

import functools
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent


def package_version() -> str:
    """``[project] version`` of ``pyproject.toml``, as installed; ``0+unknown`` for sources never installed."""
    try:
        return metadata.version("medssl")
    except metadata.PackageNotFoundError:
        return "0+unknown"


__version__ = package_version()


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(PACKAGE_DIR), *args], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """``{"version", "commit", "dirty"}``; ``commit`` and ``dirty`` are None when the running sources
    are not tracked by git (an installed wheel: the version alone names the code)."""
    tracked = _git("ls-files", "--error-unmatch", str(PACKAGE_DIR / "__init__.py")) is not None
    commit = _git("rev-parse", "HEAD") if tracked else None
    if commit is None:
        return {"version": __version__, "commit": None, "dirty": None}
    status = _git("status", "--porcelain")
    return {"version": __version__, "commit": commit, "dirty": None if status is None else bool(status)}


def describe_code_version(value: Any) -> str:
    """One line for a recorded ``code_version``: ``0.1.0 @ 1a2b3c4d5e6f (dirty)``; older runs recorded
    the version string alone."""
    if not isinstance(value, dict):
        return str(value)
    text = str(value.get("version"))
    if value.get("commit"):
        text += f" @ {str(value['commit'])[:12]}" + (" (uncommitted changes)" if value.get("dirty") else "")
    else:
        text += " (installed, no git checkout)"
    return text
