"""Exports: the printed SwinUNETR(...) loads every preset's state dict; every value a bundle writes is typed
(hypothesis over checkpoint metadata), hostile values exit 2 with one line; --out is checked; re-exporting
leaves no stale file."""

import json
import math
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from monai.networks.nets import SwinUNETR

from medssl import cli
from medssl.config import AXIS_PAIRS, EncoderConfig, FinetuneConfig, PreprocessConfig, dump_yaml
from medssl.errors import MedsslInputError
from medssl.export.bundle import segmenter_metadata, segmenter_values
from medssl.export.inference import own_expressions, segmenter_inference
from medssl.export.paths import MANIFEST
from medssl.export.values import check_inert
from medssl.models import SwinEncoder, SwinSegmenter
from medssl.models.checkpoint import encoder_meta, save_encoder, save_segmenter
from medssl.runs import RunDir

TINY = EncoderConfig(preset="tiny", window_size=4)
AXCODES = {a + b + c for a in "LR" for b in "PA" for c in "IS"} | {"SAR", "PIR", "ASL", "SRA", "IPL"}


def run_cli(args, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["medssl", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return exit_info.value.code, *capsys.readouterr()


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


# --------------------------------------------------------------------------- --format monai


@pytest.mark.parametrize(
    "fields",
    [
        {"preset": "tiny"},
        {"preset": "tiny", "use_v2": True},
        pytest.param({"preset": "base"}, marks=pytest.mark.slow),
        pytest.param({"preset": "smit"}, marks=pytest.mark.slow),
    ],
)
def test_the_printed_constructor_loads_every_exported_tensor(tmp_path, fields, capsys, monkeypatch):
    """README's snippet per preset: the SwinUNETR(...) that ``export --format monai`` prints takes the file."""
    config = EncoderConfig(**fields)
    encoder = SwinEncoder(config)
    save_encoder(tmp_path / "enc.pt", encoder, encoder_meta(method="simmim", family="mim", encoder=config))
    code, out, err = run_cli(["export", tmp_path / "enc.pt", "--out", tmp_path / "monai.pt"], capsys, monkeypatch)
    assert code in (0, None), err
    call = next(line.strip() for line in out.splitlines() if "SwinUNETR(" in line).split("  #")[0]
    net = eval(call, {"monai": __import__("monai")})  # noqa: S307 - the line medssl printed, as a user runs it
    state = torch.load(tmp_path / "monai.pt", weights_only=True)
    assert set(state) == {k for k in net.state_dict() if k.startswith("swinViT.")}
    net.swinViT.load_state_dict({k[len("swinViT.") :]: v for k, v in state.items()}, strict=True)
    for key, value in encoder.state_dict().items():
        if key != "mask_token":
            assert torch.equal(net.swinViT.state_dict()[key], value), key


@pytest.mark.parametrize("target", ["/proc/version", "folder", "missing/x.pt", "/dev/null"])
def test_export_out_that_cannot_take_a_file_exits_2_with_one_line(tmp_path, target, capsys, monkeypatch):
    save_encoder(tmp_path / "enc.pt", SwinEncoder(TINY), encoder_meta(method="simmim", family="mim", encoder=TINY))
    (tmp_path / "folder").mkdir()
    out = target if target.startswith("/") else tmp_path / target
    code, _, err = run_cli(["export", tmp_path / "enc.pt", "--out", out], capsys, monkeypatch)
    assert code == 2 and str(out) in one_line(err)


# --------------------------------------------------------------------------- a fine-tuning run to export


def _run_dir(tmp_path, meta_changes=None, results_changes=None, model=None):
    """A finished fine-tuning run directory with a tiny best.pt (what ``medssl finetune`` leaves)."""
    run = RunDir(tmp_path / "ft")
    config = FinetuneConfig(task=tmp_path, encoder=TINY, crop_size=32, preprocess=PreprocessConfig(spacing=(4, 4, 4)))
    run.prepare(dump_yaml(config), {"kind": "finetune", "task": "ct_lesions", "modality": "ct"})
    results = {
        "kind": "finetune",
        "method": "simmim",
        "family": "mim",
        "task": "ct_lesions",
        "modality": "ct",
        "budget": "all",
        "seed": 0,
        "cases": [{"case": "case_000", "label": 1, "structure": "lesion", "dice": 0.5}],
    }
    run.write_results({**results, **(results_changes or {})})
    run.set_status("finished")
    meta = {
        "encoder": TINY.model_dump(mode="json"),
        "out_channels": 2,
        "crop_size": 32,
        "norm": "auto",
        "method": "simmim",
        "family": "mim",
        "task": "ct_lesions",
        "labels": {0: "background", 1: "lesion"},
        "preprocess": config.preprocess.model_dump(mode="json"),
        "run_id": "ft",
        "step": 3,
        "val_dice": 0.4,
    }
    meta.update(meta_changes or {})
    model = model or SwinSegmenter(TINY, 2, crop_size=32)
    save_segmenter(run.checkpoint_dir / "best.pt", model, meta)
    return run


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    return _run_dir(tmp_path_factory.mktemp("run"))


HOSTILE = ["$__import__('os').system('touch pwned') or 'RAS'", "%/etc/passwd#x", "@network", "$1", "_target_", ""]
NAMES = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,20}", fullmatch=True)


def _hostile_text() -> st.SearchStrategy:
    return st.one_of(st.sampled_from(HOSTILE), st.text(max_size=30))


@st.composite
def checkpoint_metas(draw) -> tuple[dict, set[str]]:
    """Valid metadata with up to three fields replaced by hostile or malformed values (and their names)."""
    out_channels = draw(st.integers(2, 6))
    meta = {
        "encoder": TINY.model_dump(mode="json"),
        "out_channels": out_channels,
        "crop_size": 32,
        "norm": draw(st.sampled_from(["auto", "group", "instance", "batch"])),
        "method": draw(NAMES),
        "family": "mim",
        "task": draw(NAMES),
        "labels": {0: "background", **{i: draw(NAMES) for i in range(1, out_channels)}},
        "preprocess": {
            "orientation": draw(st.sampled_from(sorted(AXCODES))),
            "spacing": draw(st.lists(st.floats(0.1, 10.0), min_size=3, max_size=3)),
            "ct_window": draw(st.lists(st.floats(-2000, 3000), min_size=2, max_size=2)),
        },
    }
    corrupt = draw(
        st.sets(
            st.sampled_from(["orientation", "spacing", "window", "label", "method", "task", "norm", "out"]), max_size=3
        )
    )
    bad_float = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 0), _hostile_text())
    if "orientation" in corrupt:
        meta["preprocess"]["orientation"] = draw(_hostile_text())
    if "spacing" in corrupt:
        meta["preprocess"]["spacing"] = draw(st.one_of(st.lists(bad_float, max_size=4), _hostile_text()))
    if "window" in corrupt:
        meta["preprocess"]["ct_window"] = draw(
            st.lists(st.sampled_from([math.nan, math.inf, -math.inf]), min_size=2, max_size=2)
        )
    if "label" in corrupt:
        meta["labels"][draw(st.integers(0, out_channels - 1))] = draw(_hostile_text())
    if "method" in corrupt:
        meta["method"] = draw(_hostile_text())
    if "task" in corrupt:
        meta["task"] = draw(_hostile_text())
    if "norm" in corrupt:
        meta["norm"] = draw(_hostile_text())
    if "out" in corrupt:
        meta["out_channels"] = draw(st.one_of(st.integers(-2, 1), _hostile_text()))
    return meta, corrupt


