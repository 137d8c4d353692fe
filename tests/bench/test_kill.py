"""SIGKILL a small ``medssl bench`` at seeded random moments, finish it, and compare the final
results table with an uninterrupted run's; then a changed config under the same --out is refused.

CPU runs in different processes are not bit-identical after a resume (tests/train/test_loop.py
compares resumed weights to 1e-6), so the table's identity columns (run ids, cases, structures)
must match exactly and the metrics to a tolerance that one flipped voxel would exceed.
"""

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from medssl.bench import run_bench
from medssl.results import results_table
from medssl.runs import RunDir

KILLS = 2
# run ids hold the out folder's paths (cache, splits), so they differ between the two folders
IDENTITY = ["method", "task", "budget", "seed", "n_train", "case", "label", "structure"]


def write_bench(folder: Path, data: Path, **changes: object) -> Path:
    schedule = {"steps": 2, "batch_size": 2, "warmup_steps": 1, "checkpoint_every": 1, "log_every": 1}
    bench = {
        "name": "kill",
        "data": {"corpus": [str(data / "corpus")]},
        "tasks": [{"path": str(data / "task"), "name": "organs"}],
        "methods": ["none", "simmim"],
        "encoder": {"preset": "tiny", "window_size": 4},
        "preprocess": {"spacing": [3.5, 3.5, 3.5]},
        "pretrain": {"crop_size": 32, "schedule": schedule},
        "finetune": {
            "crop_size": 32,
            "schedule": schedule,
            "val_every": 1,
            "n_test": 1,
            "n_val": 1,
            "sw_batch_size": 1,
        },
        "budgets": ["all"],
        "seeds": [0],
        "cka": {"enabled": False},
        **changes,
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(bench))
    return path


def records(out: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in (out / "runs").glob("*/metrics.jsonl"))


def table(out: Path) -> pd.DataFrame:
    frame = results_table(out / "runs")
    return frame.sort_values(IDENTITY, ignore_index=True)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_at_random_moments_gives_the_uninterrupted_results(tmp_path: Path, capsys, monkeypatch) -> None:
    from medssl.data.synth import synth_corpus, synth_task

    data = tmp_path / "data"
    synth_task(data / "task", "ct_organs", 4, seed=0, shape=(32, 32, 32))
    synth_corpus(data / "corpus", 2, seed=0, shape=(32, 32, 32))
    config = write_bench(tmp_path, data)

    assert run_bench(config, tmp_path / "reference") == 0
    reference = table(tmp_path / "reference")
    assert len(reference) > 0

    out = tmp_path / "killed"
    # a moment is a seeded random number of logged training records (the runs' metrics lines): a
    # point inside a run, however fast or slow the machine is today
    total = records(tmp_path / "reference")
    moments = sorted(random.Random(9).sample(range(1, total), KILLS))
    finished_after_kill = []
    for index, moment in enumerate(moments):
        log = open(tmp_path / f"kill{index}.log", "w")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            [sys.executable, "-m", "medssl.cli", "bench", str(config), "--out", str(out)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 240
        while records(out) < moment and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        log.close()
        finished_after_kill.append(sum(RunDir(p).is_finished() for p in (out / "runs").iterdir()))
    # at least one kill stopped it part-way (a loaded machine may let a late moment's kill land after the end)
    assert min(finished_after_kill) < 3, finished_after_kill
    assert run_bench(config, out) == 0
    final = table(out)

    pd.testing.assert_frame_equal(final[IDENTITY], reference[IDENTITY], check_dtype=False)
    for column in ("dice", "nsd"):
        np.testing.assert_allclose(final[column], reference[column], rtol=0, atol=1e-3, equal_nan=True)
    for run_dir in (out / "runs").iterdir():
        assert RunDir(run_dir).is_finished(), run_dir
        assert not list(run_dir.rglob(".*.tmp")), "temporaries of killed runs left behind"

    # the same out folder with another benchmark config is refused naming the field (issue 9, item 1)
    changed = write_bench(tmp_path / "changed", data, seeds=[1])
    from medssl import cli

    monkeypatch.setattr(sys, "argv", ["medssl", "bench", str(changed), "--out", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "seeds" in err and "new --out" in err, err
