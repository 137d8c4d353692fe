from __future__ import annotations

import base64
import re
import warnings
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from medssl.report import SECTIONS, build_report, default_out_dir
from medssl.report.build import BUILD_FAILED
from medssl.report.html import PNG_MAGIC
from medssl.report.tables import Table, latex_table, markdown_table

SECTION_IDS = [
    "leaderboard",
    "families",
    "budgets",
    "controls",
    "probe",
    "convergence",
    "modality",
    "cka",
    "structures",
    "statistics",
    "pretraining",
    "cost",
    "provenance",
]


class ReportParser(HTMLParser):
    """Collects h2 ids, image sources, alert texts, external references and text per section."""

    def __init__(self) -> None:
        super().__init__()
        self.h2_ids: list[str] = []
        self.images: list[str] = []
        self.external: list[str] = []
        self.alerts: list[tuple[str, str]] = []  # (section id, text)
        self.section_text: dict[str, str] = {}
        self.bold: dict[str, list[str]] = {}
        self._section = ""
        self._alert_depth = 0
        self._alert_text = ""
        self._in_bold = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "h2":
            self._section = a.get("id") or ""
            self.h2_ids.append(self._section)
        elif tag == "img":
            self.images.append(a.get("src") or "")
        elif tag in ("script", "link", "iframe") or (tag == "a" and (a.get("href") or "").startswith("http")):
            self.external.append(tag)
        elif tag == "div" and "alert" in (a.get("class") or ""):
            self._alert_depth, self._alert_text = 1, ""
        elif tag == "b":
            self._in_bold = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "div" and self._alert_depth:
            self._alert_depth = 0
            self.alerts.append((self._section, self._alert_text))
        elif tag == "b":
            self._in_bold = False

    def handle_data(self, data: str) -> None:
        self.section_text[self._section] = self.section_text.get(self._section, "") + data
        if self._alert_depth:
            self._alert_text += data
        if self._in_bold:
            self.bold.setdefault(self._section, []).append(data)


def parse(index: Path) -> ReportParser:
    parser = ReportParser()
    parser.feed(index.read_text(encoding="utf-8"))
    return parser


def assert_images_are_embedded_pngs(parser: ReportParser) -> None:
    for src in parser.images:
        assert src.startswith("data:image/png;base64,"), src[:40]
        payload = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert len(payload) > 1000 and payload.startswith(PNG_MAGIC)


@pytest.fixture(scope="module")
def full_report(fake, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("bench")
    runs = fake.write_benchmark(out)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no section may fail, even silently
        index = build_report(runs, out / "report")
    return runs, index


def test_build_report_writes_every_section(full_report: tuple[Path, Path]) -> None:
    _, index = full_report
    report = index.parent
    assert index.name == "index.html" and (report / "report.md").exists()
    parser = parse(index)
    assert parser.h2_ids == SECTION_IDS == [sid for sid, _ in SECTIONS]
    assert not parser.external
    assert BUILD_FAILED not in index.read_text(encoding="utf-8")
    # budgets, convergence, modality, CKA heat map, CD plot(s), pretraining loss
    assert len(parser.images) >= 6
    assert_images_are_embedded_pngs(parser)
    for name in ("results.csv", "results.parquet", "curves.csv", "pretrain.csv", "leaderboard.tex"):
        assert (report / name).stat().st_size > 0, name
    figures = sorted((report / "figures").glob("*.png"))
    assert len(figures) == len(parser.images)
    assert all(f.read_bytes().startswith(PNG_MAGIC) for f in figures)


def test_collapse_warning_names_the_collapsed_method(full_report: tuple[Path, Path]) -> None:
    _, index = full_report
    parser = parse(index)
    pretraining_alerts = [text for section, text in parser.alerts if section == "pretraining"]
    assert len(pretraining_alerts) == 1
    assert "COLLAPSE" in pretraining_alerts[0] and "dino" in pretraining_alerts[0]
    assert "simmim" not in pretraining_alerts[0]
    # Also at the top of the page, before any section, and beside its leaderboard scores.
    assert any(section == "leaderboard" and "dino" in text for section, text in parser.alerts)
    assert any(section == "" and "dino" in text for section, text in parser.alerts)
    assert "COLLAPSE" in (index.parent / "report.md").read_text(encoding="utf-8")


def test_sections_carry_the_expected_content(full_report: tuple[Path, Path]) -> None:
    _, index = full_report
    parser = parse(index)
    text = parser.section_text
    # Leaderboard: the best method of every column is bold; CI brackets present.
    assert parser.bold["leaderboard"] and all(cell.startswith("0.") for cell in parser.bold["leaderboard"])
    assert re.search(r"0\.\d{3} \[0\.\d{3}, 0\.\d{3}\]", text["leaderboard"])
    assert "simmim" in text["leaderboard"] and "random init" in text["leaderboard"]
    assert "self_distillation" in text["families"] and "mim" in text["families"]
    assert "ct_organs" in text["modality"] and "No MRI task" not in text["modality"]
    assert "liver" in text["structures"] and "spleen" in text["structures"]
    assert "pretrained_vs_finetuned" in text["cka"] and "stage4" in text["cka"]
    assert "Friedman" in text["statistics"]
    assert "torch" in text["provenance"] and "finetune" in text["provenance"]
    markdown = (index.parent / "report.md").read_text(encoding="utf-8")
    for sid, title in SECTIONS:
        assert f'<a id="{sid}"></a>' in markdown and f"## {title}" in markdown
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown):
        assert (index.parent / link).exists(), link
    latex = (index.parent / "leaderboard.tex").read_text(encoding="utf-8")
    assert r"\toprule" in latex and r"\textbf{" in latex and r"ct\_organs" in latex


