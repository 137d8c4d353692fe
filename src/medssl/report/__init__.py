"""The benchmark report: tables (Markdown, CSV, LaTeX), figures (PNG) and a self-contained HTML page,
built from run directories alone."""

from medssl.report.build import SECTIONS, build_report, default_out_dir

__all__ = ["SECTIONS", "build_report", "default_out_dir"]
