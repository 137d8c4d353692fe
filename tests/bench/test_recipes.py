"""Optimiser recipes: `pretrain.recipe: published` gives each method its own settings (scaled to the run's
batch by the published rule), `shared` one schedule for all; both are recorded in the config and its hash."""

from __future__ import annotations

import pytest

from medssl.bench.plan import expand_plan
from medssl.config import (
    BenchConfig,
    MethodConfig,
    PretrainConfig,
    ScheduleConfig,
    config_hash,
    load_yaml,
    published_recipe,
)
from medssl.methods import REGISTRY
from medssl.train.pretrain import optimiser_provenance

TRAINING = sorted(name for name, cls in REGISTRY.items() if cls.trains)

# (lr at batch 8, weight decay start, end, clip) from each reference (configs/methods/<name>.yaml sources)
EXPECTED = {
    "dino": (5e-4 * 8 / 256, 0.04, 0.4, 3.0),
    "ibot": (5e-4 * 8 / 256, 0.04, 0.4, 3.0),
    "mocov3": (1.5e-4 * 8 / 256, 0.1, None, None),
    "simclr": (1.5e-4 * 8 / 256, 0.1, None, None),
    "byol": (1.5e-4 * 8 / 256, 0.1, None, None),
    "simmim": (2e-4 * 8 / 512, 0.05, None, 5.0),
    "rotnet": (2e-4 * 8 / 512, 0.05, None, 5.0),
    "smit": (1e-4 * 8, 0.01, None, None),
    "swinunetr_ssl": (6e-6, 0.1, None, None),
}


def test_every_training_method_yaml_carries_a_published_recipe_with_sources() -> None:
    assert sorted(EXPECTED) == TRAINING
    for name in TRAINING:
        recipe = published_recipe(name)
        assert recipe is not None, name
        assert {"base_lr", "weight_decay", "grad_clip", "published_batch_size"} <= set(recipe.sources), name
    assert published_recipe("none") is None


@pytest.mark.parametrize("name", TRAINING)
def test_published_recipe_sets_the_methods_own_schedule(name: str) -> None:
    config = PretrainConfig(
        method=MethodConfig(name=name),
        recipe="published",
        schedule=ScheduleConfig(steps=1000, batch_size=8, lr=1.0, grad_clip=0.5),
    )
    lr, wd, wd_end, clip = EXPECTED[name]
    schedule = config.schedule
    assert schedule.lr == pytest.approx(lr)
    assert (schedule.weight_decay, schedule.weight_decay_end, schedule.grad_clip) == (wd, wd_end, clip)
    assert schedule.warmup_steps == round(config.published_recipe.warmup_fraction * 1000)
    assert schedule.batch_size == 8 and schedule.steps == 1000  # the hardware's, not the paper's
    # The dumped config reloads to the same config (the recipe is recorded, applying it again is a no-op).
    assert PretrainConfig.model_validate(config.model_dump(mode="json")) == config
    # A method YAML is a PretrainConfig fragment: `recipe=published` on it gives the same schedule.
    fragment = {
        **load_yaml(f"configs/methods/{name}.yaml"),
        "recipe": "published",
        "schedule": {"steps": 1000, "batch_size": 8},
    }
    assert PretrainConfig.model_validate(fragment).schedule == schedule


def test_shared_recipe_keeps_the_schedule_and_changes_the_hash() -> None:
    schedule = ScheduleConfig(steps=1000, batch_size=8, lr=5e-4, weight_decay=0.04, grad_clip=3.0)
    shared = PretrainConfig(method=MethodConfig(name="simmim"), schedule=schedule)
    assert shared.recipe == "shared" and shared.published_recipe is None and shared.schedule == schedule
    published = PretrainConfig(method=MethodConfig(name="simmim"), recipe="published", schedule=schedule)
    assert config_hash(shared) != config_hash(published)
    assert published.schedule.grad_clip == 5.0 and shared.schedule.grad_clip == 3.0


def test_bench_plan_gives_each_method_its_recipe(tmp_path) -> None:
    def plan(recipe: str) -> dict[str, PretrainConfig]:
        bench = BenchConfig.model_validate(
            {
                "name": "t",
                "tasks": [{"path": "synth:ct_organs"}],
                "methods": ["none", "simclr", "dino", "smit"],
                "encoder": {"preset": "tiny", "window_size": 4},
                "cka": {"enabled": False},
                "pretrain": {
                    "crop_size": 32,
                    "recipe": recipe,
                    "schedule": {"steps": 100, "batch_size": 8, "lr": 5e-4},
                },
                "finetune": {"crop_size": 32, "schedule": {"steps": 3}, "n_test": 3, "n_val": 2},
            }
        )
        runs = expand_plan(bench, tmp_path / recipe).stage("pretrain")
        return {r.labels["method"]: r for r in runs}

    published, shared = plan("published"), plan("shared")
    assert {m: r.config.schedule.grad_clip for m, r in published.items()} == {"simclr": None, "dino": 3.0, "smit": None}
    assert {m: r.config.schedule.lr for m, r in shared.items()} == {"simclr": 5e-4, "dino": 5e-4, "smit": 5e-4}
    assert published["smit"].config.schedule.lr == pytest.approx(8e-4)
    assert all(published[m].run_id != shared[m].run_id for m in published)
    assert all(r.config.recipe == "published" and r.config.published_recipe for r in published.values())


def test_optimiser_provenance_counts_negatives_and_flags_few() -> None:
    simclr = optimiser_provenance(
        PretrainConfig(
            method=MethodConfig(name="simclr"), recipe="published", schedule=ScheduleConfig(steps=10, batch_size=8)
        )
    )
    assert simclr["negatives_per_step"] == 14 and simclr["few_negatives"]
    assert simclr["published_optimizer"].startswith("LARS") and simclr["published_batch_size"] == 4096
    mocov3 = optimiser_provenance(
        PretrainConfig(method=MethodConfig(name="mocov3"), schedule=ScheduleConfig(steps=10, batch_size=512))
    )
    assert mocov3["negatives_per_step"] == 511 and not mocov3["few_negatives"] and mocov3["recipe"] == "shared"
    dino = optimiser_provenance(
        PretrainConfig(method=MethodConfig(name="dino"), schedule=ScheduleConfig(steps=10, batch_size=8))
    )
    assert dino["negatives_per_step"] is None and not dino["few_negatives"]
