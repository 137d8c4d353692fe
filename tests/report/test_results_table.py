from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest

from medssl.errors import MedsslInputError
from medssl.results import (
    CURVE_COLUMNS,
    RESULT_COLUMNS,
    cka_runs,
    curves_table,
    finetune_recipes,
    pretrain_curves,
    pretrain_table,
    provenance,
    results_table,
    write_tables,
)
from medssl.runs import RunDir, atomic_write_text


def test_results_table_rows_and_columns(fake, fake_runs: Path) -> None:
    table = results_table(fake_runs)
    assert list(table.columns) == RESULT_COLUMNS
    # 3 methods × 2 tasks × 2 budgets × 1 seed × 3 cases × 2 structures
    assert len(table) == 3 * 2 * 2 * 3 * 2
    assert set(table["method"]) == set(fake.METHODS)
    assert set(table["budget"]) == {"2", "all"}
    assert table["budget"].map(type).eq(str).all()
    assert set(table["structure"]) == set(fake.STRUCTURES.values())
    assert dict(table.groupby("task")["modality"].first()) == fake.TASKS
    assert set(table.loc[table["budget"] == "all", "n_train"]) == {12}
    assert set(table.loc[table["method"] == "dino", "family"]) == {"self_distillation"}
    # Each fine-tune run contributes cases × structures rows, and every run id is a real directory.
    assert table.groupby("run_id").size().eq(6).all()
    assert all((fake_runs / run_id).is_dir() for run_id in table["run_id"].unique())
    assert table["dice"].between(0, 1).all()


def test_curves_and_pretrain_tables(fake_runs: Path) -> None:
    curves = curves_table(fake_runs)
    assert list(curves.columns) == CURVE_COLUMNS
    assert len(curves) == 12 * 4  # 12 fine-tune runs × 4 validations
    assert curves.groupby("run_id")["step"].apply(list).map(lambda s: s == [25, 50, 75, 100]).all()

    pre = pretrain_table(fake_runs)
    assert sorted(pre["method"]) == ["dino", "simmim"]
    assert pre.set_index("method").loc["dino", "collapsed"]
    assert not pre.set_index("method").loc["simmim", "collapsed"]
    assert pre.set_index("method").loc["dino", "collapse_reason"].startswith("embedding spread")
    assert pre.set_index("method").loc["simmim", "embedding_std_scaled"] == 0.5
    assert pre.set_index("method").loc["simmim", "recipe"] == "published"
    assert pre.set_index("method").loc["simmim", "grad_clip"] == 5.0

    loss = pretrain_curves(fake_runs)
    assert set(loss["method"]) == {"dino", "simmim"}
    assert loss.groupby("run_id")["step"].is_monotonic_increasing.all()
    assert loss["loss"].notna().all()
    assert (loss.loc[loss["method"] == "dino", "embedding_std_scaled"] == 0.0).all()

    cka = cka_runs(fake_runs)
    assert len(cka) == 1 and len(cka[0]["linear_cka"]) == 5 and cka[0]["run_id"].startswith("cka-")


def test_curves_fall_back_to_metrics_jsonl(fake, tmp_path: Path) -> None:
    run = fake.write_finetune_run(tmp_path, "simmim", "ct_organs", "all")
    results = run.results()
    del results["val_curve"]
    run.write_results(results)
    curves = curves_table(tmp_path)
    assert list(curves["step"]) == [25, 50, 75, 100]
    assert curves["val_dice"].notna().all()


def test_unfinished_and_broken_runs_are_excluded(fake, tmp_path: Path) -> None:
    runs = fake.write_benchmark(tmp_path / "b", methods=("none", "simmim"), tasks=("ct_organs",), budgets=("all",))
    fake.write_finetune_run(runs, "dino", "ct_organs", "all", finished=False)
    failed = fake.write_finetune_run(runs, "dino", "ct_organs", 2)
    atomic_write_text(failed.status_path, '{"status": "failed"}')
    broken = fake.write_finetune_run(runs, "dino", "mri_brain", 2)
    atomic_write_text(broken.results_path, "[1, 2")  # cut off mid-write by a crash on another machine
    odd = fake.write_finetune_run(runs, "dino", "mri_brain", "all")
    odd.update_info(budget="most")
    odd.write_results({**odd.results(), "budget": "most"})
    with pytest.warns(UserWarning) as caught:
        table = results_table(runs)
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2 and "results.json" in messages[0] and "label budget" in messages[1]
    assert set(table["method"]) == {"none", "simmim"}
    with pytest.warns(UserWarning):
        prov = provenance(runs)
    assert prov["not_finished"] == {"running": 1, "failed": 1}
    skipped = {item["run_id"]: item["reason"] for item in prov["skipped"]}
    assert set(skipped) == {broken.id, odd.id} and "label budget 'most'" in skipped[odd.id]