FIELD_NAMES = {
    "orientation": "orientation",
    "spacing": "spacing",
    "window": "ct_window",
    "label": "labels",
    "method": "method",
    "task": "task",
    "norm": "norm",
    "out": "out_channels",
}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=checkpoint_metas())
def test_every_value_a_bundle_writes_is_typed_or_the_export_is_refused(finished_run, case):
    """Generated checkpoint metadata: either one line naming best.pt and a field that was made bad, or a
    bundle whose every value has its type and in which no string but the exporter's own is an expression.
    Metadata with nothing made bad always exports."""
    meta, corrupt = case
    ckpt = finished_run.checkpoint_dir / "best.pt"
    try:
        values = segmenter_values(ckpt, meta, finished_run)
    except MedsslInputError as err:
        assert corrupt, err
        assert err.source == str(ckpt) and "\n" not in err.one_line()
        assert any(FIELD_NAMES[c] in err.problem for c in corrupt) or "labels go up to" in err.problem, err
        return
    inference, metadata = segmenter_inference(values), segmenter_metadata(values)
    check_inert(inference, ckpt, own_expressions())
    check_inert(metadata, ckpt, frozenset())
    transforms = {t["_target_"]: t for t in inference["preprocessing"]["transforms"]}
    axcodes = transforms["Orientationd"]["axcodes"]
    assert axcodes in AXCODES and sorted(p for c in axcodes for p in AXIS_PAIRS if c in p) == sorted(AXIS_PAIRS)
    assert all(isinstance(s, float) and math.isfinite(s) and s > 0 for s in transforms["Spacingd"]["pixdim"])
    window_values = [transforms["ScaleIntensityRanged"][k] for k in ("a_min", "a_max")]
    assert all(isinstance(v, float) and math.isfinite(v) for v in window_values)
    assert isinstance(inference["network_def"]["out_channels"], int) and inference["network_def"]["out_channels"] >= 2
    for name in metadata["pred_classes"].values():
        assert name[0].isalnum() and "#" not in name and "::" not in name


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"preprocess": {"orientation": "$__import__('os').system('touch pwned') or 'RAS'"}}, "orientation"),
        ({"labels": {0: "background", 1: "%/etc/passwd"}}, "labels.1"),
        ({"labels": {0: "background", 1: "@network"}}, "labels.1"),
        ({"preprocess": {"spacing": ["a", "b", "c"]}}, "spacing"),
        ({"task": "$print(1)"}, "task"),
    ],
)
def test_a_hostile_checkpoint_is_refused_naming_the_file_and_the_field(tmp_path, changes, field, capsys, monkeypatch):
    run = _run_dir(tmp_path, meta_changes=changes)
    code, _, err = run_cli(
        ["export", run.checkpoint_dir / "best.pt", "--format", "monai-bundle", "--out", tmp_path / "bundle"],
        capsys,
        monkeypatch,
    )
    assert code == 2 and "best.pt" in one_line(err) and field in err
    assert not (tmp_path / "bundle").exists() and not (tmp_path / "pwned").exists()


