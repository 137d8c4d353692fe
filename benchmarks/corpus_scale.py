"""A corpus at the study's scale (about 10,000 CT scans), measured at benchmark size in one run.

    python benchmarks/corpus_scale.py                 # ingest rate, manifest, sampling, cache formats
    python benchmarks/corpus_scale.py --quick         # smaller ingest series, 2,000-entry manifest

1. **Ingest rate**: ``ingest_corpus`` on N small synthetic scans (24^3 int16 NIfTI) for N = n, 2n, 4n,
   with 1 and 2 worker processes: scans/s should stay constant in N (linear time) and grow with workers.
2. **Manifest**: ``Corpus.open`` of a 10,000-entry corpus (entries hard-linked from one real entry):
   seconds to load and validate (target < 1 s).
3. **Sampling**: 2 DataLoader workers drawing regions from that corpus: open files, memory mappings and
   resident memory per worker before and after touching thousands of scans.
4. **Cache format**: today's float16 ``.npy`` (memory-mapped) against a chunked, compressed blosc2 NDArray
   (64^3 chunks, zstd level 1 with shuffle, as nnssl stores its pretraining data), on one 512x512x300-like
   CT-sized volume (``--volume``): bytes per scan and random 96^3 crop reads per second, cold (file pages
   evicted with posix_fadvise DONTNEED before every read) and warm. blosc2 is optional
   (``pip install blosc2``); without it this part says so.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def _state() -> tuple[int, int, int]:
    fds = len(os.listdir("/proc/self/fd"))
    with open("/proc/self/maps") as f:
        maps = sum(1 for _ in f)
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 2**20
    return fds, maps, rss


def ingest_rates(root: Path, sizes: list[int]) -> None:
    import nibabel as nib

    from medssl.config import PreprocessConfig
    from medssl.data.corpus import ingest_corpus

    pre = PreprocessConfig(spacing=(2.0, 2.0, 2.0))
    print("ingest: scans of 24^3 int16 at 2 mm (no resampling), CT window, float16 cache")
    for workers in (1, 2):
        for n in sizes:
            src = root / f"scans-{n}"
            if not src.exists():
                src.mkdir()
                rng = np.random.default_rng(n)
                for i in range(n):
                    data = rng.integers(-1000, 1000, (24, 24, 24)).astype(np.int16)
                    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), src / f"s{i:05d}.nii.gz")
            out = root / f"corpus-{n}-{workers}"
            t0 = time.perf_counter()
            ingest_corpus(src, out, pre, workers=workers)
            seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            ingest_corpus(src, out, pre, workers=workers)  # a re-run (a resume after a kill): cache hits only
            again = time.perf_counter() - t0
            print(
                f"  {n:>6} scans, {workers} worker(s): {seconds:7.1f} s = {n / seconds:6.1f} scans/s; "
                f"re-run {again:5.1f} s",
                flush=True,
            )


def manifest_and_sampling(root: Path, n: int) -> None:
    import shutil

    import nibabel as nib
    import torch

    from medssl.config import PreprocessConfig
    from medssl.data.cache import VolumeCache
    from medssl.data.corpus import MANIFEST_NAME, Corpus
    from medssl.data.datasets import PretrainRegionDataset

    pre = PreprocessConfig(spacing=(2.0, 2.0, 2.0))
    nib.save(nib.Nifti1Image(np.zeros((40, 40, 40), np.int16), np.diag([2.0, 2.0, 2.0, 1.0])), root / "one.nii.gz")
    template = VolumeCache(root / "build").get(root / "one.nii.gz", None, "ct", pre)
    cache = root / "big" / "cache"
    cache.mkdir(parents=True)
    volumes = []
    for i in range(n):
        key = f"{i:032x}"
        shutil.copytree(template.path, cache / key, copy_function=os.link)
        volumes.append(
            {
                "id": f"s{i:05d}",
                "source": f"/scans/s{i:05d}.nii.gz",
                "cache_key": key,
                "shape": list(template.shape),
                "spacing": list(template.spacing),
            }
        )
    import json

    (root / "big" / MANIFEST_NAME).write_text(
        json.dumps(
            {
                "version": 1,
                "preprocess": pre.model_dump(mode="json"),
                "modality": "ct",
                "volumes": volumes,
                "skipped": [],
            }
        ),
        encoding="utf-8",
    )
    size_mb = (root / "big" / MANIFEST_NAME).stat().st_size / 2**20
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        corpus = Corpus.open(root / "big")
        times.append(time.perf_counter() - t0)
    print(f"manifest: {n} volumes ({size_mb:.1f} MB): Corpus.open {statistics.median(times):.3f} s (median of 3)")

    def views(region, rng):
        return {"image": region, "state": torch.tensor([*_state(), os.getpid()])}

    dataset = PretrainRegionDataset(corpus, 32, views, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=20, sampler=range(min(n, 6000)), num_workers=2)
    first, last = {}, {}
    for batch in loader:
        for row in batch["state"].tolist():
            first.setdefault(row[-1], row[:-1])
            last[row[-1]] = row[:-1]
    for pid in first:
        (f0, m0, r0), (f1, m1, r1) = first[pid], last[pid]
        print(
            f"sampling worker {pid}: open files {f0} -> {f1}, mappings {m0} -> {m1}, RSS {r0} -> {r1} MB "
            f"after {min(n, 6000) // 2} regions"
        )


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cache_formats(root: Path, shape: tuple[int, int, int], reads: int) -> None:
    from medssl.data.synth import synth_corpus

    # A CT-like volume: a phantom rendered at the size of a clinical scan, windowed to [0, 1], float16.
    scan = synth_corpus(root / "ct", 1, seed=1, shape=shape, spacing=(1.0, 1.0, 1.0), jitter_spacing=False)[0]
    import nibabel as nib

    hu = np.asarray(nib.load(scan).dataobj, dtype=np.float32)
    image = np.clip((hu + 175.0) / 425.0, 0.0, 1.0).astype(np.float16)
    npy = root / "image.npy"
    np.save(npy, image)
    rng = np.random.default_rng(0)
    starts = [[int(rng.integers(0, d - 96 + 1)) for d in shape] for _ in range(reads)]

    def read_npy(s):
        a = np.load(npy, mmap_mode="r")
        return np.array(a[s[0] : s[0] + 96, s[1] : s[1] + 96, s[2] : s[2] + 96])

    formats = {"npy float16 (mmap)": (npy, read_npy)}
    try:
        import blosc2
    except ImportError:
        blosc2 = None
        print("cache formats: blosc2 is not installed (pip install blosc2): only .npy measured")
    if blosc2 is not None:
        b2 = root / "image.b2nd"
        cparams = blosc2.CParams(codec=blosc2.Codec.ZSTD, clevel=1, filters=[blosc2.Filter.SHUFFLE])
        blosc2.asarray(image, urlpath=str(b2), mode="w", chunks=(64, 64, 64), blocks=(16, 16, 16), cparams=cparams)

        def read_b2(s):
            a = blosc2.open(str(b2), mode="r")
            return a[s[0] : s[0] + 96, s[1] : s[1] + 96, s[2] : s[2] + 96]

        formats["blosc2 zstd-1 64^3 chunks"] = (b2, read_b2)
    print(
        f"cache formats on one {shape[0]}x{shape[1]}x{shape[2]} float16 volume ({image.nbytes / 2**20:.0f} MB raw), "
        f"{reads} random 96^3 crops:"
    )
    for name, (path, read) in formats.items():
        np.testing.assert_array_equal(
            read(starts[0]),
            image[starts[0][0] : starts[0][0] + 96, starts[0][1] : starts[0][1] + 96, starts[0][2] : starts[0][2] + 96],
        )
        cold = []
        for s in starts:
            _evict(path)
            t0 = time.perf_counter()
            read(s)
            cold.append(time.perf_counter() - t0)
        read(starts[0])
        warm = []
        for s in starts:
            t0 = time.perf_counter()
            read(s)
            warm.append(time.perf_counter() - t0)
        print(
            f"  {name:<26} {path.stat().st_size / 2**20:7.1f} MB on disk  cold {1 / statistics.median(cold):7.1f} "
            f"crops/s  warm {1 / statistics.median(warm):7.1f} crops/s",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--volume", type=int, nargs=3, default=(384, 384, 256))
    parser.add_argument("--reads", type=int, default=20)
    args = parser.parse_args()
    sizes = [50, 100, 200] if args.quick else [250, 500, 1000]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ingest_rates(root, sizes)
        manifest_and_sampling(root, 2000 if args.quick else 10_000)
        cache_formats(root, (160, 160, 128) if args.quick else tuple(args.volume), args.reads)


if __name__ == "__main__":
    main()
