"""Checks a volume file passes before any voxel is decoded.

- **Where the voxels lie.** NRRD (``data file``) and MetaImage (``ElementDataFile``) headers may name
  other files, in ``.nrrd`` and ``.mha`` as much as in ``.nhdr`` and ``.mhd``, one name or a list or a
  printf pattern (:mod:`medssl.data.headers` reads the whole header as a stream). Every named file must
  be a relative path that stays inside the header's folder once ``..`` and symlinks are resolved; an
  absolute name is refused outright. Otherwise a volume could make medssl
  read, cache, train on and convert bytes from anywhere on the machine. The volume itself must lie
  inside the root when one is given (a symlink leading out is refused). NIfTI must be single-file
  (``n+1``/``n+2`` magic): an Analyze-style pair (``.hdr``/``.img``, magic ``ni1``) is not read, and
  SimpleITK is told which format to read (never guessing from the bytes), so no other reader that
  follows file names can be reached.
- **Voxel spacing.** Libraries replace an unusable spacing by 1 mm with at most a warning: nibabel a
  zero NIfTI ``pixdim`` (and a negative one by its absolute value), ITK a ``nan`` NRRD spacing, GDCM a
  zero, negative or unparsable DICOM Pixel Spacing. The header's own values are checked instead: each
  spatial spacing must be a finite positive number.
- **Size.** The voxel count comes from the header (nibabel for NIfTI, SimpleITK's
  ``ReadImageInformation`` for NRRD/MetaImage/DICOM) and must be within ``limits.voxels_per_volume``
  before decoding: a 50-byte header can declare a 1024^3 volume, and a gzip stream decodes to whatever
  it declares. Decoders read at most the header's voxel count, so this bound caps decompression too.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medssl.data.headers import (
    METAIMAGE_SUFFIXES,
    NRRD_SUFFIXES,
    metaimage_spacing_problem,
    nrrd_spacing_problem,
    read_text_header,
)
from medssl.errors import MedsslInputError
from medssl.limits import check

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# SimpleITK's ImageIO per suffix: the format is never guessed from the file's bytes.
ITK_IMAGE_IO = {**{s: "NrrdImageIO" for s in NRRD_SUFFIXES}, **{s: "MetaImageIO" for s in METAIMAGE_SUFFIXES}}
DICOM_IMAGE_IO = "GDCMImageIO"
_PIXEL_SPACING = "0028|0030"


def _name_of(path: Path) -> str:
    return path.name.lower()


def itk_image_io(path: Path) -> str:
    """The SimpleITK ImageIO that reads ``path`` (by its suffix)."""
    name = _name_of(path)
    for suffix, io in ITK_IMAGE_IO.items():
        if name.endswith(suffix):
            return io
    raise MedsslInputError(path, "not an NRRD or MetaImage file")


def inside_root(path: Path, root: Path) -> bool:
    """True when ``path`` stays inside ``root`` once '..' and symlinks are resolved."""
    try:
        return path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError, ValueError):  # symlink loop, name too long, NUL byte
        return False


def check_inside(path: Path, root: Path, what: str = "file") -> None:
    """Refuse ``path`` when it resolves outside ``root`` (a symlink leading out, a '..' escape)."""
    if not inside_root(path, root):
        raise MedsslInputError(path, f"{what} resolves outside {root} (a symlink or '..' leading out)")


def detached_data_files(header: Path) -> list[str]:
    """The data file names an NRRD/MetaImage header points to, as written (empty for inline data)."""
    text_header = read_text_header(header)
    return text_header.data_files if text_header is not None else []


def check_detached_data(header: Path) -> None:
    """Refuse a header naming a data file that is absolute or lies outside the header's folder."""
    base = allowed = header.parent
    for name in detached_data_files(header):
        shown = name[:200]
        if "\0" in name:
            raise MedsslInputError(header, "data file name contains a NUL byte")
        if os.path.isabs(name) or name.startswith("~"):
            raise MedsslInputError(
                header, f"data file {shown!r} is an absolute path; detached data files must be named relative to it"
            )
        if not inside_root(Path(os.path.normpath(base / name)), allowed):
            raise MedsslInputError(
                header,
                f"data file {shown!r} lies outside {allowed.resolve()}; detached data files must be inside "
                "the folder of their header",
            )


# --------------------------------------------------------------------------------------------- spacing


