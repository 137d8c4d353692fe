"""An output folder belongs to one benchmark config.

Run ids are config hashes, so changed runs never reuse a finished one; but the folder's own plan,
synthetic data, corpus, splits and report are shared by every run in it, and a changed benchmark
would silently mix with the old one there. The first ``medssl bench`` into a folder records its
resolved config in ``<out>/bench.yaml``; a later one with another config is refused (exit 2)
naming the fields that differ. To start anew use a new ``--out``; to extend a benchmark on purpose
(another seed, another method) delete ``<out>/bench.yaml``: finished runs whose configs did not
change are still reused.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import yaml

from medssl.config import BenchConfig, config_dump
from medssl.errors import ConfigError
from medssl.fileio import atomic_write_text, file_lock
from medssl.runs import config_differences

IDENTITY_FILE = "bench.yaml"
# How runs are executed, the resource limits and the (lossless) cache format change no result.
NOT_PART_OF_IDENTITY = ("executor", "limits", "cache")
# Stored (the report shows it) but not compared: rewording what a study can show changes no result.
DESCRIPTIVE = ("about",)


def bench_identity(bench: BenchConfig) -> dict[str, Any]:
    data = config_dump(bench)  # fields added later count only when set
    return {k: v for k, v in data.items() if k not in NOT_PART_OF_IDENTITY}


def bind_out_folder(bench: BenchConfig, out: str | Path, record: bool = True) -> None:
    """Refuse a benchmark whose config differs from the one ``out`` was made with; record it if new."""
    out = Path(out)
    path = out / IDENTITY_FILE
    mine = bench_identity(bench)
    with file_lock(out / ".bench.lock") if record else contextlib.nullcontext():
        if path.is_file():
            try:
                stored = yaml.safe_load(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
                raise ConfigError(path, f"unreadable ({type(err).__name__}); use a new --out folder") from None
            stored = stored if isinstance(stored, dict) else {}
            differ = config_differences(
                {k: v for k, v in stored.items() if k not in DESCRIPTIVE},
                {k: v for k, v in mine.items() if k not in DESCRIPTIVE},
            )
            if differ:
                shown = ", ".join(differ[:8]) + (f" and {len(differ) - 8} more" if len(differ) > 8 else "")
                raise ConfigError(
                    path,
                    f"{out} holds a benchmark with another config (differs in: {shown}); "
                    f"use a new --out folder, or delete {path} to extend this one on purpose",
                )
            if record and any(stored.get(k) != mine.get(k) for k in DESCRIPTIVE):
                atomic_write_text(path, yaml.safe_dump(mine, sort_keys=False))
        elif record:
            atomic_write_text(path, yaml.safe_dump(mine, sort_keys=False))
