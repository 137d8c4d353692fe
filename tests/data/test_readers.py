"""Volume readers: round trips per format, orientation agreement, DICOM, InVesalius, bad inputs."""

from __future__ import annotations

import gzip
import io
import plistlib
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medssl.data.readers import Volume, find_volumes, is_volume_path, read_channels, read_volume, write_nifti
from medssl.errors import MedsslInputError

CRANIUM = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")
SPACING = (0.8, 1.25, 2.5)


def _ramp(shape: tuple[int, int, int] = (6, 7, 5)) -> np.ndarray:
    """Distinct voxel values, so any axis swap or flip changes the array."""
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


def _affine(spacing=SPACING, origin=(10.0, -20.0, 30.0)) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    return affine


def _sitk_image(array_ijk: np.ndarray, spacing=SPACING, origin=(5.0, -3.0, 12.0), direction=None) -> sitk.Image:
    image = sitk.GetImageFromArray(np.transpose(array_ijk, (2, 1, 0)))  # SimpleITK wants (k, j, i)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    return image


# ---------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("name", ["vol.nii", "vol.nii.gz"])
def test_nifti_round_trip(tmp_path: Path, name: str) -> None:
    array, affine = _ramp(), _affine()
    write_nifti(tmp_path / name, array, affine)
    volume = read_volume(tmp_path / name)
    assert isinstance(volume, Volume)
    assert volume.array.dtype == np.float32
    np.testing.assert_array_equal(volume.array, array)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-6)
    np.testing.assert_allclose(volume.spacing, SPACING, rtol=1e-6)
    assert volume.source == tmp_path / name
    # atomic write leaves no temporary file behind
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_write_nifti_converts_types_nibabel_refuses(tmp_path: Path) -> None:
    labels = np.zeros((4, 4, 4), dtype=np.int64)
    labels[1:3, 1:3, 1:3] = 300
    write_nifti(tmp_path / "sub" / "lab.nii.gz", labels, np.eye(4))
    volume = read_volume(tmp_path / "sub" / "lab.nii.gz", label=True)
    assert volume.array.dtype == np.int32
    np.testing.assert_array_equal(volume.array, labels)
    write_nifti(tmp_path / "mask.nii.gz", labels > 0, np.eye(4))
    mask = read_volume(tmp_path / "mask.nii.gz", label=True)
    assert mask.array.dtype == np.uint8 and mask.array.sum() == 8
    with pytest.raises(MedsslInputError, match="3D array"):
        write_nifti(tmp_path / "x.nii.gz", np.zeros((4, 4)), np.eye(4))


@pytest.mark.parametrize("suffix", [".nrrd", ".nhdr", ".mha", ".mhd"])
def test_itk_formats_agree_with_nifti(tmp_path: Path, suffix: str) -> None:
    """The same image saved as NIfTI and as NRRD/MetaImage reads to the same array and world geometry."""
    array = _ramp()
    # an oblique, non-identity LPS direction so that sign conventions matter
    c, s = np.cos(0.3), np.sin(0.3)
    direction = (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, -1.0)
    image = _sitk_image(array, direction=direction)
    sitk.WriteImage(image, str(tmp_path / f"img{suffix}"))
    sitk.WriteImage(image, str(tmp_path / "img.nii.gz"))
    itk_volume = read_volume(tmp_path / f"img{suffix}")
    nifti_volume = read_volume(tmp_path / "img.nii.gz")
    np.testing.assert_array_equal(itk_volume.array, array)
    np.testing.assert_array_equal(nifti_volume.array, array)
    np.testing.assert_allclose(itk_volume.spacing, SPACING, rtol=1e-6)
    np.testing.assert_allclose(itk_volume.affine, nifti_volume.affine, atol=1e-4)
    assert nib.aff2axcodes(itk_volume.affine) == nib.aff2axcodes(nifti_volume.affine)


def test_itk_identity_direction_is_lps(tmp_path: Path) -> None:
    sitk.WriteImage(_sitk_image(_ramp(), origin=(1.0, 2.0, 3.0)), str(tmp_path / "img.mha"))
    volume = read_volume(tmp_path / "img.mha")
    assert nib.aff2axcodes(volume.affine) == ("L", "P", "S")
    np.testing.assert_allclose(volume.affine[:3, 3], (-1.0, -2.0, 3.0))  # LPS origin in RAS


