"""The volume cache: each scan decoded and preprocessed once, stored for memory-mapped crop reads.

Layout of one entry, ``<root>/<key>/``::

    image.npy   float16 (X, Y, Z), or (C, X, Y, Z) for multi-channel cases, values in [0, 1]
                (or image.b2nd, the same array as a chunked blosc2 NDArray: ``cache.format: blosc2``)
    label.npy   uint8 (int16 beyond 255 classes), (X, Y, Z); absent for unlabeled scans
    fg.npy      int32 (N, 4) rows [class, x, y, z]: up to ``FG_SAMPLES`` random voxels per class,
                so a positive crop centre costs an index lookup instead of a scan of the label
    meta.json   sources, shape, spacing, modality, preprocess config, class voxel counts

Why float16: the arrays are in [0, 1] after intensity normalisation, where float16's spacing is at
most 2^-11, so the round-trip error is at most 2^-12 ~ 2.4e-4 (checked in the tests) — a tenth of
one HU step of the default CT window (1/425) — and it halves the disk and the page-cache reads of
every crop.

Image format (``VolumeCache(root, image_format=...)``, the benchmark's ``cache.format``): ``npy``
(default) is memory-mapped and the fastest to train from; ``blosc2`` stores 64^3 chunks compressed
with zstd level 1 and byte shuffle (nnssl's choice), lossless, and on real CT and MRI takes a fifth to
a quarter of the disk at a cost in crop reads per second (benchmarks/cache_format.py). blosc2 is an
optional extra (``pip install 'medssl[blosc2]'``). The format is not part of the key: an entry is read
in whichever format it was built, so switching formats affects new entries only.

The key hashes the resolved source paths with their size and mtime (and those of a detached header's
data files), the modality and the preprocess config, so an edited file or another preprocessing gets a
fresh entry. An entry is built in a temporary directory and renamed into place in one ``os.replace``: a
reader sees a complete entry or none, and of two processes building the same entry the loser drops its
copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medssl.config import PreprocessConfig, config_hash
from medssl.data.preprocess import MODALITIES, preprocess_case
from medssl.data.readers import read_channels, read_volume
from medssl.data.safe_read import detached_data_files
from medssl.errors import MedsslInputError, look_up_option

if TYPE_CHECKING:
    from medssl.data.tasks import TaskFolder

CACHE_VERSION = 1
FG_SAMPLES = 2000
IMAGE_DTYPE = np.float16
IMAGE_FORMATS = ("npy", "blosc2")
IMAGE_FILES = {"npy": "image.npy", "blosc2": "image.b2nd"}
BLOSC2_CHUNKS = 64
BLOSC2_BLOCKS = 16
STALE_TEMP_SECONDS = 6 * 3600
_KEY_LENGTH = 32  # hex characters of the sha256: collisions are not a practical concern


def _blosc2(where: str | Path) -> Any:
    try:
        import blosc2
    except ImportError:
        raise MedsslInputError(
            where, "cache format blosc2 needs the blosc2 package: pip install 'medssl[blosc2]' (or use format npy)"
        ) from None
    return blosc2


def write_image(path: str | Path, image: np.ndarray, image_format: str = "npy") -> None:
    """Write a cache image array as ``.npy`` or as a chunked, zstd-1 + shuffle compressed blosc2 NDArray."""
    if image_format == "npy":
        np.save(path, image)
        return
    if image_format != "blosc2":
        raise MedsslInputError(path, f"unknown cache format '{image_format}' ({' or '.join(IMAGE_FORMATS)})")
    blosc2 = _blosc2(path)
    spatial = tuple(min(BLOSC2_CHUNKS, d) for d in image.shape[-3:])
    blocks = tuple(min(BLOSC2_BLOCKS, d) for d in spatial)
    lead = (1,) * (image.ndim - 3)  # one channel per chunk
    cparams = blosc2.CParams(codec=blosc2.Codec.ZSTD, clevel=1, filters=[blosc2.Filter.SHUFFLE])
    blosc2.asarray(
        np.ascontiguousarray(image),
        urlpath=str(path),
        mode="w",
        chunks=lead + spatial,
        blocks=lead + blocks,
        cparams=cparams,
    )


def read_image(path: str | Path, image_format: str = "npy", mmap: bool = True) -> Any:
    """A cache image array: memory-mapped ``.npy``, or an opened blosc2 NDArray that decompresses only the
    chunks a slice touches (``mmap=False``: the whole array in memory, either way)."""
    if image_format == "npy":
        return np.load(path, mmap_mode="r" if mmap else None)
    array = _blosc2(path).open(str(path), mode="r")
    return array if mmap else array[...]


def _stat_entry(path: Path) -> list[Any]:
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def source_fingerprint(path: str | Path) -> list[Any]:
    """Resolved path + size + mtime; a directory (DICOM series) lists every file below it, and a detached
    NRRD/MetaImage header the data files it names (a rewritten ``.raw`` beside an unchanged header)."""
    path = Path(path).resolve()
    if not path.exists():
        raise MedsslInputError(path, "file not found")
    if path.is_dir():
        # A directory's own mtime misses a file rewritten in place; stat each file instead.
        return [str(path), [_stat_entry(p) for p in sorted(path.rglob("*")) if p.is_file()]]
    data_files = [path.parent / name for name in detached_data_files(path)]
    existing = [p for p in data_files if p.is_file()]
    return [*_stat_entry(path), [_stat_entry(p) for p in existing]] if existing else _stat_entry(path)


def cache_key(
    images: Sequence[str | Path],
    label: str | Path | None,
    modality: str,
    config: PreprocessConfig,
    channels_in_file: int = 1,
) -> str:
    """The entry name for these sources under this modality and preprocessing."""
    payload = {
        "version": CACHE_VERSION,
        "images": [source_fingerprint(p) for p in images],
        "channels_in_file": int(channels_in_file),
        "label": source_fingerprint(label) if label is not None else None,
        "modality": modality,
        "preprocess": config_hash(config, length=64),
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:_KEY_LENGTH]


def case_id_from_path(path: str | Path) -> str:
    """``imagesTr/liver_003_0000.nii.gz`` -> ``liver_003`` (nnU-Net channel suffix dropped)."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".inv3"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    stem, _, channel = name.rpartition("_")
    return stem if stem and len(channel) == 4 and channel.isdigit() else name


