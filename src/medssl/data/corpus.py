"""The unlabeled pretraining corpus: ingest raw scans into the volume cache, open it by its manifest.

``ingest_corpus`` finds every scan under the sources (NIfTI, NRRD, MetaImage, DICOM series,
InVesalius), preprocesses each once into ``<out>/cache`` and writes ``<out>/manifest.json``::

    {"version": 1, "preprocess": {...}, "modality": "ct",
     "volumes": [{"id", "source", "cache_key", "shape", "spacing"}],
     "skipped": [{"source", "problem"}]}

A file that cannot be read is recorded in ``skipped`` and the ingest goes on: one corrupt scan
among thousands must not cost the other conversions. Re-ingesting is cheap: cached files are
recognised by the cache key and not decoded again.

``Corpus.open`` trusts nothing in a manifest: a cache key must name an entry directly inside
``<root>/cache`` (no separators, no ``..``, no symlink leading out).
"""

from __future__ import annotations

import json
import multiprocessing
import re
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import cached_property
from itertools import repeat
from pathlib import Path
from typing import Any

from medssl.config import PreprocessConfig, validate_config
from medssl.data.cache import CachedVolume, VolumeCache, case_id_from_path
from medssl.data.preprocess import MODALITIES
from medssl.data.readers import find_volumes
from medssl.errors import MedsslInputError, look_up_option
from medssl.runs import atomic_write_json

MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
CACHE_DIRNAME = "cache"
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Exceptions that mean "this file is bad", as opposed to a bug or an interrupt.
_BAD_FILE_ERRORS = (MedsslInputError, OSError, ValueError, RuntimeError, EOFError, MemoryError)


def _cache_one(
    cache_root: str, path: str, modality: str, config_json: dict[str, Any], image_format: str = "npy"
) -> dict[str, Any]:
    """Worker: cache one scan; returns its entry or the problem (picklable either way)."""
    config = PreprocessConfig.model_validate(config_json)
    try:
        entry = VolumeCache(cache_root, image_format).get(path, None, modality, config)
    except _BAD_FILE_ERRORS as err:
        problem = err.problem if isinstance(err, MedsslInputError) else f"{type(err).__name__}: {err}"
        return {"source": path, "problem": " ".join(str(problem).split())}
    return {"source": path, "cache_key": entry.key, "shape": list(entry.shape), "spacing": list(entry.spacing)}


def _volume_id(path: Path, root: Path) -> str:
    """``<root>/patient7/ct.nii.gz`` -> ``patient7_ct``: readable and stable across re-ingests."""
    try:
        relative = path.relative_to(root) if path != root else Path(path.name)
    except ValueError:
        relative = Path(path.name)
    parts = [*relative.parent.parts, case_id_from_path(relative.name)]
    name = "_".join(p for p in parts if p not in ("", "."))
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-") or "volume"


def _discover(sources: Sequence[Path], exclude: Path) -> list[tuple[Path, str]]:
    """Every scan under the sources, resolved, with its proposed id; ``exclude`` (the output) is skipped."""
    found: list[tuple[Path, str]] = []
    seen: set[Path] = set()
    excluded = exclude.resolve()
    for src in sources:
        if not src.exists():
            raise MedsslInputError(src, "not found")
        paths = [src] if src.is_file() else find_volumes(src)
        for path in paths:
            resolved = Path(path).resolve()
            if resolved == excluded or excluded in resolved.parents or resolved in seen:
                continue
            seen.add(resolved)
            found.append((resolved, _volume_id(Path(path), src if src.is_dir() else src.parent)))
    return found