def _write_dicom_series(
    folder: Path, array_ijk: np.ndarray, series_uid: str, spacing=(0.7, 0.7, 2.0), suffix=".dcm", prefix="s"
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    volume = _sitk_image(array_ijk.astype(np.int16), spacing=spacing, origin=(-50.0, -60.0, 100.0))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(volume.GetDepth()):
        slice_k = volume[:, :, k]
        tags = {
            "0008|0060": "CT",
            "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": series_uid,
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0020|0032": "\\".join(f"{v:.4f}" for v in volume.TransformIndexToPhysicalPoint((0, 0, k))),
            "0020|0013": str(k + 1),
            "0018|0050": str(spacing[2]),
            "0008|0018": f"{series_uid}.{k + 1}",
        }
        for tag, value in tags.items():
            slice_k.SetMetaData(tag, value)
        written = folder / f"{prefix}{k:03d}.dcm"  # the writer picks its ImageIO by extension
        writer.SetFileName(str(written))
        writer.Execute(slice_k)
        written.rename(written.with_suffix(suffix))


def test_dicom_series_round_trip(tmp_path: Path) -> None:
    array = _ramp((8, 9, 5))
    _write_dicom_series(tmp_path / "series", array, "1.2.826.0.1.3680043.2.1125.10", suffix="")
    assert is_volume_path(tmp_path / "series")  # detected by the DICM preamble, no extension needed
    volume = read_volume(tmp_path / "series")
    np.testing.assert_array_equal(volume.array, array)
    np.testing.assert_allclose(volume.spacing, (0.7, 0.7, 2.0), rtol=1e-4)
    assert nib.aff2axcodes(volume.affine) == ("L", "P", "S")
    assert volume.notes == []


def test_dicom_folder_with_two_series_reads_the_largest(tmp_path: Path) -> None:
    big, small = _ramp((6, 6, 5)), _ramp((6, 6, 3)) + 1000
    _write_dicom_series(tmp_path / "mixed", big, "1.2.826.0.1.3680043.2.1125.20", prefix="big")
    _write_dicom_series(tmp_path / "mixed", small, "1.2.826.0.1.3680043.2.1125.21", prefix="small")
    volume = read_volume(tmp_path / "mixed")
    assert volume.array.shape == (6, 6, 5)
    np.testing.assert_array_equal(volume.array, big)
    assert len(volume.notes) == 1 and "2 DICOM series" in volume.notes[0]


def _write_inv3(
    path: Path,
    array_kji: np.ndarray,
    spacing=(0.5, 0.5, 1.5),
    extra_members: dict[str, bytes] | None = None,
    matrix_bytes: bytes | None = None,
    plist: dict | None = None,
) -> None:
    """A minimal InVesalius project: gzipped tar with <dir>/main.plist and <dir>/matrix.dat."""
    info = plist or {
        "format_version": 1,
        "modality": "CT",
        "matrix": {"dtype": str(array_kji.dtype), "filename": "matrix.dat", "shape": list(array_kji.shape)},
        "spacing": list(spacing),
    }
    members = {
        "proj/main.plist": plistlib.dumps(info),
        "proj/matrix.dat": array_kji.tobytes() if matrix_bytes is None else matrix_bytes,
        **(extra_members or {}),
    }
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            member = tarfile.TarInfo(name)
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))


def test_invesalius_round_trip(tmp_path: Path) -> None:
    array_kji = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) - 100
    _write_inv3(tmp_path / "head.inv3", array_kji)
    assert is_volume_path(tmp_path / "head.inv3")
    volume = read_volume(tmp_path / "head.inv3")
    assert volume.array.shape == (6, 5, 4)  # (i, j, k) = (columns, rows, slices)
    np.testing.assert_array_equal(volume.array, array_kji.transpose(2, 1, 0))
    np.testing.assert_allclose(volume.spacing, (0.5, 0.5, 1.5))


