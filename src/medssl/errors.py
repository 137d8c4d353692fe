"""Errors that the CLI turns into exit code 2 with one line naming the file and the problem."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


class MedsslInputError(Exception):
    """Bad input or config: a user-fixable problem with a named file (or key)."""

    def __init__(self, source: str | Path | None, problem: str) -> None:
        self.source = str(source) if source is not None else None
        self.problem = problem
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = " ".join(self.problem.split())
        return f"{self.source}: {text}" if self.source else text


class ConfigError(MedsslInputError):
    """A config file or override is invalid (unknown key, wrong type, bad value)."""


def describe_error(err: BaseException, limit: int = 500) -> str:
    """One line for a run's status and log: the input error as the CLI prints it, else "Type: message"."""
    if isinstance(err, MedsslInputError):
        return err.one_line()[:limit]
    text = " ".join(str(err).split())
    return (f"{type(err).__name__}: {text}" if text else type(err).__name__)[:limit]


def unknown_name_message(what: str, name: object, known: Iterable[object]) -> str:
    """The one wording of a name that is not one of a known set: ``unknown executor 'x' (known: a, b)``."""
    return f"unknown {what} '{name}' (known: {', '.join(str(k) for k in known)})"
