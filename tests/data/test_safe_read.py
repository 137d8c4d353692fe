"""Issue 19 items 2 and 9: a volume's voxels never come from outside its folder, and a spacing a library
would read as 1 mm is refused.

The red team's four files first (each must now exit 2 from `data check` with one line naming it), then
properties: hypothesis writes NRRD and MetaImage headers in every form that can name another file
(one name, ``LIST``, printf patterns; ``.nrrd``/``.nhdr``/``.mha``/``.mhd``; comments before the data
line; CR, LF or CRLF line ends) with names inside or leading out; and headers of every reader with
spacings that are positive, zero, negative, NaN or not numbers.
"""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medssl import cli
from medssl.data.readers import read_volume
from medssl.data.safe_read import check_detached_data
from medssl.errors import MedsslInputError

PROPERTY = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
OUTSIDE_VALUE = 7777  # every voxel of a file outside the folder: a read that returns it has leaked
NRRD = "NRRD0004\ntype: short\ndimension: 3\nsizes: 4 4 4\nspacings: 1 1 1\nencoding: raw\nendian: little\n"
META = "ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementSpacing = 1 1 1\nElementType = MET_SHORT\n"


def run_cli(args, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["medssl", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def _folders(root: Path) -> tuple[Path, Path]:
    inside, outside = root / "scans", root / "outside"
    inside.mkdir(parents=True)
    outside.mkdir()
    np.full(64, OUTSIDE_VALUE, np.int16).tofile(outside / "x.raw")
    for k in range(4):
        np.full(16, OUTSIDE_VALUE, np.int16).tofile(outside / f"s{k}.raw")
    return inside, outside


# --------------------------------------------------------------------------------------------- red team


@pytest.mark.parametrize(
    "name,body",
    [
        ("rel.nrrd", NRRD + "data file: ../outside/x.raw\n"),
        ("abs.nrrd", NRRD + "data file: {outside}/x.raw\n"),
        ("rel.mha", META + "ElementDataFile = ../outside/x.raw\n"),
        ("late.nhdr", NRRD + "# padding\n" * 9000 + "data file: ../outside/x.raw\n"),  # after 90 kB of comments
    ],
)
def test_red_team_headers_exit_2_naming_the_file(tmp_path, capsys, monkeypatch, name, body):
    inside, outside = _folders(tmp_path)
    header = inside / name
    header.write_text(body.format(outside=outside))
    code, out, err = run_cli(["data", "check", header], capsys, monkeypatch)
    assert code == 2 and "Traceback" not in err
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{header}:") and "data file" in lines[0], out
    # ingest skips it (and, with nothing else to ingest, exits 2): it is never cached or trained on
    code, _, err = run_cli(["data", "ingest", inside, "--out", tmp_path / "corpus"], capsys, monkeypatch)
    assert code == 2 and str(header) in err
    assert not (tmp_path / "corpus" / "manifest.json").exists()


def test_detached_data_inside_the_folder_is_read(tmp_path):
    inside, _ = _folders(tmp_path)
    np.arange(64, dtype=np.int16).tofile(inside / "x.raw")
    for name, body in [("a.nrrd", NRRD), ("b.nhdr", NRRD), ("c.mha", META), ("d.mhd", META)]:
        key = "data file: x.raw" if name.endswith(("nrrd", "nhdr")) else "ElementDataFile = x.raw"
        comments = ("# comment\n" if key.startswith("data") else "Comment = c\n") * 9000  # 90-100 kB
        (inside / name).write_text(body + comments + key + "\n")
        assert read_volume(inside / name).array.max() == 63


def test_metaimage_data_key_spelled_otherwise_is_refused(tmp_path):
    """MetaIO matches `ElementDataFile` exactly and stops there; a decoy in another case must not hide
    the real line from the check."""
    inside, _ = _folders(tmp_path)
    (inside / "a.mhd").write_text(META + "elementdatafile = LOCAL\nElementDataFile = ../outside/x.raw\n")
    with pytest.raises(MedsslInputError, match="not spelled 'ElementDataFile'"):
        read_volume(inside / "a.mhd")


def test_patterns_may_only_number_files(tmp_path):
    inside, _ = _folders(tmp_path)
    for value in ("s%s.raw 0 3 1", "s%d%d.raw 0 3 1", "s%d.raw 0 999999 1", "s%d.raw 3 0 1", "s%d.raw"):
        (inside / "p.nhdr").write_text(NRRD + f"data file: {value}\n")
        with pytest.raises(MedsslInputError, match="pattern") as info:
            read_volume(inside / "p.nhdr")
        assert str(inside / "p.nhdr") in str(info.value)


def test_header_line_without_end_is_refused(tmp_path):
    inside, _ = _folders(tmp_path)
    (inside / "a.nhdr").write_bytes(NRRD.encode() + b"#" * (2 << 20))
    with pytest.raises(MedsslInputError, match="header line longer"):
        read_volume(inside / "a.nhdr")


def test_analyze_pair_and_nifti_pair_magic_are_not_read(tmp_path):
    """Analyze/NIfTI pairs keep voxels in a second file: `.hdr` is not a readable suffix, and a `.nii` that
    says it is one half of a pair (magic `ni1`) is refused."""
    image = nib.Nifti1Pair(np.zeros((4, 4, 4), np.int16), np.eye(4))
    nib.save(image, tmp_path / "pair.hdr")
    with pytest.raises(MedsslInputError, match="unsupported file type"):
        read_volume(tmp_path / "pair.hdr")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), tmp_path / "one.nii")
    raw = bytearray((tmp_path / "one.nii").read_bytes())
    raw[344:348] = b"ni1\0"
    (tmp_path / "one.nii").write_bytes(bytes(raw))
    with pytest.raises(MedsslInputError, match="magic"):
        read_volume(tmp_path / "one.nii")


