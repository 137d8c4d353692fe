"""Pretraining with DataLoader workers inside a spawned process, as the bench's local executor runs it
(the demo pretrains with ``num_workers: 1``): the workers are forked on Linux, so the method (whose
weight-normalised heads do not pickle) never has to travel by pickle."""

import multiprocessing

import pytest

from medssl.config import EncoderConfig, MethodConfig, PreprocessConfig, PretrainConfig, ScheduleConfig
from medssl.data.corpus import ingest_corpus
from medssl.data.synth import synth_corpus
from medssl.runs import RunDir
from medssl.train.pretrain import run_pretrain

TINY = EncoderConfig(preset="tiny", window_size=4)
PRE = PreprocessConfig(spacing=(4.0, 4.0, 4.0))
SMALL = {"dino": {"out_dim": 64, "hidden_dim": 64, "bottleneck_dim": 32, "n_local_crops": 2}}


def _pretrain(config: PretrainConfig, out: str) -> None:
    run_pretrain(config, out)


@pytest.mark.parametrize("name", ["simmim", "dino"])  # DINO: a weight-normalised head, which does not pickle
def test_pretraining_with_a_loader_worker_in_a_spawned_process(name, tmp_path):
    synth_corpus(tmp_path / "scans", 2, seed=4, shape=(32, 32, 32))
    corpus = ingest_corpus(tmp_path / "scans", tmp_path / "corpus", PRE).root
    config = PretrainConfig(
        method=MethodConfig(name=name, options=SMALL.get(name, {})),
        encoder=TINY,
        corpus=corpus,
        crop_size=32,
        preprocess=PRE,
        schedule=ScheduleConfig(steps=2, batch_size=2, warmup_steps=0, log_every=1, num_workers=1),
    )
    process = multiprocessing.get_context("spawn").Process(target=_pretrain, args=(config, str(tmp_path / "run")))
    process.start()
    process.join(300)
    assert process.exitcode == 0, RunDir(tmp_path / "run").status()
    assert RunDir(tmp_path / "run").is_finished()
