"""Issue 9 through the CLI: runs bound to their config, inputs kept inside their roots and within the
limits, checks at the door, faults recorded, and every bad input exit 2 with one line."""

import errno
import gzip
import io
import json
import os
import plistlib
import shutil
import sys
import tarfile
import time

import nibabel as nib
import numpy as np
import pytest
import torch

from medssl import cli
from medssl.config import EncoderConfig
from medssl.data.synth import synth_corpus, synth_task
from medssl.limits import set_limits
from medssl.models.checkpoint import encoder_meta, save_encoder
from medssl.models.encoder import SwinEncoder
from medssl.runs import RunDir

TINY = EncoderConfig(preset="tiny", window_size=4)
FAST = [
    "crop_size=32",
    "schedule.steps=2",
    "schedule.warmup_steps=0",
    "schedule.checkpoint_every=1",
    "val_every=2",
    "n_test=1",
    "n_val=1",
    "encoder.window_size=4",
    "preprocess.spacing=[4,4,4]",
    "sw_batch_size=1",
]


@pytest.fixture(autouse=True)
def default_limits():
    set_limits(None)
    yield
    set_limits(None)


def run_cli(args, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["medssl", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def error_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def check_refused(args, capsys, monkeypatch, *expected):
    """``data check`` lists problems on stdout, one line each, and exits 2."""
    code, out, err = run_cli(args, capsys, monkeypatch)
    assert code == 2 and "Traceback" not in out + err, out + err
    for text in expected:
        assert str(text) in out, out
    return out


def refused(args, capsys, monkeypatch, *expected):
    """Run the CLI, assert exit 2 with one line holding every ``expected`` text; return the line."""
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 2, err
    line = error_line(err)
    for text in expected:
        assert str(text) in line, line
    return line


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return synth_task(tmp_path_factory.mktemp("task") / "ct_organs", "ct_organs", 6, seed=1, shape=(32, 32, 32))


@pytest.fixture
def task_copy(task, tmp_path):
    return shutil.copytree(task, tmp_path / "task")


@pytest.fixture(scope="module")
def encoder_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("enc") / "simmim.pt"
    torch.manual_seed(0)
    save_encoder(path, SwinEncoder(TINY), encoder_meta(method="simmim", family="mim", encoder=TINY))
    return path


def finetune(task, out, encoder="none", *extra):
    return ["finetune", "--task", task, "--encoder", encoder, "--out", out, *FAST, *extra]


def rewrite_checkpoint(src, dst, change):
    payload = torch.load(src, weights_only=True)
    change(payload)
    torch.save(payload, dst)
    return dst


# --------------------------------------------------------------------------- 1. run identity


@pytest.fixture(scope="module")
def finished(task, encoder_ckpt, tmp_path_factory):
    """One fine-tuning run from ``encoder_ckpt``, started over a stale temporary of a killed run."""
    out = tmp_path_factory.mktemp("finished") / "run"
    stale = out / "checkpoints" / ".last.pt.abc123.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"\0" * 1000)
    old = time.time() - 3600
    os.utime(stale, (old, old))
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(sys, "argv", ["medssl", *map(str, finetune(task, out, encoder_ckpt))])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    monkeypatch.undo()
    assert exit_info.value.code == 0
    return out, stale


def test_run_directory_is_bound_to_its_config(finished, task, encoder_ckpt, tmp_path, capsys, monkeypatch):
    out = shutil.copytree(finished[0], tmp_path / "run")
    results = (out / "results.json").read_bytes()
    # finished: another encoder and lr, or another task, are refused naming the fields
    refused(
        finetune(task, out, "none", "schedule.lr=0.001"),
        capsys,
        monkeypatch,
        "encoder_checkpoint",
        "schedule.lr",
        "new --out",
    )
    other_task = shutil.copytree(task, tmp_path / "other")
    refused(finetune(other_task, out, encoder_ckpt), capsys, monkeypatch, "task")
    # the same request, even with other limits, returns the stored results
    assert run_cli(finetune(task, out, encoder_ckpt, "limits.labels=50"), capsys, monkeypatch)[0] == 0
    assert (out / "results.json").read_bytes() == results

    # the encoder is bound by its contents, not its path
    original = encoder_ckpt.read_bytes()
    try:
        rewrite_checkpoint(encoder_ckpt, encoder_ckpt, lambda p: p["encoder"]["patch_embed.proj.weight"].mul_(2))
        refused(finetune(task, out, encoder_ckpt), capsys, monkeypatch, "encoder_sha256")
    finally:
        encoder_ckpt.write_bytes(original)

    # interrupted (a checkpoint, no results): resuming as random init is refused, nothing touched
    run = RunDir(out)
    run.results_path.unlink()
    run.set_status("pending")
    last = run.last_checkpoint.read_bytes()
    refused(finetune(task, out, "none"), capsys, monkeypatch, "encoder_checkpoint")
    assert run.last_checkpoint.read_bytes() == last and run.status() == "pending"


def test_stale_temporaries_of_killed_runs_are_swept(finished):
    out, stale = finished
    assert not stale.exists()
    assert not list(out.rglob(".*.tmp"))


def test_pretrain_run_directory_is_bound_to_its_method(tmp_path, capsys, monkeypatch):
    corpus = synth_corpus(tmp_path / "scans", 1, seed=0, shape=(32, 32, 32))[0].parent
    ingested = tmp_path / "corpus"
    assert (
        run_cli(["data", "ingest", corpus, "--out", ingested, "--set", "spacing=[4,4,4]"], capsys, monkeypatch)[0] == 0
    )
    out = tmp_path / "pre"
    args = ["pretrain", "--corpus", ingested, "--out", out, "encoder.window_size=4", "crop_size=32"]
    assert run_cli([*args, "--method", "none"], capsys, monkeypatch)[0] == 0
    refused([*args, "--method", "simmim"], capsys, monkeypatch, "method.name", str(out))


# --------------------------------------------------------------------------- 2. roots hold


def test_benchmark_names_must_be_plain(task, tmp_path, capsys, monkeypatch):
    config = tmp_path / "bench.yaml"
    config.write_text(f"tasks: [{{path: {task}, name: ../../elsewhere}}]\nmethods: [none]\n")
    refused(
        ["bench", config, "--out", tmp_path / "out", "--dry-run"],
        capsys,
        monkeypatch,
        "tasks.0.name",
        "not a plain name",
    )
    assert not (tmp_path / "elsewhere").exists() and not list(tmp_path.glob("*.lock"))
    refused(
        ["bench", config, "--out", tmp_path / "out", "--dry-run", "name=../x", "tasks.0.name=t"],
        capsys,
        monkeypatch,
        "name",
    )
    code, _, err = run_cli(
        ["pretrain", "--method", "../../x", "--corpus", tmp_path, "--out", tmp_path / "p"], capsys, monkeypatch
    )
    assert code == 2 and "method.name" in error_line(err)


@pytest.mark.parametrize("suffix,line", [(".mhd", "ElementDataFile = {}"), (".nhdr", "data file: {}")])
def test_detached_header_may_not_read_outside_its_folder(tmp_path, capsys, monkeypatch, suffix, line):
    secret = tmp_path / "secret.raw"
    secret.write_bytes(np.arange(8 * 8 * 8, dtype=np.int16).tobytes())
    scans = tmp_path / "scans"
    scans.mkdir()
    header = scans / f"scan{suffix}"
    if suffix == ".mhd":
        body = (
            "ObjectType = Image\nNDims = 3\nDimSize = 8 8 8\nElementType = MET_SHORT\n"
            "ElementSpacing = 1 1 1\n" + line.format("../secret.raw") + "\n"
        )
    else:
        body = (
            "NRRD0004\ntype: short\ndimension: 3\nsizes: 8 8 8\nspacings: 1 1 1\nencoding: raw\n"
            "endian: little\n" + line.format("../secret.raw") + "\n\n"
        )
    header.write_text(body)
    check_refused(["data", "check", header], capsys, monkeypatch, header, "outside")
    code, _, err = run_cli(["data", "ingest", scans, "--out", tmp_path / "corpus"], capsys, monkeypatch)
    assert code == 2 and "outside" in error_line(err)
    assert not (tmp_path / "corpus" / "manifest.json").exists()
    # the same data file inside the folder is read
    shutil.copy(secret, scans / "inside.raw")
    header.write_text(body.replace("../secret.raw", "inside.raw"))
    assert run_cli(["data", "check", header], capsys, monkeypatch)[0] == 0


def test_symlink_in_a_corpus_cache_entry_is_refused(tmp_path, capsys, monkeypatch):
    corpus = synth_corpus(tmp_path / "scans", 1, seed=0, shape=(32, 32, 32))[0].parent
    ingested = tmp_path / "corpus"
    assert (
        run_cli(["data", "ingest", corpus, "--out", ingested, "--set", "spacing=[4,4,4]"], capsys, monkeypatch)[0] == 0
    )
    entry = next(p for p in (ingested / "cache").iterdir() if p.is_dir() and not p.name.startswith("."))
    outside = tmp_path / "outside.npy"
    np.save(outside, np.zeros((8, 8, 8), dtype=np.float16))
    (entry / "image.npy").unlink()
    (entry / "image.npy").symlink_to(outside)
    refused(
        [
            "pretrain",
            "--method",
            "simmim",
            "--corpus",
            ingested,
            "--out",
            tmp_path / "pre",
            "crop_size=32",
            "encoder.window_size=4",
            "schedule.steps=1",
        ],
        capsys,
        monkeypatch,
        "symbolic link",
    )


# --------------------------------------------------------------------------- 3. limits before allocation


@pytest.mark.timeout(60)
def test_yaml_alias_bomb_and_size_are_refused(task, tmp_path, capsys, monkeypatch):
    bomb = tmp_path / "bomb.yaml"
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    bomb.write_text("\n".join(lines) + "\n")
    refused(finetune(task, tmp_path / "r", "none", "--config", bomb), capsys, monkeypatch, bomb, "limits.yaml_nodes")
    refused(["bench", bomb, "--out", tmp_path / "o"], capsys, monkeypatch, "limits.yaml_nodes")
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (2 << 20) + "\n")
    refused(finetune(task, tmp_path / "r", "none", "--config", big), capsys, monkeypatch, big, "limits.yaml_bytes")
    # raised on the command line, the same file loads (and then fails on its content, not its size)
    code, _, err = run_cli(
        ["--limit", "yaml_bytes=3e6", "bench", big, "--out", tmp_path / "o", "--dry-run"], capsys, monkeypatch
    )
    assert code == 2 and "yaml_bytes" not in err and "tasks" in error_line(err)


def test_label_count_and_value_are_capped(task_copy, tmp_path, capsys, monkeypatch):
    ds = task_copy / "dataset.json"
    data = json.loads(ds.read_text())
    data["labels"] = {"0": "background", "1000000000": "huge"}
    ds.write_text(json.dumps(data))
    refused(finetune(task_copy, tmp_path / "r"), capsys, monkeypatch, ds, "limits.label_value")
    assert not (tmp_path / "r" / "results.json").exists()
    data["labels"] = {str(i): f"s{i}" for i in range(2000)}
    ds.write_text(json.dumps(data))
    code, out, _ = run_cli(["data", "check", task_copy], capsys, monkeypatch)
    assert code == 2 and "limits.labels" in out


def _nifti_header_only(path, shape, dtype=np.int16):
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    raw = header.binaryblock + b"\0" * 4 + b"\1\2" * 64  # the header, then far less data than it declares
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def test_voxels_are_capped_from_the_header_before_decoding(tmp_path, capsys, monkeypatch):
    for name in ("huge.nii.gz", "huge.nii"):
        path = _nifti_header_only(tmp_path / name, (1024, 1024, 1024))
        check_refused(["data", "check", path], capsys, monkeypatch, path, "limits.voxels_per_volume")
    nrrd = tmp_path / "huge.nrrd"
    nrrd.write_bytes(
        b"NRRD0004\ntype: short\ndimension: 3\nsizes: 2048 2048 2048\nencoding: gzip\n"
        b"endian: little\n\n" + gzip.compress(b"\0" * 1024)
    )
    check_refused(["data", "check", nrrd], capsys, monkeypatch, nrrd, "limits.voxels_per_volume")
    # the limit is a setting: a small one refuses an ordinary volume, the default takes it
    small = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16), np.float32), np.eye(4)), small)
    assert run_cli(["data", "check", small], capsys, monkeypatch)[0] == 0
    check_refused(
        ["--limit", "voxels_per_volume=1000", "data", "check", small],
        capsys,
        monkeypatch,
        "4,096",
        "limits.voxels_per_volume",
    )


