"""The bench end to end on a tiny real benchmark (random init + SimMIM, one synthetic task of 6
cases at 32^3, a few steps): re-running executes nothing, interrupted benches resume without
rewriting finished runs, two processes share one output folder, the SLURM path (submitit's local
cluster) honours a dependency."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import medssl.bench.executors.dispatch as dispatch
from medssl.bench import run_bench
from medssl.bench.executors import CLAIM_FILE
from medssl.bench.plan import expand_plan
from medssl.config import load_bench_config
from medssl.runs import RunDir

pytestmark = pytest.mark.slow

FINISHED_LINE = re.compile(r"^\[[^\]]+\] finished$", re.MULTILINE)  # written once by the run that finishes


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medssl.data.synth import synth_corpus, synth_task

    root = tmp_path_factory.mktemp("tiny_data")
    synth_task(root / "task", "ct_organs", 6, seed=0, shape=(32, 32, 32))
    synth_corpus(root / "corpus", 2, seed=0, shape=(32, 32, 32))
    return root


SCHEDULE = {"steps": 2, "batch_size": 2, "warmup_steps": 1, "checkpoint_every": 1, "log_every": 1}
FINETUNE = {"crop_size": 32, "schedule": SCHEDULE, "val_every": 2, "n_test": 1, "n_val": 1, "sw_batch_size": 1}


def write_bench(folder: Path, data: Path, **changes: object) -> Path:
    bench = {
        "name": "tiny",
        "data": {"corpus": [str(data / "corpus")]},
        "tasks": [{"path": str(data / "task"), "name": "organs"}],
        "methods": ["none", "simmim"],
        "encoder": {"preset": "tiny", "window_size": 4},
        # 3.5 mm voxels: each ~30^3 phantom fits one 32^3 window, so inference is a single forward pass
        "preprocess": {"spacing": [3.5, 3.5, 3.5]},
        "pretrain": {"crop_size": 32, "schedule": SCHEDULE},
        "finetune": FINETUNE,
        "budgets": ["all"],
        "seeds": [0],
        "cka": {"enabled": True, "n_crops": 2, "crop_size": 32, "batch_size": 2},
    }
    bench.update(changes)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(bench))
    return path


def planned_ids(out: Path) -> list[str]:
    return [r["run_id"] for r in json.loads((out / "plan.json").read_text())["runs"]]


def finished_results(out: Path) -> dict[str, bytes]:
    runs = out / "runs"
    if not runs.is_dir():
        return {}
    return {p.name: (p / "results.json").read_bytes() for p in runs.iterdir() if RunDir(p).is_finished()}


def start_cli(config: Path, out: Path, log_name: str) -> subprocess.Popen:
    log = open(out.parent / f"{log_name}.log", "w")  # noqa: SIM115 - closed with the process
    # A shell's background jobs inherit SIGINT ignored, and Python then never raises KeyboardInterrupt:
    # restore the default so Ctrl-C behaves as in a terminal.
    return subprocess.Popen(
        [sys.executable, "-m", "medssl.cli", "bench", str(config), "--out", str(out)],
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_until(condition, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"bench exited (code {proc.returncode}) before the condition held")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def assert_complete_and_executed_once(out: Path) -> None:
    ids = planned_ids(out)
    assert len(ids) == 4  # pretrain simmim, finetune none + simmim, CKA
    for run_id in ids:
        run = RunDir(out / "runs" / run_id)
        assert run.is_finished(), run_id
        log = run.log_path.read_text()
        assert len(FINISHED_LINE.findall(log)) == 1, f"{run_id} finished more than once:\n{log}"
        # the bench's own line follows the entry point's; an interrupt may fall between the two
        assert log.count("bench: completed") <= 1, log
        assert run.results()["kind"] == run_id.split("-")[0]


# --------------------------------------------------------------------------- two processes, then a re-run


@pytest.fixture(scope="module")
def shared_out(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[int]]:
    root = tmp_path_factory.mktemp("concurrent")
    config, out = write_bench(root, tiny_data), root / "out"
    procs = [start_cli(config, out, f"bench{i}") for i in range(2)]
    codes = [p.wait(timeout=400) for p in procs]
    return config, out, codes


def test_two_processes_on_one_out_dir_both_complete(shared_out: tuple[Path, Path, list[int]]) -> None:
    config, out, codes = shared_out
    logs = [(out.parent / f"bench{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], logs
    assert_complete_and_executed_once(out)
    for run_id in planned_ids(out):
        started = re.findall(r"bench: started by pid (\d+)", (out / "runs" / run_id / "log.txt").read_text())
        assert len(set(started)) == 1, f"{run_id} started by several processes: {started}"
    assert (out / "report" / "index.html").is_file()


def test_second_run_executes_nothing(shared_out: tuple[Path, Path, list[int]], monkeypatch: pytest.MonkeyPatch) -> None:
    config, out, _ = shared_out
    before = finished_results(out)
    status_mtimes = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/status.json")}

    def must_not_run(run, run_dir):
        raise AssertionError(f"{run.run_id} executed again")

    monkeypatch.setattr(dispatch, "run_in_process", must_not_run)
    assert run_bench(config, out) == 0
    assert finished_results(out) == before and len(before) == 4
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/status.json")} == status_mtimes


def test_concurrent_reports_on_one_folder_both_succeed(shared_out: tuple[Path, Path, list[int]]) -> None:
    """Both bench processes end by writing the report into the same folder: they must take turns."""
    _, out, _ = shared_out
    cmd = [sys.executable, "-m", "medssl.cli", "report", str(out / "runs")]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    pngs = list((out / "report" / "figures").glob("*.png"))
    assert pngs and all(p.read_bytes().startswith(b"\x89PNG") for p in pngs)
    assert not [p for p in (out / "report").rglob(".*.tmp")], "temporary files left behind"
    assert "<img" in (out / "report" / "index.html").read_text(encoding="utf-8")


# --------------------------------------------------------------------------- interrupts


def hold_claims(stack: contextlib.ExitStack, out: Path, run_ids: list[str]) -> None:
    """Claim runs from this process, as a second bench would: the bench under test waits for them.

    That makes the interrupts below land where they are meant to, however slowly this test process
    is scheduled (the runs take about a second each, less than a loaded CI machine can stall it)."""
    for run_id in run_ids:
        stack.enter_context(RunDir(out / "runs" / run_id).lock(CLAIM_FILE))


def test_interrupted_bench_resumes_and_never_rewrites_finished_runs(tiny_data: Path, tmp_path: Path) -> None:
    # fine-tuning long enough that a kill between its first checkpoint and its results is easy to hit
    finetune = {**FINETUNE, "schedule": {**SCHEDULE, "steps": 8}, "val_every": 4}
    config, out = write_bench(tmp_path, tiny_data, finetune=finetune), (tmp_path / "out").resolve()
    ids = [run.run_id for run in expand_plan(load_bench_config(config), out, config).runs]
    pretrain_id, cka_id = ids[0], ids[-1]
    assert pretrain_id.startswith("pretrain-") and cka_id.startswith("cka-")

    # SIGINT (Ctrl-C) once the first run has finished, while the bench waits for the others
    with contextlib.ExitStack() as claims:
        hold_claims(claims, out, ids[1:])
        proc = start_cli(config, out, "first")
        wait_until(lambda: len(finished_results(out)) >= 1, proc)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130, (tmp_path / "first.log").read_text()
    after_sigint = finished_results(out)
    assert list(after_sigint) == [pretrain_id] and planned_ids(out) == ids

    # SIGKILL in the middle of a run (a checkpoint written, results not yet); the last run is held,
    # so the plan cannot complete before the kill
    def mid_run() -> bool:
        for run_id in ids[1:-1]:
            run = RunDir(out / "runs" / run_id)
            if run.last_checkpoint.exists() and run.status() == "running" and not run.is_finished():
                return True
        return False

    with contextlib.ExitStack() as claims:
        hold_claims(claims, out, [cka_id])
        proc = start_cli(config, out, "second")
        wait_until(mid_run, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    after_sigkill = finished_results(out)
    assert pretrain_id in after_sigkill and cka_id not in after_sigkill
    assert {k: after_sigkill[k] for k in after_sigint} == after_sigint

    # the third start completes the plan; what had finished is byte-for-byte untouched
    assert run_bench(config, out) == 0
    final = finished_results(out)
    assert {k: final[k] for k in after_sigkill} == after_sigkill
    assert_complete_and_executed_once(out)
    killed = [rid for rid in ids if rid not in after_sigkill]
    assert any(
        "bench: started" in (out / "runs" / rid / "log.txt").read_text().split("bench: completed")[0] for rid in killed
    )


# --------------------------------------------------------------------------- SLURM via submitit's local cluster


def test_slurm_local_cluster_runs_a_plan_with_a_dependency(tiny_data: Path, tmp_path: Path) -> None:
    config = write_bench(
        tmp_path,
        tiny_data,
        methods=["simmim"],
        cka={"enabled": False},
        executor={"kind": "slurm", "slurm": {"timeout_min": 10, "gpus_per_node": 0, "cpus_per_task": 1, "mem_gb": 2}},
    )
    out = tmp_path / "out"
    assert run_bench(config, out, cluster="local") == 0
    pretrain_id, finetune_id = planned_ids(out)
    assert pretrain_id.startswith("pretrain-") and finetune_id.startswith("finetune-")
    pretrain, finetune = RunDir(out / "runs" / pretrain_id), RunDir(out / "runs" / finetune_id)
    assert pretrain.is_finished() and finetune.is_finished()
    # each ran in its own submitit job process, the fine-tune after the pretraining had finished
    pids = [re.search(r"bench: started by pid (\d+)", r.log_path.read_text()).group(1) for r in (pretrain, finetune)]
    assert len(set(pids)) == 2 and str(os.getpid()) not in pids
    assert finetune.info()["encoder_checkpoint"].startswith(str(pretrain.path))
    assert pretrain.status_path.stat().st_mtime <= json.loads(finetune.status_path.read_text())["updated"]
    assert any((out / "slurm").rglob("*_result.pkl"))


# --------------------------------------------------------------------------- dry run and cost estimate


def test_dry_run_estimates_from_finished_runs_and_measures_the_rest(
    shared_out: tuple[Path, Path, list[int]], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from medssl.bench.estimate import estimate_plan

    config, out, _ = shared_out
    bench = load_bench_config(config, ["finetune.schedule.steps=3"])  # new fine-tune runs, same pretraining
    estimates = {
        e.run_id.split("-")[0] + "-" + e.run_id.split("-")[1]: e
        for e in estimate_plan(expand_plan(bench, tmp_path / "copy"), out)
    }
    assert estimates["finetune-none"].source == "from 2 finished runs"  # same preset and crop: same step cost
    assert estimates["finetune-none"].seconds == pytest.approx(3 * estimates["finetune-none"].step_seconds)
    assert estimates["pretrain-simmim"].source == "from 1 finished runs"
    assert estimates["cka-simmim"].source == "measured now (cpu)"  # its encoder forwards, timed now

    empty = tmp_path / "empty"
    measured = estimate_plan(expand_plan(bench, empty), empty, measure_steps=1)
    assert {e.source for e in measured if e.kind != "cka"} == {"measured now (cpu)"}
    assert all(e.step_seconds > 0 for e in measured if e.kind != "cka")

    assert run_bench(config, out, dry_run=True) == 0
    printed = capsys.readouterr().out
    assert "pretrain" in printed and "estimated cost of the unfinished runs: 0 s" in printed
    assert printed.count("finished") >= 4  # every run shown as finished


# --------------------------------------------------------------------------- data preparation


def test_prepare_data_synthesises_and_ingests_where_the_plan_expects(tmp_path: Path) -> None:
    from medssl.bench.engine import REAL_CT_PATH, prepare_data
    from medssl.config import BenchConfig

    bench = BenchConfig.model_validate(
        {
            "data": {
                "synth": {"cases": 5, "corpus_cases": 2, "shape": [32, 32, 32]},
                "corpus": "synth",
                "include_real_ct": True,
            },
            "tasks": [{"path": "synth:ct_organs"}, {"path": "synth:mri_organs"}],
            "methods": ["none", "simmim"],
            "preprocess": {"spacing": [3.5, 3.5, 3.5]},
            "finetune": {"crop_size": 32, "n_test": 2, "n_val": 1},
            "budgets": [2],
        }
    )
    out = tmp_path / "out"
    prepare_data(bench, out)
    plan = expand_plan(bench, out)  # the tasks now exist: budgets are checked against the folders
    assert {str(r.config.task) for r in plan.stage("finetune")} == {
        str(out.resolve() / "data" / k) for k in ("ct_organs", "mri_organs")
    }
    manifest = json.loads((out / "corpus" / "manifest.json").read_text())
    sources = [v["source"] for v in manifest["volumes"]]
    assert len(sources) == 2 + REAL_CT_PATH.is_file()
    assert any(s.endswith("Cranium.inv3") for s in sources) == REAL_CT_PATH.is_file()
    assert plan.stage("pretrain")[0].config.corpus == out.resolve() / "corpus"
    assert sorted(p.name for p in (out / "data").iterdir()) == ["corpus", "ct_organs", "mri_organs"]  # no ct_lesions
