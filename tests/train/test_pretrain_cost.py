"""The measured pretraining cost: FLOPs of one step (forward + backward) that leave the method untouched,
and the cost entry every pretraining run writes into results.json."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from medssl.config import EncoderConfig, MethodConfig, PreprocessConfig, PretrainConfig, ScheduleConfig
from medssl.data.corpus import Corpus, ingest_corpus
from medssl.data.datasets import PretrainRegionDataset
from medssl.data.synth import synth_corpus
from medssl.methods import build_method
from medssl.models.encoder import SwinEncoder
from medssl.results import pretrain_table
from medssl.train.cost import step_flops
from medssl.train.distributed import DistInfo
from medssl.train.pretrain import run_pretrain

TINY = EncoderConfig(preset="tiny", window_size=4)
PRE = PreprocessConfig(spacing=(4.0, 4.0, 4.0))
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    synth_corpus(root / "scans", 2, seed=3, shape=(40, 40, 40))
    return ingest_corpus(root / "scans", root / "corpus", PRE).root


def test_step_flops_counts_forward_and_backward_and_leaves_no_trace(corpus):
    torch.manual_seed(0)
    options = {"out_dim": 256, "hidden_dim": 128, "bottleneck_dim": 32, "n_local_crops": 0}
    method = build_method(MethodConfig(name="dino", options=options), SwinEncoder(TINY), 32, 10)
    dataset = PretrainRegionDataset(Corpus.open(corpus), method.region_size(32), method.make_views, seed=0)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    rng = torch.random.get_rng_state()
    flops = step_flops(method, dataset, 2, CPU)
    after = method.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # DINO's centre included
    assert torch.equal(rng, torch.random.get_rng_state())
    assert all(p.grad is None for p in method.parameters())
    batch = torch.utils.data.default_collate([dataset[0], dataset[1]])
    with FlopCounterMode(display=False) as forward_only, torch.no_grad():
        method(batch, 0)
    method.load_state_dict(before)
    assert 2 * forward_only.get_total_flops() < flops < 4 * forward_only.get_total_flops()  # backward ~ 2x forward


def test_pretraining_records_its_cost(corpus, tmp_path):
    cfg = PretrainConfig(
        method=MethodConfig(name="simmim"),
        encoder=TINY,
        corpus=corpus,
        crop_size=32,
        preprocess=PRE,
        schedule=ScheduleConfig(steps=2, batch_size=2, warmup_steps=0, log_every=1),
    )
    results = run_pretrain(cfg, tmp_path / "runs" / "pretrain-simmim")
    cost = json.loads((tmp_path / "runs" / "pretrain-simmim" / "results.json").read_text())["cost"]
    assert cost == results["cost"]
    assert cost["flops_per_step"] > 1e8 and cost["total_flops"] == 2 * cost["flops_per_step"]
    assert cost["peak_memory_kind"] == "cpu_peak_rss" and cost["peak_memory_bytes"] > 2**20
    assert 0 < cost["device_hours"] == pytest.approx(cost["wall_seconds"] / 3600)
    row = pretrain_table(tmp_path / "runs").iloc[0]
    assert row["flops_per_step"] == cost["flops_per_step"] and row["device_kind"] == "cpu"