def _previous_manifest(out: Path, modality: str, config: PreprocessConfig) -> dict[str, Any] | None:
    """The manifest already in ``out`` (ingest extends it), refusing one made another way.

    Lenient where a re-ingest is the repair: entries whose cache directory is gone are dropped
    (their sources are cached again if they are among the sources now).
    """
    manifest_path = out / MANIFEST_NAME
    if not manifest_path.exists():
        return None
    previous = _read_manifest(manifest_path)
    if not isinstance(previous, dict) or previous.get("version") != MANIFEST_VERSION:
        raise MedsslInputError(manifest_path, "not a medssl corpus manifest; ingest into a new folder")
    if previous.get("modality") != modality or previous.get("preprocess") != config.model_dump(mode="json"):
        raise MedsslInputError(
            manifest_path, "this corpus was ingested with another modality or preprocessing; ingest into a new folder"
        )
    cache_root = (out / CACHE_DIRNAME).resolve()
    volumes = [
        v
        for v in previous.get("volumes") or []
        if isinstance(v, dict)
        and isinstance(v.get("id"), str)
        and isinstance(v.get("source"), str)
        and _entry_problem(v.get("cache_key"), cache_root) is None
    ]
    skipped = [s for s in previous.get("skipped") or [] if isinstance(s, dict)]
    return {**previous, "volumes": volumes, "skipped": skipped}


