"""SLURM runs over several nodes, without a cluster: the sbatch script submitit writes for such a job,
the ``srun torchrun`` line with its c10d rendezvous, and that only the job's task 0 claims a run and
only global rank 0 of a run writes to its directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from medssl.bench.executors import MultiNodeTorchrunRunner, SlurmExecutor, slurm_job
from medssl.bench.executors.dispatch import CLAIM_FILE
from medssl.bench.plan import PlannedRun
from medssl.config import CKARunConfig, PretrainConfig, SlurmConfig
from medssl.runs import RunDir, finish_run, run_session

SUBMITIT_COMMAND = "python -u -m submitit.core._submit /jobs"


def pretrain_run(tmp_path: Path) -> PlannedRun:
    return PlannedRun.make("pretrain", "simmim", PretrainConfig(corpus=tmp_path / "corpus"), [], {"method": "simmim"})


def cka_run(tmp_path: Path) -> PlannedRun:
    config = CKARunConfig(model_a=tmp_path / "a.pt", model_b=tmp_path / "b.pt", task=tmp_path / "task")
    return PlannedRun.make("cka", "simmim-task-pvf", config, [], {"method": "simmim"})


@pytest.fixture
def slurm_job_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The environment SLURM gives the batch script of a two-node job (read through submitit)."""
    for name, value in {
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "gpu[017-018]",
        "SLURM_PROCID": "0",
    }.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


def test_multinode_job_script_and_srun_torchrun_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slurm_job_env: pytest.MonkeyPatch
) -> None:
    fake_bin = tmp_path / "bin"  # submitit's SLURM executor only checks that srun exists
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:/usr/bin:/bin")
    executor = SlurmExecutor(SlurmConfig(nodes=2, gpus_per_node=4, rdzv_port=29611), nproc_per_node=4, cluster="slurm")
    submitit_executor = executor._executor(tmp_path)

    def script(run: PlannedRun) -> str:
        submitit_executor.update_parameters(**executor.job_parameters(submitit_executor, run, []))
        return submitit_executor._executor._make_submission_file_text(SUBMITIT_COMMAND, "uid")

    pretrain = pretrain_run(tmp_path)
    text = script(pretrain)
    assert "#SBATCH --nodes=2" in text and "#SBATCH --ntasks-per-node=1" in text and "#SBATCH --gpus-per-node=4" in text
    # the job function runs once, in the batch script on the first node; it srun's the nodes itself
    assert SUBMITIT_COMMAND in text.splitlines()
    assert not [line for line in text.splitlines() if line.startswith("srun")]
    # a CKA run is small and single-process: one node, submitit's own srun
    cka_text = script(cka_run(tmp_path))
    assert "#SBATCH --nodes=1" in cka_text and "srun --unbuffered" in cka_text

    runner = executor._runner(executor._multinode(submitit_executor, pretrain))
    assert isinstance(runner, MultiNodeTorchrunRunner)
    rd = RunDir(pretrain.run_dir(tmp_path))
    command = runner.command(pretrain, rd.path)  # nodes, first node and job id from the job's environment
    srun_end = command.index(sys.executable)
    srun = ["srun", "--nodes", "2", "--ntasks", "2", "--ntasks-per-node", "1", "--kill-on-bad-exit=1"]
    assert command[:srun_end] == srun
    assert command[srun_end:] == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc_per_node",
        "4",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        "gpu017:29611",
        "--rdzv_id",
        "4242",
        "-m",
        "medssl.train.launch",
        "--kind",
        "pretrain",
        "--config",
        str(rd.config_path),
        "--run-dir",
        str(rd.path),
    ]
    assert executor._runner(executor._multinode(submitit_executor, cka_run(tmp_path))) is not runner


def test_task_0_claims_the_run_and_starts_srun_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slurm_job_env: pytest.MonkeyPatch
) -> None:
    run = pretrain_run(tmp_path)
    rd = RunDir(run.run_dir(tmp_path))
    launched: list[list[str]] = []

    def fake_srun(cmd: list[str], check: bool = False) -> subprocess.CompletedProcess:
        launched.append(cmd)
        assert rd.config_path.is_file()  # written under the claim, before any node reads it
        rd.write_results({"kind": "pretrain"})  # what global rank 0 does at the end
        rd.set_status("finished")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", fake_srun)
    result = slurm_job(run, str(tmp_path), MultiNodeTorchrunRunner(4))
    assert result is not None and result["status"] == "finished"
    assert len(launched) == 1 and launched[0][0] == "srun"
    assert rd.info()["config_hash"] == run.config_hash


def test_a_rank_1_task_never_claims_or_writes(tmp_path: Path, slurm_job_env: pytest.MonkeyPatch) -> None:
    slurm_job_env.setenv("SLURM_PROCID", "1")
    run = pretrain_run(tmp_path)

    def must_not_run(run: PlannedRun, run_dir: Path) -> None:
        raise AssertionError("a task other than 0 ran the run")

    assert slurm_job(run, str(tmp_path), must_not_run) is None
    assert not run.run_dir(tmp_path).exists()  # no claim file, no config, no status


def test_a_rank_1_training_process_never_locks_or_writes(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "runs" / "pretrain-x-000000000000")
    rank1 = {"is_main": False, "world_size": 2}
    with run_session(rd, "method: {name: simmim}\n", {"kind": "pretrain"}, **rank1):
        with rd.lock():  # rank 1 holds no run lock: rank 0 (here: this process) can take it
            pass
        finish_run(rd, {"kind": "pretrain"}, is_main=False)
    assert sorted(p.name for p in rd.path.iterdir()) == [".lock"]  # only the lock file this test took
    with pytest.raises(RuntimeError, match="boom"), run_session(rd, "{}\n", {"kind": "pretrain"}, **rank1):
        raise RuntimeError("boom")  # a failure on rank 1 is rank 0's to record
    assert not rd.status_path.exists() and not (rd.path / CLAIM_FILE).exists()
