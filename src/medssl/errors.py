"""Errors that the CLI turns into exit code 2 with one line naming the file and the problem."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar, overload

K = TypeVar("K")
V = TypeVar("V")


class MedsslInputError(Exception):
    """Bad input or config: a user-fixable problem with a named file (or key).

    ``problems``: several problems of one source (a config with two bad fields), each its own line
    in :meth:`lines`; ``problem`` and :meth:`one_line` join them with "; "."""

    def __init__(self, source: str | Path | None, problem: str = "", *, problems: list[str] | None = None) -> None:
        self.source = str(source) if source is not None else None
        self.problems = list(problems) if problems else [problem]
        self.problem = "; ".join(self.problems)
        super().__init__(self.one_line())

    def _with_source(self, problem: str) -> str:
        text = " ".join(problem.split())
        return f"{self.source}: {text}" if self.source else text

    def one_line(self) -> str:
        return self._with_source(self.problem)

    def lines(self) -> list[str]:
        """One line per problem, each naming the source: what the CLI prints."""
        return [self._with_source(p) for p in self.problems]


class ConfigError(MedsslInputError):
    """A config file or override is invalid (unknown key, wrong type, bad value)."""


def describe_error(err: BaseException, limit: int = 500) -> str:
    """One line for a run's status and log: the input error as the CLI prints it, else "Type: message"."""
    if isinstance(err, MedsslInputError):
        return err.one_line()[:limit]
    text = " ".join(str(err).split())
    return (f"{type(err).__name__}: {text}" if text else type(err).__name__)[:limit]


class UnknownNameError(ConfigError, ValueError):
    """A name that is not one of a known set (a method, an executor, a run kind, a modality, ...).

    A ``ConfigError`` (exit 2, one line) and a ``ValueError``, so that a pydantic validator turns it
    into a validation error and callers that caught ``ValueError`` still do."""

    def __init__(self, source: str | Path | None, problem: str, suggestion: str | None = None) -> None:
        super().__init__(source, problem)
        self.suggestion = suggestion


def closest_name(name: object, options: Iterable[object], cutoff: float = 0.6) -> str | None:
    """The option most like ``name`` (difflib's ratio, case ignored), or None when none is close."""
    by_folded: dict[str, str] = {}
    for option in options:
        by_folded.setdefault(str(option).casefold(), str(option))
    found = difflib.get_close_matches(str(name).casefold(), list(by_folded), n=1, cutoff=cutoff)
    return by_folded[found[0]] if found else None


# A mapping gives the value under the name (a registry's class), any other collection its own item.
@overload
def look_up_option(kind: str, name: object, options: Mapping[K, V], *, source: str | Path | None = None) -> V: ...
@overload
def look_up_option(kind: str, name: object, options: Iterable[K], *, source: str | Path | None = None) -> K: ...
def look_up_option(kind: str, name: object, options: Any, *, source: str | Path | None = None) -> Any:
    """The option called ``name``: a mapping's value, or the collection's own item equal to ``name``.

    An unknown name raises ``UnknownNameError`` with one line naming the known options and the closest
    one: ``unknown method 'simclrr'; did you mean 'simclr'? (known: byol, dino, ...)``. As MONAI's
    ``monai.utils.module.look_up_option``, with difflib's similarity in place of an edit distance.
    """
    known = list(options)
    for option in known:
        if option == name:
            return options[option] if isinstance(options, Mapping) else option
    guess = closest_name(name, known)
    hint = f"; did you mean '{guess}'?" if guess is not None else ""
    problem = f"unknown {kind} '{name}'{hint} (known: {', '.join(str(k) for k in known)})"
    raise UnknownNameError(source, problem, guess)
