"""Executors with a fake runner: dependency order, failures and skips, claims held by other
processes, worker processes, torchrun command. (Real training runs: test_engine.py.)"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from pydantic import Field

from medssl.bench.executors import (
    CLAIM_FILE,
    LocalExecutor,
    RunFailed,
    TorchrunRunner,
    execute_run,
)
from medssl.bench.plan import Plan, PlannedRun
from medssl.config import StrictModel
from medssl.runs import RunDir


class FakeConfig(StrictModel):
    value: int = 0
    sleep: float = Field(0.0, ge=0)
    fail: bool = False
    die: bool = False


def fake_runner(run: PlannedRun, run_dir: Path) -> None:
    """Behaves like an entry point: takes the run lock, marks running, writes results, finishes."""
    import torch

    rd = RunDir(run_dir)
    with rd.lock():
        rd.set_status("running")
        started = time.time()
        time.sleep(run.config.sleep)
        if run.config.die:
            os._exit(9)  # a killed process: no cleanup, no status
        if run.config.fail:
            raise RuntimeError(f"boom in {run.run_id}")
        rd.write_results(
            {
                "kind": run.kind,
                "pid": os.getpid(),
                "started": started,
                "ended": time.time(),
                "threads": torch.get_num_threads(),
            }
        )
        rd.set_status("finished")
        rd.log("finished")


def not_called(run: PlannedRun, run_dir: Path) -> None:
    raise AssertionError(f"{run.run_id} executed again")


def make_plan(out: Path, spec: dict[str, tuple[list[str], dict]]) -> Plan:
    digest = "000000000000"  # a fake config: the id's hash part is fixed
    runs = [
        PlannedRun("finetune", f"finetune-{name}-{digest}", FakeConfig(**options), digest, deps, {"method": name})
        for name, (deps, options) in spec.items()
    ]
    ids = {name: f"finetune-{name}-000000000000" for name in spec}
    for run in runs:
        run.depends_on = [ids[d] for d in run.depends_on]
    return Plan(name="fake", out=out, runs=runs)


def results(out: Path, name: str) -> dict:
    return json.loads((out / "runs" / f"finetune-{name}-000000000000" / "results.json").read_text())


def run_dir(out: Path, name: str) -> RunDir:
    return RunDir(out / "runs" / f"finetune-{name}-000000000000")


def quiet(_: str) -> None:
    return None


def test_serial_runs_in_dependency_order_and_never_twice(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, {"c": (["b"], {}), "b": (["a"], {}), "a": ([], {}), "d": ([], {})})
    summary = LocalExecutor(runner=fake_runner, poll_seconds=0.05, log=quiet).run(plan, tmp_path)
    assert len(summary.executed) == 4 and not summary.failed
    assert results(tmp_path, "a")["ended"] <= results(tmp_path, "b")["started"]
    assert results(tmp_path, "b")["ended"] <= results(tmp_path, "c")["started"]
    log = run_dir(tmp_path, "c").log_path.read_text()
    assert log.count("bench: started") == 1 and log.count("bench: completed") == 1
    before = {n: run_dir(tmp_path, n).results_path.read_bytes() for n in "abcd"}

    summary = LocalExecutor(runner=not_called, poll_seconds=0.05, log=quiet).run(plan, tmp_path)
    assert len(summary.with_status("already_finished")) == 4
    assert {n: run_dir(tmp_path, n).results_path.read_bytes() for n in "abcd"} == before


def test_failure_is_recorded_and_dependents_skipped(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, {"a": ([], {"fail": True}), "b": (["a"], {}), "c": (["b"], {}), "d": ([], {})})
    summary = LocalExecutor(runner=fake_runner, poll_seconds=0.05, log=quiet).run(plan, tmp_path)
    assert [o.run_id.split("-")[1] for o in summary.failed] == ["a"]
    assert "boom in finetune-a" in summary.failed[0].error
    assert sorted(o.run_id.split("-")[1] for o in summary.skipped) == ["b", "c"]
    assert all("dependency" in o.error for o in summary.skipped)
    assert [o.run_id.split("-")[1] for o in summary.executed] == ["d"]
    status = json.loads(run_dir(tmp_path, "a").status_path.read_text())
    assert status["status"] == "failed" and "boom" in status["error"]
    assert not run_dir(tmp_path, "b").status_path.exists()  # never started
    # the config and the plan's labels are in the run directory even though the run failed
    assert run_dir(tmp_path, "a").info()["kind"] == "finetune"
    assert run_dir(tmp_path, "a").config_path.exists()


def test_failure_before_the_entry_point_records_the_one_line_error(tmp_path: Path) -> None:
    from medssl.errors import MedsslInputError

    def bad_input(run: PlannedRun, rd: Path) -> None:
        raise MedsslInputError("/data/task/dataset.json", "missing key 'labels'")

    plan = make_plan(tmp_path, {"a": ([], {})})
    run_dir(tmp_path, "a").set_status("failed", error="an older failure")  # a previous attempt's record
    outcome = execute_run(plan.runs[0], tmp_path, bad_input)
    assert outcome.status == "failed" and outcome.error == "/data/task/dataset.json: missing key 'labels'"
    status = json.loads(run_dir(tmp_path, "a").status_path.read_text())
    assert (status["status"], status["error"]) == ("failed", "/data/task/dataset.json: missing key 'labels'")


HOLDER = textwrap.dedent("""
    import fcntl, json, os, sys, time
    path, finish = sys.argv[1], sys.argv[2] == "finish"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("locked", flush=True)
    time.sleep(1.0)
    if finish:
        run = os.path.dirname(path)
        json.dump({"kind": "finetune", "pid": os.getpid()}, open(os.path.join(run, "results.json"), "w"))
        json.dump({"status": "finished"}, open(os.path.join(run, "status.json"), "w"))
