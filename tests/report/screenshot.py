"""Write the README's report screenshot: ``python tests/report/screenshot.py docs/report.png``.

Builds the small fake benchmark of ``conftest.py`` (three methods, two tasks, two budgets), renders its
report in headless Chromium and keeps the top of the page at half scale, palette-quantised (< 300 KB).
"""

from __future__ import annotations

import io
import sys
import tempfile
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import chromium  # noqa: E402

import conftest  # noqa: E402
from medssl.report import build_report  # noqa: E402

MAX_HEIGHT = 2400  # pixels of the page kept (after scaling)


def main(target: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        runs = conftest.write_benchmark(Path(tmp) / "bench")
        index = build_report(runs, Path(tmp) / "bench" / "report")
        _, png = chromium.render(index, width=1100, screenshot_scale=0.6)
    image = Image.open(io.BytesIO(png)).convert("RGB")
    image = image.crop((0, 0, image.width, min(image.height, MAX_HEIGHT)))
    image = image.quantize(colors=64, method=Image.Quantize.MEDIANCUT)
    target.parent.mkdir(parents=True, exist_ok=True)
    image.save(target, optimize=True)
    print(f"{target}: {image.width}x{image.height}, {target.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/report.png"))
