"""The representation-health verdict (methods/health.py) is calibrated: random init is not flagged, the two
deliberately collapsed runs are (constant embeddings; DINO without centring). Short healthy runs of every
method are checked in tests/train/test_entry_points.py, which already pretrains each one."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import default_collate

import medssl.train.pretrain as pretrain
from medssl.config import EncoderConfig, MethodConfig, PreprocessConfig, PretrainConfig, ScheduleConfig
from medssl.data.corpus import ingest_corpus
from medssl.data.datasets import PretrainRegionDataset
from medssl.data.synth import synth_corpus
from medssl.methods import REGISTRY, build_method
from medssl.methods.health import health_metrics
from medssl.methods.verdict import EMBEDDING_STD_FLOOR, TEACHER_BATCH_ENTROPY_FLOOR, health_verdict
from medssl.models.encoder import SwinEncoder
from medssl.train.pretrain import run_pretrain

TINY = EncoderConfig(preset="tiny", window_size=4)
PRE = PreprocessConfig(spacing=(4.0, 4.0, 4.0))
SMALL_HEADS = {
    "simclr": {"proj_hidden_dim": 256, "proj_dim": 64},
    "mocov3": {"proj_hidden_dim": 256, "proj_dim": 64, "pred_hidden_dim": 256},
    "byol": {"proj_hidden_dim": 256, "proj_dim": 64, "pred_hidden_dim": 256},
    "dino": {"out_dim": 512, "hidden_dim": 256, "bottleneck_dim": 64, "n_local_crops": 2},
    "ibot": {"out_dim": 512, "hidden_dim": 256, "bottleneck_dim": 64, "n_local_crops": 2},
    "smit": {"out_dim": 512, "hidden_dim": 256, "bottleneck_dim": 64},
    "swinunetr_ssl": {"head_input": "pooled"},  # 32^3 crops have one bottleneck token
}
TRAINING = sorted(name for name, cls in REGISTRY.items() if cls.trains)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    synth_corpus(root / "scans", 3, seed=3, shape=(40, 40, 40))
    return ingest_corpus(root / "scans", root / "corpus", PRE).root


def _as_records(out: dict[str, torch.Tensor]) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in out.items() if k.startswith("health/")}]


def test_verdict_on_known_cases() -> None:
    torch.manual_seed(0)
    healthy = [health_metrics(embedding=torch.randn(8, 32), teacher_probs=torch.softmax(torch.randn(8, 64), -1))]
    verdict = health_verdict([{k: float(v) for k, v in r.items()} for r in healthy])
    assert verdict["assessed"] and not verdict["collapsed"] and verdict["reasons"] == []
    assert set(verdict["thresholds"]) >= {"embedding_std_floor", "teacher_batch_entropy_floor"}

    constant = health_metrics(embedding=torch.randn(1, 32).repeat(8, 1))
    verdict = health_verdict([{k: float(v) for k, v in constant.items()}])
    assert verdict["collapsed"] and "one point" in verdict["reason"]

    one_prototype = torch.zeros(8, 64)
    one_prototype[:, 5] = 1.0
    verdict = health_verdict(_as_records(health_metrics(teacher_probs=one_prototype)))
    assert verdict["collapsed"] and "same prototype" in verdict["reason"]

    uniform_probs = torch.full((8, 64), 1 / 64)
    uniform = health_verdict(_as_records(health_metrics(teacher_probs=uniform_probs)))
    assert not uniform["collapsed"] and "near uniform" in uniform["warnings"][0]
    # A uniform teacher the student still differs from (KL 0.2 nats) is the early phase: a warning only; once
    # the student matches it (cross-entropy = log K, KL 0) it is DINO's uniform collapse.
    log_k = torch.tensor(64.0).log()
    early = health_verdict(_as_records(health_metrics(teacher_probs=uniform_probs, distillation_ce=log_k + 0.2)))
    assert not early["collapsed"] and early["final"]["health/teacher_student_kl"] == pytest.approx(0.2, abs=1e-5)
    matched = health_verdict(_as_records(health_metrics(teacher_probs=uniform_probs, distillation_ce=log_k)))
    assert matched["collapsed"] and "uniform collapse" in matched["reason"]
    # A student matching a peaked teacher (low entropy, KL 0) is what training aims at, not a collapse.
    peaked = torch.softmax(torch.randn(8, 64, generator=torch.Generator().manual_seed(1)) * 5, -1)
    ce = -(peaked * peaked.log()).sum(-1).mean()
    assert not health_verdict(_as_records(health_metrics(teacher_probs=peaked, distillation_ce=ce)))["collapsed"]

    assert health_verdict([{"step": 1, "loss": 1.0}]) == {**health_verdict([]), "assessed": False}
    # The tail mean: one collapsed log after healthy ones is not yet a verdict; three are.
    logs = [{"health/embedding_std_scaled": 0.5}] * 5
    assert not health_verdict([*logs, {"health/embedding_std_scaled": 0.0}])["collapsed"]
    assert health_verdict([*logs, *[{"health/embedding_std_scaled": 0.0}] * 3])["collapsed"]


@pytest.mark.parametrize("name", TRAINING)
def test_random_init_is_not_flagged(name, corpus) -> None:
    """The health a randomly initialised method logs at its first step (before any update)."""
    from medssl.data.corpus import Corpus

    torch.manual_seed(0)
    method = build_method(MethodConfig(name=name, options=SMALL_HEADS.get(name, {})), SwinEncoder(TINY), 32, 10)
    dataset = PretrainRegionDataset(Corpus.open(corpus), method.region_size(32), method.make_views, seed=0)
    method.train()
    with torch.no_grad():
        out = method(default_collate([dataset[0], dataset[1]]), 0)
    verdict = health_verdict(_as_records(out))
    assert verdict["assessed"], f"{name} logs no health/... values"
    assert not verdict["collapsed"], verdict["reason"]
    if "health/embedding_std_scaled" in verdict["final"]:
        assert verdict["final"]["health/embedding_std_scaled"] > 10 * EMBEDDING_STD_FLOOR
    if "health/teacher_batch_entropy_ratio" in verdict["final"]:
        assert verdict["final"]["health/teacher_batch_entropy_ratio"] > 2 * TEACHER_BATCH_ENTROPY_FLOOR
        # Every teacher-student method logs the KL its uniform-collapse check reads (Gibbs: never negative).
        assert verdict["final"]["health/teacher_student_kl"] > -1e-5


def _short_run(name: str, options: dict, corpus, out, steps: int = 4, lr: float = 5e-4) -> dict:
    cfg = PretrainConfig(
        method=MethodConfig(name=name, options={**SMALL_HEADS.get(name, {}), **options}),
        encoder=TINY,
        corpus=corpus,
        crop_size=32,
        preprocess=PRE,
        schedule=ScheduleConfig(steps=steps, batch_size=2, lr=lr, warmup_steps=1, log_every=1),
    )
    return run_pretrain(cfg, out)


class ConstantProjector(nn.Module):
    """A projector whose output ignores its input: every sample gets the same (learnable) embedding."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.randn(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value.expand(x.shape[0], -1) + 0.0 * x[:, :1]


