"""Read 3D medical volumes into one in-memory form: a voxel array and a RAS+ affine.

Formats: NIfTI (``.nii``, ``.nii.gz``) through nibabel; NRRD (``.nrrd``, ``.nhdr``) and MetaImage
(``.mha``, ``.mhd``) through SimpleITK; DICOM series folders through SimpleITK/GDCM; InVesalius
projects (``.inv3``). Every array comes out in voxel order (i, j, k) as nibabel gives it, with the
affine mapping (i, j, k, 1) to RAS+ world millimetres. Orientation is *not* changed here (MONAI's
``Orientation`` does that during preprocessing), so a file's own voxel order is kept.

``read_volume`` reads one 3D volume; ``read_channels`` reads a multi-channel (4D) image whole and
refuses one with more or fewer channels than declared. Before any voxel is decoded, every file passes
:mod:`medssl.data.safe_read` (detached data inside its folder, spacing as written, voxel count), and
SimpleITK is told the ImageIO of the suffix rather than guessing the format from the bytes.

Every problem with a file is a ``MedsslInputError(path, one-line problem)``.
"""

from __future__ import annotations

import os
import plistlib
import posixpath
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from medssl.data.headers import METAIMAGE_SUFFIXES, NRRD_SUFFIXES
from medssl.data.safe_read import (
    DICOM_IMAGE_IO,
    NIFTI_SUFFIXES,
    check_before_decoding,
    check_dicom_spacing,
    itk_image_io,
)
from medssl.errors import MedsslInputError
from medssl.fileio import atomic_path
from medssl.limits import check

ITK_SUFFIXES = NRRD_SUFFIXES + METAIMAGE_SUFFIXES
INVESALIUS_SUFFIXES = (".inv3",)
VOLUME_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES + INVESALIUS_SUFFIXES

# ITK/DICOM world coordinates are LPS; nibabel/MONAI use RAS: flip the first two world axes.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Files probed when deciding whether a folder holds a DICOM series (a folder is one series).
_DICOM_PROBE_LIMIT = 32
# main.plist of an InVesalius project is a few kB; refuse to read an absurd one into memory.
_PLIST_MAX_BYTES = 16 * 1024 * 1024


@dataclass
class Volume:
    """A 3D volume: voxel array in (i, j, k) order and its voxel-to-RAS+ affine."""

    array: np.ndarray
    affine: np.ndarray
    source: Path
    notes: list[str] = field(default_factory=list)  # e.g. which DICOM series of several was read

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k (norms of the affine's columns)."""
        norms = np.linalg.norm(np.asarray(self.affine, dtype=np.float64)[:3, :3], axis=0)
        return (float(norms[0]), float(norms[1]), float(norms[2]))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]


def _has_suffix(path: Path, suffixes: tuple[str, ...]) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in suffixes)