""")


def hold_lock(path: Path, finish: bool) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), "finish" if finish else "die"], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.parametrize("lock_file", [CLAIM_FILE, ".lock"])  # another bench process / a direct `medssl finetune`
def test_held_run_is_waited_for_then_taken_over_when_the_holder_dies(tmp_path: Path, lock_file: str) -> None:
    plan = make_plan(tmp_path, {"a": ([], {}), "b": (["a"], {})})
    holder = hold_lock(run_dir(tmp_path, "a").path / lock_file, finish=False)
    locked_at = time.time()
    try:
        summary = LocalExecutor(runner=fake_runner, poll_seconds=0.1, log=quiet).run(plan, tmp_path)
    finally:
        holder.wait(timeout=30)
    assert len(summary.executed) == 2  # the holder died without finishing: this process resumed the run
    assert results(tmp_path, "a")["pid"] == os.getpid()
    assert results(tmp_path, "a")["started"] >= locked_at + 0.9  # only after the holder let go


def test_held_run_finished_by_its_holder_is_not_run_again(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, {"a": ([], {}), "b": (["a"], {})})
    holder = hold_lock(run_dir(tmp_path, "a").path / CLAIM_FILE, finish=True)
    try:
        summary = LocalExecutor(runner=fake_runner, poll_seconds=0.1, log=quiet).run(plan, tmp_path)
    finally:
        holder.wait(timeout=30)
    assert summary.outcomes[plan.runs[0].run_id].status == "already_finished"
    assert results(tmp_path, "a")["pid"] == holder.pid
    assert summary.outcomes[plan.runs[1].run_id].status == "finished"


def test_worker_processes_share_the_plan(tmp_path: Path) -> None:
    spec = {n: ([], {"sleep": 0.5}) for n in "abcd"}
    spec["e"] = (["a", "b"], {})
    plan = make_plan(tmp_path, spec)
    summary = LocalExecutor(workers=2, runner=fake_runner, poll_seconds=0.05, log=quiet).run(plan, tmp_path)
    assert len(summary.executed) == 5 and not summary.failed
    pids = {results(tmp_path, n)["pid"] for n in "abcde"}
    assert len(pids) == 2 and os.getpid() not in pids
    cpus = len(os.sched_getaffinity(0))
    assert {results(tmp_path, n)["threads"] for n in "abcde"} == {max(1, cpus // 2)}
    assert results(tmp_path, "e")["started"] >= max(results(tmp_path, n)["ended"] for n in "ab")
    for name in "abcde":
        assert run_dir(tmp_path, name).log_path.read_text().count("] finished") == 1


def test_worker_that_dies_mid_run_fails_only_that_run(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, {"a": ([], {"die": True}), "b": (["a"], {}), "c": ([], {}), "d": ([], {})})
    summary = LocalExecutor(workers=2, runner=fake_runner, poll_seconds=0.05, log=quiet).run(plan, tmp_path)
    assert [o.run_id.split("-")[1] for o in summary.failed] == ["a"]
    assert "worker process died" in summary.failed[0].error
    assert run_dir(tmp_path, "a").status() == "failed"
    assert [o.run_id.split("-")[1] for o in summary.skipped] == ["b"]
    assert sorted(o.run_id.split("-")[1] for o in summary.executed) == ["c", "d"]


def test_torchrun_runner_command_and_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = make_plan(tmp_path, {"a": ([], {})})
    run, rd = plan.runs[0], run_dir(tmp_path, "a")
    command = TorchrunRunner(4).command(run, rd.path)
    assert command[:6] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4"]
    assert command[6:] == [
        "-m",
        "medssl.train.launch",
        "--kind",
        "finetune",
        "--config",
        str(rd.config_path),
        "--run-dir",
        str(rd.path),
    ]

    def failing_torchrun(cmd: list[str], check: bool = False) -> subprocess.CompletedProcess:
        rd.set_status("failed", error="ValueError: bad crop")  # what rank 0 records before exiting
        return subprocess.CompletedProcess(cmd, 1)

    monkeypatch.setattr(subprocess, "run", failing_torchrun)
    with pytest.raises(RunFailed, match="ValueError: bad crop"):
        TorchrunRunner(2)(run, rd.path)
    outcome = execute_run(run, tmp_path, TorchrunRunner(2))
    assert outcome.status == "failed" and outcome.error == "ValueError: bad crop"
    assert rd.config_path.read_text().startswith("value: 0")  # written before torchrun reads it


class FakeJob:
    def __init__(self, job_id: str, run: PlannedRun, fail: bool) -> None:
        self.job_id, self.run, self.fail = job_id, run, fail

    def done(self) -> bool:
        return True

    def result(self) -> dict:
        if self.fail:
            raise RuntimeError(f"job {self.job_id} failed\nTraceback ...\nRunFailed: boom")
        return {"run_id": self.run.run_id, "status": "finished", "seconds": 1.0}


class FakeSlurm:
    """Stands in for submitit's AutoExecutor on a SLURM cluster: records what would be submitted."""

    cluster = "slurm"

    def __init__(self) -> None:
        self.params: dict = {}
        self.submitted: list[tuple[str, dict]] = []

    def update_parameters(self, **kwargs: object) -> None:
        self.params.update(kwargs)

    def submit(self, fn, run: PlannedRun, out: str, runner, poll: float) -> FakeJob:
        self.submitted.append((run.run_id, dict(self.params)))
        return FakeJob(str(100 + len(self.submitted)), run, fail=run.config.fail)


