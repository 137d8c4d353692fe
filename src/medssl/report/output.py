"""The report's output folder: it writes only files it owns and deletes only files it wrote.

``medssl report RUNS --out DIR`` may be pointed at any folder. The report therefore keeps a manifest,
``DIR/.medssl-report.json``, of every file it wrote. A rebuild replaces those files and removes the
ones of the last build that this build no longer writes (a figure of a run that is gone), and nothing
else: a user's own ``DIR/figures/notes.png`` is never touched. A folder that is not empty and holds
no manifest is refused with one line, unless it is a report written before the manifest existed
(its index.html, report.md and provenance.json are there), which is adopted without deleting anything.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from medssl.errors import MedsslInputError
from medssl.fileio import atomic_write_text

MANIFEST_NAME = ".medssl-report.json"
LOCK_NAME = ".report.lock"
# what a report wrote before it kept a manifest: enough of them marks a folder as an earlier report
LEGACY_MARKERS = ("index.html", "report.md", "provenance.json")
LEGACY_FILES = (*LEGACY_MARKERS, "leaderboard.tex", "results.csv", "results.parquet", "curves.csv", "pretrain.csv")


def _is_own_relative(name: object) -> bool:
    """A manifest entry names a file inside the folder: relative, no '..', no NUL."""
    if not isinstance(name, str) or not name or "\0" in name or "\\" in name:
        return False
    path = PurePosixPath(name)
    return not path.is_absolute() and ".." not in path.parts and name not in (MANIFEST_NAME, LOCK_NAME)


class ReportFolder:
    """The files one build writes into ``root``; :meth:`finish` prunes the last build's leftovers."""

    def __init__(self, root: Path, previous: set[str]) -> None:
        self.root = root
        self.previous = previous
        self.written: set[str] = set()

    @classmethod
    def claim(cls, out: str | Path, record: bool = False) -> ReportFolder:
        """The folder ``out`` for a new build: new, empty, or a report's own; else ``MedsslInputError``.

        ``record``: mark the folder as the report's at once (a manifest of what it owns so far), before
        anything else is written, so a build that another process or a crash interrupts midway never
        leaves a folder that looks foreign to the next build."""
        folder = cls._claim(Path(out))
        if record and not (folder.root / MANIFEST_NAME).is_file():
            folder._write_manifest(folder.previous)
        return folder

    @classmethod
    def _claim(cls, root: Path) -> ReportFolder:
        if root.exists() and not root.is_dir():
            raise MedsslInputError(root, "report folder is an existing file, not a folder")
        manifest = root / MANIFEST_NAME
        if manifest.is_symlink() or (manifest.exists() and not manifest.is_file()):
            raise MedsslInputError(manifest, "not a plain file; give another report folder")
        if manifest.is_file():
            return cls(root, _read_manifest(manifest))
        entries = [p.name for p in root.iterdir() if p.name != LOCK_NAME] if root.is_dir() else []
        if not entries:
            return cls(root, set())
        if all((root / name).is_file() for name in LEGACY_MARKERS):
            # An earlier report: its fixed files are the report's; its figures are left as they are.
            return cls(root, {name for name in LEGACY_FILES if (root / name).is_file()})
        raise MedsslInputError(
            root,
            f"not empty and not a report folder (no {MANIFEST_NAME}); the report writes only into a new, "
            "empty or earlier report folder and never over other files: give another --out",
        )

    def path(self, relative: str) -> Path:
        """Where to write ``relative`` (a POSIX path inside the folder); recorded as written."""
        if not _is_own_relative(relative):
            raise ValueError(f"not a file inside the report folder: {relative!r}")
        self.written.add(relative)
        target = self.root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if not _inside(self.root, target.parent) or target.is_symlink():
            raise MedsslInputError(target, "leads out of the report folder (a symlink); not written")
        return target

    def directory(self, relative: str) -> Path:
        """A subfolder for the report's own files, created; refused when it leads out of the folder."""
        target = self.root / relative
        target.mkdir(parents=True, exist_ok=True)
        if not _inside(self.root, target):
            raise MedsslInputError(target, "leads out of the report folder (a symlink); not written")
        return target

    def adopt(self, path: Path) -> None:
        """Record a file written by a helper into the folder (e.g. the CSV tables)."""
        self.written.add(Path(path).resolve().relative_to(self.root.resolve()).as_posix())

    def finish(self) -> None:
        """Remove what the last build wrote and this one did not, then record this build's files."""
        for name in sorted(self.previous - self.written):
            stale = self.root / name
            if stale.is_file() and not stale.is_symlink() and _inside(self.root, stale.parent):
                stale.unlink()
        self._write_manifest(self.written)

    def _write_manifest(self, files: set[str]) -> None:
        body = {"written_by": "medssl report", "files": sorted(files)}
        atomic_write_text(self.root / MANIFEST_NAME, json.dumps(body, indent=1) + "\n")


def _inside(root: Path, path: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def _read_manifest(path: Path) -> set[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        raise MedsslInputError(path, "unreadable report manifest; give another report folder") from None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, list):
        raise MedsslInputError(path, "report manifest has no 'files' list; give another report folder")
    # an entry that would leave the folder is ignored, never followed
    return {name for name in files if _is_own_relative(name)}
