"""Where an export may write, and writing a bundle folder so that no stale file survives.

``--out`` is checked before anything is read or built: a file export refuses a folder, a special file
(``/proc/...``, a device, a FIFO) or a missing parent folder; a bundle export refuses a file and a
non-empty folder that is not a medssl bundle. Any operating-system error while writing becomes one line
naming the path (exit 2).

A bundle is assembled in a temporary sibling folder first, so a failed export leaves an earlier bundle
untouched. Then its files replace the old bundle's: every file the old bundle owned (listed in its
``.medssl-bundle.json``) that the new one does not write is removed, and files the user added (``eval/``
segmentations) are left alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from medssl.errors import MedsslInputError
from medssl.fileio import atomic_path

MANIFEST = ".medssl-bundle.json"
# what bundles exported before the manifest existed wrote (medssl 0.1)
LEGACY_FILES = ("configs/inference.json", "configs/metadata.json", "models/model.pt", "README.md")


def _folder_mode() -> int:
    """0777 minus the umask, what ``mkdir`` gives (``mkdtemp`` makes 0700 folders)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def _describe(err: OSError) -> str:
    return err.strerror or type(err).__name__


def check_file_target(out: Path) -> None:
    """``out`` can receive a new regular file (replacing a regular file is fine)."""
    try:
        info = out.lstat() if os.path.lexists(out) else None
    except OSError as err:
        raise MedsslInputError(out, f"cannot write here ({_describe(err)})") from None
    if info is not None and stat.S_ISDIR(info.st_mode):
        raise MedsslInputError(out, "--out is a folder; give the path of the .pt file to write")
    if info is not None and not stat.S_ISREG(info.st_mode):
        raise MedsslInputError(out, "--out is not a regular file (a link, device or pipe); give a new file path")
    parent = out.parent
    if not parent.is_dir():
        raise MedsslInputError(out, f"--out's folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MedsslInputError(out, f"--out's folder {parent} is not writable")


def write_file_atomically(out: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` for a temporary file beside ``out``, then move it into place; an OS error
    (read-only or special file system, disk full) is one line naming ``out``."""
    check_file_target(out)
    try:
        with atomic_path(out) as tmp:
            write(tmp)
    except OSError as err:
        raise MedsslInputError(out, f"cannot write the export ({_describe(err)})") from None


def _owned_files(folder: Path) -> list[str] | None:
    """Files an earlier medssl bundle in ``folder`` owns; None when ``folder`` is not one."""
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            listed = json.loads(manifest.read_text(encoding="utf-8")).get("files")
        except (OSError, ValueError, AttributeError):
            listed = None
        if isinstance(listed, list) and all(isinstance(f, str) for f in listed):
            return [f for f in listed if _inside(folder, f)]
    metadata = folder / "configs" / "metadata.json"
    try:
        legacy = "medssl" in json.loads(metadata.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        legacy = False
    return list(LEGACY_FILES) if legacy else None


def _inside(folder: Path, relative: str) -> bool:
    if os.path.isabs(relative) or "\0" in relative:
        return False
    return (folder / relative).resolve().is_relative_to(folder.resolve())


def check_bundle_target(out: Path) -> None:
    """``out`` is a new path, an empty folder, or a medssl bundle (to be replaced)."""
    if os.path.lexists(out) and (out.is_symlink() or not out.is_dir()):
        raise MedsslInputError(out, "--out exists and is not a folder; give a new or empty folder for the bundle")
    if out.is_dir() and any(out.iterdir()) and _owned_files(out) is None:
        raise MedsslInputError(
            out, "--out holds files that are not a medssl bundle; give a new or empty folder (nothing was written)"
        )
    parent = out.parent
    if not parent.is_dir():
        raise MedsslInputError(out, f"--out's folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MedsslInputError(out, f"--out's folder {parent} is not writable")


@contextlib.contextmanager
def staged_bundle(out: Path) -> Iterator[Path]:
    """A temporary sibling folder to write the bundle into; on success its files replace the bundle at
    ``out`` (see the module docstring), on failure it is removed and ``out`` is as it was."""
    check_bundle_target(out)
    try:
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        os.chmod(stage, _folder_mode())
    except OSError as err:
        raise MedsslInputError(out, f"cannot write the bundle ({_describe(err)})") from None
    try:
        yield stage
        _swap_in(stage, out)
    except OSError as err:
        raise MedsslInputError(out, f"cannot write the bundle ({_describe(err)})") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _swap_in(stage: Path, out: Path) -> None:
    new_files = sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file())
    (stage / MANIFEST).write_text(json.dumps({"files": new_files}, indent=2) + "\n", encoding="utf-8")
    if not os.path.lexists(out):
        os.replace(stage, out)
        return
    stale = set(_owned_files(out) or []) - set(new_files)
    for name in stale:
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()
    for name in [*new_files, MANIFEST]:
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(stage / name, target)
    for folder in sorted({(out / name).parent for name in stale}, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            if folder != out and not any(folder.iterdir()):
                folder.rmdir()
