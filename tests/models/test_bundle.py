"""MONAI bundles out: a fine-tuned phantom run exported as a bundle, moved to another folder, segments its test
case under the README's ``python -m monai.bundle run`` command from another working directory, with the run's
own Dice."""

import json
import shlex
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from medssl import cli
from medssl.config import EncoderConfig, FinetuneConfig, PreprocessConfig, ScheduleConfig
from medssl.data.cache import VolumeCache, cache_task
from medssl.data.datasets import load_eval_case
from medssl.data.synth import synth_task
from medssl.data.tasks import load_task
from medssl.evaluate import case_metrics
from medssl.export import run_command
from medssl.train.finetune import run_finetune

TINY = EncoderConfig(preset="tiny", window_size=4)
PRE = PreprocessConfig(spacing=(4.0, 4.0, 4.0))


def run_cli(args, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["medssl", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return exit_info.value.code, *capsys.readouterr()


@pytest.mark.slow
def test_exported_bundle_segments_a_test_case_with_the_runs_dice(tmp_path, capsys, monkeypatch):
    task_dir = synth_task(tmp_path / "task", "ct_organs", 4, seed=5, shape=(40, 40, 40))
    cfg = FinetuneConfig(
        task=task_dir,
        encoder=TINY,
        budget=2,
        crop_size=32,
        preprocess=PRE,
        val_every=3,
        n_test=1,
        n_val=1,
        loss="dice",
        crop_sampling="class_balanced",
        schedule=ScheduleConfig(steps=6, batch_size=2, lr=1e-2, warmup_steps=1, log_every=1),
    )
    results = run_finetune(cfg, tmp_path / "ft")
    code, out, err = run_cli(
        [
            "export",
            tmp_path / "ft" / "checkpoints" / "best.pt",
            "--format",
            "monai-bundle",
            "--out",
            tmp_path / "bundle",
        ],
        capsys,
        monkeypatch,
    )
    assert code in (0, None), err
    for name in ("configs/metadata.json", "configs/inference.json", "configs/logging.conf", "models/model.pt"):
        assert (tmp_path / "bundle" / name).stat().st_size > 0, name
    # shared: moved to another folder, run from a third one
    bundle = tmp_path / "shared" / "simmim_bundle"
    bundle.parent.mkdir()
    (tmp_path / "bundle").rename(bundle)
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert metadata["medssl"]["method"] == "none" and metadata["medssl"]["task"] == results["task"]
    assert {k: v for k, v in metadata["pred_classes"].items() if k != "0"} == results["labels"]

    # one test case, as the user would hand it over: the raw NIfTI
    task = load_task(task_dir)
    case_id = results["cases"][0]["case"]
    case = next(c for c in task.cases if c.case_id == case_id)
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / f"{case_id}.nii.gz").symlink_to(case.image)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    command = run_command(bundle).replace("SCANS", str(scans))  # the command export prints and the README gives
    assert command.startswith("python -m monai.bundle run ")
    proc = subprocess.run(
        [sys.executable, *shlex.split(command)[1:]], cwd=elsewhere, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (seg_file,) = (bundle / "eval").glob("*.nii.gz")
    prediction = torch.from_numpy(np.asarray(nib.load(seg_file).dataobj).astype(np.int64))

    volume = cache_task(task, VolumeCache(tmp_path / "ft" / "cache"), PRE)[case_id]
    truth = load_eval_case(volume)
    assert tuple(prediction.shape) == tuple(truth["label"].shape[1:])
    rows = case_metrics(
        prediction, truth["label"][0], task.structures, truth["spacing"], cfg.nsd_tolerance_mm, case_id=case_id
    )
    run_dice = {r["structure"]: r["dice"] for r in results["cases"] if r["case"] == case_id}
    bundle_dice = {r["structure"]: r["dice"] for r in rows}
    assert bundle_dice.keys() == run_dice.keys()
    for structure, dice in run_dice.items():
        assert bundle_dice[structure] == pytest.approx(dice, abs=1e-3), structure
