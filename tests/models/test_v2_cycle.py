"""encoder.use_v2: SwinUNETR v2 is pretrained, fine-tuned and exported by medssl, and MONAI's
``SwinUNETR(use_v2=True)`` loads the export strictly."""

import pytest
import torch
from monai.networks.nets import SwinUNETR

from medssl.config import EncoderConfig, FinetuneConfig, MethodConfig, PreprocessConfig, PretrainConfig, ScheduleConfig
from medssl.data.corpus import ingest_corpus
from medssl.data.synth import synth_corpus, synth_task
from medssl.export import export_monai
from medssl.runs import RunDir
from medssl.train.finetune import run_finetune
from medssl.train.pretrain import run_pretrain

V2 = EncoderConfig(preset="tiny", window_size=4, use_v2=True)
PRE = PreprocessConfig(spacing=(4.0, 4.0, 4.0))


@pytest.mark.slow
def test_v2_pretrains_fine_tunes_and_exports_for_monai(tmp_path):
    synth_corpus(tmp_path / "scans", 2, seed=3, shape=(40, 40, 40))
    corpus = ingest_corpus(tmp_path / "scans", tmp_path / "corpus", PRE).root
    pretrain = PretrainConfig(
        method=MethodConfig(name="simmim"),
        encoder=V2,
        corpus=corpus,
        crop_size=32,
        preprocess=PRE,
        schedule=ScheduleConfig(steps=2, batch_size=1, warmup_steps=0, log_every=1),
    )
    encoder_path = RunDir(tmp_path / "pt").path / run_pretrain(pretrain, tmp_path / "pt")["encoder"]
    state = torch.load(encoder_path, weights_only=True)
    assert any(k.startswith("layers4c.") for k in state["encoder"]) and state["meta"]["encoder"]["use_v2"]

    exported = export_monai(encoder_path, tmp_path / "monai.pt")
    assert "use_v2=True" in exported.constructor()
    net = SwinUNETR(in_channels=1, out_channels=3, feature_size=12, window_size=4, use_v2=True)
    weights = torch.load(tmp_path / "monai.pt", weights_only=True)
    net.swinViT.load_state_dict({k[len("swinViT.") :]: v for k, v in weights.items()}, strict=True)

    task = synth_task(tmp_path / "task", "ct_organs", 3, seed=2, shape=(32, 32, 32))
    finetune = FinetuneConfig(
        task=task,
        encoder_checkpoint=encoder_path,
        budget=1,
        crop_size=32,
        n_test=1,
        n_val=1,
        val_every=2,
        preprocess=PRE,
        schedule=ScheduleConfig(steps=2, batch_size=1, warmup_steps=0, log_every=1),
    )
    results = run_finetune(finetune, tmp_path / "ft")
    assert results["steps_run"] == 2
    n = len(state["encoder"])
    assert f"loaded {n}/{n} encoder tensors" in (tmp_path / "ft" / "log.txt").read_text()
    assert "axis order: same" in (tmp_path / "ft" / "log.txt").read_text()