def test_leaderboard_significance_marks(fake, tmp_path: Path) -> None:
    # 8 cases: simmim and dino beat random init on every case (exact Wilcoxon p = 0.0078, Holm < 0.05);
    # moco is simmim's twin up to noise, so it is not significantly different from the best (†).
    runs = fake.write_benchmark(tmp_path, n_cases=8, tasks=("ct_organs",), budgets=("all",), pretrain=False, cka=False)
    fake.write_finetune_run(runs, "moco", "ct_organs", "all", n_cases=8, skill=0.2)
    index = build_report(runs, tmp_path / "report")
    parser = parse(index)
    rows = {}
    for line in (index.parent / "report.md").read_text(encoding="utf-8").split("## Pretext families")[0].splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) >= 2 and cells[0] in ("simmim", "dino", "moco", "random init"):
            rows[cells[0]] = cells[1]
    assert set(rows) == {"simmim", "dino", "moco", "random init"}
    assert "*" in rows["dino"] and "†" not in rows["dino"]
    assert "*" not in rows["random init"]
    best = "simmim" if rows["simmim"].startswith("**") else "moco"
    other = "moco" if best == "simmim" else "simmim"
    assert "†" in rows[other] and "†" not in rows[best]
    assert BUILD_FAILED not in index.read_text(encoding="utf-8")
    assert_images_are_embedded_pngs(parser)


def test_report_degrades_gracefully(fake, tmp_path: Path) -> None:
    """One method, one budget, no MRI task, no pretraining runs, no CKA runs."""
    runs = fake.write_benchmark(
        tmp_path, methods=("simmim",), tasks=("ct_organs",), budgets=("all",), pretrain=False, cka=False
    )
    fake.write_finetune_run(runs, "dino", "ct_organs", 2, finished=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        index = build_report(tmp_path, tmp_path / "report")  # the benchmark folder holding runs/
    parser = parse(index)
    assert parser.h2_ids == SECTION_IDS
    assert BUILD_FAILED not in index.read_text(encoding="utf-8")
    text = parser.section_text
    assert "Only one method" in text["leaderboard"]
    assert "Only one label budget" in text["budgets"]
    assert "No MRI task" in text["modality"]
    assert "No CKA runs" in text["cka"]
    assert "No finished pretraining runs" in text["pretraining"]
    assert "Fewer than two methods" in text["statistics"]
    assert any("not finished" in alert for _, alert in parser.alerts)
    assert_images_are_embedded_pngs(parser)


def test_report_of_an_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        index = build_report(tmp_path / "runs", tmp_path / "report")
    parser = parse(index)
    assert default_out_dir(tmp_path / "runs") == default_out_dir(tmp_path) == tmp_path / "report"
    assert parser.h2_ids == SECTION_IDS and not parser.images
    assert BUILD_FAILED not in index.read_text(encoding="utf-8")
    assert "No finished fine-tuning runs" in parser.section_text["leaderboard"]
    assert pd.read_csv(tmp_path / "report" / "results.csv").empty


def test_rebuild_drops_figures_of_removed_runs(fake, tmp_path: Path) -> None:
    runs = fake.write_benchmark(
        tmp_path, methods=("none", "simmim"), tasks=("ct_organs",), budgets=("all",), pretrain=False
    )
    build_report(runs, tmp_path / "report")
    assert (tmp_path / "report" / "figures" / "cka_00.png").exists()
    cka_dir = next(p for p in runs.iterdir() if p.name.startswith("cka-"))
    (cka_dir / "status.json").unlink()  # no longer finished
    index = build_report(runs, tmp_path / "report")
    assert not (tmp_path / "report" / "figures" / "cka_00.png").exists()
    assert "No CKA runs" in parse(index).section_text["cka"]


def test_table_renderers_escape_and_bold() -> None:
    frame = pd.DataFrame({"ct_organs": ["0.900", "0.800*"], "a|b": ["–", "50%"]}, index=["simmim", "none"])
    bold = pd.DataFrame({"ct_organs": [True, False], "a|b": [False, True]}, index=frame.index)
    table = Table(frame, caption="t_1", bold=bold, index_name="method")
    md = markdown_table(table)
    assert "| method | ct_organs | a\\|b |" in md and "**0.900**" in md and "**50%**" in md
    tex = latex_table(table)
    assert r"\textbf{0.900}" in tex and r"0.800$^{*}$" in tex and r"50\%" in tex and r"ct\_organs" in tex


def test_report_shows_health_curves_and_the_optimiser_recipe(full_report: tuple[Path, Path]) -> None:
    runs, index = full_report
    markdown = (index.parent / "report.md").read_text(encoding="utf-8")
    assert "Representation health per step" in markdown
    assert (index.parent / "figures" / "pretraining_health.png").exists()
    assert "Pretraining optimiser per method (recipe: published" in markdown
    # simmim's published SimMIM recipe at batch 8: clip 5, wd 0.05; dino's: 0.04 -> 0.4, clip 3
    assert "0.040 → 0.400" in markdown and "| 5.000 |" in markdown and "AdamW" in markdown
    assert "embedding spread" in markdown  # the collapsed dino run's reason, from the health verdict


def test_report_flags_few_contrastive_negatives(fake, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    fake.write_pretrain_run(runs, "simclr")
    index = build_report(runs, tmp_path / "report")
    alerts = [text for section, text in parse(index).alerts if section == "provenance"]
    assert any("SimCLR (14 negatives)" in text or "simclr (14 negatives)" in text.lower() for text in alerts), alerts
    assert "14 (few)" in (index.parent / "report.md").read_text(encoding="utf-8")