def check_plain_entry(path: Path) -> None:
    """An entry is a real folder of plain files: a symlink in it (or to it) could make training read
    any file on the machine, so it is refused rather than followed."""
    if path.is_symlink():
        raise MedsslInputError(path, "cache entry is a symbolic link; entries must be plain folders")
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.is_symlink() or not entry.is_file(follow_symlinks=False):
                    raise MedsslInputError(
                        Path(entry.path),
                        "cache entry holds a symbolic link or a non-file; delete the entry to rebuild it",
                    )
    except OSError as err:
        raise MedsslInputError(path, f"unreadable cache entry ({err.strerror or err})") from None


class CachedVolume:
    """A complete cache entry. Arrays are opened on demand (memory-mapped by default)."""

    def __init__(self, path: str | Path, case_id: str | None = None) -> None:
        self.path = Path(path)
        if not (self.path / "meta.json").is_file():
            raise MedsslInputError(self.path, "not a volume cache entry (meta.json missing)")
        check_plain_entry(self.path)
        self._case_id = case_id

    def __repr__(self) -> str:
        return f"CachedVolume({self.case_id!r}, shape={self.shape}, path={str(self.path)!r})"

    @cached_property
    def meta(self) -> dict[str, Any]:
        try:
            data = json.loads((self.path / "meta.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise MedsslInputError(self.path / "meta.json", f"unreadable cache metadata ({err})") from None
        if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
            raise MedsslInputError(self.path / "meta.json", "cache entry from another medssl version")
        return data

    @property
    def key(self) -> str:
        return self.path.name

    @property
    def case_id(self) -> str:
        return self._case_id or self.meta["case_id"]

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape (X, Y, Z) after preprocessing."""
        return tuple(self.meta["shape"])

    @property
    def n_channels(self) -> int:
        return int(self.meta["channels"])

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(self.meta["spacing"])

    @property
    def modality(self) -> str:
        return self.meta["modality"]

    @property
    def source(self) -> str:
        """The (first) image file this entry was made from."""
        return self.meta["source"][0]

    @property
    def sources(self) -> list[str]:
        return list(self.meta["source"])

    @property
    def label_source(self) -> str | None:
        return self.meta["label_source"]

    @property
    def has_label(self) -> bool:
        return self.meta["label_source"] is not None

    @property
    def image_min(self) -> float:
        return float(self.meta["image_min"])

    @property
    def class_voxels(self) -> dict[int, int]:
        return {int(k): int(v) for k, v in self.meta["class_voxels"].items()}

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig.model_validate(self.meta["preprocess"])

    @property
    def image_format(self) -> str:
        return "blosc2" if (self.path / IMAGE_FILES["blosc2"]).is_file() else "npy"

    def image(self, mmap: bool = True) -> np.ndarray:
        """The stored float16 image, (X, Y, Z) or (C, X, Y, Z); read-only when memory-mapped (a blosc2
        entry: an array whose slices decompress only the chunks they touch)."""
        fmt = self.image_format
        return read_image(self.path / IMAGE_FILES[fmt], fmt, mmap=mmap)

    def label(self, mmap: bool = True) -> np.ndarray | None:
        if not self.has_label:
            return None
        return np.load(self.path / "label.npy", mmap_mode="r" if mmap else None)

    def foreground(self) -> dict[int, np.ndarray]:
        """Per foreground class: (n, 3) int voxel coordinates sampled from that class."""
        if "_foreground" not in self.__dict__:
            rows = np.load(self.path / "fg.npy")
            self.__dict__["_foreground"] = {
                int(c): np.ascontiguousarray(rows[rows[:, 0] == c, 1:]) for c in np.unique(rows[:, 0])
            }
        return self.__dict__["_foreground"]


def sample_foreground(label: np.ndarray, rng: np.random.Generator, per_class: int = FG_SAMPLES) -> np.ndarray:
    """(N, 4) int32 rows [class, x, y, z], at most ``per_class`` random voxels of each class > 0."""
    flat = np.flatnonzero(label)
    classes = label.reshape(-1)[flat]
    rows = []
    for c in np.unique(classes):
        members = flat[classes == c]
        if len(members) > per_class:
            members = rng.choice(members, size=per_class, replace=False)
        coords = np.stack(np.unravel_index(np.sort(members), label.shape), axis=1)
        rows.append(np.concatenate([np.full((len(coords), 1), c), coords], axis=1))
    if not rows:
        return np.zeros((0, 4), dtype=np.int32)
    return np.concatenate(rows).astype(np.int32)


class VolumeCache:
    """A directory of preprocessed volumes keyed by source files, modality and preprocessing."""

    def __init__(self, root: str | Path, image_format: str = "npy") -> None:
        if image_format not in IMAGE_FORMATS:
            raise MedsslInputError(root, f"unknown cache format '{image_format}' ({' or '.join(IMAGE_FORMATS)})")
        if image_format == "blosc2":
            _blosc2(root)  # fail before any scan is decoded
        self.root = Path(root)
        self.image_format = image_format

    def get(
        self,
        image_path: str | Path,
        label_path: str | Path | None,
        modality: str,
        config: PreprocessConfig,
        images: Sequence[str | Path] | None = None,
        case_id: str | None = None,
        channels_in_file: int = 1,
    ) -> CachedVolume:
        """The cached entry for this case, building it (decode + preprocess) on a miss.

        A multi-channel case either lists one file per channel in ``images`` (nnU-Net; ``image_path``
        is the first) or is one 4D file with ``channels_in_file`` channels (MSD).
        """
        look_up_option("modality", modality, MODALITIES, source=image_path)
        files = [Path(p) for p in images] if images else [Path(image_path)]
        if channels_in_file < 1 or (channels_in_file > 1 and len(files) > 1):
            raise ValueError("channels_in_file > 1 needs exactly one image file")
        key = cache_key(files, label_path, modality, config, channels_in_file)
        final = self.root / key
        if (final / "meta.json").is_file():
            return CachedVolume(final, case_id)
        # Entries appear only by a whole-directory rename, so a directory without meta.json was
        # damaged by hand: rebuild it. (meta.json is checked again after the directory: a rename by
        # another process between the two checks must not be mistaken for damage.)
        if final.is_dir() and not (final / "meta.json").is_file():
            shutil.rmtree(final, ignore_errors=True)
        label = Path(label_path) if label_path is not None else None
        self._build(final, files, label, modality, config, channels_in_file)
        return CachedVolume(final, case_id)

    def _sweep_stale(self, key: str) -> None:
        """Drop temporary dirs of this key left by a killed process (a live build is never this old)."""
        now = time.time()
        for stale in self.root.glob(f".tmp-{key}-*"):
            with contextlib.suppress(OSError):
                if now - stale.stat().st_mtime > STALE_TEMP_SECONDS:
                    shutil.rmtree(stale, ignore_errors=True)

    def _build(
        self,
        final: Path,
        files: list[Path],
        label_path: Path | None,
        modality: str,
        config: PreprocessConfig,
        channels_in_file: int,
    ) -> None:
        # an MSD case holds its channels in one 4D file: all of them, and exactly as many as declared
        volumes = read_channels(files[0], channels_in_file) if channels_in_file > 1 else [read_volume(p) for p in files]
        label_volume = read_volume(label_path, label=True) if label_path is not None else None
        image, label, spacing = preprocess_case(
            volumes if len(volumes) > 1 else volumes[0], label_volume, modality, config
        )
        del volumes, label_volume
        stored = image.astype(IMAGE_DTYPE)
        spatial = image.shape[-3:]
        meta: dict[str, Any] = {
            "version": CACHE_VERSION,
            "case_id": case_id_from_path(files[0]),
            "source": [str(p.resolve()) for p in files],
            "label_source": str(label_path.resolve()) if label_path is not None else None,
            "shape": [int(s) for s in spatial],
            "channels": 1 if image.ndim == 3 else int(image.shape[0]),
            "spacing": [float(s) for s in spacing],
            "modality": modality,
            "preprocess": config.model_dump(mode="json"),
            "image_dtype": np.dtype(IMAGE_DTYPE).name,
            # Of the stored values: crops padded with image_min match the stored background exactly.
            "image_min": float(stored.min()),
            "image_max": float(stored.max()),
            "label_dtype": label.dtype.name if label is not None else None,
            "class_voxels": {},
        }
        self.root.mkdir(parents=True, exist_ok=True)
        self._sweep_stale(final.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=self.root))
        try:
            write_image(tmp / IMAGE_FILES[self.image_format], stored, self.image_format)
            rows = np.zeros((0, 4), dtype=np.int32)
            if label is not None:
                counts = np.bincount(label.reshape(-1).astype(np.int64))
                meta["class_voxels"] = {str(c): int(n) for c, n in enumerate(counts) if n}
                np.save(tmp / "label.npy", label)
                # Seeded by the key: the same entry always holds the same foreground samples.
                rng = np.random.default_rng(int(final.name[:16], 16))
                rows = sample_foreground(label, rng)
            np.save(tmp / "fg.npy", rows)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            try:
                os.replace(tmp, final)
            except OSError:
                # Another process renamed its (identical) entry into place first.
                if not (final / "meta.json").is_file():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def cache_task(task: TaskFolder, cache: VolumeCache, config: PreprocessConfig) -> dict[str, CachedVolume]:
    """Preprocess every case of a task into ``cache``; a progress bar only on an interactive stderr."""
    result: dict[str, CachedVolume] = {}

    def one(case: Any) -> None:
        images = list(case.images) if len(case.images or []) > 1 else None
        in_file = task.n_channels if getattr(task, "channels_in_one_file", False) else 1
        result[case.case_id] = cache.get(
            case.image,
            case.label,
            task.modality,
            config,
            images=images,
            case_id=case.case_id,
            channels_in_file=in_file,
        )

    if sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import Progress

        with Progress(console=Console(stderr=True), transient=True) as progress:
            bar = progress.add_task(f"caching {task.name}", total=len(task.cases))
            for case in task.cases:
                one(case)
                progress.advance(bar)
    else:
        for case in task.cases:
            one(case)
    return result
