"""The training loop: DDP (2 gloo processes) matches one process; resume reproduces the run."""

import json

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medssl.config import EncoderConfig, MethodConfig, ScheduleConfig
from medssl.methods import build_method
from medssl.models import SwinEncoder
from medssl.runs import RunDir
from medssl.train.distributed import DistInfo, init_distributed
from medssl.train.loop import train

TINY = EncoderConfig(preset="tiny", window_size=4)


class ToyRegions(torch.utils.data.Dataset):
    """Deterministic per index, like the real datasets: sample i is the same in any process."""

    def __init__(self, make_views, size=32, interrupt_at=None):
        self.make_views, self.size, self.interrupt_at = make_views, size, interrupt_at

    def __len__(self):
        return 10**6

    def __getitem__(self, i):
        if self.interrupt_at is not None and i == self.interrupt_at:
            self.interrupt_at = None
            raise KeyboardInterrupt
        rng = np.random.default_rng([7, i])
        region = torch.from_numpy(rng.random((1, self.size, self.size, self.size), dtype=np.float32))
        return self.make_views(region, rng)


def _method(steps):
    torch.manual_seed(0)
    return build_method(MethodConfig(name="simmim"), SwinEncoder(TINY), crop_size=32, total_steps=steps)


def _schedule(steps, batch=2, **kw):
    return ScheduleConfig(steps=steps, batch_size=batch, lr=1e-3, warmup_steps=1, checkpoint_every=2, log_every=1, **kw)


def _ddp_worker(rank, world, init_file, run_path, steps):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        info = init_distributed(device="cpu")
        assert info.world_size == world and info.rank == rank
        method = _method(steps)
        train(method, ToyRegions(method.make_views), _schedule(steps), RunDir(run_path), info)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_gloo_ddp_matches_single_process(tmp_path):
    steps = 2
    single = _method(steps)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    train(single, ToyRegions(single.make_views), _schedule(steps), RunDir(tmp_path / "single"), info)

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, tmp_path / "init", tmp_path / "ddp", steps)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
        assert p.exitcode == 0
    ddp_state = torch.load(tmp_path / "ddp" / "checkpoints" / "last.pt", weights_only=True)["model"]
    for k, v in single.state_dict().items():
        torch.testing.assert_close(ddp_state[k], v, rtol=1e-4, atol=2e-5, msg=k)
    single_losses = [r["loss"] for r in RunDir(tmp_path / "single").read_metrics()]
    ddp_losses = [r["loss"] for r in RunDir(tmp_path / "ddp").read_metrics()]
    np.testing.assert_allclose(ddp_losses, single_losses, rtol=1e-4)


def test_resume_after_interruption_reproduces_uninterrupted_run(tmp_path):
    steps = 5
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    reference = _method(steps)
    train(reference, ToyRegions(reference.make_views), _schedule(steps), RunDir(tmp_path / "ref"), info)

    run = RunDir(tmp_path / "interrupted")
    first = _method(steps)
    # sample 6 belongs to step 3 (0-based, batch 2): the checkpoint of step 2 is on disk by then
    with pytest.raises(KeyboardInterrupt):
        train(first, ToyRegions(first.make_views, interrupt_at=6), _schedule(steps), run, info)
    assert torch.load(run.last_checkpoint, weights_only=True)["step"] == 2
    resumed = _method(steps)  # a fresh process: weights come from the checkpoint
    result = train(resumed, ToyRegions(resumed.make_views), _schedule(steps), run, info)
    assert result.resumed_from == 2
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=1e-6, msg=k)
    ref_log = [(r["step"], r["loss"]) for r in RunDir(tmp_path / "ref").read_metrics()]
    got_log = [(r["step"], r["loss"]) for r in run.read_metrics()]
    assert [s for s, _ in got_log] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([v for _, v in got_log], [v for _, v in ref_log], rtol=1e-6)


def test_non_finite_loss_stops_with_clear_error(tmp_path):
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    method = _method(2)

    def nan_views(region, rng):
        views = method.make_views(region, rng)
        views["image"] = views["image"] * float("nan")
        return views

    from medssl.train.loop import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match="at step 1"):
        train(method, ToyRegions(nan_views), _schedule(2), RunDir(tmp_path / "nan"), info)


def test_metrics_are_json_lines(tmp_path):
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    method = _method(2)
    train(method, ToyRegions(method.make_views), _schedule(2), RunDir(tmp_path / "r"), info)
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    assert [r["step"] for r in records] == [1, 2]
    assert {"loss", "lr", "reconstruction_l1", "grad_norm"} <= set(records[0])


def test_kill_before_the_first_checkpoint_logs_no_step_twice(tmp_path):
    """Killed at step 2 of 5 with no checkpoint yet: the restart begins at step 0 and drops what was
    logged, in metrics.jsonl and in the TensorBoard events alike."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = 5
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    schedule = _schedule(steps).model_copy(update={"checkpoint_every": 4})
    run = RunDir(tmp_path / "killed")
    first = _method(steps)
    with pytest.raises(KeyboardInterrupt):  # sample 4 belongs to step 2 (0-based): steps 1 and 2 are logged
        train(first, ToyRegions(first.make_views, interrupt_at=4), schedule, run, info)
    assert not run.last_checkpoint.exists() and [r["step"] for r in run.read_metrics()] == [1, 2]
    restarted = RunDir(tmp_path / "killed")  # a fresh process
    result = train(_method(steps), ToyRegions(_method(steps).make_views), schedule, restarted, info)
    assert result.resumed_from == 0
    assert [r["step"] for r in restarted.read_metrics()] == [1, 2, 3, 4, 5]
    restarted.close_tensorboard()
    events = EventAccumulator(str(restarted.tensorboard_dir))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4, 5]


def test_batch_size_beyond_the_limit_is_refused_before_a_crop_is_drawn(tmp_path):
    from medssl.errors import MedsslInputError
    from medssl.limits import set_limits

    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    method = _method(1)

    class NeverRead(ToyRegions):
        def __getitem__(self, i):
            raise AssertionError("no sample may be read")

    with pytest.raises(MedsslInputError, match=r"schedule.batch_size 100,000 exceeds the limit 1,024: every crop"):
        train(method, NeverRead(method.make_views), _schedule(1, batch=100_000), RunDir(tmp_path / "b"), info)
    previous = set_limits({"batch_size": 200_000})
    try:  # the run's own limits decide (a run's entry point puts its config's limits in force)
        with pytest.raises(AssertionError, match="no sample may be read"):
            train(method, NeverRead(method.make_views), _schedule(1, batch=100_000), RunDir(tmp_path / "c"), info)
    finally:
        set_limits(previous)


def test_a_full_disk_names_the_file_it_could_not_write(tmp_path, monkeypatch):
    """torch.save into a full disk raises OSError(ENOSPC) naming the checkpoint, not torch's
    "PytorchStreamWriter failed"; the metrics written before stay."""
    import errno
    import os

    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    real_save = torch.save

    def save_to_a_full_disk(obj, f, *args, **kwargs):
        with open("/dev/full", "wb") as full:
            real_save(obj, full, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_to_a_full_disk)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    method = _method(2)
    run = RunDir(tmp_path / "full")
    with pytest.raises(OSError) as caught:
        train(method, ToyRegions(method.make_views), _schedule(2), run, info)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(run.last_checkpoint)
    assert [r["step"] for r in run.read_metrics()] == [1, 2]
    assert not list(run.checkpoint_dir.glob("*")), "no partial checkpoint or temporary is left"