def test_copying_run_dirs_from_two_machines_gives_the_union(fake, tmp_path: Path) -> None:
    machine_a = fake.write_benchmark(tmp_path / "a", methods=("none", "simmim"), pretrain=False, cka=False)
    machine_b = fake.write_benchmark(tmp_path / "b", methods=("dino",), cka=False)
    # The same finished run copied to both machines must be counted once.
    shared_run = sorted(machine_a.iterdir())[0]
    shutil.copytree(shared_run, machine_b / shared_run.name)
    merged = tmp_path / "merged" / "runs"
    merged.mkdir(parents=True)
    for source in (machine_a, machine_b):
        for run in source.iterdir():
            shutil.copytree(run, merged / run.name, dirs_exist_ok=True)
    a, b, m = results_table(machine_a), results_table(machine_b), results_table(merged)
    union = pd.concat([a, b]).drop_duplicates(["run_id", "case", "label"])
    assert len(m) == len(union) == 3 * 2 * 2 * 3 * 2
    assert set(m["run_id"]) == set(a["run_id"]) | set(b["run_id"])
    # The benchmark folder (holding runs/) and a list of folders read the same.
    assert len(results_table(tmp_path / "merged")) == len(m)
    assert len(results_table([machine_a, machine_b])) == len(m)
    assert len(pretrain_table(merged)) == 2


def test_empty_and_missing_roots(tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir()
    assert results_table(tmp_path).empty and list(results_table(tmp_path).columns) == RESULT_COLUMNS
    assert curves_table(tmp_path).empty and pretrain_table(tmp_path).empty and cka_runs(tmp_path) == []
    with pytest.raises(MedsslInputError, match="does not exist"):
        results_table(tmp_path / "nope")


def test_provenance(fake_runs: Path) -> None:
    prov = provenance(fake_runs)
    assert prov["packages"]["medssl"] and prov["packages"]["numpy"]
    assert set(prov["packages"]) >= {"medssl", "torch", "monai", "numpy"}
    assert prov["hardware"]["cpu_count"] >= 1 and prov["hardware"]["platform"]
    zero = {"supervised": 0, "probe": 0}  # kinds this study did not run
    assert prov["n_runs"] == {"pretrain": 2, "finetune": 12, "cka": 1, **zero}
    assert prov["wall_seconds"] == {"pretrain": 40.0, "finetune": 120.0, "cka": 3.0, **zero}
    assert len(prov["runs"]) == 15
    assert all(len(r["config_hash"]) == 12 for r in prov["runs"].values())
    assert prov["code_versions"] == ["0.1.0"]


def test_finetune_recipes_come_from_each_runs_config(fake, tmp_path: Path) -> None:
    from medssl.config import FinetuneConfig, dump_yaml

    runs = tmp_path / "runs"
    organs = FinetuneConfig(crop_size=32, loss="dice", crop_sampling="class_balanced")
    organs.schedule.steps = 96
    for method in ("none", "simmim"):
        run = fake.write_finetune_run(runs, method, "ct_organs", "all")
        atomic_write_text(run.config_path, dump_yaml(organs))
    fake.write_finetune_run(runs, "none", "mri_organs", "all")  # its config.yaml records no recipe

    recipes = finetune_recipes(runs).set_index("task")
    assert recipes.loc["ct_organs", "runs"] == 2  # both encoders share one recipe row
    assert recipes.loc["ct_organs", ["steps", "loss", "crop_sampling", "crop_size"]].tolist() == [
        "96",
        "dice",
        "class_balanced",
        "32",
    ]
    assert recipes.loc["mri_organs", "steps"] == "not recorded"
    assert provenance(runs)["finetune_recipes"] == finetune_recipes(runs).to_dict(orient="records")


def test_write_tables(fake_runs: Path, tmp_path: Path) -> None:
    paths = write_tables(fake_runs, tmp_path / "report")
    assert sorted(p.name for p in paths.values()) == [
        "curves.csv",
        "pretrain.csv",
        "results.csv",
        "results.parquet",
    ]
    parquet = pd.read_parquet(paths["results.parquet"])
    csv = pd.read_csv(paths["results.csv"], dtype={"budget": str})
    assert len(parquet) == len(csv) == 72
    assert parquet["budget"].map(type).eq(str).all()
    assert pd.read_csv(paths["pretrain.csv"])["collapsed"].sum() == 1
    assert len(pd.read_csv(paths["curves.csv"])) == 48


def test_reading_tables_does_not_import_torch(fake_runs: Path) -> None:
    import subprocess

    code = (
        "import sys; from medssl.results import results_table, curves_table, pretrain_table;"
        f"root = {str(fake_runs)!r}; results_table(root); curves_table(root); pretrain_table(root);"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_run_dir_finished_state_is_what_counts(fake, tmp_path: Path) -> None:
    run = fake.write_finetune_run(tmp_path, "simmim", "ct_organs", "all")
    assert len(results_table(tmp_path)) == 6
    RunDir(run.path).results_path.unlink()  # finished status without results is not finished
    assert results_table(tmp_path).empty