def test_nan_or_missing_tensors_are_refused(tmp_path, capsys, monkeypatch):
    model = SwinSegmenter(TINY, 2, crop_size=32)
    with torch.no_grad():
        model.decoder1.transp_conv.conv.weight[0, 0, 0, 0, 0] = float("nan")
    run = _run_dir(tmp_path, model=model)
    args = ["export", run.checkpoint_dir / "best.pt", "--format", "monai-bundle", "--out", tmp_path / "bundle"]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 2 and "decoder1.transp_conv.conv.weight" in one_line(err) and "NaN" in err
    payload = torch.load(run.checkpoint_dir / "best.pt", weights_only=True)
    del payload["model"]["out.conv.conv.bias"]
    torch.save(payload, run.checkpoint_dir / "best.pt")
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 2 and "missing 1 segmenter tensors: out.conv.conv.bias" in one_line(err)


def test_a_results_json_with_an_impossible_dice_is_refused(tmp_path, capsys, monkeypatch):
    run = _run_dir(tmp_path, results_changes={"cases": [{"case": "a", "structure": "lesion", "dice": 5.0}]})
    args = ["export", run.checkpoint_dir / "best.pt", "--format", "monai-bundle", "--out", tmp_path / "bundle"]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 2 and "results.json" in one_line(err) and "outside [0, 1]" in err


# --------------------------------------------------------------------------- the bundle folder


def test_bundle_has_zoo_files_no_absolute_path_and_reexport_leaves_no_stale_file(tmp_path, capsys, monkeypatch):
    run = _run_dir(tmp_path)
    out = tmp_path / "bundle"
    args = ["export", run.checkpoint_dir / "best.pt", "--format", "monai-bundle", "--out", out]
    code, stdout, err = run_cli(args, capsys, monkeypatch)
    assert code in (0, None), err
    assert f"--bundle_root {out}" in stdout
    for name in ("configs/inference.json", "configs/metadata.json", "configs/logging.conf", "models/model.pt"):
        assert (out / name).stat().st_size > 0, name
    for name in ("README.md", "LICENSE", "docs/data_license.txt", MANIFEST):
        assert (out / name).is_file(), name
    inference = json.loads((out / "configs" / "inference.json").read_text())
    metadata = json.loads((out / "configs" / "metadata.json").read_text())
    assert inference["bundle_root"] == "." and metadata["license"] == "Apache-2.0"
    assert str(tmp_path) not in (out / "configs" / "inference.json").read_text()
    assert str(tmp_path) not in (out / "configs" / "metadata.json").read_text()
    # an older export owned a file the new one does not write; the user added eval/ results
    manifest = json.loads((out / MANIFEST).read_text())
    (out / "models" / "model.ts").write_bytes(b"old")
    (out / MANIFEST).write_text(json.dumps({"files": [*manifest["files"], "models/model.ts", "../outside.txt"]}))
    (tmp_path / "outside.txt").write_text("not the bundle's")
    (out / "eval").mkdir()
    (out / "eval" / "case_seg.nii.gz").write_bytes(b"user result")
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code in (0, None), err
    assert not (out / "models" / "model.ts").exists()
    assert (out / "eval" / "case_seg.nii.gz").read_bytes() == b"user result"
    assert (tmp_path / "outside.txt").exists()  # a manifest never names files outside the bundle
    assert not list(tmp_path.glob(".bundle.*"))  # no staging folder left behind


