"""Checks a volume file passes before any voxel is decoded.

- Detached headers (MetaImage ``.mhd`` ``ElementDataFile``, NRRD ``.nhdr`` ``data file``) may name
  any file on the machine; the data file must lie inside the header's folder (or the given root),
  symlinks resolved, or the volume is refused: otherwise a task could make medssl read, cache and
  train on bytes from anywhere.
- The voxel count comes from the header (nibabel for NIfTI, SimpleITK's ``ReadImageInformation``
  for NRRD/MetaImage/DICOM) and must be within ``limits.voxels_per_volume`` before decoding: a
  50-byte header can declare a 1024^3 volume, and a gzip stream decodes to whatever it declares.
  Decoders read at most the header's voxel count, so this bound caps decompression as well.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from medssl.errors import MedsslInputError
from medssl.limits import check

# Detached headers are text of a few hundred bytes; read no more than this to find the data file.
HEADER_READ_BYTES = 1 << 16
_MHD_KEY = re.compile(r"^\s*ElementDataFile\s*=\s*(?P<value>.*?)\s*$", re.IGNORECASE)
_NHDR_KEY = re.compile(r"^\s*data\s?file\s*:\s*(?P<value>.*?)\s*$", re.IGNORECASE)


def _name_of(path: Path) -> str:
    return path.name.lower()


def detached_data_files(header: Path) -> list[str]:
    """The data file names a ``.mhd``/``.nhdr`` header points to (empty for inline data)."""
    try:
        with open(header, "rb") as f:
            text = f.read(HEADER_READ_BYTES).decode("latin-1")
    except OSError as err:
        raise MedsslInputError(header, f"unreadable header ({err.strerror or err})") from None
    key = _MHD_KEY if _name_of(header).endswith(".mhd") else _NHDR_KEY
    lines = text.splitlines()
    for index, line in enumerate(lines):
        match = key.match(line)
        if match is None:
            continue
        value = match["value"]
        if value.upper() in ("LOCAL", ""):
            return []
        if value.upper().startswith("LIST"):
            return [ln.strip() for ln in lines[index + 1 :] if ln.strip()]
        if "%" in value:
            raise MedsslInputError(header, f"data file pattern {value!r} is not supported; name one data file")
        return [value]
    return []


def check_detached_data(header: Path, root: Path | None = None) -> None:
    """Refuse a detached header whose data file lies outside ``root`` (default: the header's folder)."""
    if not _name_of(header).endswith((".mhd", ".nhdr")):
        return
    base = header.parent
    allowed = (root or base).resolve()
    for name in detached_data_files(header):
        if "\0" in name:
            raise MedsslInputError(header, "data file name contains a NUL byte")
        target = Path(os.path.normpath(base / name))
        try:
            inside = target.resolve().is_relative_to(allowed)
        except (OSError, RuntimeError):  # symlink loop
            inside = False
        if not inside:
            raise MedsslInputError(
                header,
                f"data file {name[:200]!r} lies outside {allowed}; detached data "
                "files must be inside the folder of their header",
            )


def header_voxels(path: Path) -> int | None:
    """Voxels (times channels) the file declares, from its header alone; None when undecidable."""
    import SimpleITK as sitk

    name = _name_of(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        for first in files[:8]:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(first))
            try:
                reader.ReadImageInformation()
            except RuntimeError:
                continue
            size = reader.GetSize()
            return math.prod(size[:2]) * max(len(files), 1) * reader.GetNumberOfComponents()
        return None
    if name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        try:
            shape = nib.load(str(path)).shape  # reads the header only
        except Exception:  # noqa: BLE001 - the reader reports a bad header with its own message
            return None
        return math.prod(int(s) for s in shape) if shape else None
    if name.endswith((".nrrd", ".nhdr", ".mha", ".mhd")):
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            return None
        return math.prod(reader.GetSize()) * reader.GetNumberOfComponents()
    return None  # .inv3: checked from main.plist and the tar headers by its reader


def check_before_decoding(path: Path, root: Path | None = None) -> None:
    """The checks above, in order: where the data lies, then how large it is."""
    check_detached_data(path, root)
    voxels = header_voxels(path)
    if voxels is not None:
        check(path, "voxels declared by the header", voxels, "voxels_per_volume")
