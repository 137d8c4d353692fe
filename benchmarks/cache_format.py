"""Cache format on real scans: float16 ``.npy`` (memory-mapped, today's cache) vs a chunked, compressed
blosc2 NDArray, in one run: bytes on disk per scan and random crop reads per second, cold and warm.

    python benchmarks/cache_format.py                     # Debian's real head CT and real T1 MRI, 96^3 crops
    python benchmarks/cache_format.py --quick             # 10 reads per format and scan
    python benchmarks/cache_format.py --scan ct:/path/a.nii.gz --scan mri:/path/b.nii.gz --spacing 1 1 1

Each scan goes through the cache's own preprocessing (``medssl.data.cache.VolumeCache.get``: reorientation,
resampling to ``--spacing``, CT window or MRI percentiles, float16 in [0, 1]); the cached ``image.npy`` is the
``.npy`` candidate and the same array written by ``medssl.data.cache.write_image(..., "blosc2")`` (64^3
chunks, 16^3 blocks, zstd level 1 with byte shuffle, as nnssl stores its pretraining data) the other.

"Cold" means: before every read the file's pages are dropped from this machine's page cache
(``fsync`` + ``posix_fadvise(POSIX_FADV_DONTNEED)``; ``fincore`` is asked once that none stayed resident)
and every handle is reopened, so the read comes from the block device. A virtual disk may still be
served from its host's cache, so "cold" is a lower bound on what a spinning or network disk costs.
"Warm" reads the same crops again with the pages cached. Timings on a shared machine are noisy.

Synthetic phantoms are not used: their flat organs compress ~5x and say nothing about real CT.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

DEFAULT_SCANS = [
    "ct:/usr/share/doc/invesalius-examples/examples/Cranium.inv3",  # Debian invesalius-examples: head CT
    "mri:/usr/share/mricron/templates/ch2better.nii.gz",  # Debian mricron-data: T1 brain MRI
]


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _resident_bytes(path: Path) -> int | None:
    """Bytes of ``path`` in the page cache (util-linux ``fincore``), None when it is unavailable."""
    try:
        out = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return int(out.split()[0])
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return None


def _time_reads(read: Callable[[list[int]], np.ndarray], path: Path, starts: list[list[int]], cold: bool) -> float:
    """Median crops per second."""
    seconds = []
    for s in starts:
        if cold:
            _evict(path)
        t0 = time.perf_counter()
        read(s)
        seconds.append(time.perf_counter() - t0)
    return 1.0 / statistics.median(seconds)


def measure_scan(label: str, source: Path, modality: str, root: Path, spacing: float, crop: int, reads: int) -> None:
    from medssl.config import PreprocessConfig
    from medssl.data.cache import VolumeCache, read_image, write_image

    pre = PreprocessConfig(spacing=(spacing, spacing, spacing))
    entry = VolumeCache(root / "cache").get(source, None, modality, pre)
    image = entry.image(mmap=False)
    if min(image.shape[-3:]) < crop:
        raise SystemExit(f"{source}: cached shape {image.shape} is smaller than a {crop}^3 crop")
    paths = {"npy": root / f"{label}.npy", "blosc2": root / f"{label}.b2nd"}
    shutil.copyfile(entry.path / "image.npy", paths["npy"])  # a fresh file: nothing of it cached yet
    write_image(paths["blosc2"], image, "blosc2")
    rng = np.random.default_rng(0)
    starts = [[int(rng.integers(0, d - crop + 1)) for d in image.shape[-3:]] for _ in range(reads)]
    raw_mb = image.nbytes / 2**20
    print(
        f"{label}: {source.name} ({modality}), cached {'x'.join(map(str, image.shape))} at {spacing} mm, "
        f"float16 {raw_mb:.1f} MB; {reads} random {crop}^3 crops per format"
    )
    for fmt, path in paths.items():

        def read(s: list[int], path: Path = path, fmt: str = fmt) -> np.ndarray:
            array = read_image(path, fmt)  # reopened for every crop, as a worker meeting a new scan
            return np.array(array[..., s[0] : s[0] + crop, s[1] : s[1] + crop, s[2] : s[2] + crop])

        cube = tuple(slice(s, s + crop) for s in starts[0])
        np.testing.assert_array_equal(read(starts[0]), image[(..., *cube)])
        _evict(path)
        resident = _resident_bytes(path)
        cold = _time_reads(read, path, starts, cold=True)
        read(starts[0])
        warm = _time_reads(read, path, starts, cold=False)
        size_mb = path.stat().st_size / 2**20
        print(
            f"  {fmt:<7} {size_mb:7.1f} MB on disk ({size_mb / raw_mb:5.1%} of raw)  "
            f"cold {cold:7.1f} crops/s  warm {warm:7.1f} crops/s"
            + ("" if resident is None else f"  (resident after eviction: {resident} B)"),
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scan", action="append", default=None, help="MODALITY:PATH (ct or mri); repeatable")
    parser.add_argument("--spacing", type=float, default=1.5, help="isotropic mm of the cache (paper: 1.5)")
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument("--reads", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="10 reads per format and scan")
    parser.add_argument("--workdir", type=Path, default=None, help="a folder on the disk to measure (default: tmp)")
    args = parser.parse_args()
    scans = args.scan or DEFAULT_SCANS
    reads = 10 if args.quick else args.reads
    try:
        import blosc2
    except ImportError:
        raise SystemExit("blosc2 is not installed (pip install 'medssl[blosc2]'): nothing to compare") from None
    print(f"numpy {np.__version__}, blosc2 {blosc2.__version__}, {os.cpu_count()} CPUs; timings are noisy")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for i, spec in enumerate(scans):
            modality, _, path = spec.partition(":")
            source = Path(path)
            if not source.exists():
                print(f"{spec}: not found (Debian packages invesalius-examples, mricron-data): skipped")
                continue
            measure_scan(f"{modality}{i}", source, modality, Path(tmp), args.spacing, args.crop, reads)


if __name__ == "__main__":
    main()