def _inv3(path, shape, member_bytes):
    plist = plistlib.dumps(
        {"matrix": {"filename": "matrix.dat", "shape": list(shape), "dtype": "int16"}, "spacing": [1.0, 1.0, 1.0]}
    )
    with tarfile.open(path, "w:gz") as archive:
        for name, data in (("main.plist", plist), ("matrix.dat", member_bytes)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_invesalius_declared_sizes_are_capped(tmp_path, capsys, monkeypatch):
    huge = _inv3(tmp_path / "huge.inv3", (2000, 2000, 2000), b"\0" * 16)
    check_refused(["data", "check", huge], capsys, monkeypatch, huge, "limits.voxels_per_volume")
    small = _inv3(tmp_path / "small.inv3", (4, 4, 4), b"\0" * 128)
    assert run_cli(["data", "check", small], capsys, monkeypatch)[0] == 0
    check_refused(
        ["--limit", "archive_member_bytes=100", "data", "check", small],
        capsys,
        monkeypatch,
        "matrix.dat",
        "limits.archive_member_bytes",
    )


def test_resampling_size_is_computed_before_resampling(task, tmp_path, capsys, monkeypatch):
    refused(
        finetune(task, tmp_path / "r", "none", "preprocess.spacing=[0.01,0.01,0.01]"),
        capsys,
        monkeypatch,
        "limits.voxels_after_resampling",
    )
    scans = synth_corpus(tmp_path / "scans", 1, seed=0, shape=(32, 32, 32))[0].parent
    refused(
        ["data", "ingest", scans, "--out", tmp_path / "c", "--set", "spacing=[0.01,0.01,0.01]"],
        capsys,
        monkeypatch,
        "limits.voxels_after_resampling",
    )
    assert not (tmp_path / "c" / "manifest.json").exists()


# --------------------------------------------------------------------------- 4. checks at the door


def test_undeclared_label_values_and_empty_tasks_are_refused_before_training(task_copy, tmp_path, capsys, monkeypatch):
    label = sorted((task_copy / "labelsTr").iterdir())[0]
    img = nib.load(label)
    data = np.asarray(img.dataobj).copy()
    data[data == 1] = 9
    nib.save(nib.Nifti1Image(data.astype(np.uint8), img.affine), label)
    refused(finetune(task_copy, tmp_path / "r"), capsys, monkeypatch, label.name, "not declared", "dataset.json")
    # refused before its work: nothing binds the folder (no config.yaml, no checkpoint); the refusal itself
    # is recorded as status "failed" (medssl.runs.record_refusal)
    assert not (tmp_path / "r" / "checkpoints" / "last.pt").exists() and not (tmp_path / "r" / "config.yaml").exists()
    for path in (task_copy / "labelsTr").iterdir():
        img = nib.load(path)
        nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), path)
    refused(finetune(task_copy, tmp_path / "r2"), capsys, monkeypatch, "no case has any foreground")


