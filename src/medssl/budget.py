"""A fine-tuning run's label budget: a number of training cases, or every case of the pool ("all").

One value type for the whole package: the config fields (``budget``, ``budgets``), the splits, the plan's
order, run.json and the report's tables all go through it, so a budget has one parse, one label, one
order and one equality. In YAML, JSON and run ids it is what it always was: an integer or ``"all"``.
No medssl imports: every layer may use it.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any

ALL = "all"


@functools.total_ordering
class Budget:
    """A positive number of training cases, or ``Budget.all()``. Ordered by size with ``all`` last;
    equal when they name the same number of cases (and to the plain value YAML holds: ``Budget(5) == 5``,
    ``Budget.all() == "all"``); ``str`` is the label (``"5"``, ``"all"``)."""

    __slots__ = ("_cases",)
    _cases: int | None

    def __init__(self, cases: int | None) -> None:
        if cases is not None and (isinstance(cases, bool) or not isinstance(cases, int) or cases < 1):
            raise ValueError(f"a label budget is a positive number of cases or '{ALL}', not {cases!r}")
        object.__setattr__(self, "_cases", cases)

    @classmethod
    def all(cls) -> Budget:
        return cls(None)

    @classmethod
    def parse(cls, value: object) -> Budget:
        """A budget from a config, a run record or a table cell: ``5``, ``"5"``, ``5.0``, ``"all"``,
        or a ``Budget``. ``ValueError`` naming the value otherwise."""
        if isinstance(value, Budget):
            return value
        if isinstance(value, str) and value.strip() == ALL:
            return cls.all()
        number: Any = value
        if isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                number = None
        real = isinstance(number, numbers.Real) and not isinstance(number, bool) and math.isfinite(number)
        if real and float(number).is_integer() and number >= 1:
            return cls(int(number))
        raise ValueError(f"unknown label budget {value!r} (a positive number of cases or '{ALL}')")

    @property
    def cases(self) -> int | None:
        """The number of training cases; None for ``all``."""
        return self._cases

    @property
    def is_all(self) -> bool:
        return self._cases is None

    @property
    def label(self) -> str:
        """``"5"`` or ``"all"``: run.json's ``budget``, the splits file's key, the tables' column."""
        return ALL if self._cases is None else str(self._cases)

    def to_json(self) -> int | str:
        """What YAML, JSON and the config hash hold: the integer, or ``"all"``."""
        return ALL if self._cases is None else self._cases

    def sort_key(self) -> float:
        """Numbers by value, ``all`` after every number (a float, for pandas' ``sort_values(key=...)``)."""
        return math.inf if self._cases is None else float(self._cases)

    def take(self, pool: list[str]) -> list[str]:
        """The first ``cases`` of a training order (all of it for ``all``)."""
        return list(pool) if self._cases is None else list(pool[: self._cases])

    def __eq__(self, other: object) -> bool:
        """Equal to a Budget of the same cases, and to its own YAML/JSON value (``5``, ``"all"``): a config
        read back compares equal to what was written."""
        if isinstance(other, Budget):
            return other._cases == self._cases
        if isinstance(other, (int, str)) and not isinstance(other, bool):
            return other == self.to_json()
        return NotImplemented

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Budget):
            return NotImplemented
        return self.sort_key() < other.sort_key()

    def __hash__(self) -> int:
        return hash(self.to_json())  # consistent with equality to the plain value

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("a Budget is immutable")

    def __str__(self) -> str:
        return self.label

    def __repr__(self) -> str:
        return f"Budget({self.to_json()!r})"

    def __reduce__(self) -> tuple[Any, tuple[int | None]]:
        return (Budget, (self._cases,))

    # pydantic: validated by ``parse``, serialised as ``to_json`` (so YAML and config hashes are unchanged)
    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema

        return core_schema.no_info_plain_validator_function(
            cls.parse,
            serialization=core_schema.plain_serializer_function_ser_schema(
                lambda budget: budget.to_json(),
                return_schema=core_schema.union_schema([core_schema.int_schema(), core_schema.str_schema()]),
            ),
        )

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: Any, handler: Any) -> dict[str, Any]:
        return {"anyOf": [{"type": "integer", "minimum": 1}, {"const": ALL}], "title": "Budget"}