def test_bundle_out_that_is_a_file_or_a_foreign_folder_is_refused(tmp_path, capsys, monkeypatch):
    run = _run_dir(tmp_path)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep me")
    for out in (tmp_path / "afile", tmp_path / "mine", tmp_path / "no" / "such" / "folder"):
        args = ["export", run.checkpoint_dir / "best.pt", "--format", "monai-bundle", "--out", out]
        code, _, err = run_cli(args, capsys, monkeypatch)
        assert code == 2 and str(out) in one_line(err)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "keep me"


def test_an_encoder_bundle_loads_from_its_moved_folder(tmp_path):
    from monai.bundle import ConfigParser

    from medssl.export import export_bundle

    torch.manual_seed(0)
    encoder = SwinEncoder(TINY)
    save_encoder(tmp_path / "encoder.pt", encoder, encoder_meta(method="simmim", family="mim", encoder=TINY))
    bundle, kind = export_bundle(tmp_path / "encoder.pt", tmp_path / "bundle")
    assert kind == "encoder"
    moved = tmp_path / "elsewhere" / "b"
    moved.parent.mkdir()
    bundle.rename(moved)
    parser = ConfigParser()
    parser.read_config(str(moved / "configs" / "inference.json"))
    parser["bundle_root"] = str(moved)
    parser["out_channels"] = 5
    net = parser.get_parsed_content("network")
    assert isinstance(net, SwinUNETR) and net.out.conv.conv.out_channels == 5
    for key, value in encoder.state_dict().items():
        if key != "mask_token":
            assert torch.equal(net.swinViT.state_dict()[key], value), key
    assert json.loads((moved / "configs" / "metadata.json").read_text())["medssl"]["method"] == "simmim"


def test_the_readme_snippet_is_the_printed_constructor_of_each_preset():
    from pathlib import Path

    from medssl.export import swin_unetr_call

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    for preset in ("tiny", "base", "smit"):
        line = f"net = monai.networks.nets.{swin_unetr_call(EncoderConfig(preset=preset))}  # {preset}"
        assert line in readme, preset


@pytest.fixture(scope="module")
def small_task(tmp_path_factory):
    from medssl.data.synth import synth_task

    return synth_task(tmp_path_factory.mktemp("task"), "ct_organs", 3, seed=1, shape=(32, 32, 32))


@pytest.mark.parametrize(
    ("field", "value"),
    [("spacing", ["a", "b", "c"]), ("spacing", [1.5, float("nan"), 1.5]), ("intensity", {"orientation": "$x"})],
)
def test_bad_preprocessing_in_an_encoder_checkpoint_exits_2_naming_it(
    tmp_path, small_task, field, value, capsys, monkeypatch
):
    meta = encoder_meta(method="simmim", family="mim", encoder=TINY, preprocess={"spacing": [1.5] * 3})
    meta[field] = value
    save_encoder(tmp_path / "enc.pt", SwinEncoder(TINY), meta)
    for args in (
        ["export", tmp_path / "enc.pt", "--out", tmp_path / "x.pt"],
        ["export", tmp_path / "enc.pt", "--format", "monai-bundle", "--out", tmp_path / "b"],
        ["finetune", "--task", small_task, "--encoder", tmp_path / "enc.pt", "--out", tmp_path / "ft"]
        + ["preprocess.spacing=[4,4,4]"],
    ):
        code, _, err = run_cli(args, capsys, monkeypatch)
        assert code == 2 and "enc.pt" in one_line(err) and (field in err or "orientation" in err), err
