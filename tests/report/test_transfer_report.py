"""The transfer study's report sections from fake run directories: the controls' effects with CI and p, the
identity paragraph, the encoder drift table, and the "Frozen-encoder probe" section with its online curve."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest

from medssl.analysis.transfer import drift_table, paired_effects, probe_results_table
from medssl.config import IDENTITY_TRANSFORMER, SUPERVISED
from medssl.report import SECTIONS, build_report
from medssl.results import collect_runs, results_table
from medssl.runs import RunDir

# The positive control helps at one case, the identity control is a little below random init, SimMIM is null.
SKILL = {"none": 0.0, SUPERVISED: 0.1, IDENTITY_TRANSFORMER: -0.03, "simmim": 0.0}


def _add_drift(run: RunDir, stage4: float) -> None:
    results = run.results() or {}
    results["encoder_drift"] = {"patch_embed": 0.01, "stage1": 0.02, "stage2": 0.03, "stage3": 0.05, "stage4": stage4}
    run.write_results(results)


def _write_probe_run(runs: Path, method: str, seed: int, level: float) -> None:
    run = RunDir(runs / f"probe-{method}-ct_organs-b1-s{seed}-000000000000")
    rng = np.random.default_rng(seed)
    cases = [
        {"case": f"case_{c:03d}", "label": 1, "structure": "liver", "dice": float(level + rng.normal(0, 0.01))}
        for c in range(5)
    ]
    keys = {"method": method, "family": SUPERVISED if method == SUPERVISED else "none", "task": "ct_organs"}
    keys |= {"modality": "ct", "budget": "1", "n_train": 1, "seed": seed}
    run.prepare("fake: true\n", {"kind": "probe", "run_id": run.id, **keys})
    run.write_results({"kind": "probe", **keys, "cases": cases, "mean_dice": level})
    run.set_status("finished")


@pytest.fixture(scope="module")
def transfer_report(tmp_path_factory, fake: types.SimpleNamespace) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("transfer")
    runs = out / "runs"
    for method, skill in SKILL.items():
        for budget in (1, "all"):
            for seed in (0, 1, 2):
                run = fake.write_finetune_run(runs, method, "ct_organs", budget, seed, n_cases=5, skill=skill)
                _add_drift(run, 0.4 if method == SUPERVISED else 0.1)
    for seed in (0, 1, 2):
        _write_probe_run(runs, "none", seed, 0.2)
        _write_probe_run(runs, SUPERVISED, seed, 0.5)
    pretrain = fake.write_pretrain_run(runs, "simmim")
    for step, dice in ((0, 0.1), (20, 0.2), (40, 0.3)):
        pretrain.append_metrics({"step": step, "probe": {"dice": dice, "per_structure": {"liver": dice}}})
    build_report(runs, out / "report")
    return out, (out / "report" / "report.md").read_text(encoding="utf-8")


def test_paired_effects_and_tables(transfer_report: tuple[Path, str]) -> None:
    out, _ = transfer_report
    collection = collect_runs(out / "runs")
    effects = paired_effects(results_table(collection))
    row = effects[(effects["method"] == SUPERVISED) & (effects["budget"] == "1")].iloc[0]
    assert row["n"] == 15 and row["diff"] == pytest.approx(0.15, abs=0.02)  # skill 0.1 x 1.5 at few labels
    assert row["ci_lo"] < row["diff"] < row["ci_hi"] and row["p"] < 0.05
    drift = drift_table(collection).set_index("method")
    assert drift.loc[SUPERVISED, "stage4"] == pytest.approx(0.4) and drift.loc[SUPERVISED, "runs"] == 6
    probes = probe_results_table(collection)
    assert len(probes) == 2 * 3 * 5 and set(probes["method"]) == {"none", SUPERVISED}


def test_sections_state_the_controls_and_the_probe(transfer_report: tuple[Path, str]) -> None:
    out, md = transfer_report
    assert ("probe", "Frozen-encoder probe") in SECTIONS and ("controls", "Controls and transfer effects") in SECTIONS
    assert "## Frozen-encoder probe" in md and "## Controls and transfer effects" in md
    assert "Positive control (supervised" in md and "the protocol sees an effect of this size" in md
    assert "Identity control on ct_organs" in md
    assert "simmim vs random init: better nowhere at p < 0.05" in md
    assert "The probe passes the supervised control on ct_organs at 1 case(s)" in md
    assert "Encoder drift" in md
    assert (out / "report" / "figures" / "online_probe.png").is_file()
    assert "Online probe: simmim 0.100 at step 0 → 0.300 at step 40" in md
    html = (out / "report" / "index.html").read_text(encoding="utf-8")
    assert "Frozen-encoder probe" in html
    assert json.loads((out / "report" / "provenance.json").read_text())  # the rest of the report still builds