def test_constant_embeddings_are_flagged(corpus, tmp_path, monkeypatch) -> None:
    build = pretrain.build_method

    def with_constant_projector(*args, **kwargs):
        method = build(*args, **kwargs)
        method.projector = ConstantProjector(64)
        return method

    monkeypatch.setattr(pretrain, "build_method", with_constant_projector)
    results = _short_run("simclr", {}, corpus, tmp_path / "constant", steps=3)
    health = results["health"]
    assert health["collapsed"] and "one point" in health["reason"]
    assert health["final"]["health/embedding_std_scaled"] < EMBEDDING_STD_FLOOR
    assert (tmp_path / "constant" / "results.json").read_text().count('"collapsed": true') == 1


def test_dino_without_centring_is_flagged(corpus, tmp_path) -> None:
    """DINO's sharpening without its centring puts every sample on one prototype. At the published lr and
    tau_t this takes longer than a test can run (measured: batch-mean entropy 0.39 log K after 20 steps, see
    TEACHER_BATCH_ENTROPY_FLOOR), so the run is driven hard: tau_t 0.02, teacher momentum 0.9, lr 5e-3."""
    if "centre" not in REGISTRY["dino"].Params.model_fields:
        pytest.skip("DINO has no centre option in this tree")
    hot = {
        "centre": False,
        "teacher_temp_start": 0.02,
        "teacher_temp": 0.02,
        "teacher_momentum": 0.9,
        "n_local_crops": 0,
    }
    health = _short_run("dino", hot, corpus, tmp_path / "nocentre", steps=5, lr=5e-3)["health"]
    assert health["collapsed"] and "same prototype" in health["reason"]
    assert health["final"]["health/teacher_batch_entropy_ratio"] < TEACHER_BATCH_ENTROPY_FLOOR