def test_volume_symlinked_out_of_the_root_is_refused(tmp_path):
    inside, outside = _folders(tmp_path)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), outside / "secret.nii")
    (inside / "link.nii").symlink_to(outside / "secret.nii")
    with pytest.raises(MedsslInputError, match="resolves outside"):
        read_volume(inside / "link.nii", root=inside)


# --------------------------------------------------------------------------------------------- property: every form


ESCAPES = ("../outside/{f}", "{outside}/{f}", "sub/../../outside/{f}", "link_{f}")


@st.composite
def detached_headers(draw):
    """(suffix, header text builder, names per slice file or one name, which names escape)."""
    suffix = draw(st.sampled_from([".nrrd", ".nhdr", ".mha", ".mhd"]))
    form = draw(st.sampled_from(["single", "list", "pattern"]))
    n_files = 1 if form == "single" else 4
    escapes = draw(st.lists(st.sampled_from((None, *ESCAPES)), min_size=n_files, max_size=n_files))
    if form == "pattern":
        escapes = [escapes[0]] * 4  # one pattern: every name escapes or none
    comments = draw(st.sampled_from([0, 1, 9000]))  # lines of comment before the data file line
    eol = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    key_spelling = draw(st.sampled_from(["data file", "datafile", "DATA FILE"]))
    return suffix, form, escapes, comments, eol, key_spelling


