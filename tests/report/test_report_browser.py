"""The report as a reader sees it: ``index.html`` rendered by headless Chromium (Debian's ``chromium``),
every section laid out and every figure decoded and displayed. Skipped when Chromium is not installed."""

from __future__ import annotations

import struct
import sys
import warnings
from pathlib import Path

import pytest

from medssl.report import SECTIONS, build_report
from medssl.report.html import PNG_MAGIC

sys.path.insert(0, str(Path(__file__).parent))
import chromium  # noqa: E402

pytestmark = pytest.mark.skipif(
    chromium.find_chromium() is None,
    reason="headless Chromium not installed (Debian: apt-get install chromium; .ci/run tries to install it; "
    "MEDSSL_CHROMIUM=/path picks a binary)",
)


def png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(PNG_MAGIC)
    return struct.unpack(">II", data[16:24])


def test_every_section_and_image_is_displayed_in_chromium(fake, tmp_path: Path) -> None:
    runs = fake.write_benchmark(tmp_path / "bench")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        index = build_report(runs, tmp_path / "bench" / "report")
    html_images = index.read_text(encoding="utf-8").count("<img ")
    layout, screenshot = chromium.render(index)

    assert layout["title"] == "medssl benchmark report"
    assert [s["id"] for s in layout["sections"]] == [sid for sid, _ in SECTIONS]
    for section in layout["sections"]:
        assert section["shown"] and section["height"] > 30, section
    assert len(layout["images"]) == html_images >= 6
    for image in layout["images"]:
        assert image["complete"] and image["naturalWidth"] > 0 and image["naturalHeight"] > 0, image
        assert image["shown"] and image["width"] > 50 and image["height"] > 50, image
        assert image["width"] <= layout["width"], image  # scaled to the page, not cut off
    with_figures = {image["section"] for image in layout["images"]}
    assert {"budgets", "convergence", "cka", "statistics", "pretraining"} <= with_figures
    width, height = png_size(screenshot)
    assert width == layout["width"] and height == layout["height"] > 2000