@pytest.mark.parametrize(
    "override,key",
    [
        ("preprocess.spacing=[0,1,1]", "preprocess.spacing"),
        ("preprocess.spacing=[-1,1,1]", "preprocess.spacing"),
        ("schedule.lr=.inf", "schedule.lr"),
        ("schedule.lr=.nan", "schedule.lr"),
        ("schedule.seed=-1", "schedule.seed"),
    ],
)
def test_numbers_are_finite_positive_and_in_range(task, tmp_path, capsys, monkeypatch, override, key):
    refused(finetune(task, tmp_path / "r", "none", override), capsys, monkeypatch, key)


def test_seed_overflow_is_refused(task, tmp_path, capsys, monkeypatch):
    args = finetune(task, tmp_path / "r")
    args[args.index("--out") : args.index("--out")] = ["--seed", str(2**70)]
    refused(args, capsys, monkeypatch, "seed")


def _drop(p):
    del p["encoder"]["patch_embed.proj.weight"]


def _reshape(p):
    p["encoder"]["patch_embed.proj.weight"] = torch.zeros(3, 3)


def _nan(p):
    p["encoder"]["patch_embed.proj.weight"][0] = float("nan")


def _integer(p):
    p["encoder"]["patch_embed.proj.weight"] = p["encoder"]["patch_embed.proj.weight"].to(torch.int32)