@PROPERTY
@given(case=detached_headers())
def test_no_read_returns_bytes_from_outside(tmp_path_factory, case):
    suffix, form, escapes, comments, eol, key_spelling = case
    inside, outside = _folders(tmp_path_factory.mktemp("detached"))
    files = ["x.raw"] if form == "single" else [f"s{k}.raw" for k in range(4)]
    names = []
    for file, escape in zip(files, escapes, strict=True):
        if escape is None:
            np.full(64 // len(files), 1, np.int16).tofile(inside / file)
            names.append(file)
        else:
            if escape.startswith("link_"):
                (inside / f"link_{file}").symlink_to(outside / file)
            names.append(escape.format(f=file, outside=outside))
    nrrd = suffix in (".nrrd", ".nhdr")
    if form == "pattern":
        lines = [names[0].replace("s0.raw", "s%d.raw") + " 0 3 1"]
    elif form == "list":
        lines = ["LIST", *names]
    else:
        lines = [names[0]]
    head = (NRRD if nrrd else META).replace("\n", eol)
    comment = (("# c" if nrrd else "Comment = c") + eol) * comments
    key = f"{key_spelling}: " if nrrd else "ElementDataFile = "
    header = inside / f"scan{suffix}"
    header.write_text(head + comment + key + (eol.join(lines)) + eol, newline="")
    escaped = any(e is not None for e in escapes)
    try:
        volume = read_volume(header)
    except MedsslInputError as err:
        assert str(header) in str(err) and "\n" not in str(err)
        if escaped:
            assert "data file" in err.problem
        return
    assert not escaped, f"read {header} although a data file leads out"
    assert OUTSIDE_VALUE not in volume.array and volume.array.shape == (4, 4, 4)


# --------------------------------------------------------------------------------------------- spacing


SPACINGS = st.sampled_from(["0.7", "1", "2.5", "0", "-1", "nan", "inf", "abc"])


def _positive(text: str) -> bool:
    try:
        return 0 < float(text) < float("inf")
    except ValueError:
        return False


@PROPERTY
@given(spacing=st.lists(SPACINGS, min_size=3, max_size=3), fmt=st.sampled_from(["nifti", "nrrd", "metaimage"]))
def test_a_spacing_that_is_not_positive_is_refused(tmp_path_factory, spacing, fmt):
    folder = tmp_path_factory.mktemp("spacing")
    numbers = []
    for text in spacing:
        try:
            numbers.append(float(text))
        except ValueError:
            numbers.append(float("nan"))
    if fmt == "nifti":
        if "abc" in spacing:
            return  # pixdim is binary: every value is a number
        path = folder / "scan.nii"
        image = nib.Nifti1Image(np.ones((4, 4, 4), np.int16), None)
        image.set_qform(np.eye(4), code=1)  # no sform: the affine is the qform with pixdim's voxel sizes
        nib.save(image, path)
        raw = bytearray(path.read_bytes())
        for axis, value in enumerate(numbers):
            struct.pack_into("<f", raw, 76 + 4 * (axis + 1), value)  # pixdim[1..3] as written, unfixed
        path.write_bytes(bytes(raw))
    else:
        np.ones(64, np.int16).tofile(folder / "x.raw")
        path = folder / ("scan.nhdr" if fmt == "nrrd" else "scan.mhd")
        if fmt == "nrrd":
            path.write_text(NRRD.replace("spacings: 1 1 1", f"spacings: {' '.join(spacing)}") + "data file: x.raw\n")
        else:
            path.write_text(
                META.replace("ElementSpacing = 1 1 1", f"ElementSpacing = {' '.join(spacing)}")
                + "ElementDataFile = x.raw\n"
            )
    ok = all(_positive(t) for t in spacing)
    try:
        volume = read_volume(path)
    except MedsslInputError as err:
        assert not ok and str(path) in str(err), err
        return
    assert ok, f"{path} read with spacing {volume.spacing} from {spacing}"
    np.testing.assert_allclose(volume.spacing, [float(t) for t in spacing], rtol=1e-5)


def _dicom_series(folder: Path, pixel_spacing: str) -> None:
    """A three-slice CT series whose Pixel Spacing element holds ``pixel_spacing`` as written."""
    folder.mkdir()
    image = sitk.GetImageFromArray(np.zeros((3, 4, 4), np.int16))
    image.SetSpacing((0.7, 0.7, 2.0))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(3):
        piece = image[:, :, k]
        for tag, value in {
            "0008|0060": "CT",
            "0020|000e": "1.2.826.0.1.3680043.2.1125.1",
            "0020|0032": f"0\\0\\{2.0 * k}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0020|0013": str(k),
        }.items():
            piece.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{k}.dcm"))
        writer.Execute(piece)
        raw = bytearray((folder / f"{k}.dcm").read_bytes())
        at = raw.find(b"\x28\x00\x30\x00")  # (0028,0030); the writer sets it from the spacing
        explicit = raw[at + 4 : at + 6] == b"DS"
        length = struct.unpack_from("<H" if explicit else "<I", raw, at + (6 if explicit else 4))[0]
        raw[at + 8 : at + 8 + length] = pixel_spacing.ljust(length).encode()[:length]
        (folder / f"{k}.dcm").write_bytes(bytes(raw))


@pytest.mark.parametrize("value,ok", [(".5\\.5", True), ("0\\0", False), ("-1\\1", False), ("nan\\1", False)])
def test_dicom_pixel_spacing_is_checked_as_written(tmp_path, value, ok):
    _dicom_series(tmp_path / "series", value)
    if ok:
        assert read_volume(tmp_path / "series").spacing[:2] == pytest.approx((0.5, 0.5))
        return
    with pytest.raises(MedsslInputError, match="Pixel Spacing"):
        read_volume(tmp_path / "series")


def test_nifti_pixdim_zero_through_the_cli(tmp_path, capsys, monkeypatch):
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.int16), np.eye(4)), tmp_path / "scan.nii")
    raw = bytearray((tmp_path / "scan.nii").read_bytes())
    struct.pack_into("<f", raw, 80, 0.0)
    import gzip

    path.write_bytes(gzip.compress(bytes(raw)))
    code, out, err = run_cli(["data", "check", path], capsys, monkeypatch)
    assert code == 2 and out.startswith(f"{path}:") and "pixdim" in out and len(out.strip().splitlines()) == 1