def _is_dicom_file(path: Path) -> bool:
    """DICOM Part 10 files carry 'DICM' after a 128-byte preamble; '.dcm' is trusted as well."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _dicom_files_in(folder: Path, limit: int | None = _DICOM_PROBE_LIMIT) -> list[Path]:
    """DICOM files directly inside ``folder`` (probing at most ``limit`` candidate files)."""
    found: list[Path] = []
    probed = 0
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return found
    for entry in entries:
        if entry.name.startswith(".") or not entry.is_file():
            continue
        path = Path(entry.path)
        if _has_suffix(path, VOLUME_SUFFIXES):
            continue  # a NIfTI/NRRD next to DICOMs is its own volume, never a slice
        if limit is not None and probed >= limit:
            break
        probed += 1
        if _is_dicom_file(path):
            found.append(path)
            if limit is not None:
                break  # one DICOM file is enough to call the folder a series folder
    return found


def is_volume_path(path: str | Path) -> bool:
    """True for a file with a readable extension, or a folder that directly holds DICOM files."""
    path = Path(path)
    if path.is_file():
        return _has_suffix(path, VOLUME_SUFFIXES)
    if path.is_dir():
        return bool(_dicom_files_in(path))
    return False


def find_volumes(root: str | Path) -> list[Path]:
    """Every volume under ``root``, recursively, sorted; a DICOM series folder counts as one volume.

    Hidden files and folders (names starting with '.') are skipped: they hold caches and OS debris
    such as macOS ``._x.nii.gz`` resource forks, never scans.
    """
    root = Path(root)
    if not root.exists():
        raise MedsslInputError(root, "not found")
    if root.is_file():
        return [root] if is_volume_path(root) else []
    volumes: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        folder = Path(dirpath)
        if _dicom_files_in(folder):
            volumes.append(folder)
        for name in sorted(filenames):
            if not name.startswith(".") and _has_suffix(Path(name), VOLUME_SUFFIXES):
                volumes.append(folder / name)
    return sorted(volumes)


# ---------------------------------------------------------------------------------------------
# format readers: each returns (array in (i, j, k[, c]) order, 4x4 RAS affine, notes)


def _one_line(exc: BaseException) -> str:
    """Condense a library exception (SimpleITK ones span lines and name C++ sources) to one line."""
    text = str(exc) or type(exc).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # SimpleITK: first line is "Exception thrown in ... <file.cxx>:<line>:"; the reason follows.
    if len(lines) > 1 and lines[0].startswith("Exception thrown in SimpleITK"):
        lines = lines[1:]
    text = " ".join(lines)
    text = re.sub(r"^(sitk::ERROR|ITK ERROR):\s*", "", text)
    text = re.sub(r"^\w+\(0x[0-9a-fA-F]+\):\s*", "", text)
    return text[:300]


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    try:
        img: Any = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for a bad header
        raise MedsslInputError(path, f"unreadable NIfTI: {_one_line(exc)}") from exc
    try:
        # Accessing the data forces decompression: a truncated .nii.gz fails here, not at load.
        array = np.asanyarray(img.dataobj)
    except Exception as exc:  # EOFError, zlib.error, OSError, ValueError from short reads
        raise MedsslInputError(path, f"unreadable or truncated NIfTI data: {_one_line(exc)}") from exc
    return array, np.asarray(img.affine, dtype=np.float64), []


def _sitk_to_array_affine(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """SimpleITK image -> (array in (i, j, k[, t/c]) order, RAS affine).

    ``GetArrayFromImage`` returns (k, j, i) (plus a trailing component axis for vector pixels);
    ITK geometry is LPS: world = origin + direction @ diag(spacing) @ index.
    """
    array = sitk.GetArrayFromImage(image)
    dim = image.GetDimension()
    n_comp = image.GetNumberOfComponentsPerPixel()
    spatial_axes = list(range(dim))[::-1]  # (k, j, i) -> (i, j, k); 4D ITK: (t, k, j, i) -> (i, j, k, t)
    extra = [dim] if n_comp > 1 else []
    array = np.transpose(array, spatial_axes + extra)
    n = min(dim, 3)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)[:n, :n]
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)[:n]
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)[:n]
    lps = np.eye(4)
    lps[:n, :n] = direction @ np.diag(spacing)
    lps[:n, 3] = origin
    return array, _LPS_TO_RAS @ lps


def read_itk_image(path: Path) -> sitk.Image:
    """An NRRD/MetaImage file as a SimpleITK image, read by the ImageIO of its suffix (never guessed
    from its bytes). Callers have passed :func:`read_volume`'s checks on ``path`` first."""
    reader = sitk.ImageFileReader()
    reader.SetImageIO(itk_image_io(path))
    reader.SetFileName(str(path))
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise MedsslInputError(path, f"unreadable image: {_one_line(exc)}") from exc


