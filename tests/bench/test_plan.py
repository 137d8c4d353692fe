"""Benchmark config loading and plan expansion: run counts, ids that chain, dependencies, budget checks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from medssl.bench.engine import demo_config_path
from medssl.bench.kinds import STAGES
from medssl.bench.plan import control_data_seed, corpus_dir, expand_plan
from medssl.budget import Budget
from medssl.config import (
    IDENTITY_TRANSFORMER,
    SUPERVISED,
    BenchConfig,
    CKARunConfig,
    FinetuneConfig,
    PretrainConfig,
    ProbeRunConfig,
    config_hash,
    load_bench_config,
)
from medssl.errors import ConfigError
from medssl.methods import REGISTRY

RUN_ID = re.compile(r"^(pretrain|finetune|cka)-[A-Za-z0-9_.-]+-[0-9a-f]{12}$")
PAPER = demo_config_path().parent / "paper.yaml"


def bench_dict(**changes) -> dict:
    base = {
        "name": "t",
        "tasks": [{"path": "synth:ct_organs"}],
        "methods": ["none", "simmim"],
        "encoder": {"preset": "tiny", "window_size": 4},
        "pretrain": {"crop_size": 32, "schedule": {"steps": 3}},
        "finetune": {"crop_size": 32, "schedule": {"steps": 3}, "n_test": 3, "n_val": 2},
        "budgets": [2, "all"],
        "seeds": [0, 1],
    }
    base.update(changes)
    return base


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_plan_counts_stages_and_dependencies(tmp_path: Path) -> None:
    plan = expand_plan(BenchConfig.model_validate(bench_dict()), tmp_path)
    assert [len(plan.stage(k)) for k in ("pretrain", "finetune", "cka")] == [1, 2 * 2 * 2, 2]
    assert [r.kind for r in plan.runs] == sorted((r.kind for r in plan.runs), key=["pretrain", "finetune", "cka"].index)
    ids = [r.run_id for r in plan.runs]
    assert len(set(ids)) == len(ids) and all(RUN_ID.match(i) for i in ids)

    (pretrain,) = plan.stage("pretrain")
    assert isinstance(pretrain.config, PretrainConfig) and pretrain.config.method.name == "simmim"
    assert pretrain.config.corpus == tmp_path.resolve() / "corpus"
    for run in plan.stage("finetune"):
        assert isinstance(run.config, FinetuneConfig)
        assert run.config.task == tmp_path.resolve() / "data" / "ct_organs"
        assert run.config.splits_path == tmp_path.resolve() / "splits" / "ct_organs.json"
        assert run.config.cache_dir == tmp_path.resolve() / "cache"
        assert run.config.schedule.seed == run.config.seed
        if run.labels["method"] == "none":  # random init: no pretraining, no dependency
            assert run.config.encoder_checkpoint is None and run.depends_on == []
        else:  # the checkpoint path holds the pretrain run id: ids chain
            assert pretrain.run_id in str(run.config.encoder_checkpoint)
            assert run.depends_on == [pretrain.run_id]

    by_id = plan.by_id()
    cka = {r.labels["comparison"]: r for r in plan.stage("cka")}
    pvf, fvm = cka["pretrained_vs_finetuned"], cka["fewshot_vs_manyshot"]
    assert isinstance(pvf.config, CKARunConfig)
    assert pvf.config.cache_dir == tmp_path.resolve() / "cache"  # the volumes the fine-tuning runs cached
    for run in plan.runs:  # the hash is stored where the id is made, never parsed back out of it
        assert run.config_hash == config_hash(run.config) and run.run_id.endswith("-" + run.config_hash)
    assert str(pvf.config.model_a).endswith(f"{pretrain.run_id}/checkpoints/encoder.pt")
    assert pvf.depends_on[0] == pretrain.run_id
    many = by_id[pvf.depends_on[1]]
    assert (many.labels["method"], many.labels["budget"], many.labels["seed"]) == ("simmim", "all", 0)
    few, many2 = (by_id[d] for d in fvm.depends_on)
    assert (few.labels["budget"], many2.labels["budget"], few.labels["seed"]) == ("2", "all", 0)
    assert str(fvm.config.model_a).endswith(f"{few.run_id}/checkpoints/best.pt")
    assert str(fvm.config.model_b).endswith(f"{many.run_id}/checkpoints/best.pt")


def test_plan_json_written_and_ids_stable(tmp_path: Path) -> None:
    bench = BenchConfig.model_validate(bench_dict())
    first = expand_plan(bench, tmp_path)
    data = json.loads((tmp_path / "plan.json").read_text())
    assert [r["run_id"] for r in data["runs"]] == [r.run_id for r in first.runs]
    assert data["stages"] == {"pretrain": 1, "supervised": 0, "finetune": 8, "probe": 0, "cka": 2}
    assert [r.run_id for r in expand_plan(bench, tmp_path).runs] == [r.run_id for r in first.runs]


def test_changing_pretraining_changes_downstream_ids_only(tmp_path: Path) -> None:
    before = expand_plan(BenchConfig.model_validate(bench_dict()), tmp_path)
    after = expand_plan(
        BenchConfig.model_validate(bench_dict(pretrain={"crop_size": 32, "schedule": {"steps": 5}})), tmp_path
    )
    changed = {r.labels.get("method"): set() for r in before.runs}
    for a, b in zip(before.runs, after.runs, strict=True):
        changed[a.labels["method"]].add(a.run_id != b.run_id)
    assert changed["simmim"] == {True}  # pretrain, its fine-tunes and CKA runs are new runs
    assert changed["none"] == {False}  # random init does not depend on pretraining


def test_cka_disabled_and_single_budget(tmp_path: Path) -> None:
    plan = expand_plan(BenchConfig.model_validate(bench_dict(cka={"enabled": False})), tmp_path)
    assert plan.stage("cka") == []
    plan = expand_plan(BenchConfig.model_validate(bench_dict(budgets=["all"], seeds=[3])), tmp_path)
    assert [r.labels["comparison"] for r in plan.stage("cka")] == ["pretrained_vs_finetuned"]
    assert plan.stage("cka")[0].config.seed == 3


def test_methods_all_includes_random_init(tmp_path: Path) -> None:
    plan = expand_plan(BenchConfig.model_validate(bench_dict(methods="all", seeds=[0], budgets=["all"])), tmp_path)
    assert {r.labels["method"] for r in plan.stage("finetune")} == set(REGISTRY)
    assert {r.labels["method"] for r in plan.stage("pretrain")} == set(REGISTRY) - {"none"}


def test_budget_larger_than_pool_is_a_config_error(tmp_path: Path) -> None:
    # synthetic task not created yet: its pool is cases - n_test - n_val = 12 - 3 - 2 = 7
    with pytest.raises(ConfigError, match=r"budget 8 exceeds the training pool of task 'ct_organs' \(7 cases"):
        expand_plan(BenchConfig.model_validate(bench_dict(budgets=[8])), tmp_path, source="b.yaml")
    # an existing task folder is counted with load_task
    from medssl.data.synth import synth_task

    task = synth_task(tmp_path / "organs", "ct_organs", 6, seed=0, shape=(32, 32, 32))
    data = bench_dict(tasks=[{"path": str(task), "name": "organs"}], budgets=[2])
    data["finetune"] = {"crop_size": 32, "n_test": 2, "n_val": 1}
    expand_plan(BenchConfig.model_validate(data), tmp_path)
    data["budgets"] = [4]
    with pytest.raises(ConfigError, match=r"b\.yaml: budget 4 exceeds the training pool of task 'organs' \(3 cases"):
        expand_plan(BenchConfig.model_validate(data), tmp_path, source="b.yaml")


def test_unknown_method_and_duplicates_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown method 'simclear'"):
        expand_plan(BenchConfig.model_validate(bench_dict(methods=["simclear"])), tmp_path)
    with pytest.raises(ConfigError, match="'simmim' is listed twice"):
        expand_plan(BenchConfig.model_validate(bench_dict(methods=["simmim", {"name": "simmim"}])), tmp_path)
    with pytest.raises(ConfigError, match="mask_ratio"):
        bad = bench_dict(methods=[{"name": "simmim", "options": {"mask_ratio": 3}}])
        expand_plan(BenchConfig.model_validate(bad), tmp_path)
    with pytest.raises(ConfigError, match="name 'x' is used twice"):
        tasks = [{"path": "synth:ct_organs", "name": "x"}, {"path": "synth:mri_organs", "name": "x"}]
        expand_plan(BenchConfig.model_validate(bench_dict(tasks=tasks)), tmp_path)


def test_per_task_finetune_settings_apply_to_that_task_only(tmp_path: Path) -> None:
    tasks = [
        {"path": "synth:ct_organs", "finetune": {"schedule": {"steps": 7}, "nsd_tolerance_mm": 1.0}},
        {"path": "synth:mri_organs"},
    ]
    plan = expand_plan(BenchConfig.model_validate(bench_dict(tasks=tasks)), tmp_path)
    for run in plan.stage("finetune"):
        organs = run.labels["task"] == "ct_organs"
        assert run.config.schedule.steps == (7 if organs else 3)
        assert run.config.schedule.batch_size == 2  # the rest of the section is kept
        assert run.config.schedule.seed == run.config.seed
        assert run.config.nsd_tolerance_mm == (1.0 if organs else 2.0)

    bad = [{"path": "synth:ct_organs", "finetune": {"schedule": {"stepz": 7}}}]
    with pytest.raises(ConfigError, match=r"'ct_organs' .*schedule\.stepz: unknown key"):
        expand_plan(BenchConfig.model_validate(bench_dict(tasks=bad)), tmp_path)
    bad = [{"path": "synth:ct_organs", "finetune": {"budget": 2}}]
    with pytest.raises(ConfigError, match=r"'ct_organs' finetune\.budget is set by the benchmark"):
        expand_plan(BenchConfig.model_validate(bench_dict(tasks=bad)), tmp_path)


def test_per_task_budgets_and_finetuned_subset(tmp_path: Path) -> None:
    tasks = [{"path": "synth:ct_organs"}, {"path": "synth:mri_organs", "budgets": ["all"]}]
    data = bench_dict(tasks=tasks, methods=["none", "simmim", "rotnet"], finetune_methods=["rotnet", "none"], seeds=[0])
    plan = expand_plan(BenchConfig.model_validate(data), tmp_path)
    assert {r.labels["method"] for r in plan.stage("pretrain")} == {"simmim", "rotnet"}  # every method pretrains
    cells = {(r.labels["method"], r.labels["task"], r.labels["budget"]) for r in plan.stage("finetune")}
    assert cells == {
        (m, t, b)
        for m in ("none", "rotnet")
        for t, bs in (("ct_organs", ("2", "all")), ("mri_organs", ("all",)))
        for b in bs
    }
    # CKA only for fine-tuned pretrained encoders; few-vs-many only where the task has two budgets
    assert sorted((r.labels["task"], r.labels["comparison"]) for r in plan.stage("cka")) == [
        ("ct_organs", "fewshot_vs_manyshot"),
        ("ct_organs", "pretrained_vs_finetuned"),
        ("mri_organs", "pretrained_vs_finetuned"),
    ]
    with pytest.raises(ConfigError, match=r"finetune_methods: unknown method 'rotnt'.*rotnet"):
        expand_plan(BenchConfig.model_validate({**data, "finetune_methods": ["rotnt"]}), tmp_path)
    too_large = bench_dict(tasks=[{"path": "synth:mri_organs", "budgets": [8]}])
    with pytest.raises(ConfigError, match=r"budget 8 exceeds the training pool of task 'mri_organs'"):
        expand_plan(BenchConfig.model_validate(too_large), tmp_path)


def test_load_config_errors_name_key_and_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "b.yaml", bench_dict(finetune={"crop_size": 32, "bogus": 1}))
    with pytest.raises(ConfigError, match=r"b\.yaml: finetune\.bogus: unknown key"):
        load_bench_config(path)
    path = write_yaml(tmp_path / "b.yaml", bench_dict(pretrain={"crop_size": 40}))
    with pytest.raises(ConfigError, match=r"b\.yaml: pretrain\.crop_size: .*multiple of 32"):
        load_bench_config(path)
    path = write_yaml(tmp_path / "b.yaml", bench_dict(budgets=[0]))
    with pytest.raises(ConfigError, match="budgets"):
        load_bench_config(path)
    path = write_yaml(tmp_path / "b.yaml", bench_dict(tasks=[{"path": "synth:lungs"}]))
    with pytest.raises(ConfigError, match="unknown synthetic task 'synth:lungs'"):
        load_bench_config(path)


def test_relative_paths_and_overrides(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    data = bench_dict(tasks=[{"path": "../tasks/liver"}], data={"corpus": ["scans"]})
    path = write_yaml(tmp_path / "conf" / "b.yaml", data)
    bench = load_bench_config(path, ["budgets=[1,all]", "finetune.schedule.steps=7"])
    assert bench.tasks[0].path == str(tmp_path.resolve() / "tasks" / "liver")
    assert bench.data.corpus == [tmp_path.resolve() / "conf" / "scans"]
    assert bench.budgets == [Budget(1), Budget.all()] and bench.finetune.schedule.steps == 7
    # a task folder absent at planning time is planned (checked when its runs start), named by its folder
    plan = expand_plan(bench, tmp_path / "out")
    assert {r.labels["task"] for r in plan.stage("finetune")} == {"liver"}


def test_ingested_corpus_is_used_in_place(tmp_path: Path) -> None:
    corpus = tmp_path / "ingested"
    corpus.mkdir()
    (corpus / "manifest.json").write_text("{}")
    bench = BenchConfig.model_validate(bench_dict(data={"corpus": [str(corpus)]}))
    assert corpus_dir(bench, tmp_path / "out") == corpus.resolve()
    bench = BenchConfig.model_validate(bench_dict(data={"corpus": [str(tmp_path / "raw")]}))
    assert corpus_dir(bench, tmp_path / "out") == (tmp_path / "out").resolve() / "corpus"


def test_packaged_configs_load_and_expand(tmp_path: Path) -> None:
    demo = load_bench_config(demo_config_path())
    plan = expand_plan(demo, tmp_path / "demo")
    n_methods, n_trained = len(REGISTRY), len(REGISTRY) - 1
    assert len(plan.stage("pretrain")) == n_trained  # every method pretrains
    assert {m.name for m in demo.method_configs()} == set(REGISTRY)  # every registered method
    finetuned = demo.finetune_methods or []
    assert "none" in finetuned and {REGISTRY[m].family for m in finetuned} >= {"mim", "contrastive"}
    cells = {(r.labels["task"], r.labels["budget"]) for r in plan.stage("finetune")}
    assert cells == {("ct_organs", "2"), ("ct_organs", "all"), ("mri_organs", "all")}
    assert len(plan.stage("finetune")) == len(finetuned) * len(cells) and demo.seeds == [0]
    # every paired test rests on >= 6 (case, seed) pairs: one seed, n_test test cases
    assert demo.finetune.n_test * len(demo.seeds) >= 6
    # CKA on the listed task only, for the fine-tuned pretrained encoders: pretrained vs fine-tuned, few vs many
    assert len(plan.stage("cka")) == (len(finetuned) - 1) * len(demo.cka.tasks or []) * 2
    assert demo.encoder.preset == "tiny" and demo.executor.kind == "local"

    paper = load_bench_config(PAPER)
    plan = expand_plan(paper, tmp_path / "paper")
    assert paper.encoder.preset == "smit" and paper.pretrain.crop_size == 96 and paper.preprocess.spacing == (1.5,) * 3
    assert len(paper.tasks) == 9 and len(paper.seeds) == 3 and paper.executor.kind in ("torchrun", "slurm")
    assert len(plan.stage("finetune")) == n_methods * 9 * len(paper.budgets) * 3


def test_bench_model_with_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medssl.bench.engine import load_bench

    monkeypatch.chdir(tmp_path)
    given = BenchConfig.model_validate(bench_dict(tasks=[{"path": "tasks/liver"}]))
    bench = load_bench(None, ["seeds=[4]", "executor.kind=torchrun"], bench=given)
    assert bench.seeds == [4] and bench.executor.kind == "torchrun"
    assert bench.tasks[0].path == str(tmp_path.resolve() / "tasks" / "liver")  # relative to the working dir
    assert given.tasks[0].path == "tasks/liver" and given.seeds == [0, 1]  # the caller's model is untouched
    with pytest.raises(ConfigError, match="no benchmark config"):
        load_bench(None)


def test_controls_and_probes_in_the_plan(tmp_path: Path) -> None:
    """The transfer study's rows: random init, the supervised control (its own training run, on phantoms of
    another anatomy seed derived from the data seed), the identity-transformer, and a probe run per encoder."""
    data = bench_dict(
        data={"synth": {"seed": 7}},
        controls={
            "supervised": {"enabled": True, "finetune": {"schedule": {"steps": 5}}},
            "identity_transformer": True,
        },
        probe={"enabled": True, "budgets": [2], "steps": 10},
        pretrain={"crop_size": 32, "schedule": {"steps": 3}, "probe": {"every": 2}},
        cka={"enabled": False},
    )
    bench = BenchConfig.model_validate(data)
    plan = expand_plan(bench, tmp_path)
    assert [len(plan.stage(k)) for k in ("pretrain", "supervised", "finetune", "probe", "cka")] == [
        1,
        1,
        4 * 2 * 2,
        3 * 2,
        0,
    ]
    assert [r.kind for r in plan.runs] == sorted((r.kind for r in plan.runs), key=list(STAGES).index)

    (control,) = plan.stage("supervised")
    assert isinstance(control.config, FinetuneConfig) and control.config.budget == Budget.all()
    assert control.config.schedule.steps == 5  # its own training, merged over the study's finetune section
    assert control.config.task == tmp_path.resolve() / "data" / "control" / "ct_organs"
    assert control_data_seed(bench) == 8 != bench.data.synth.seed
    assert control_data_seed(BenchConfig.model_validate({**data, "data": {"synth": {"seed": 0}}})) == 1

    rows = {
        r.labels["method"]: r for r in plan.stage("finetune") if r.labels["budget"] == "2" and r.labels["seed"] == 0
    }
    assert set(rows) == {"none", "simmim", SUPERVISED, IDENTITY_TRANSFORMER}
    assert rows[SUPERVISED].depends_on == [control.run_id] and rows[SUPERVISED].labels["family"] == SUPERVISED
    assert str(rows[SUPERVISED].config.encoder_checkpoint).endswith(f"{control.run_id}/checkpoints/encoder.pt")
    identity = rows[IDENTITY_TRANSFORMER].config
    assert isinstance(identity, FinetuneConfig) and identity.transformer == "identity"
    assert identity.encoder_checkpoint is None and rows[IDENTITY_TRANSFORMER].labels["family"] == "control"
    assert all(r.config.transformer == "swin" for m, r in rows.items() if m != IDENTITY_TRANSFORMER)

    probes = {(r.labels["method"], r.labels["seed"]): r for r in plan.stage("probe")}
    assert {m for m, _ in probes} == {"none", "simmim", SUPERVISED}  # the identity row has no encoder to probe
    probe = probes[(SUPERVISED, 0)]
    assert isinstance(probe.config, ProbeRunConfig) and probe.config.probe.steps == 10
    assert probe.config.budget == Budget(2) and probe.depends_on == [control.run_id]
    finetune = rows[SUPERVISED].config
    assert (probe.config.splits_path, probe.config.cache_dir, probe.config.n_test) == (
        finetune.splits_path,
        finetune.cache_dir,
        finetune.n_test,
    )
    (pretrain,) = plan.stage("pretrain")  # the online probe is scored on the control phantoms
    assert pretrain.config.probe.task == control.config.task and pretrain.config.probe.every == 2


def test_probe_budgets_must_be_the_studys(tmp_path: Path) -> None:
    bench = BenchConfig.model_validate(bench_dict(probe={"enabled": True, "budgets": [1]}))
    with pytest.raises(ConfigError, match="probe.budgets"):
        expand_plan(bench, tmp_path)
