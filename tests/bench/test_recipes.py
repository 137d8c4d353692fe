"""Optimiser recipes: `pretrain.recipe: published` gives each method its own settings (its published learning-rate
point moved to the run's batch by the one linear rule), `shared` one schedule for all; both are recorded in the
config and its hash; the dry run shows the nine operating points side by side and as JSON."""

from __future__ import annotations

import pytest

from medssl.bench.plan import expand_plan
from medssl.config import (
    LR_SCALING_RULE,
    LR_SPREAD_LIMIT,
    BenchConfig,
    MethodConfig,
    PretrainConfig,
    ScheduleConfig,
    config_hash,
    load_yaml,
    published_recipe,
)
from medssl.methods import REGISTRY
from medssl.methods.recipe import operating_point

TRAINING = sorted(name for name, cls in REGISTRY.items() if cls.trains)

# (lr at batch 8, weight decay start, end, clip) from each reference (configs/methods/<name>.yaml sources): the
# published learning-rate point scaled linearly to batch 8 (SMIT: iBOT's point, a declared departure)
EXPECTED = {
    "dino": (5e-4 * 8 / 256, 0.04, 0.4, 3.0),
    "ibot": (5e-4 * 8 / 256, 0.04, 0.4, 3.0),
    "mocov3": (1.5e-4 * 8 / 256, 0.1, None, None),
    "simclr": (1.5e-4 * 8 / 256, 0.1, None, None),
    "byol": (1.5e-4 * 8 / 256, 0.1, None, None),
    "simmim": (2e-4 * 8 / 512, 0.05, None, 5.0),
    "rotnet": (2e-4 * 8 / 512, 0.05, None, 5.0),
    "smit": (5e-4 * 8 / 256, 0.01, None, None),
    "swinunetr_ssl": (6e-6 * 8 / 16, 0.1, None, None),
}


def test_every_training_method_yaml_carries_a_published_recipe_with_sources() -> None:
    assert sorted(EXPECTED) == TRAINING
    for name in TRAINING:
        recipe = published_recipe(name)
        assert recipe is not None, name
        assert {"base_lr", "weight_decay", "grad_clip", "published_batch_size"} <= set(recipe.sources), name
    assert published_recipe("none") is None