def _read_itk(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    array, affine = _sitk_to_array_affine(read_itk_image(path))
    return array, affine, []


def _read_dicom_folder(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if not any(p.is_file() and not p.name.startswith(".") for p in path.iterdir()):
        raise MedsslInputError(path, "empty DICOM folder")
    reader = sitk.ImageSeriesReader()
    try:
        series_ids = list(reader.GetGDCMSeriesIDs(str(path)))
    except RuntimeError as exc:
        raise MedsslInputError(path, f"unreadable DICOM folder: {_one_line(exc)}") from exc
    if not series_ids:
        raise MedsslInputError(path, "folder holds no DICOM series")
    files_by_series = {sid: list(reader.GetGDCMSeriesFileNames(str(path), sid)) for sid in series_ids}
    # A folder is one volume: with several series, take the one with the most slices.
    chosen = max(series_ids, key=lambda sid: (len(files_by_series[sid]), sid))
    notes: list[str] = []
    if len(series_ids) > 1:
        notes.append(
            f"{len(series_ids)} DICOM series in folder; read the largest, {chosen} "
            f"({len(files_by_series[chosen])} files)"
        )
    check_dicom_spacing(files_by_series[chosen])
    reader.SetImageIO(DICOM_IMAGE_IO)
    reader.SetFileNames(files_by_series[chosen])
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise MedsslInputError(path, f"unreadable DICOM series {chosen}: {_one_line(exc)}") from exc
    array, affine = _sitk_to_array_affine(image)
    return array, affine, notes


def _safe_member_name(name: str) -> bool:
    """A plain relative archive path: not absolute, no '..' component, no backslashes."""
    if not name or name.startswith("/") or "\\" in name:
        return False
    return ".." not in PurePosixPath(name).parts


def _read_invesalius(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """An InVesalius 3 project: a gzipped tar with ``main.plist`` and the raw volume it names.

    main.plist holds ``matrix: {filename, shape, dtype}`` and ``spacing``. The raw matrix is C-ordered
    with shape (slices, rows, columns) = (k, j, i) and spacing is (x, y, z) = (i, j, k), so the array
    is transposed to (i, j, k). Members are read into memory through ``extractfile``; nothing is
    written to disk, and every member name must be a plain relative path to a regular file.
    """
    try:
        with tarfile.open(path, "r:*") as archive:
            members = archive.getmembers()
            for member in members:
                if not _safe_member_name(member.name):
                    raise MedsslInputError(path, f"unsafe member name in archive: {member.name!r}")
            plists = [m for m in members if posixpath.basename(m.name) == "main.plist"]
            if not plists:
                raise MedsslInputError(path, "not an InVesalius project (no main.plist in the archive)")
            plist_member = min(plists, key=lambda m: m.name.count("/"))
            if not plist_member.isfile() or plist_member.size > _PLIST_MAX_BYTES:
                raise MedsslInputError(path, "main.plist is not a regular file of reasonable size")
            try:
                info = plistlib.loads(archive.extractfile(plist_member).read())  # type: ignore[union-attr]
            except Exception as exc:  # plistlib raises InvalidFileException, ExpatError, ValueError
                raise MedsslInputError(path, f"unreadable main.plist: {_one_line(exc)}") from exc
            matrix_name, shape, dtype, spacing = _invesalius_matrix_info(path, info)
            check(path, "voxels declared by main.plist", int(np.prod(shape, dtype=np.float64)), "voxels_per_volume")
            wanted = posixpath.join(posixpath.dirname(plist_member.name), matrix_name)
            by_name = {m.name: m for m in members}
            matrix_member = by_name.get(wanted)
            if matrix_member is None:
                raise MedsslInputError(path, f"main.plist names {matrix_name!r}, which the archive lacks")
            if not matrix_member.isfile():
                raise MedsslInputError(path, f"{matrix_name!r} is not a regular file (link or device)")
            check(path, f"bytes of archive member {matrix_name}", matrix_member.size, "archive_member_bytes")
            expected = int(np.prod(shape)) * dtype.itemsize
            if matrix_member.size != expected:
                raise MedsslInputError(
                    path,
                    f"{matrix_name} holds {matrix_member.size} bytes, expected {expected} for shape "
                    f"{tuple(shape)} {dtype.name}",
                )
            raw = archive.extractfile(matrix_member).read()  # type: ignore[union-attr]
    except MedsslInputError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise MedsslInputError(path, f"unreadable InVesalius project: {_one_line(exc)}") from exc
    if len(raw) != expected:
        raise MedsslInputError(path, f"truncated {matrix_name}: {len(raw)} of {expected} bytes")
    array = np.frombuffer(raw, dtype=dtype).reshape(shape).transpose(2, 1, 0)
    # The project stores no direction cosines. Viewing Cranium.inv3 shows j running posterior ->
    # anterior (InVesalius flips DICOM rows) and k inferior -> superior; i keeps the DICOM column
    # sense (towards patient left), giving LAS. Origin is not stored either: put voxel 0 at 0 mm.
    affine = np.diag([-spacing[0], spacing[1], spacing[2], 1.0])
    return np.ascontiguousarray(array), affine, []


def _invesalius_matrix_info(
    path: Path, info: object
) -> tuple[str, tuple[int, int, int], np.dtype, tuple[float, float, float]]:
    if not isinstance(info, dict) or not isinstance(info.get("matrix"), dict):
        raise MedsslInputError(path, "main.plist lacks the 'matrix' entry")
    matrix = info["matrix"]
    missing = [k for k in ("filename", "shape", "dtype") if k not in matrix]
    if missing or "spacing" not in info:
        names = [f"matrix.{k}" for k in missing] + ([] if "spacing" in info else ["spacing"])
        raise MedsslInputError(path, f"main.plist lacks {', '.join(names)}")
    name = matrix["filename"]
    if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", ".."):
        raise MedsslInputError(path, f"main.plist names an unsafe matrix file {name!r}")
    try:
        shape = tuple(int(s) for s in matrix["shape"])
        spacing = tuple(float(s) for s in info["spacing"])
        dtype = np.dtype(str(matrix["dtype"]))
    except (TypeError, ValueError) as exc:
        raise MedsslInputError(path, f"main.plist has a bad matrix shape, dtype or spacing: {exc}") from exc
    if len(shape) != 3 or min(shape) < 1:
        raise MedsslInputError(path, f"main.plist matrix shape {shape} is not a 3D shape")
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise MedsslInputError(path, f"main.plist spacing {spacing} is not three positive numbers")
    if dtype.kind not in "iuf" or dtype.itemsize > 8:
        raise MedsslInputError(path, f"main.plist matrix dtype {dtype} is not a numeric voxel type")
    if dtype.byteorder == "=":
        dtype = dtype.newbyteorder("<")  # InVesalius writes native little-endian memmaps
    return name, shape, dtype, spacing


# ---------------------------------------------------------------------------------------------


def _read_raw(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if path.is_dir():
        return _read_dicom_folder(path)
    if _has_suffix(path, NIFTI_SUFFIXES):
        return _read_nifti(path)
    if _has_suffix(path, ITK_SUFFIXES):
        return _read_itk(path)
    if _has_suffix(path, INVESALIUS_SUFFIXES):
        return _read_invesalius(path)
    raise MedsslInputError(
        path, f"unsupported file type (readable: {', '.join(VOLUME_SUFFIXES)}, or a DICOM series folder)"
    )


def _squeeze(array: np.ndarray) -> np.ndarray:
    """Drop trailing singleton axes beyond the third (a 4D file holding one channel is 3D)."""
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return array


def _checked_volume(path: Path, array: np.ndarray, affine: np.ndarray, notes: list[str], label: bool) -> Volume:
    """A 3D array and its affine as a :class:`Volume`, after the checks every read makes."""
    if array.ndim != 3:
        shape = tuple(array.shape)
        raise MedsslInputError(path, f"is {array.ndim}D with shape {shape}; a 3D volume is expected")
    if min(array.shape) < 1:
        raise MedsslInputError(path, f"has an empty shape {tuple(array.shape)}")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise MedsslInputError(path, "invalid affine (non-finite or not 4x4)")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(spacing <= 0) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise MedsslInputError(path, f"invalid affine: voxel spacing {tuple(np.round(spacing, 6))}")
    if array.dtype.kind == "f":
        n_bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if n_bad:
            raise MedsslInputError(path, f"contains {n_bad} NaN/inf voxels")
    elif array.dtype.kind not in "iub":
        raise MedsslInputError(path, f"unsupported voxel type {array.dtype}")
    array = _as_label_array(path, array) if label else np.asarray(array, dtype=np.float32)
    return Volume(array=np.ascontiguousarray(array), affine=affine, source=path, notes=list(notes))


def _read_checked(path: Path, root: str | Path | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if not path.exists():
        raise MedsslInputError(path, "not found")
    # inside the root, detached data inside its folder, spacing, voxel count: all before decoding
    check_before_decoding(path, Path(root) if root is not None else None)
    array, affine, notes = _read_raw(path)
    return _squeeze(array), affine, notes


def read_volume(path: str | Path, *, label: bool = False, root: str | Path | None = None) -> Volume:
    """Read a 3D volume file or DICOM series folder.

    Images come back as float32. With ``label=True`` the values must be whole numbers and come back
    as uint8 (values 0..255) or int32. A 4D image whose extra axes have size 1 is squeezed; a true 4D
    image is an error here (read it with :func:`read_channels`). With ``root`` the file must lie inside
    it (symlinks resolved); a detached header's data files must lie inside the header's folder.
    """
    path = Path(path)
    array, affine, notes = _read_checked(path, root)
    return _checked_volume(path, array, affine, notes, label)


def read_channels(path: str | Path, n_channels: int, *, root: str | Path | None = None) -> list[Volume]:
    """The ``n_channels`` 3D channels of one image file (MSD multi-modal tasks keep them on the fourth axis).

    The file must hold exactly ``n_channels``: a 3D image where several are declared, or a 4D image with
    more or fewer channels, is refused rather than read in part.
    """
    path = Path(path)
    array, affine, notes = _read_checked(path, root)
    found = array.shape[3] if array.ndim == 4 else 1 if array.ndim == 3 else None
    if found is None or found != n_channels:
        raise MedsslInputError(
            path,
            f"holds {found if found is not None else 'no'} channel(s) (shape {tuple(array.shape)}); "
            f"{n_channels} declared (dataset.json 'modality' / 'channel_names')",
        )
    if array.ndim == 3:
        return [_checked_volume(path, array, affine, notes, label=False)]
    return [_checked_volume(path, array[..., c], affine, notes, label=False) for c in range(n_channels)]


def _as_label_array(path: Path, array: np.ndarray) -> np.ndarray:
    if array.dtype.kind == "f":
        fractional = array != np.round(array)
        if np.any(fractional):
            examples = np.unique(array[fractional])[:3]
            shown = ", ".join(f"{v:g}" for v in examples)
            raise MedsslInputError(path, f"label is not integer-valued (values such as {shown})")
    low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
    if low >= 0 and high <= 255:
        return array.astype(np.uint8)
    if low < np.iinfo(np.int32).min or high > np.iinfo(np.int32).max:
        raise MedsslInputError(path, f"label values {low}..{high} do not fit int32")
    return array.astype(np.int32)


def write_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray) -> None:
    """Write a 3D array as NIfTI (``.nii`` or ``.nii.gz``) atomically: a temp file, then os.replace."""
    path = Path(path)
    if not _has_suffix(path, NIFTI_SUFFIXES):
        raise MedsslInputError(path, "write_nifti needs a .nii or .nii.gz path")
    array = np.asarray(array)
    if array.ndim != 3:
        raise MedsslInputError(path, f"write_nifti takes a 3D array, got shape {tuple(array.shape)}")
    # NIfTI has no bool and nibabel refuses int64/float64 without an explicit choice: pick compact types.
    if array.dtype == bool:
        array = array.astype(np.uint8)
    elif array.dtype.kind in "iu" and array.dtype.itemsize == 8:
        array = array.astype(np.int32)
    elif array.dtype == np.float64:
        array = array.astype(np.float32)
    image = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64))
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else ".nii"
    with atomic_path(path, suffix=suffix) as tmp:
        nib.save(image, tmp)