def test_slurm_jobs_are_chained_with_afterok(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medssl.bench.executors import SlurmExecutor
    from medssl.config import SlurmConfig

    plan = make_plan(
        tmp_path, {"a": ([], {}), "b": (["a"], {}), "c": (["a", "b"], {}), "x": ([], {"fail": True}), "y": (["x"], {})}
    )
    fake = FakeSlurm()
    executor = SlurmExecutor(SlurmConfig(timeout_min=60), nproc_per_node=4, poll_seconds=0.01, log=quiet)
    monkeypatch.setattr(executor, "_executor", lambda out: fake)
    summary = executor.run(plan, tmp_path)
    deps = {rid.split("-")[1]: p["slurm_additional_parameters"] for rid, p in fake.submitted}
    assert [rid.split("-")[1] for rid, _ in fake.submitted] == ["a", "b", "c", "x", "y"]  # all at once
    assert deps["a"] == {} and deps["x"] == {}
    assert deps["b"] == {"dependency": "afterok:101", "kill-on-invalid-dep": "yes"}
    assert deps["c"] == {"dependency": "afterok:101:102", "kill-on-invalid-dep": "yes"}
    assert deps["y"] == {"dependency": "afterok:104", "kill-on-invalid-dep": "yes"}
    assert [o.run_id.split("-")[1] for o in summary.failed] == ["x"]
    assert summary.failed[0].error == "RunFailed: boom"  # the job's last line when the run recorded nothing
    assert [o.run_id.split("-")[1] for o in summary.skipped] == ["y"]
    assert sorted(o.run_id.split("-")[1] for o in summary.executed) == ["a", "b", "c"]
    assert run_dir(tmp_path, "x").status() == "failed"


def test_idle_worker_exits_when_its_bench_process_is_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    # A bench killed by a signal never sends the workers their stop message: they must notice.
    import medssl.bench.executors.local as local

    monkeypatch.setattr(local, "WORKER_PARENT_CHECK_SECONDS", 0.05)
    tasks = multiprocessing.get_context("spawn").Queue()
    started = time.time()
    local._worker_main(0, tasks, None, "/nonexistent", None, 1, parent=os.getppid() + 10**6)
    assert time.time() - started < 5