@pytest.mark.parametrize("batch", [1, 4, 8, 64])
def test_one_rule_puts_the_nine_learning_rates_within_the_limit_at_any_batch(batch: int) -> None:
    """One declared rule for every method (linear from its published point): the resolved learning rates lie
    within LR_SPREAD_LIMIT of each other (5.2x: SwinUNETR-SSL's 6e-6 at 16 crops to DINO's 5e-4 per 256), and a
    recipe that borrows another's point says so (SMIT: iBOT's)."""
    recipes = {name: published_recipe(name) for name in TRAINING}
    assert {r.lr_scaling for r in recipes.values()} == {LR_SCALING_RULE}
    lrs = [r.scaled(r.base_lr, batch) for r in recipes.values()]
    assert max(lrs) / min(lrs) <= LR_SPREAD_LIMIT
    assert max(lrs) / min(lrs) == pytest.approx((5e-4 / 256) / (6e-6 / 16))
    assert {n: r.lr_from for n, r in recipes.items() if r.lr_from} == {"smit": "ibot"}
    assert recipes["smit"].base_lr == recipes["ibot"].base_lr and recipes["smit"].lr_batch == recipes["ibot"].lr_batch


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
    def plan(recipe: str, methods: list | None = None) -> dict[str, PretrainConfig]:
        bench = BenchConfig.model_validate(
            {
                "name": "t",
                "tasks": [{"path": "synth:ct_organs"}],
                "methods": methods or ["none", "simclr", "dino", "smit"],
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
    assert published["smit"].config.schedule.lr == pytest.approx(5e-4 * 8 / 256)
    assert all(published[m].run_id != shared[m].run_id for m in published)
    assert all(r.config.recipe == "published" and r.config.published_recipe for r in published.values())
    # A method's own `recipe` overrides the benchmark's (the demo's teacher-student methods at their own).
    mixed = plan("shared", ["simclr", {"name": "dino", "recipe": "published"}])
    assert mixed["simclr"].config.recipe == "shared" and mixed["simclr"].config.schedule.lr == 5e-4
    assert mixed["dino"].config.recipe == "published" and mixed["dino"].config.schedule.lr == pytest.approx(5e-4 / 32)
    assert mixed["dino"].config.schedule == published["dino"].config.schedule
    # A method's `lr_scale` scales the shared lr and min_lr, and the run records it (the demo's teacher-students).
    scaled = plan("shared", ["simclr", {"name": "dino", "lr_scale": 0.1}])
    dino = scaled["dino"].config
    shared_min_lr = scaled["simclr"].config.schedule.min_lr
    assert (dino.schedule.lr, dino.schedule.min_lr, dino.shared_lr_scale) == (5e-5, shared_min_lr / 10, 0.1)
    assert operating_point(dino)["lr_rule"] == "shared lr x 0.1"
    assert scaled["simclr"].run_id == mixed["simclr"].run_id  # an unscaled method's run is unchanged
    with pytest.raises(ValueError, match="lr_scale scales the shared schedule"):
        plan("shared", [{"name": "dino", "recipe": "published", "lr_scale": 0.1}])


def test_the_demo_keeps_every_learning_rate_within_the_limit(tmp_path) -> None:
    """The demo's declared small-scale departure (DINO, iBOT, SMIT at the shared lr x 0.1) keeps the nine
    resolved learning rates within LR_SPREAD_LIMIT of each other."""
    from importlib import resources

    bench = BenchConfig.model_validate(load_yaml(resources.files("medssl") / "configs" / "demo.yaml"))
    lrs = [run.config.schedule.lr for run in expand_plan(bench, tmp_path).stage("pretrain")]
    assert len(lrs) == 9 and max(lrs) / min(lrs) <= LR_SPREAD_LIMIT


def test_planned_configs_spell_out_every_method_option(tmp_path) -> None:
    """A planned run's config holds every option of its method, so a change of a default changes the run id."""
    bench = BenchConfig.model_validate(
        {
            "name": "t",
            "tasks": [{"path": "synth:ct_organs"}],
            "methods": [{"name": "dino", "options": {"out_dim": 64}}],
            "encoder": {"preset": "tiny", "window_size": 4},
            "cka": {"enabled": False},
            "pretrain": {"crop_size": 32, "schedule": {"steps": 10}},
            "finetune": {"crop_size": 32, "schedule": {"steps": 3}, "n_test": 3, "n_val": 2},
        }
    )
    (run,) = expand_plan(bench, tmp_path / "out").stage("pretrain")
    options = run.config.method.options
    assert set(options) == set(REGISTRY["dino"].Params.model_fields)
    assert options["out_dim"] == 64 and options["teacher_temp_warmup_epochs"] == 30


def test_operating_point_counts_negatives_flags_few_and_says_where_values_come_from() -> None:
    simclr = operating_point(
        PretrainConfig(
            method=MethodConfig(name="simclr"), recipe="published", schedule=ScheduleConfig(steps=10, batch_size=8)
        )
    )
    assert simclr["negatives_per_step"] == 14 and simclr["few_negatives"]
    assert simclr["published_optimizer"].startswith("LARS") and simclr["published_batch_size"] == 4096
    assert simclr["lr_rule"] == "0.00015 x 8 / 256 (linear)" and simclr["lr_from"] == "simclr"
    assert "MoCo v3" in simclr["sources"]["lr"] and simclr["epochs"] is None and simclr["knob_steps"] == {}
    mocov3 = operating_point(
        PretrainConfig(method=MethodConfig(name="mocov3"), schedule=ScheduleConfig(steps=10, batch_size=512))
    )
    assert mocov3["negatives_per_step"] == 511 and not mocov3["few_negatives"] and mocov3["recipe"] == "shared"
    assert mocov3["sources"]["lr"].startswith("the shared schedule") and mocov3["lr_rule"] is None
    dino = operating_point(
        PretrainConfig(method=MethodConfig(name="dino"), schedule=ScheduleConfig(steps=300, batch_size=8)),
        corpus_volumes=40,
    )
    assert dino["negatives_per_step"] is None and not dino["few_negatives"]
    assert dino["epochs"] == pytest.approx(300 * 8 / 40) and dino["corpus_volumes"] == 40
    assert dino["knob_steps"] == {"teacher_temp_warmup": 30, "freeze_last_layer": 1}  # 30 and 1 of 300 epochs
    smit = operating_point(
        PretrainConfig(method=MethodConfig(name="smit"), recipe="published", schedule=ScheduleConfig(batch_size=8))
    )
    assert smit["lr_from"] == "ibot" and "ibot's point" in smit["lr_rule"] and smit["lr"] == pytest.approx(5e-4 / 32)


def test_dry_run_json_of_the_paper_config_and_its_operating_points(tmp_path, capsys) -> None:
    """`medssl bench configs/paper.yaml --dry-run --json`: one JSON object on stdout with every run and its resolved
    config; the nine pretraining learning rates within LR_SPREAD_LIMIT (they were 3.1e-6 to 8e-4: 256x)."""
    import json

    from medssl.bench.engine import run_bench

    assert run_bench("configs/paper.yaml", tmp_path / "paper", dry_run=True, as_json=True) == 0
    plan = json.loads(capsys.readouterr().out)
    pretrain = [r for r in plan["runs"] if r["kind"] == "pretrain"]
    assert sorted(r["method"] for r in pretrain) == TRAINING
    lrs = {r["method"]: r["config"]["schedule"]["lr"] for r in pretrain}
    assert max(lrs.values()) / min(lrs.values()) <= LR_SPREAD_LIMIT
    assert lrs == pytest.approx({name: expected[0] for name, expected in EXPECTED.items()})
    for run in pretrain:
        config = PretrainConfig.model_validate(run["config"])  # exactly as it would run: it validates back
        assert config.recipe == "published" and run["run_id"].endswith(config_hash(config))
        params = REGISTRY[run["method"]].Params.model_fields
        assert set(run["config"]["method"]["options"]) == set(params)  # every option spelled out
        point = run["operating_point"]
        assert point["steps"] == 100_000 and point["batch_size"] == 8 and point["lr"] == lrs[run["method"]]
    dino = next(r for r in pretrain if r["method"] == "dino")["operating_point"]
    assert dino["knob_steps"]["teacher_temp_warmup"] == 10_000  # 30 of 300 epochs: 10 % of the run
    finetune = [r for r in plan["runs"] if r["kind"] == "finetune"]
    assert finetune and all({"task", "budget", "seed", "config"} <= set(r) for r in finetune)
    assert {r["kind"] for r in plan["runs"]} == {"pretrain", "finetune", "cka"}


def test_json_needs_a_dry_run(tmp_path) -> None:
    from medssl.bench.engine import run_bench
    from medssl.errors import ConfigError

    with pytest.raises(ConfigError, match="--dry-run"):
        run_bench("configs/paper.yaml", tmp_path / "paper", as_json=True)


def test_cli_prints_only_the_json_plan(tmp_path, capsys, monkeypatch) -> None:
    """`medssl bench CONFIG --dry-run --json` through the CLI: stdout is one JSON object; --json alone exits 2."""
    import json
    import sys

    from medssl import cli

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["medssl", *args])
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        out, err = capsys.readouterr()
        return int(exit_info.value.code or 0), out, err

    code, out, _ = run("bench", "configs/paper.yaml", "--dry-run", "--json", "--out", str(tmp_path / "a"))
    assert code == 0 and json.loads(out)["name"] == "paper"
    code, out, err = run("bench", "configs/paper.yaml", "--json", "--out", str(tmp_path / "b"))
    assert code == 2 and "--dry-run" in err and len([line for line in err.splitlines() if line.strip()]) == 1