def test_check_detached_data_names_the_header(tmp_path):
    inside, _ = _folders(tmp_path)
    (inside / "a.mhd").write_text(META + "ElementDataFile = LIST\nok.raw\n../outside/x.raw\n")
    with pytest.raises(MedsslInputError) as info:
        check_detached_data(inside / "a.mhd")
    assert info.value.source == str(inside / "a.mhd") and "../outside/x.raw" in info.value.problem
    os.remove(inside / "a.mhd")


def test_detached_data_out_of_the_folder_stops_finetune_and_convert(tmp_path, capsys, monkeypatch):
    """The red team's other two doors: a task image fine-tuned on, and a HaN-Seg CT converted."""
    inside, outside = _folders(tmp_path)
    escaping = NRRD.replace("sizes: 4 4 4", "sizes: 32 32 32") + "data file: ../../outside/x.raw\n"
    task = inside / "task"
    for case in range(3):
        (task / "imagesTr").mkdir(parents=True, exist_ok=True)
        (task / "imagesTr" / f"c{case}_0000.nhdr").write_text(escaping)
        label = np.zeros((32, 32, 32), np.uint8)
        label[4:12, 4:12, 4:12] = 1
        (task / "labelsTr").mkdir(exist_ok=True)
        sitk.WriteImage(sitk.GetImageFromArray(label), str(task / "labelsTr" / f"c{case}.nhdr"))
    (task / "dataset.json").write_text(
        '{"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1}, "numTraining": 3, "file_ending": ".nhdr"}'
    )
    code, _, err = run_cli(
        ["finetune", "--task", task, "--encoder", "none", "--out", tmp_path / "run", "n_test=1", "n_val=1"],
        capsys,
        monkeypatch,
    )
    assert code == 2 and "Traceback" not in err and "c0_0000.nhdr" in err and "data file" in err, err
    case = inside / "HaN-Seg/case_01"
    case.mkdir(parents=True)
    (case / "case_01_IMG_CT.nrrd").write_text(NRRD + "data file: ../../../outside/x.raw\n")
    (case / "case_01_OAR_Brainstem.seg.nrrd").write_text(NRRD + "data file: ../../../outside/x.raw\n")
    code, _, err = run_cli(
        ["data", "convert", "hanseg", inside / "HaN-Seg", "--out", tmp_path / "converted"], capsys, monkeypatch
    )
    assert code == 2 and "case_01_IMG_CT.nrrd" in err and "data file" in err, err
    assert not list((tmp_path / "converted").rglob("*.nii.gz"))


def test_cache_key_follows_a_detached_data_file(tmp_path):
    """A rewritten .raw beside an unchanged header is another scan: its cache entry must not be reused."""
    from medssl.data.cache import source_fingerprint

    np.zeros(64, np.int16).tofile(tmp_path / "x.raw")
    (tmp_path / "a.nhdr").write_text(NRRD + "data file: x.raw\n")
    before = source_fingerprint(tmp_path / "a.nhdr")
    np.ones(65, np.int16).tofile(tmp_path / "x.raw")
    assert source_fingerprint(tmp_path / "a.nhdr") != before
