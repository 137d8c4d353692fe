"""The report's provenance lists the commits its runs came from."""

from __future__ import annotations

from pathlib import Path

from medssl.results import provenance
from medssl.runs import list_runs


def test_report_provenance_lists_the_commits_of_its_runs(fake_runs: Path) -> None:
    runs = list_runs(fake_runs)
    commits = ["1" * 40, "2" * 40]
    for run, commit in zip(runs[:2], commits, strict=True):
        run.update_info(code_version={"version": "0.1.0", "commit": commit, "dirty": False})
    prov = provenance(fake_runs)
    assert prov["commits"] == commits
    assert "0.1.0 @ 111111111111" in prov["code_versions"]
