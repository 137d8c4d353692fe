"""Provenance: one version (pyproject -> installed metadata), the commit every run records, the report's list."""

from __future__ import annotations

import re
from pathlib import Path

from medssl import __version__
from medssl.runs import RunDir, run_session
from medssl.version import code_version, describe_code_version

ROOT = Path(__file__).resolve().parents[1]


def test_version_is_single_sourced_from_pyproject() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    declared = re.search(r'^version = "([^"]+)"', pyproject, re.MULTILINE)
    literal = re.compile(r'^__version__\s*=\s*["\']', re.MULTILINE)  # a second, hand-written copy
    assert not [p for p in (ROOT / "src" / "medssl").rglob("*.py") if literal.search(p.read_text(encoding="utf-8"))]
    assert declared is not None and __version__ == declared.group(1)


def test_a_run_records_its_commit(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "r")
    with run_session(run, "a: 1\n", {"kind": "pretrain"}, is_main=True, world_size=1):
        pass
    recorded = run.info()["code_version"]
    assert recorded == code_version() and recorded["version"] == __version__
    if (ROOT / ".git").exists():  # the test suite runs from a checkout: commit and dirty flag are known
        assert re.fullmatch(r"[0-9a-f]{40}", recorded["commit"]) and isinstance(recorded["dirty"], bool)


def test_describe_code_version() -> None:
    assert describe_code_version("0.1.0") == "0.1.0"
    assert describe_code_version({"version": "1.2", "commit": "a" * 40, "dirty": True}) == (
        "1.2 @ aaaaaaaaaaaa (uncommitted changes)"
    )
    assert describe_code_version({"version": "1.2", "commit": None, "dirty": None}) == (
        "1.2 (installed, no git checkout)"
    )