def _nifti_header(path: Path) -> object | None:
    """The NIfTI header as written (nibabel's loader "fixes" pixdim), or None when unreadable."""
    import nibabel as nib
    from nibabel.openers import ImageOpener

    try:
        with ImageOpener(str(path)) as f:
            head = f.read(4)
            f.seek(0)
            size = int.from_bytes(head, "little") if len(head) == 4 else 0
            if size not in (348, 540):
                size = int.from_bytes(head, "big")
            klass = nib.Nifti2Header if size == 540 else nib.Nifti1Header
            return klass.from_fileobj(f, check=False)
    except Exception:  # noqa: BLE001 - the reader reports a bad header with its own message
        return None


def check_nifti_header(path: Path) -> None:
    """A single-file NIfTI whose spatial ``pixdim`` are finite positive numbers."""
    header = _nifti_header(path)
    if header is None:
        return  # unreadable: the reader says why
    magic = bytes(np.asarray(header["magic"]).tobytes()).rstrip(b"\0")  # type: ignore[index]
    if magic not in (b"n+1", b"n+2"):
        raise MedsslInputError(path, f"NIfTI magic {magic[:8]!r} is not a single-file NIfTI (n+1 or n+2)")
    dims = [int(d) for d in np.asarray(header["dim"])]  # type: ignore[index]
    pixdim = [float(p) for p in np.asarray(header["pixdim"])]  # type: ignore[index]
    spatial = pixdim[1 : 1 + max(1, min(dims[0], 3))] if 0 < dims[0] <= 7 else pixdim[1:4]
    if not all(math.isfinite(p) and p > 0 for p in spatial):
        shown = ", ".join(f"{p:g}" for p in spatial)
        raise MedsslInputError(path, f"NIfTI pixdim ({shown}) is not positive voxel sizes (would be read as 1 mm)")


def check_text_header_spacing(path: Path) -> None:
    header = read_text_header(path)
    if header is None:
        return
    problem = (
        nrrd_spacing_problem(header) if _name_of(path).endswith(NRRD_SUFFIXES) else metaimage_spacing_problem(header)
    )
    if problem is not None:
        raise MedsslInputError(path, f"{problem} (would be read as 1 mm or lose its sign)")


def _image_information(path: str | Path, image_io: str) -> Any | None:
    """SimpleITK's reader of ``path`` with its header read (the given ImageIO); None when unreadable."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetImageIO(image_io)
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return reader


def check_dicom_spacing(files: Sequence[str | Path]) -> None:
    """Every slice of a DICOM series states a Pixel Spacing of two positive numbers (GDCM reads a missing,
    zero, negative or unparsable one as 1 mm)."""
    for file in files:
        reader = _image_information(file, DICOM_IMAGE_IO)
        if reader is None:
            continue  # unreadable: the series reader says why
        value = reader.GetMetaData(_PIXEL_SPACING).strip() if reader.HasMetaDataKey(_PIXEL_SPACING) else ""
        parts = value.split("\\")
        ok = len(parts) == 2
        if ok:
            try:
                ok = all(math.isfinite(float(p)) and float(p) > 0 for p in parts)
            except ValueError:
                ok = False
        if not ok:
            raise MedsslInputError(
                file,
                f"DICOM Pixel Spacing (0028,0030) {value[:40]!r} is not two positive numbers (would be read as 1 mm)",
            )


# --------------------------------------------------------------------------------------------- size


def header_voxels(path: Path) -> int | None:
    """Voxels (times channels) the file declares, from its header alone; None when undecidable."""
    name = _name_of(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        for first in files[:8]:
            reader = _image_information(first, DICOM_IMAGE_IO)
            if reader is None:
                continue
            size = reader.GetSize()
            return math.prod(size[:2]) * max(len(files), 1) * reader.GetNumberOfComponents()
        return None
    if name.endswith(NIFTI_SUFFIXES):
        import nibabel as nib

        try:
            image: Any = nib.load(str(path))
            shape = image.shape  # reads the header only
        except Exception:  # noqa: BLE001 - the reader reports a bad header with its own message
            return None
        return math.prod(int(s) for s in shape) if shape else None
    if name.endswith(tuple(ITK_IMAGE_IO)):
        reader = _image_information(path, itk_image_io(path))
        return math.prod(reader.GetSize()) * reader.GetNumberOfComponents() if reader is not None else None
    return None  # .inv3: checked from main.plist and the tar headers by its reader


def check_before_decoding(path: Path, root: Path | None = None) -> None:
    """The checks above, in order: where the file and its data lie, its spacing, then how large it is."""
    if root is not None:
        check_inside(path, root, "volume")
    name = _name_of(path)
    if name.endswith(tuple(ITK_IMAGE_IO)):
        check_detached_data(path)
        check_text_header_spacing(path)
    elif name.endswith(NIFTI_SUFFIXES):
        check_nifti_header(path)
    voxels = header_voxels(path)
    if voxels is not None:
        check(path, "voxels declared by the header", voxels, "voxels_per_volume")
