"""External encoders in: MONAI SwinUNETR state dicts (v1 and v2), research-contributions' model_swinvit.pt,
MONAI's ~50k-volume SSL weights and SuPreM, each built here from MONAI's own modules in its published layout
(nothing downloaded), with the encoder config rebuilt from the shapes, full coverage or exit 2, and a row of
their own."""

import hashlib
import json
import re
import sys

import pytest
import torch
import yaml
from monai.networks.nets import SwinUNETR

from medssl import cli
from medssl.analysis.cka_run import run_cka
from medssl.bench.plan import expand_plan
from medssl.config import CKARunConfig, EncoderConfig, load_bench_config
from medssl.data.synth import synth_task
from medssl.errors import MedsslInputError
from medssl.models import load_encoder, read_encoder_checkpoint
from medssl.models.encoder import MASK_TOKEN_KEY, SwinEncoder
from medssl.models.foreign import import_external_encoder

TINY = EncoderConfig(preset="tiny", window_size=4)


def _monai_state(feature_size=12, **kwargs) -> dict:
    torch.manual_seed(0)
    net = SwinUNETR(in_channels=1, out_channels=3, feature_size=feature_size, spatial_dims=3, **kwargs)
    return net.state_dict()


def _research_contributions_layout(encoder: SwinEncoder) -> dict:
    """model_swinvit.pt as SwinUNETR/BTCV/main.py and MONAI's load_from read it: ``module.`` keys, MLPs
    named fc1/fc2, under ``state_dict`` beside the training state, plus the SSL heads."""
    state = {}
    for key, value in encoder.state_dict().items():
        if key == MASK_TOKEN_KEY:
            continue
        state["module." + key.replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2.")] = value
    state["module.rotation_head.weight"] = torch.zeros(4, 16 * encoder.config.feature_size)
    state["module.contrastive_head.weight"] = torch.zeros(512, 16 * encoder.config.feature_size)
    return {"epoch": 100, "state_dict": state}


def run_cli(args, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["medssl", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.mark.parametrize(("wrap", "feature_size"), [("plain", 48), ("module", 12), ("state_dict", 12), ("net", 12)])
def test_a_monai_swinunetr_state_dict_is_read_with_its_config_from_the_shapes(tmp_path, wrap, feature_size):
    state = _monai_state(feature_size)
    payload = {
        "plain": state,
        "module": {"module." + k: v for k, v in state.items()},
        "state_dict": {"state_dict": state, "epoch": 3},
        "net": {"net": state},
    }[wrap]
    path = tmp_path / "swin_unetr.pt"
    torch.save(payload, path)
    encoder, meta = load_encoder(path)
    config = encoder.config
    assert (config.feature_size, config.depths, config.num_heads, config.window_size) == (
        feature_size,
        (2,) * 4,
        (3, 6, 12, 24),
        7,
    )
    assert config.preset == ("base" if feature_size == 48 else "tiny")
    assert config.in_channels == 1 and config.patch_size == 2
    assert meta["method"] == "external-swin_unetr" and meta["family"] == "external"
    source = meta["source"]
    n = len([k for k in state if k.startswith("swinViT.")])
    assert source["coverage"] == f"{n}/{n} encoder tensors" and source["layout"] == "MONAI SwinUNETR"
    assert source["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert source["ignored_tensors"] == len(state) - n  # the decoder
    for key, value in encoder.state_dict().items():
        if key != MASK_TOKEN_KEY:
            assert torch.equal(value, state["swinViT." + key]), key


def test_research_contributions_model_swinvit_layout_is_read_and_renamed(tmp_path):
    torch.manual_seed(1)
    source = SwinEncoder(TINY)
    path = tmp_path / "model_swinvit.pt"
    torch.save(_research_contributions_layout(source), path)
    encoder, meta = load_encoder(path)
    assert encoder.config.window_size == 4 and encoder.config.preset == "tiny"
    assert meta["source"]["layout"] == "research-contributions model_swinvit"
    assert meta["source"]["ignored_tensors"] == 2  # rotation and contrastive heads
    assert meta["method"] == "external-model_swinvit"
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(encoder(x)[-1], source(x)[-1])


def test_missing_or_misshaped_tensors_and_v2_encoders_fail_with_one_line(tmp_path):
    state = _monai_state(12)
    missing = {k: v for k, v in state.items() if k != "swinViT.layers2.0.blocks.1.attn.qkv.weight"}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(MedsslInputError, match=r"missing 1 encoder tensors \(125/126 encoder tensors present\): lay"):
        read_encoder_checkpoint(tmp_path / "missing.pt")
    bad = dict(state)
    bad["swinViT.layers3.0.blocks.0.mlp.linear1.weight"] = torch.zeros(3, 3)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(MedsslInputError, match="layers3.0.blocks.0.mlp.linear1.weight' has shape"):
        read_encoder_checkpoint(tmp_path / "bad.pt")
    two = {**{"student." + k: v for k, v in state.items()}, **{"teacher." + k: v for k, v in state.items()}}
    torch.save(two, tmp_path / "two.pt")
    with pytest.raises(MedsslInputError, match="holds 2 Swin encoders"):
        read_encoder_checkpoint(tmp_path / "two.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "junk.pt")
    with pytest.raises(MedsslInputError, match="no Swin encoder"):
        read_encoder_checkpoint(tmp_path / "junk.pt")


def test_finetune_cli_takes_a_monai_state_dict_and_exits_2_when_a_tensor_is_missing(tmp_path, capsys, monkeypatch):
    task = synth_task(tmp_path / "task", "ct_organs", 4, seed=2, shape=(32, 32, 32))
    state = _monai_state(12)
    torch.save(state, tmp_path / "monai.pt")
    common = [
        "--task",
        task,
        "--budget",
        "1",
        "crop_size=32",
        "n_test=1",
        "n_val=1",
        "val_every=1",
        "schedule.steps=1",
        "schedule.warmup_steps=0",
        "preprocess.spacing=[4,4,4]",
    ]
    code, out, err = run_cli(
        ["finetune", "--encoder", tmp_path / "monai.pt", "--out", tmp_path / "ft", *common], capsys, monkeypatch
    )
    assert code == 0, err
    results = json.loads((tmp_path / "ft" / "results.json").read_text())
    info = json.loads((tmp_path / "ft" / "run.json").read_text())
    assert results["method"] == "external-monai" and results["family"] == "external"
    assert results["encoder_source"]["sha256"] == info["encoder_source"]["sha256"]
    n = len([k for k in state if k.startswith("swinViT.")])
    assert f"{n}/{n} encoder tensors" in (tmp_path / "ft" / "log.txt").read_text()

    torch.save({k: v for k, v in state.items() if "patch_embed.proj.bias" not in k}, tmp_path / "broken.pt")
    code, out, err = run_cli(
        ["finetune", "--encoder", tmp_path / "broken.pt", "--out", tmp_path / "ft2", *common], capsys, monkeypatch
    )
    assert code == 2
    assert err.strip().count("\n") == 0 and "broken.pt" in err and "patch_embed.proj.bias" in err


def test_cka_accepts_an_external_encoder(tmp_path):
    task = synth_task(tmp_path / "task", "ct_organs", 2, seed=2, shape=(32, 32, 32))
    torch.save({"state_dict": _monai_state(12)}, tmp_path / "monai.pt")
    config = CKARunConfig(
        model_a=tmp_path / "monai.pt", model_b=tmp_path / "monai.pt", task=task, n_crops=2, max_tokens=8
    )
    results = run_cka(config, tmp_path / "cka")
    assert results["model_a_kind"] == "external" and results["method"] == "external-monai"
    assert all(v == pytest.approx(1.0) for v in results["reuse"].values())


def test_bench_external_encoders_become_their_own_rows(tmp_path):
    torch.save(_monai_state(12), tmp_path / "published.pt")
    bench = {
        "name": "t",
        "tasks": [{"path": "synth:ct_organs"}],
        "methods": ["none"],
        "encoder": {"preset": "tiny"},
        "finetune": {"crop_size": 32, "n_test": 3, "n_val": 2},
        "external_encoders": [{"name": "swinunetr_btcv", "path": "published.pt"}],
    }
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(bench))
    plan = expand_plan(load_bench_config(tmp_path / "bench.yaml"), tmp_path / "out")
    external = [r for r in plan.stage("finetune") if r.labels["method"] == "external-swinunetr_btcv"]
    assert len(external) == 1 and external[0].labels["family"] == "external" and external[0].depends_on == []
    checkpoint = external[0].config.encoder_checkpoint
    assert checkpoint.parent == tmp_path / "out" / "external"
    assert read_encoder_checkpoint(checkpoint)[1]["method"] == "external-swinunetr_btcv"
    assert [r.labels["comparison"] for r in plan.stage("cka")] == ["pretrained_vs_finetuned"]
    assert (
        import_external_encoder(tmp_path / "published.pt", "swinunetr_btcv", tmp_path / "out" / "external")
        == checkpoint
    )  # converted once, named by the source's hash


# --------------------------------------------------------------------------- the published layouts


def _ssl_50k_layout(state: dict) -> dict:
    """MONAI's SwinUNETR pretrained on ~50k CT/MR (Project-MONAI/tutorials swinunetr_pretrained): the whole
    network under ``model``; the encoder as ``encoder.*`` with one more ``.0`` per stage (what MONAI's
    ``filter_swinunetr`` and the tutorial's renaming undo), a final ``encoder.norm``, a (1, 1, C) mask token."""
    model = {}
    for key, value in state.items():
        if key.startswith("swinViT."):
            name = re.sub(r"^layers([1-4])\.0\.", r"layers\1.0.0.", key[len("swinViT.") :])
            model["encoder." + name] = value
        else:
            model[key] = value  # encoder1.., decoder.., out: MONAI's own names
    c = state["swinViT.patch_embed.proj.weight"].shape[0]
    model["encoder.mask_token"] = torch.full((1, 1, c), 0.5)
    model["encoder.norm.weight"], model["encoder.norm.bias"] = torch.ones(16 * c), torch.zeros(16 * c)
    return {"model": model, "epoch": 300}


def _suprem_layout(state: dict) -> dict:
    """SuPreM (MrGiovanni/SuPreM): ``torch.load(...)["net"]`` with ``module.backbone.*`` keys beside its heads."""
    net = {"module.backbone." + k: v for k, v in state.items()}
    net["module.organ_embedding"] = torch.zeros(32, 256)
    net["module.precls_conv.0.weight"] = torch.zeros(8, 48, 1, 1, 1)
    return {"net": net, "epoch": 2100}


def _v2_layout(state: dict) -> dict:
    """SwinUNETR v2 as VoCo and Large-Scale-Medical ship it: ``SwinUNETR(use_v2=True).state_dict()``, DDP keys."""
    return {"module." + k: v for k, v in state.items()}


LAYOUTS = {
    "ssl_50k": (_ssl_50k_layout, False, "MONAI SwinUNETR SSL-pretrained"),
    "suprem": (_suprem_layout, False, "SuPreM"),
    "v2": (_v2_layout, True, "MONAI SwinUNETR v2"),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_published_layouts_are_found_from_the_tensors_with_every_encoder_tensor(tmp_path, layout):
    make, v2, name = LAYOUTS[layout]
    state = _monai_state(12, use_v2=v2)
    path = tmp_path / f"{layout}.pt"
    torch.save(make(state), path)
    encoder, meta = load_encoder(path)
    assert encoder.config.use_v2 is v2 and encoder.config.feature_size == 12
    swin = {k[len("swinViT.") :]: v for k, v in state.items() if k.startswith("swinViT.")}
    assert meta["source"]["layout"].startswith(name)
    assert meta["source"]["coverage"] == f"{len(swin)}/{len(swin)} encoder tensors"
    assert meta["source"]["axis_order"] == "unchecked"
    for key, value in encoder.state_dict().items():
        if key != MASK_TOKEN_KEY:
            assert torch.equal(value, swin[key]), key
    if layout == "ssl_50k":  # its mask token, reshaped to medssl's (1, C, 1, 1, 1); its final norm left out
        assert torch.equal(encoder.mask_token, torch.full((1, 12, 1, 1, 1), 0.5))
        assert meta["source"]["mask_token"] == "from the source"
    # the same network's outputs: MONAI's swinViT on the same weights
    reference = SwinUNETR(in_channels=1, out_channels=3, feature_size=12, use_v2=v2)
    reference.load_state_dict(state)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(encoder.eval()(x)[-1], reference.swinViT(x)[-1], atol=1e-5)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_a_missing_or_misshaped_tensor_in_each_layout_exits_2_with_one_line(tmp_path, layout, capsys, monkeypatch):
    make, v2, _ = LAYOUTS[layout]
    state = _monai_state(12, use_v2=v2)
    victim = "swinViT.layers1c.0.layer.conv2.conv.weight" if v2 else "swinViT.layers2.0.blocks.1.mlp.linear2.bias"
    torch.save(make({k: v for k, v in state.items() if k != victim}), tmp_path / "missing.pt")
    code, _, err = run_cli(["export", tmp_path / "missing.pt", "--out", tmp_path / "x.pt"], capsys, monkeypatch)
    assert code == 2 and err.count("\n") == 1 and "missing.pt" in err
    assert victim[len("swinViT.") :] in err and "encoder tensors present" in err
    torch.save(make({**state, victim: torch.zeros(3)}), tmp_path / "shape.pt")
    code, _, err = run_cli(["export", tmp_path / "shape.pt", "--out", tmp_path / "x.pt"], capsys, monkeypatch)
    assert code == 2 and err.count("\n") == 1 and "shape.pt" in err and "has shape (3,)" in err
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_layout_fine_tunes_with_every_encoder_tensor_taken(tmp_path, layout):
    """Issue 21's check: 2 fine-tuning steps from each layout, the log reporting N/N encoder tensors."""
    from medssl.config import FinetuneConfig, PreprocessConfig, ScheduleConfig
    from medssl.train.finetune import run_finetune

    make, v2, name = LAYOUTS[layout]
    state = _monai_state(12, use_v2=v2)
    torch.save(make(state), tmp_path / f"{layout}.pt")
    task = synth_task(tmp_path / "task", "ct_organs", 3, seed=2, shape=(32, 32, 32))
    config = FinetuneConfig(
        task=task,
        encoder_checkpoint=tmp_path / f"{layout}.pt",
        budget=1,
        crop_size=32,
        n_test=1,
        n_val=1,
        val_every=2,
        preprocess=PreprocessConfig(spacing=(4.0, 4.0, 4.0)),
        schedule=ScheduleConfig(steps=2, batch_size=1, warmup_steps=0, log_every=1),
    )
    results = run_finetune(config, tmp_path / "ft")
    assert results["steps_run"] == 2 and results["encoder_source"]["layout"].startswith(name)
    n = len([k for k in state if k.startswith("swinViT.")])
    log = (tmp_path / "ft" / "log.txt").read_text()
    assert f"loaded {n + 1}/{n + 1} encoder tensors" in log  # + the mask token
    assert f"{n}/{n} encoder tensors" in log
    assert "axis order: unchecked" in log


def test_an_external_encoder_may_declare_the_supervised_family(tmp_path):
    """SuPreM is supervised: its row carries family 'supervised' in the plan, the checkpoint and the report."""
    import pandas as pd

    from medssl.errors import ConfigError
    from medssl.report.tables import family_summary

    torch.save(_suprem_layout(_monai_state(12)), tmp_path / "suprem.pt")
    bench = {
        "name": "t",
        "tasks": [{"path": "synth:ct_organs"}],
        "methods": ["none"],
        "encoder": {"preset": "tiny"},
        "finetune": {"crop_size": 32, "n_test": 3, "n_val": 2},
        "cka": {"enabled": False},
        "external_encoders": [{"name": "suprem", "path": "suprem.pt", "family": "supervised"}],
    }
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(bench))
    plan = expand_plan(load_bench_config(tmp_path / "bench.yaml"), tmp_path / "out")
    (row,) = [r for r in plan.stage("finetune") if r.labels["method"] == "external-suprem"]
    assert row.labels["family"] == "supervised"
    assert "-supervised-" in row.config.encoder_checkpoint.name
    assert read_encoder_checkpoint(row.config.encoder_checkpoint)[1]["family"] == "supervised"
    bench["external_encoders"][0]["family"] = "pretrained"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bench))
    with pytest.raises(ConfigError, match="family"):
        load_bench_config(tmp_path / "bad.yaml")
    results = pd.DataFrame(
        {
            "method": ["simmim", "dino", "external-suprem", "none"],
            "family": ["mim", "distillation", "supervised", "none"],
            "task": ["t"] * 4,
            "budget": ["all"] * 4,
            "dice": [0.5, 0.4, 0.9, 0.3],
        }
    )
    table = family_summary(results)
    assert list(table.frame.index) == ["mim", "distillation", "supervised", "none"]
    assert "supervised, none: reference rows" in table.caption