@pytest.mark.skipif(not CRANIUM.exists(), reason="Debian package invesalius-examples is not installed")
def test_real_cranium_inv3() -> None:
    volume = read_volume(CRANIUM)
    assert 108 in volume.array.shape and 256 in volume.array.shape
    assert sorted(volume.spacing) == pytest.approx(sorted((0.957, 0.957, 1.5)), abs=1e-3)
    assert volume.array.min() == -1024  # CT air in HU
    assert nib.aff2axcodes(volume.affine)[2] == "S"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"extra_members": {"../evil.txt": b"x"}}, "unsafe member"),
        ({"extra_members": {"/etc/evil": b"x"}}, "unsafe member"),
        ({"matrix_bytes": b"\x00" * 10}, "bytes, expected"),
        (
            {
                "plist": {
                    "matrix": {"dtype": "int16", "filename": "../matrix.dat", "shape": [4, 5, 6]},
                    "spacing": [1, 1, 1],
                }
            },
            "unsafe matrix file",
        ),
        (
            {"plist": {"matrix": {"dtype": "int16", "filename": "matrix.dat"}, "spacing": [1, 1, 1]}},
            "lacks matrix.shape",
        ),
        (
            {
                "plist": {
                    "matrix": {"dtype": "int16", "filename": "other.dat", "shape": [4, 5, 6]},
                    "spacing": [1, 1, 1],
                }
            },
            "which the archive lacks",
        ),
    ],
)
def test_bad_invesalius_projects(tmp_path: Path, kwargs: dict, message: str) -> None:
    path = tmp_path / "bad.inv3"
    _write_inv3(path, np.zeros((4, 5, 6), dtype=np.int16), **kwargs)
    with pytest.raises(MedsslInputError, match=message) as info:
        read_volume(path)
    assert str(path) in str(info.value)


def test_inv3_with_a_symlink_member_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "link.inv3"
    with tarfile.open(path, "w:gz") as archive:
        data = plistlib.dumps(
            {"matrix": {"dtype": "int16", "filename": "matrix.dat", "shape": [1, 1, 1]}, "spacing": [1, 1, 1]}
        )
        member = tarfile.TarInfo("proj/main.plist")
        member.size = len(data)
        archive.addfile(member, io.BytesIO(data))
        link = tarfile.TarInfo("proj/matrix.dat")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        archive.addfile(link)
    with pytest.raises(MedsslInputError, match="not a regular file"):
        read_volume(path)


def test_inv3_that_is_not_an_archive(tmp_path: Path) -> None:
    path = tmp_path / "junk.inv3"
    path.write_bytes(gzip.compress(b"not a tar at all" * 10))
    with pytest.raises(MedsslInputError, match="junk.inv3"):
        read_volume(path)


# ---------------------------------------------------------------------------------------------
# shapes, channels, labels


def test_singleton_fourth_axis_is_squeezed(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(_ramp()[..., None], _affine()), tmp_path / "4d1.nii.gz")
    assert read_volume(tmp_path / "4d1.nii.gz").array.shape == (6, 7, 5)


def test_true_4d_is_an_error_unless_every_channel_is_read(tmp_path: Path) -> None:
    data = np.stack([_ramp(), -_ramp()], axis=-1)
    nib.save(nib.Nifti1Image(data, _affine()), tmp_path / "4d.nii.gz")
    with pytest.raises(MedsslInputError, match=r"4D with shape \(6, 7, 5, 2\)") as info:
        read_volume(tmp_path / "4d.nii.gz")
    assert str(tmp_path / "4d.nii.gz") in str(info.value)
    first, second = read_channels(tmp_path / "4d.nii.gz", 2)
    np.testing.assert_array_equal(first.array, _ramp())
    np.testing.assert_array_equal(second.array, -_ramp())
    # more or fewer channels than declared: refused, never read in part (issue 19 item 6)
    for declared in (1, 3):
        with pytest.raises(MedsslInputError, match=rf"holds 2 channel\(s\).*{declared} declared"):
            read_channels(tmp_path / "4d.nii.gz", declared)
    nib.save(nib.Nifti1Image(_ramp(), _affine()), tmp_path / "3d.nii.gz")
    with pytest.raises(MedsslInputError, match="holds 1 channel"):
        read_channels(tmp_path / "3d.nii.gz", 4)


