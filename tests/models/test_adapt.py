"""Fitting an encoder to a task: input channels (refused or adapted as timm's adapt_input_conv, recorded) and
the axis-order check (permuted orientation refused; foreign files 'unchecked', said in the log)."""

import json
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F

from medssl import cli
from medssl.config import EncoderConfig
from medssl.data.synth import synth_task
from medssl.errors import MedsslInputError
from medssl.models import SwinEncoder
from medssl.models.adapt import adapt_input_channels, adapt_patch_kernel, axis_order_agreement, fit_encoder
from medssl.models.checkpoint import encoder_meta, save_encoder

TINY = EncoderConfig(preset="tiny", window_size=4)


@pytest.mark.parametrize(
    ("source", "target", "mode"),
    [(1, 4, "repeat"), (1, 3, "average"), (3, 1, "average"), (2, 5, "repeat"), (4, 2, "average")],
)
def test_adapted_kernel_keeps_the_response_to_channels_that_agree(source, target, mode):
    """An input whose channels are all the same image gives the pretrained response (timm's invariant)."""
    torch.manual_seed(0)
    weight = torch.randn(12, source, 2, 2, 2)
    image = torch.randn(1, 1, 8, 8, 8)
    adapted = adapt_patch_kernel(weight, target, mode)
    assert adapted.shape == (12, target, 2, 2, 2)
    before = F.conv3d(image.repeat(1, source, 1, 1, 1), weight, stride=2)
    after = F.conv3d(image.repeat(1, target, 1, 1, 1), adapted, stride=2)
    if mode == "average" or target % source == 0:
        assert torch.allclose(before, after, atol=1e-5)


def test_different_channel_counts_are_refused_by_default_and_adapted_on_request():
    state = SwinEncoder(TINY).state_dict()
    with pytest.raises(
        MedsslInputError, match=r"enc\.pt: the encoder takes 1 input channel\(s\), the task has 4: set input_channels"
    ):
        adapt_input_channels(state, 4, "match", "enc.pt")
    adapted, record = adapt_input_channels(state, 4, "repeat", "enc.pt")
    assert record == {"mode": "repeat", "from": 1, "to": 4, "tensor": "patch_embed.proj.weight"}
    assert adapted["patch_embed.proj.weight"].shape[1] == 4
    assert adapt_input_channels(state, 1, "match", "enc.pt") == (state, None)
    four = dict(adapted)
    with pytest.raises(MedsslInputError, match="cannot fit a 4-channel encoder to 2"):
        adapt_input_channels(four, 2, "repeat", "enc.pt")


def test_fit_encoder_builds_the_adapted_encoder_and_random_init_takes_the_tasks_channels():
    encoder = SwinEncoder(TINY)
    meta = encoder_meta(method="simmim", family="mim", encoder=TINY, preprocess={"orientation": "RAS"})
    config, state, record = fit_encoder(encoder.state_dict(), meta, 2, "RAS", "average", "enc.pt")
    assert config.in_channels == 2 and record["input_channels"]["mode"] == "average" and record["axis_order"] == "same"
    SwinEncoder(config).load_state_dict(state, strict=True)
    config, state, record = fit_encoder(None, {"encoder": TINY.model_dump()}, 3, "RAS", "match", "encoder")
    assert config.in_channels == 3 and state is None and record["input_channels"]["mode"] == "random init"


@pytest.mark.parametrize(
    ("theirs", "expected"),
    [
        ("RAS", "same"),
        ("LPS", "flipped: pretrained LPS, task RAS"),
        (None, "unchecked: the checkpoint records no orientation"),
    ],
)
def test_axis_order_is_checked_where_the_checkpoint_declares_an_orientation(theirs, expected):
    meta = {"intensity": {"orientation": theirs}} if theirs else {"intensity": {}}
    assert axis_order_agreement(meta, "RAS", "enc.pt").startswith(expected)


def test_permuted_axes_are_refused_naming_the_setting():
    with pytest.raises(
        MedsslInputError, match=r"enc\.pt: .*pretrained on SAR volumes .* set preprocess\.orientation=SAR"
    ):
        axis_order_agreement({"intensity": {"orientation": "SAR"}}, "RAS", "enc.pt")


def _two_channel_task(tmp_path):
    """An nnU-Net v2 task with two channels per case (the phantom's image twice)."""
    msd = synth_task(tmp_path / "msd", "mri_organs", 4, seed=3, shape=(32, 32, 32))
    root = tmp_path / "Dataset001_Two"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    data = json.loads((msd / "dataset.json").read_text())
    for item in data["training"]:
        case = item["image"].split("/")[-1].removesuffix(".nii.gz")
        for channel in range(2):
            shutil.copy(msd / item["image"], root / "imagesTr" / f"{case}_{channel:04d}.nii.gz")
        shutil.copy(msd / item["label"], root / "labelsTr" / f"{case}.nii.gz")
    labels = {name: int(value) for value, name in data["labels"].items()}
    (root / "dataset.json").write_text(
        json.dumps(
            {"channel_names": {"0": "T1", "1": "T2"}, "labels": labels, "numTraining": 4, "file_ending": ".nii.gz"}
        )
    )
    return root


def run_cli(args, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["medssl", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return exit_info.value.code, *capsys.readouterr()


@pytest.mark.slow
def test_a_one_channel_encoder_on_a_two_channel_task_is_refused_at_the_door_or_adapted_and_recorded(
    tmp_path, capsys, monkeypatch
):
    task = _two_channel_task(tmp_path)
    encoder = SwinEncoder(TINY)
    ckpt = tmp_path / "enc.pt"
    save_encoder(
        ckpt,
        encoder,
        encoder_meta(
            method="simmim", family="mim", encoder=TINY, preprocess={"orientation": "RAS", "spacing": [4, 4, 4]}
        ),
    )
    common = ["--task", task, "--encoder", ckpt, "--budget", "1", "crop_size=32", "n_test=1", "n_val=1", "val_every=2"]
    common += ["schedule.steps=2", "schedule.batch_size=1", "schedule.warmup_steps=0", "preprocess.spacing=[4,4,4]"]
    code, _, err = run_cli(["finetune", *common, "--out", tmp_path / "refused"], capsys, monkeypatch)
    assert code == 2 and err.count("\n") == 1 and "enc.pt" in err and "input_channels=repeat" in err
    assert not (tmp_path / "refused" / "cache").exists()  # refused before any volume was cached
    code, _, err = run_cli(
        ["finetune", *common, "input_channels=repeat", "--out", tmp_path / "ft"], capsys, monkeypatch
    )
    assert code == 0, err
    info = json.loads((tmp_path / "ft" / "run.json").read_text())
    results = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert info["encoder_fit"]["input_channels"] == {
        "mode": "repeat",
        "from": 1,
        "to": 2,
        "tensor": "patch_embed.proj.weight",
    }
    assert results["encoder_fit"] == info["encoder_fit"] and info["encoder_fit"]["axis_order"] == "same"
    log = (tmp_path / "ft" / "log.txt").read_text()
    assert "input channels: encoder 1 -> task 2 (repeat)" in log and "axis order: same" in log
