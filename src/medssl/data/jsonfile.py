"""Reading a JSON file that came with a dataset (``dataset.json``), which is untrusted input.

One reader for every such file, so the same file is refused the same way by ``data check``,
fine-tuning and ``data convert``: at most ``limits.json_bytes`` bytes, UTF-8, a JSON object, no key
twice in one object (``json.loads`` would keep the last silently: a case or label listed twice would
vanish), and nesting, huge integers and other malformed input as one line naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medssl.errors import MedsslInputError
from medssl.limits import check


class _DuplicateKeyError(ValueError):
    pass


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKeyError(f"key {key[:80]!r} appears twice in one object")
        result[key] = value
    return result


def load_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; every problem is a ``MedsslInputError`` naming the file."""
    try:
        size = path.stat().st_size
        check(path, "size in bytes", size, "json_bytes")
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise MedsslInputError(path, f"unreadable: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise MedsslInputError(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        data = json.loads(text, object_pairs_hook=_refuse_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise MedsslInputError(path, f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except _DuplicateKeyError as exc:
        raise MedsslInputError(path, f"malformed JSON: {exc}") from None
    except RecursionError:
        raise MedsslInputError(path, "malformed JSON: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise MedsslInputError(path, f"malformed JSON: {str(exc)[:120]}") from None
    if not isinstance(data, dict):
        raise MedsslInputError(path, "must hold a JSON object")
    return data