def _meta_number(p):
    p["meta"] = 5


def _meta_encoder(p):
    p["meta"]["encoder"] = {"preset": "enormous"}


@pytest.mark.parametrize(
    "change,expected",
    [
        (_drop, "missing 1 encoder tensors"),
        (_reshape, "has shape"),
        (_nan, "NaN"),
        (_integer, "not floating point"),
        (_meta_number, "not a mapping"),
        (_meta_encoder, "encoder config"),
    ],
)
def test_export_and_finetune_validate_every_encoder_tensor(
    encoder_ckpt, task, tmp_path, capsys, monkeypatch, change, expected
):
    bad = rewrite_checkpoint(encoder_ckpt, tmp_path / "bad.pt", change)
    refused(["export", bad, "--out", tmp_path / "monai.pt"], capsys, monkeypatch, bad, expected)
    assert not (tmp_path / "monai.pt").exists()
    refused(finetune(task, tmp_path / "r", bad), capsys, monkeypatch, expected)


def test_export_refuses_to_overwrite_its_input_or_write_a_folder(encoder_ckpt, tmp_path, capsys, monkeypatch):
    ckpt = shutil.copy(encoder_ckpt, tmp_path / "enc.pt")
    before = (tmp_path / "enc.pt").read_bytes()
    refused(["export", ckpt, "--out", ckpt], capsys, monkeypatch, "overwrite")
    assert (tmp_path / "enc.pt").read_bytes() == before
    refused(["export", ckpt, "--out", tmp_path], capsys, monkeypatch, "folder")
    code, out, _ = run_cli(["export", ckpt, "--out", tmp_path / "monai.pt"], capsys, monkeypatch)
    assert code == 0 and "swinViT" in out