def test_label_reading(tmp_path: Path) -> None:
    labels = np.zeros((4, 4, 4), dtype=np.float32)
    labels[0, 0, :2] = 2.0
    write_nifti(tmp_path / "ok.nii.gz", labels, np.eye(4))
    volume = read_volume(tmp_path / "ok.nii.gz", label=True)
    assert volume.array.dtype == np.uint8 and set(np.unique(volume.array)) == {0, 2}
    labels[1, 1, 1] = 0.5
    write_nifti(tmp_path / "frac.nii.gz", labels, np.eye(4))
    with pytest.raises(MedsslInputError, match="not integer-valued"):
        read_volume(tmp_path / "frac.nii.gz", label=True)


# ---------------------------------------------------------------------------------------------
# bad inputs: each error names the file


def _assert_names_file(path: Path, message: str) -> None:
    with pytest.raises(MedsslInputError, match=message) as info:
        read_volume(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    _assert_names_file(tmp_path / "nope.nii.gz", "not found")


def test_truncated_nifti_gz(tmp_path: Path) -> None:
    path = tmp_path / "cut.nii.gz"
    write_nifti(path, np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32), np.eye(4))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _assert_names_file(path, "truncated")


def test_unsupported_extension(tmp_path: Path) -> None:
    path = tmp_path / "scan.txt"
    path.write_text("hello")
    _assert_names_file(path, "unsupported file type")


def test_garbage_nrrd_and_missing_raw(tmp_path: Path) -> None:
    (tmp_path / "bad.nrrd").write_text("garbage")
    _assert_names_file(tmp_path / "bad.nrrd", "unreadable")
    sitk.WriteImage(_sitk_image(_ramp()), str(tmp_path / "img.mhd"))
    (tmp_path / "img.raw").unlink()
    _assert_names_file(tmp_path / "img.mhd", "unreadable")


def test_two_dimensional_image(tmp_path: Path) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 6), np.float32)), str(tmp_path / "flat.mha"))
    _assert_names_file(tmp_path / "flat.mha", "2D")


def test_nan_and_inf_voxels(tmp_path: Path) -> None:
    array = _ramp()
    array[0, 0, 0] = np.nan
    array[1, 2, 3] = np.inf
    write_nifti(tmp_path / "nan.nii.gz", array, np.eye(4))
    _assert_names_file(tmp_path / "nan.nii.gz", "contains 2 NaN/inf voxels")


def test_empty_and_non_dicom_folders(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    _assert_names_file(tmp_path / "empty", "empty DICOM folder")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme").write_text("no images here")
    _assert_names_file(tmp_path / "notes", "no DICOM series")


# ---------------------------------------------------------------------------------------------
# discovery


def test_find_volumes_mixed_tree(tmp_path: Path) -> None:
    write_nifti(tmp_path / "a.nii.gz", _ramp(), np.eye(4))
    (tmp_path / "sub").mkdir()
    sitk.WriteImage(_sitk_image(_ramp()), str(tmp_path / "sub" / "b.nrrd"))
    sitk.WriteImage(_sitk_image(_ramp()), str(tmp_path / "sub" / "c.mhd"))  # c.raw is not a volume
    _write_dicom_series(tmp_path / "sub" / "dicom", _ramp((6, 6, 3)), "1.2.826.0.1.3680043.2.1125.30")
    _write_inv3(tmp_path / "d.inv3", np.zeros((2, 3, 4), dtype=np.int16))
    (tmp_path / "notes.txt").write_text("not a scan")
    (tmp_path / "._a.nii.gz").write_bytes(b"macOS resource fork")
    (tmp_path / ".cache").mkdir()
    write_nifti(tmp_path / ".cache" / "hidden.nii.gz", _ramp(), np.eye(4))
    found = find_volumes(tmp_path)
    assert found == sorted(
        [
            tmp_path / "a.nii.gz",
            tmp_path / "d.inv3",
            tmp_path / "sub" / "b.nrrd",
            tmp_path / "sub" / "c.mhd",
            tmp_path / "sub" / "dicom",
        ]
    )
    for path in found:  # each is readable as a volume
        assert read_volume(path).array.ndim == 3
    assert not is_volume_path(tmp_path / "notes.txt")
    assert not is_volume_path(tmp_path / "sub")  # holds volumes, but is not a DICOM series itself
    assert find_volumes(tmp_path / "a.nii.gz") == [tmp_path / "a.nii.gz"]
    with pytest.raises(MedsslInputError, match="not found"):
        find_volumes(tmp_path / "missing")
