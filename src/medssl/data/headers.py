"""What the text header of an NRRD or MetaImage file says, read as a stream before any voxel is decoded.

Both formats may keep their voxels in other files, named in the header, and both let the header run
to any length (comments, unknown fields), so the header is read line by line to its end, never only
its first bytes:

- NRRD (``.nrrd``, ``.nhdr``; teem's format): ``data file: NAME`` (also ``datafile:``), the printf
  form ``data file: FORMAT MIN MAX STEP [SUBDIM]`` and ``data file: LIST [SUBDIM]`` followed by one name
  per line. The header ends at the first empty line (an attached ``.nrrd`` has its voxels after it);
  a detached ``.nhdr`` is read to its end. Fields are matched without regard to case, and every
  ``data file`` line counts, so nothing teem could read is missed.
- MetaImage (``.mha``, ``.mhd``; MetaIO): ``ElementDataFile = NAME``, ``LOCAL`` (voxels follow),
  ``LIST [2D]`` followed by one name per line, and the pattern form ``FORMAT MIN MAX STEP``. MetaIO
  stops reading fields at ``ElementDataFile`` (in ``.mha`` the voxels follow it), so the scan stops
  there too; MetaIO matches the key exactly, so a line that spells it another way is refused rather
  than guessed at.

Patterns are expanded (at most :data:`MAX_PATTERN_FILES` names) with one integer conversion
(``%d``/``%i``/``%u``, optional zero padding and width) and nothing else: MetaIO passes the pattern to
``snprintf``, so any other conversion is refused. Lines end as teem ends them (``\\n``, ``\\r``, or the
two together); a header line longer than :data:`MAX_LINE_BYTES` is refused.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from medssl.errors import MedsslInputError

MAX_LINE_BYTES = 1 << 20  # a header line is a field or a file name; a longer "line" is not a header
MAX_PATTERN_FILES = 1 << 16  # slices one pattern may name
NRRD_SUFFIXES = (".nrrd", ".nhdr")
METAIMAGE_SUFFIXES = (".mha", ".mhd")

_NRRD_DATA_FILE = re.compile(r"^\s*data\s*file\s*:(?!=)\s*(?P<value>.*?)\s*$", re.IGNORECASE)
_NRRD_FIELD = re.compile(r"^\s*(?P<key>[^:#][^:]*?)\s*:(?!=)\s*(?P<value>.*?)\s*$")
_META_FIELD = re.compile(r"^\s*(?P<key>[^=:]+?)\s*[=:]\s*(?P<value>.*?)\s*$")
_META_DATA_FILE_KEY = "ElementDataFile"
_EOL = re.compile(r"\r\n|\n\r|\r|\n")
# One integer conversion: %d, %5d, %05d, %i, %u (no other conversion, no %% escapes).
_PATTERN = re.compile(r"^(?P<head>[^%]*)%(?P<flags>0?)(?P<width>\d{0,3})[diu](?P<tail>[^%]*)$")


@dataclass
class TextHeader:
    """The fields of a text header (keys lower-cased, the last value of a key kept) and the data files it
    names, as written (relative to the header's folder unless absolute); empty for voxels in the file."""

    fields: dict[str, str] = field(default_factory=dict)
    data_files: list[str] = field(default_factory=list)


def _lines(path: Path) -> Iterator[str]:
    """The file's lines, streamed. As teem's ``airOneLine``: ``\n`` or ``\r`` ends a line, and ``\r\n`` or
    ``\n\r`` is one ending (so ``a\r\n\r\n`` is ``a`` and an empty line, the end of an NRRD header)."""
    buffer = ""
    try:
        with open(path, "rb") as f:
            while True:
                chunk = f.read(1 << 16)
                buffer += chunk.decode("latin-1")
                start = 0
                for end in _EOL.finditer(buffer):
                    if chunk and end.end() == len(buffer):
                        break  # a "\r" at the end of the chunk may have its "\n" in the next
                    yield buffer[start : end.start()]
                    start = end.end()
                buffer = buffer[start:]
                if len(buffer) > MAX_LINE_BYTES:
                    raise MedsslInputError(path, f"header line longer than {MAX_LINE_BYTES} bytes")
                if not chunk:
                    if buffer:
                        yield buffer
                    return
    except OSError as err:
        raise MedsslInputError(path, f"unreadable header ({err.strerror or err})") from None


def _pattern_names(path: Path, value: str) -> list[str]:
    """The names of a ``FORMAT MIN MAX STEP [SUBDIM]`` data file pattern."""
    words = value.split()
    match = _PATTERN.fullmatch(words[0]) if words else None
    if match is None:
        raise MedsslInputError(
            path, f"data file pattern {value[:200]!r} is not one name with a single %d and numbers after it"
        )
    try:
        low, high, step = (int(w) for w in words[1:4])
    except ValueError:
        raise MedsslInputError(path, f"data file pattern {value[:200]!r} needs integer MIN MAX STEP") from None
    if step == 0 or (high - low) * step < 0:
        raise MedsslInputError(path, f"data file pattern {value[:200]!r} has a step that never reaches MAX")
    count = (high - low) // step + 1
    if count > MAX_PATTERN_FILES:
        raise MedsslInputError(path, f"data file pattern names {count} files (at most {MAX_PATTERN_FILES})")
    return [words[0] % index for index in range(low, high + (1 if step > 0 else -1), step)]


def _names(path: Path, value: str, following: Iterator[str]) -> list[str]:
    """The data files one data-file value names (``LIST`` takes the non-empty ``following`` lines)."""
    if value.upper() == "LIST" or value.upper().startswith("LIST "):
        return [line.strip() for line in following if line.strip()]
    if "%" in value:
        return _pattern_names(path, value)
    # One name. Libraries differ on whether words after a space belong to it: check the whole value
    # and each word, so every reading of the line stays inside the folder.
    words = value.split()
    return [value, *words] if len(words) > 1 else [value]


def read_nrrd_header(path: Path) -> TextHeader:
    """The fields and data files of an NRRD header (``.nrrd`` to its first empty line, ``.nhdr`` whole)."""
    header = TextHeader()
    detached = path.name.lower().endswith(".nhdr")
    lines = _lines(path)
    for line in lines:
        if not line.strip():
            if detached:
                continue  # teem stops here; reading on can only find more to check
            break
        if line.startswith("#"):
            continue
        data_file = _NRRD_DATA_FILE.match(line)
        if data_file is not None:
            header.data_files += _names(path, data_file["value"], lines)
            continue
        found = _NRRD_FIELD.match(line)
        if found is not None:
            header.fields[found["key"].lower()] = found["value"]
    return header


def read_metaimage_header(path: Path) -> TextHeader:
    """The fields up to ``ElementDataFile`` (where MetaIO stops) and the data files it names."""
    header = TextHeader()
    lines = _lines(path)
    for line in lines:
        found = _META_FIELD.match(line)
        if found is None:
            continue
        key, value = found["key"], found["value"]
        if key.lower() == _META_DATA_FILE_KEY.lower():
            if key != _META_DATA_FILE_KEY:
                raise MedsslInputError(path, f"header key {key!r} is not spelled {_META_DATA_FILE_KEY!r}")
            if value.upper() != "LOCAL":
                header.data_files = _names(path, value, lines)
            return header
        header.fields[key.lower()] = value
    return header


def read_text_header(path: Path) -> TextHeader | None:
    """The header of an NRRD or MetaImage file; None for other formats."""
    name = path.name.lower()
    if name.endswith(NRRD_SUFFIXES):
        return read_nrrd_header(path)
    if name.endswith(METAIMAGE_SUFFIXES):
        return read_metaimage_header(path)
    return None


# --------------------------------------------------------------------------------------------- spacing


def _positive(text: str) -> bool:
    try:
        value = float(text)
    except ValueError:
        return False
    return value > 0 and value != float("inf")


_SPATIAL_KINDS = {"domain", "space", "time", "???", "none"}


def nrrd_spacing_problem(header: TextHeader) -> str | None:
    """Why the voxel spacing of an NRRD header is unusable (None when fine or not given).

    ITK reads a ``nan`` spacing of a spatial axis as 1 mm; spatial axes are all of them unless ``kinds``
    names some non-spatial (``vector``, ``list``, ``RGB-color``, ...)."""
    kinds = header.fields.get("kinds", "").split()
    spatial = [not kinds or i >= len(kinds) or kinds[i].lower() in _SPATIAL_KINDS for i in range(16)]
    spacings = header.fields.get("spacings")
    if spacings is not None:
        for axis, text in enumerate(spacings.split()):
            if spatial[min(axis, 15)] and not _positive(text):
                return f"spacings {spacings[:80]!r}: axis {axis} spacing {text!r} is not a positive number"
    directions = header.fields.get("space directions")
    if directions is not None:
        vectors = re.findall(r"\(([^)]*)\)|none", directions, flags=re.IGNORECASE)
        for axis, vector in enumerate(vectors):
            if not vector:
                continue  # "none": a non-spatial axis
            try:
                parts = [float(v) for v in vector.split(",")]
            except ValueError:
                return f"space directions {directions[:80]!r}: axis {axis} is not a vector of numbers"
            norm = sum(p * p for p in parts) ** 0.5
            if not parts or not all(abs(p) < float("inf") for p in parts) or not norm > 0:
                return f"space directions {directions[:80]!r}: axis {axis} has spacing {norm:g}, not positive"
    return None


def metaimage_spacing_problem(header: TextHeader) -> str | None:
    """Why ``ElementSpacing``/``ElementSize`` of a MetaImage header is unusable (None when fine or absent):
    MetaIO keeps the sign of nothing and ITK reads a negative spacing as its absolute value."""
    for key, name in (("elementspacing", "ElementSpacing"), ("elementsize", "ElementSize")):
        text = header.fields.get(key)
        if text is not None and not all(_positive(v) for v in text.split()):
            return f"{name} {text[:80]!r} is not a list of positive numbers"
    return None