# --------------------------------------------------------------------------- 5. faults


def test_disk_full_leaves_the_run_failed_with_the_original_error(task, tmp_path, capsys, monkeypatch):
    import medssl.fileio
    import medssl.train.finetune

    def disk_full(*args, **kwargs):
        # from now on no new file can be written, as on a full disk
        def no_space(*a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(medssl.fileio, "atomic_path", no_space)
        raise OSError(errno.ENOSPC, "No space left on device", "last.pt")

    monkeypatch.setattr(medssl.train.finetune, "train", disk_full)
    out = tmp_path / "r"
    code, _, err = run_cli(finetune(task, out), capsys, monkeypatch)
    assert code == 1 and error_line(err).startswith("error: no space left on last.pt: free some space there")
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "failed" and "No space left on device" in status["error"]


def test_a_full_disk_is_one_line_naming_the_file_and_the_run_resumes_after(task, tmp_path, capsys, monkeypatch):
    """torch.save onto a full disk (/dev/full) inside a real fine-tune: one line naming the checkpoint it
    could not write, exit 1; with space again, the same command finishes the run."""
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    real_save = torch.save

    def save_to_a_full_disk(obj, f, *args, **kwargs):
        with open("/dev/full", "wb") as full:
            real_save(obj, full, *args, **kwargs)

    out = tmp_path / "r"
    with monkeypatch.context() as full_disk:
        full_disk.setattr(torch, "save", save_to_a_full_disk)
        code, _, err = run_cli(finetune(task, out), capsys, monkeypatch)
    line = error_line(err)
    assert code == 1 and line.startswith(f"error: no space left on {out / 'checkpoints' / 'last.pt'}: "), line
    assert "PytorchStreamWriter" not in err and "enforce fail" not in err
    code, _, err = run_cli(finetune(task, out), capsys, monkeypatch)
    assert code == 0, err
    assert json.loads((out / "status.json").read_text())["status"] == "finished"


def test_ingest_of_nothing_readable_writes_no_manifest(tmp_path, capsys, monkeypatch):
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "bad.nii.gz").write_bytes(b"not a nifti")
    refused(["data", "ingest", scans, "--out", tmp_path / "corpus"], capsys, monkeypatch, "no readable volumes")
    assert not (tmp_path / "corpus" / "manifest.json").exists()


# --------------------------------------------------------------------------- 6. exit 1 -> exit 2


def test_hostile_dataset_json_is_exit_2(task_copy, tmp_path, capsys, monkeypatch):
    ds = task_copy / "dataset.json"
    data = json.loads(ds.read_text())
    ds.write_text("[" * 100_000 + "]" * 100_000)
    refused(finetune(task_copy, tmp_path / "r"), capsys, monkeypatch, ds, "nested too deeply")
    for name in ("liver\0", "x" * 5000):
        ds.write_text(json.dumps({**data, "name": name}))
        code, out, _ = run_cli(["data", "check", task_copy], capsys, monkeypatch)
        assert code == 2 and "'name'" in out
    first = data["training"][0]
    for image in ("imagesTr/a\0b.nii.gz", "imagesTr/" + "a" * 300 + ".nii.gz", "imagesTr/" + "a/" * 3000):
        ds.write_text(json.dumps({**data, "training": [{**first, "image": image}, *data["training"][1:]]}))
        refused(finetune(task_copy, tmp_path / "r"), capsys, monkeypatch, "too long for a path")


def test_non_utf8_yaml_is_exit_2(task, tmp_path, capsys, monkeypatch):
    cfg = tmp_path / "ft.yaml"
    cfg.write_bytes(b"schedule:\n  steps: \xff\xfe\n")
    refused(finetune(task, tmp_path / "r", "none", "--config", cfg), capsys, monkeypatch, cfg, "UTF-8")


def test_memory_error_in_data_check_is_exit_2(task, capsys, monkeypatch):
    import medssl.data.tasks

    def exhausted(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(medssl.data.tasks, "read_volume", exhausted)
    refused(["data", "check", task], capsys, monkeypatch, task, "memory")
