"""Pretraining every registered method through ``run_pretrain`` on a synthetic corpus, and fine-tuning
through ``run_finetune``: the whole path from NIfTI files to results.json."""

import math

import pytest
import torch

from medssl.config import EncoderConfig, FinetuneConfig, MethodConfig, PreprocessConfig, PretrainConfig, ScheduleConfig
from medssl.data.corpus import ingest_corpus
from medssl.data.synth import synth_corpus, synth_task
from medssl.methods import REGISTRY
from medssl.models import SwinSegmenter, load_encoder
from medssl.models.checkpoint import load_encoder_state
from medssl.runs import RunDir
from medssl.train.finetune import run_finetune
from medssl.train.pretrain import run_pretrain

TINY = EncoderConfig(preset="tiny", window_size=4)
PRE = PreprocessConfig(spacing=(4.0, 4.0, 4.0))
# Small heads keep the suite fast; the published sizes are the defaults (configs/methods/*.yaml).
SMALL_HEADS = {
    "simclr": {"proj_hidden_dim": 256, "proj_dim": 64},
    "mocov3": {"proj_hidden_dim": 256, "proj_dim": 64, "pred_hidden_dim": 256},
    "byol": {"proj_hidden_dim": 256, "proj_dim": 64, "pred_hidden_dim": 256},
    "dino": {"out_dim": 512, "hidden_dim": 256, "bottleneck_dim": 64},
    "ibot": {"out_dim": 512, "hidden_dim": 256, "bottleneck_dim": 64},
    "smit": {"out_dim": 512, "hidden_dim": 256, "bottleneck_dim": 64},
    "swinunetr_ssl": {"head_input": "pooled"},  # 32^3 crops have one bottleneck token (no tokens 0 and 1)
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    synth_corpus(root / "scans", 3, seed=3, shape=(40, 40, 40))
    return ingest_corpus(root / "scans", root / "corpus", PRE).root


def _options(name):
    return SMALL_HEADS.get(name, {})


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_method_pretrains_and_its_encoder_loads_into_the_segmenter(name, corpus, tmp_path):
    cfg = PretrainConfig(
        method=MethodConfig(name=name, options=_options(name)),
        encoder=TINY,
        corpus=corpus,
        crop_size=32,
        preprocess=PRE,
        schedule=ScheduleConfig(steps=3, batch_size=2, lr=5e-4, warmup_steps=1, log_every=1),
    )
    results = run_pretrain(cfg, tmp_path / name)
    run = RunDir(tmp_path / name)
    assert run.is_finished()
    losses = [r["loss"] for r in run.read_metrics()]
    if REGISTRY[name].trains:
        assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
        assert results["final_loss"] == pytest.approx(losses[-1])
        # A short healthy run is assessed and not flagged (tests/train/test_health_verdict.py: the collapsed ones)
        assert results["health"]["assessed"] and not results["health"]["collapsed"], results["health"]["reason"]
    else:
        assert losses == [] and results["steps"] == 0
    encoder, meta = load_encoder(run.path / results["encoder"])
    assert meta["method"] == name and meta["family"] == REGISTRY[name].family
    assert meta["spacing"] == [4.0, 4.0, 4.0]
    seg = SwinSegmenter(encoder.config, out_channels=3, crop_size=32)
    report = load_encoder_state(seg, encoder.state_dict(), prefix="swinViT.")
    assert report.loaded == report.expected == len(encoder.state_dict())
    assert torch.equal(seg.swinViT.patch_embed.proj.weight, encoder.patch_embed.proj.weight)


def test_finetune_writes_results_and_is_not_rerun(corpus, tmp_path):
    task = synth_task(tmp_path / "task", "ct_organs", 6, seed=5, shape=(32, 32, 32))
    cfg = FinetuneConfig(
        task=task,
        encoder=TINY,
        budget=2,
        crop_size=32,
        preprocess=PRE,
        val_every=2,
        n_test=2,
        n_val=1,
        schedule=ScheduleConfig(steps=2, batch_size=2, lr=1e-3, warmup_steps=0),
    )
    results = run_finetune(cfg, tmp_path / "ft")
    assert results["method"] == "none" and results["n_train"] == 2 and results["budget"] == "2"
    assert len(results["val_curve"]) == 1 and results["val_curve"][0]["step"] == 2
    structures = {r["structure"] for r in results["cases"]}
    assert structures <= {"liver", "spleen", "kidney", "stomach", "aorta"} and structures
    for row in results["cases"]:
        assert 0.0 <= row["dice"] <= 1.0
    mtime = (tmp_path / "ft" / "results.json").stat().st_mtime_ns
    assert run_finetune(cfg, tmp_path / "ft") == results
    assert (tmp_path / "ft" / "results.json").stat().st_mtime_ns == mtime


def test_segmentation_losses_are_monais() -> None:
    from monai.losses import DiceCELoss, DiceLoss

    from medssl.train.finetune import SegmentationModule

    model = SwinSegmenter(TINY, out_channels=3, crop_size=32)
    batch = {"image": torch.randn(1, 1, 32, 32, 32), "label": torch.randint(0, 3, (1, 1, 32, 32, 32))}
    with torch.no_grad():
        logits = model(batch["image"])
        for name, reference in (("dice_ce", DiceCELoss), ("dice", DiceLoss)):
            got = SegmentationModule(model, name)(batch, step=0)["loss"]
            assert torch.allclose(got, reference(to_onehot_y=True, softmax=True)(logits, batch["label"]))
    with pytest.raises(ValueError, match="unknown segmentation loss 'focal'"):
        SegmentationModule(model, "focal")


def test_pretrained_weights_reach_the_segmenter_and_preprocessing_is_compared(corpus, tmp_path):
    """The transfer chain end to end: a pretrained encoder's tensors all land in the segmenter, change its
    first outputs against random init of the same seed, and the run records whether the corpus and the task
    were resampled and scaled alike (issue 8: a mismatch would silently erase what was learned)."""
    pre = PretrainConfig(
        method=MethodConfig(name="simmim"),
        encoder=TINY,
        corpus=corpus,
        crop_size=32,
        preprocess=PRE,
        schedule=ScheduleConfig(steps=2, batch_size=2, lr=5e-4, warmup_steps=0, log_every=1),
    )
    checkpoint = RunDir(tmp_path / "pt").path / run_pretrain(pre, tmp_path / "pt")["encoder"]
    task = synth_task(tmp_path / "task", "ct_organs", 5, seed=6, shape=(32, 32, 32))
    common = dict(task=task, encoder=TINY, budget=1, crop_size=32, val_every=1, n_test=1, n_val=1)
    schedule = ScheduleConfig(steps=1, batch_size=1, lr=1e-3, warmup_steps=0)
    run_finetune(
        FinetuneConfig(**common, encoder_checkpoint=checkpoint, preprocess=PRE, schedule=schedule), tmp_path / "ft"
    )
    info = RunDir(tmp_path / "ft").info()
    assert info["pretraining_preprocessing"] == {"spacing": "same", "intensity": "same"}
    log = (tmp_path / "ft" / "log.txt").read_text()
    encoder, _ = load_encoder(checkpoint)
    n = len(encoder.state_dict())
    assert f"{n}/{n}" in log and "spacing same, intensity same" in log
    # A task resampled to another spacing is run, but the disagreement is named in run.json.
    other = PreprocessConfig(spacing=(3.0, 3.0, 3.0))
    run_finetune(
        FinetuneConfig(**common, encoder_checkpoint=checkpoint, preprocess=other, schedule=schedule), tmp_path / "ft3"
    )
    spacing = RunDir(tmp_path / "ft3").info()["pretraining_preprocessing"]["spacing"]
    assert spacing.startswith("differs") and "[4.0, 4.0, 4.0]" in spacing and "[3.0, 3.0, 3.0]" in spacing
    # First outputs: the loaded segmenter differs from random init of the same seed.
    torch.manual_seed(0)
    scratch = SwinSegmenter(TINY, out_channels=6, crop_size=32)
    torch.manual_seed(0)
    loaded = SwinSegmenter(TINY, out_channels=6, crop_size=32)
    load_encoder_state(loaded, encoder.state_dict(), prefix="swinViT.")
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(scratch(x), loaded(x))
        assert torch.equal(
            loaded.swinViT.layers4[0].blocks[0].attn.qkv.weight, encoder.layers4[0].blocks[0].attn.qkv.weight
        )