def _worker_context() -> multiprocessing.context.BaseContext:
    """forkserver with the cache module preloaded: workers fork from a server that imported torch and
    MONAI once but never ran them (forking this process could hang in torch's OpenMP pool; spawning
    would import them again in every worker)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["medssl.data.cache"])
    return context


def _cache_all(
    paths: list[str], cache_root: Path, modality: str, config: PreprocessConfig, workers: int, image_format: str
) -> Iterator[dict[str, Any]]:
    """Cache results in ``paths`` order, from ``workers`` processes, with a progress bar on a terminal."""
    args = (
        repeat(str(cache_root)),
        paths,
        repeat(modality),
        repeat(config.model_dump(mode="json")),
        repeat(image_format),
    )
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=_worker_context()) if workers > 1 else None
    results = pool.map(_cache_one, *args) if pool is not None else map(_cache_one, *args)
    try:
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import Progress

            with Progress(console=Console(stderr=True), transient=True) as progress:
                bar = progress.add_task("ingesting corpus", total=len(paths))
                for result in results:
                    progress.advance(bar)
                    yield result
        else:
            yield from results
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def ingest_corpus(
    src: str | Path | Sequence[str | Path],
    out: str | Path,
    config: PreprocessConfig,
    modality: str = "ct",
    workers: int = 1,
    image_format: str = "npy",
) -> Corpus:
    """Preprocess every scan under ``src`` into ``out/cache`` and write ``out/manifest.json``.

    ``image_format``: how new cache entries store their image (``npy`` or ``blosc2``, see
    :mod:`medssl.data.cache`).

    An existing corpus in ``out`` is extended: its volumes from other sources are kept (it must have
    been made with the same modality and preprocessing).
    """
    look_up_option("modality", modality, MODALITIES, source=str(src))
    sources = [Path(src)] if isinstance(src, (str, Path)) else [Path(s) for s in src]
    if not sources:
        raise MedsslInputError("<corpus>", "no source folders given")
    VolumeCache(Path(out) / CACHE_DIRNAME, image_format)  # an unknown format or missing blosc2 fails here
    out = Path(out)
    shown = ", ".join(str(s) for s in sources)
    found = _discover(sources, exclude=out)
    if not found:
        raise MedsslInputError(shown, "no volumes found")
    previous = _previous_manifest(out, modality, config)

    # Volumes ingested before from other sources stay; a rediscovered source keeps its id.
    now = {str(path) for path, _ in found}
    kept = [v for v in (previous or {}).get("volumes", []) if v["source"] not in now]
    previous_ids = {v["source"]: v["id"] for v in (previous or {}).get("volumes", [])}
    used = {v["id"] for v in kept}
    ids = []
    for path, proposed in found:
        vid = previous_ids.get(str(path))
        if vid is None or vid in used:
            base, n, vid = proposed, 1, proposed
            while vid in used:
                n += 1
                vid = f"{base}_{n}"
        used.add(vid)
        ids.append(vid)

    results = _cache_all(
        [str(p) for p, _ in found], out / CACHE_DIRNAME, modality, config, max(int(workers), 1), image_format
    )
    volumes: list[dict[str, Any]] = list(kept)
    skipped = [s for s in (previous or {}).get("skipped", []) if s.get("source") not in now]
    for vid, result in zip(ids, results, strict=True):
        if "problem" in result:
            skipped.append(result)
        else:
            volumes.append({"id": vid, **result})
    manifest = {
        "version": MANIFEST_VERSION,
        "preprocess": config.model_dump(mode="json"),
        "modality": modality,
        "volumes": volumes,
        "skipped": skipped,
    }
    if not volumes:  # checked before writing: an empty manifest would look like an ingested corpus
        first = skipped[0]
        raise MedsslInputError(
            shown, f"no readable volumes ({len(skipped)} skipped; first: {first['source']}: {first['problem']})"
        )
    atomic_write_json(out / MANIFEST_NAME, manifest)
    return Corpus(out, manifest)


class Corpus:
    """An ingested corpus: its manifest and its cached volumes."""

    def __init__(self, root: str | Path, manifest: dict[str, Any]) -> None:
        self.root = Path(root)
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | Path) -> Corpus:
        """Open ``path`` (an ingested corpus dir or its manifest.json), validating the manifest."""
        path = Path(path)
        if not path.exists():
            raise MedsslInputError(path, "not found")
        root = path.parent if path.is_file() and path.name == MANIFEST_NAME else path
        manifest_path = root / MANIFEST_NAME
        if not manifest_path.is_file():
            raise MedsslInputError(path, "not an ingested corpus; run 'medssl data ingest'")
        manifest = _read_manifest(manifest_path)
        _validate_manifest(manifest, root, manifest_path)
        return cls(root, manifest)

    @property
    def modality(self) -> str:
        return self.manifest["modality"]

    @cached_property
    def preprocess(self) -> PreprocessConfig:
        return validate_config(PreprocessConfig, self.manifest["preprocess"], self.root / MANIFEST_NAME)

    @property
    def entries(self) -> list[dict[str, Any]]:
        return list(self.manifest["volumes"])

    @property
    def skipped(self) -> list[dict[str, Any]]:
        return list(self.manifest.get("skipped", []))

    @property
    def cache_root(self) -> Path:
        return self.root / CACHE_DIRNAME

    @cached_property
    def volumes(self) -> list[CachedVolume]:
        return [CachedVolume(self.cache_root / e["cache_key"], case_id=e["id"]) for e in self.entries]

    def __len__(self) -> int:
        return len(self.manifest["volumes"])

    def __repr__(self) -> str:
        return f"Corpus({str(self.root)!r}, volumes={len(self)}, skipped={len(self.skipped)})"


def _read_manifest(manifest_path: Path) -> Any:
    try:
        return json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MedsslInputError(manifest_path, f"unreadable manifest ({err})") from None


def _entry_problem(key: Any, cache_root: Path) -> str | None:
    """Why ``key`` does not name a complete entry directly inside ``cache_root`` (None when it does)."""
    if not isinstance(key, str) or not _PLAIN_NAME.match(key) or ".." in key:
        return f"cache_key {key!r} is not a plain entry name"
    target = (cache_root / key).resolve()
    if target.parent != cache_root:
        return f"cache entry {key} leads outside {cache_root}"
    if not (target / "meta.json").is_file():
        return f"cache entry {key} is missing; re-run 'medssl data ingest'"
    return None


def _validate_manifest(manifest: Any, root: Path, manifest_path: Path) -> None:
    def bad(problem: str) -> MedsslInputError:
        return MedsslInputError(manifest_path, problem)

    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        raise bad(f"not a medssl corpus manifest (version {MANIFEST_VERSION} expected)")
    if manifest.get("modality") not in MODALITIES:
        raise bad(f"modality {manifest.get('modality')!r} is not ct or mri")
    validate_config(PreprocessConfig, manifest.get("preprocess") or {}, manifest_path)
    volumes = manifest.get("volumes")
    if not isinstance(volumes, list):
        raise bad("'volumes' must be a list")
    if not volumes:
        raise bad("the corpus has no volumes")
    cache_root = (root / CACHE_DIRNAME).resolve()
    ids: set[str] = set()
    for i, entry in enumerate(volumes):
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            raise bad(f"volumes[{i}] needs a string 'id'")
        problem = _entry_problem(entry.get("cache_key"), cache_root)
        if problem:
            raise bad(f"volume {entry['id']}: {problem}")
        if entry["id"] in ids:
            raise bad(f"volume id {entry['id']} appears twice")
        ids.add(entry["id"])
