"""What the report says and how it treats its inputs and its folder (issues 19 and 20): findings in words,
tests that cannot reach significance, impossible values, symlinks out of the runs folder, and an output
folder where it writes and deletes only its own files."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import sys
import types
import warnings
from pathlib import Path

import pandas as pd
import pytest

from medssl import cli
from medssl.analysis.gap import few_many_gap, gap_ranks
from medssl.errors import MedsslInputError
from medssl.report import build_report
from medssl.report.html import Details, Paragraph, Section, render_html, render_markdown
from medssl.report.output import MANIFEST_NAME
from medssl.report.plots import model_label
from medssl.report.tables import leaderboard, method_order
from medssl.results import collect_runs, results_table
from medssl.runs import RunDir


def _section(html: str, section: str) -> str:
    start = html.index(f'<h2 id="{section}">')
    end = html.find("<h2 id=", start + 1)
    return html[start : end if end > 0 else len(html)]


def _rewrite_results(run: RunDir, change) -> None:
    results = json.loads(run.results_path.read_text())
    change(results)
    run.results_path.write_text(json.dumps(results))


def run_cli(args, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["medssl", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def _text(html: str) -> str:
    """The page without its embedded images (base64 can spell anything)."""
    return re.sub(r'src="data:[^"]*"', 'src=""', html)


CHEATS = {  # method -> (case field, value, how the report names it)
    "cheat_five": ("dice", 5.0, "dice 5 is not in [0, 1]"),
    "cheat_nan": ("dice", float("nan"), "dice nan is not finite"),
    "cheat_text": ("dice", "0.9", "dice &#x27;0.9&#x27; is not a number"),
    "cheat_hd95": ("hd95", -1.0, "hd95 -1 is not &gt;= 0"),
    "cheat_nsd": ("nsd", 1.5, "nsd 1.5 is not in [0, 1]"),
}


@pytest.fixture(scope="module")
def shared(fake, tmp_path_factory):
    """One report, built through ``medssl report``, of the small fake benchmark (3 methods, 2 tasks, budgets
    2 and all, 3 (case, seed) pairs per test) plus: random init at 2 cases scoring above its own "all"
    on ct_organs (a negative gap), runs with impossible values, a run whose structure was not predicted
    (HD95 and NSD absent: possible), a run folder symlinked from outside the runs folder and a run
    whose results.json is such a symlink."""
    root = tmp_path_factory.mktemp("shared")
    runs = fake.write_benchmark(root / "bench", pretrain=False, cka=False)
    for run in runs.iterdir():
        if run.name.startswith("finetune-ft-none-ct_organs-b2-"):
            _rewrite_results(RunDir(run), lambda r: [c.update(dice=0.99) for c in r["cases"]])
        if run.name.startswith("finetune-ft-simmim-mri_brain-ball-"):
            _rewrite_results(RunDir(run), lambda r: r["cases"][0].update(hd95=None, nsd=None))
    cheats = {}
    for method, (field, value, _) in CHEATS.items():
        cheat = fake.write_finetune_run(runs, method, "ct_organs", "all")
        _rewrite_results(cheat, lambda r, f=field, v=value: r["cases"][1].update({f: v}))
        cheats[method] = cheat.id
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    os.symlink(fake.write_finetune_run(elsewhere, "linked", "ct_organs", "all").path, runs / "linked-run")
    borrowed = fake.write_finetune_run(elsewhere, "borrowed", "ct_organs", "all")
    inside = runs / "finetune-ft-borrowed-copy"
    inside.mkdir()
    for name in ("run.json", "status.json", "config.yaml"):
        (inside / name).write_bytes((borrowed.path / name).read_bytes())
    os.symlink(borrowed.results_path, inside / "results.json")
    out = root / "report"
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout):
        patch.setattr(sys, "argv", ["medssl", "report", str(runs), "--out", str(out)])
        with pytest.raises(SystemExit) as exit_info, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the skipped runs are also warned about
            cli.main()
    assert exit_info.value.code == 0, stdout.getvalue()
    html = (out / "index.html").read_text(encoding="utf-8")
    return types.SimpleNamespace(runs=runs, out=out, html=html, stdout=stdout.getvalue(), cheats=cheats)


# --------------------------------------------------------------------------- rendering


def test_inline_code_is_rendered_as_code_never_as_backticks(shared, tmp_path: Path) -> None:
    page = render_html(
        "t", [Section("s", "S", [Paragraph("run `medssl bench x.yaml` & see"), Details("more `a`", [])])]
    )
    assert "`" not in page
    assert "<code>medssl bench x.yaml</code> &amp; see" in page and "<summary>more <code>a</code></summary>" in page
    markdown = render_markdown("t", [Section("s", "S", [Paragraph("run `medssl bench`")])], tmp_path)
    assert "`medssl bench`" in markdown  # Markdown keeps its own syntax
    assert "`" not in shared.html and "<code>medssl cka</code>" in shared.html  # "No CKA runs ... `medssl cka`"


def test_no_cell_or_caption_reads_nan(shared) -> None:
    text = _text(shared.html).lower()
    assert not re.search(r"\bnan\b", text.replace("dice nan is not finite", ""))


def test_convergence_is_summarised_with_the_full_table_collapsed(shared) -> None:
    html = _section(shared.html, "convergence")
    before, details = html.split("<details>", 1)
    first_table = before[before.index("<table>") : before.index("</table>")]
    assert first_table.count("<tr>") == 1 + 3  # header + one row per method
    assert "Every task × budget × method (12 rows)" in details and details.count("<tr>") == 1 + 12
    assert "Fastest to a good validation Dice (highest AUC) per task" in before


# --------------------------------------------------------------------------- order, gaps, findings


def test_leaderboard_rows_follow_the_mean_it_shows(fake, tmp_path: Path) -> None:
    """The mean column weighs each task the same; a pooled mean over rows would let the task with more
    test cases decide (here it would put "steady" first)."""
    runs = tmp_path / "runs"
    runs.mkdir()
    for method, skills in {"peaky": (0.2, -0.6), "steady": (-0.2, -0.25), "none": (-0.3, -0.3)}.items():
        fake.write_finetune_run(runs, method, "ct_organs", "all", n_cases=3, skill=skills[0])
        fake.write_finetune_run(runs, method, "mri_brain", "all", n_cases=10, skill=skills[1])
    results = results_table(collect_runs(runs))
    pooled = results.groupby("method")["dice"].mean().sort_values(ascending=False)
    assert list(pooled.index)[0] == "steady"
    table, means = leaderboard(results)
    shown = means["mean"].reindex(method_order(results))
    assert list(shown.index) == ["peaky", "steady", "none"] and shown.is_monotonic_decreasing
    assert list(table.frame.index) == ["peaky", "steady", "random init"]


def test_negative_gaps_are_shown_but_never_ranked(shared) -> None:
    rows = []
    for method, (few, many) in {"a": (0.5, 0.7), "b": (0.6, 0.65), "noisy": (0.7, 0.6), "flat": (0.0, 0.0)}.items():
        for budget, dice in (("2", few), ("all", many)):
            n_train = 2 if budget == "2" else 8
            rows.append(
                {"method": method, "family": "f", "task": "t", "modality": "ct", "budget": budget, "n_train": n_train,
                 "seed": 0, "case": "c", "label": 1, "structure": "s", "dice": dice, "hd95": 1.0, "nsd": 1.0,
                 "run_id": f"{method}{budget}"}
            )  # fmt: skip
    ranks = gap_ranks(few_many_gap(pd.DataFrame(rows))).set_index("method")
    assert ranks.loc["b", "rank"] == 1 and ranks.loc["a", "rank"] == 2
    assert math.isnan(ranks.loc["noisy", "rank"]) and math.isnan(ranks.loc["flat", "rank"])
    assert ranks.loc["noisy", "gap"] == pytest.approx(-0.1)
    budgets = _section(shared.html, "budgets")  # random init: 0.99 at 2 cases on ct_organs, less with all
    assert "(not ranked)" in budgets and "A gap ≤ 0" in budgets and "is not ranked" in budgets


def test_headlines_state_the_finding_and_what_the_tests_cannot_show(shared) -> None:
    """Three (case, seed) pairs: the smallest two-sided Wilcoxon p is 0.25; the report says so in words."""
    top = shared.html[: shared.html.index("<nav>")]
    for task in ("ct_organs", "mri_brain"):
        assert f"{task} (budget all): the best pretrained encoder, simmim, scores" in top
    assert "95% CI" in top and "over 3 (test case, seed) pairs" in top
    assert "not a significant difference (paired Wilcoxon, Holm-corrected p = 0.500)" in top
    assert "no encoder could have reached p &lt; 0.05 here" in top
    assert "cannot reach significance whatever the data" in top and "0.25 at n = 3" in top
    leaderboard_text = _section(shared.html, "leaderboard")
    assert "No encoder differs significantly from random init on any task at any budget" in leaderboard_text
    statistics = _section(shared.html, "statistics")
    assert "cannot reach significance whatever the data" in statistics and "smallest possible p_holm" in statistics


def test_a_significant_difference_is_said_in_words(fake, tmp_path: Path) -> None:
    runs = fake.write_benchmark(
        tmp_path / "bench", n_cases=8, methods=("none", "simmim"), tasks=("ct_organs",), budgets=("all",),
        pretrain=False, cka=False,
    )  # fmt: skip
    html = build_report(runs, tmp_path / "report").read_text(encoding="utf-8")
    top = html[: html.index("<nav>")]
    assert "significantly better than random init (paired Wilcoxon, Holm-corrected p = 0.008)" in top
    assert "could have reached" not in top and "cannot reach significance" not in top
    leaderboard_text = _section(html, "leaderboard")
    assert "1 of 1 paired tests against random init are significant" in leaderboard_text
    assert "simmim on ct_organs (budget all, better, p = 0.008)" in leaderboard_text


# --------------------------------------------------------------------------- values read from run folders


def test_runs_with_impossible_values_are_excluded_and_named(shared) -> None:
    top = shared.html[: shared.html.index("<nav>")]
    assert f"{len(CHEATS)} fine-tuning runs left out of every table, figure and test" in top
    for method, (_, _, problem) in CHEATS.items():
        assert shared.cheats[method] in top and problem in top, method
        for section in ("leaderboard", "budgets", "statistics", "structures"):
            assert method not in _section(shared.html, section), (method, section)
    kept = set(pd.read_csv(shared.out / "results.csv")["method"])
    assert kept == {"none", "simmim", "dino"}  # the run without HD95/NSD (not predicted) is possible: kept


# --------------------------------------------------------------------------- symlinks out of the runs folder


def test_symlinks_leading_out_of_the_runs_folder_are_not_followed(shared) -> None:
    assert "skipped linked-run: the symlink linked-run leads out of" in shared.stdout
    assert "the symlink finetune-ft-borrowed-copy/results.json leads out of" in shared.stdout
    assert "Run linked-run skipped: the symlink linked-run leads out of" in shared.html
    for method in ("linked", "borrowed"):
        assert method not in _section(shared.html, "leaderboard")


# --------------------------------------------------------------------------- CKA and the output folder


def test_cka_figures_name_their_models_and_a_rebuild_keeps_the_users_files(fake, tmp_path: Path) -> None:
    runs = fake.write_benchmark(tmp_path / "bench", methods=("none", "simmim"), tasks=("ct_organs",), budgets=("all",),
                                pretrain=False, cka=False)  # fmt: skip
    cka = fake.write_cka_run(runs)
    a = "/study/runs/pretrain-simmim-0123456789ab/checkpoints/encoder.pt"
    b = "/study/runs/finetune-simmim-ct_organs-ball-s0-0123456789ab/checkpoints/best.pt"

    def undefined_stage4(results):
        results["minibatch_cka"][4] = [None] * 5
        results["minibatch_cka_left_out"] = {"A stage4": "a minibatch had only 1 distinct rows at this layer"}
        results.update(model_a=a, model_b=b)

    _rewrite_results(cka, undefined_stage4)
    out = tmp_path / "report"
    section = _text(_section(build_report(runs, out).read_text(encoding="utf-8"), "cka"))
    assert not re.search(r"\bnan\b", section.lower())
    assert "pretrain-simmim (encoder.pt)" in section and "finetune-simmim-ct_organs-ball-s0 (best.pt)" in section
    assert "Grey minibatch-CKA cells are left out: A stage4: a minibatch had only 1 distinct rows" in section
    assert model_label("x/best.pt") == "best.pt"

    mine = out / "figures" / "my_annotated_budgets.png"
    mine.write_bytes(b"\x89PNG\r\n\x1a\n the user's figure")
    notes = out / "notes.txt"
    notes.write_text("mine")
    written = json.loads((out / MANIFEST_NAME).read_text())["files"]
    assert "figures/cka_00.png" in written and "figures/my_annotated_budgets.png" not in written
    (cka.path / "status.json").unlink()  # the CKA run is no longer finished: its figure goes, the user's stay
    build_report(runs, out)
    assert not (out / "figures" / "cka_00.png").exists()
    assert mine.read_bytes().endswith(b"the user's figure") and notes.read_text() == "mine"


def test_a_foreign_folder_is_refused_with_one_line_and_left_untouched(fake, tmp_path: Path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    fake.write_finetune_run(runs, "none", "ct_organs", "all")
    photos = tmp_path / "photos"
    (photos / "figures").mkdir(parents=True)
    (photos / "figures" / "holiday.png").write_bytes(b"png")
    before = sorted(p.relative_to(photos) for p in photos.rglob("*"))
    with pytest.raises(MedsslInputError, match="not empty and not a report folder"):
        build_report(runs, photos)
    code, _, err = run_cli(["report", runs, "--out", photos], capsys, monkeypatch)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and str(photos) in lines[0]
    assert sorted(p.relative_to(photos) for p in photos.rglob("*")) == before


def test_earlier_reports_are_adopted_and_a_manifest_cannot_reach_outside(fake, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    fake.write_finetune_run(runs, "none", "ct_organs", "all")
    out = tmp_path / "report"
    build_report(runs, out)
    (out / MANIFEST_NAME).unlink()  # as written by a version before the manifest
    old_figure = out / "figures" / "cka_07.png"
    old_figure.write_bytes(b"an old figure, maybe the user's")
    build_report(runs, out)
    assert old_figure.exists() and (out / MANIFEST_NAME).is_file()

    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest["files"] += ["../victim.txt", str(victim), "figures/../../victim.txt"]
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    build_report(runs, out)
    assert victim.read_text() == "keep"


def test_a_build_interrupted_midway_leaves_a_folder_the_next_build_accepts(tmp_path: Path) -> None:
    """The folder is marked as the report's before anything else is written: a second process reaching
    it while the first is still writing (or after the first was killed) does not take it for foreign."""
    from medssl.report.output import ReportFolder

    out = tmp_path / "report"
    out.mkdir()
    first = ReportFolder.claim(out, record=True)
    first.path("results.csv").write_text("half written")
    first.directory("figures")
    second = ReportFolder.claim(out)  # no error: the folder is the report's
    assert second.previous == set()  # the interrupted build's files are not claimed: never pruned
    assert (out / "results.csv").read_text() == "half written"
