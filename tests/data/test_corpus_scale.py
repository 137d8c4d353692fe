"""A 10,000-scan corpus, simulated at test size: the manifest opens, sampling with several DataLoader
workers keeps open files, memory mappings and memory flat in the number of scans touched, and a killed
``medssl data ingest`` resumes without decoding finished scans again, listing the files it could not read."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medssl.config import PreprocessConfig
from medssl.data.cache import VolumeCache
from medssl.data.corpus import MANIFEST_NAME, Corpus
from medssl.data.datasets import PretrainRegionDataset

N_SCANS = 10_000
PRE = PreprocessConfig(spacing=(2.0, 2.0, 2.0))


def _write_scan(path: Path, seed: int, side: int = 12) -> None:
    rng = np.random.default_rng(seed)
    data = rng.integers(-1000, 1000, (side, side, side)).astype(np.int16)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), path)


def _fabricate_corpus(root: Path, n: int) -> Path:
    """``n`` cache entries copied from one real entry (each under its own key) and their manifest."""
    _write_scan(root / "one.nii.gz", 0)
    template = VolumeCache(root / "build").get(root / "one.nii.gz", None, "ct", PRE)
    cache = root / "corpus" / "cache"
    cache.mkdir(parents=True)
    volumes = []
    for i in range(n):
        key = f"{i:032x}"
        shutil.copytree(template.path, cache / key, copy_function=os.link)  # plain files, one inode
        volumes.append(
            {
                "id": f"scan_{i:05d}",
                "source": f"/scans/scan_{i:05d}.nii.gz",
                "cache_key": key,
                "shape": list(template.shape),
                "spacing": list(template.spacing),
            }
        )
    manifest = {
        "version": 1,
        "preprocess": PRE.model_dump(mode="json"),
        "modality": "ct",
        "volumes": volumes,
        "skipped": [],
    }
    (root / "corpus" / MANIFEST_NAME).write_text(json.dumps(manifest), encoding="utf-8")
    return root / "corpus"


def _process_state() -> list[int]:
    """Open file descriptors, memory mappings, resident MB of the calling process (Linux /proc)."""
    fds = len(os.listdir("/proc/self/fd"))
    with open("/proc/self/maps") as f:
        maps = sum(1 for _ in f)
    with open("/proc/self/statm") as f:
        rss_mb = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 2**20
    return [fds, maps, rss_mb]


def _views_with_state(region: torch.Tensor, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    return {"image": region, "state": torch.tensor(_process_state() + [os.getpid()])}


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory):
    return _fabricate_corpus(tmp_path_factory.mktemp("scale"), N_SCANS)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_ten_thousand_scans_open_and_sample_with_flat_resources(big_corpus):
    corpus = Corpus.open(big_corpus)
    assert len(corpus) == N_SCANS
    dataset = PretrainRegionDataset(corpus, 8, _views_with_state, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=25, sampler=range(4000), num_workers=2)
    first: dict[int, list[int]] = {}
    last: dict[int, list[int]] = {}
    for batch in loader:
        for state in batch["state"].tolist():
            pid = state[-1]
            first.setdefault(pid, state[:-1])
            last[pid] = state[:-1]
    assert len(first) == 2  # two workers reported
    # 4000 regions drawn from 10,000 scans touch ~3,300 distinct scans: a mapping or file held per scan
    # would add thousands; reading metadata per scan adds a few MB at most.
    for pid in first:
        fds0, maps0, rss0 = first[pid]
        fds1, maps1, rss1 = last[pid]
        assert fds1 - fds0 <= 4, (pid, first[pid], last[pid])
        assert maps1 - maps0 <= 16, (pid, first[pid], last[pid])
        assert rss1 - rss0 <= 64, (pid, first[pid], last[pid])


def _ingest(src: Path, out: Path, workers: int = 2) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "medssl.cli",
            "data",
            "ingest",
            str(src),
            "--out",
            str(out),
            "--workers",
            str(workers),
            "--set",
            "spacing=[2,2,2]",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _entries(out: Path) -> dict[str, int]:
    cache = out / "cache"
    if not cache.is_dir():
        return {}
    # finished entries only: a ".tmp-<key>-*" build folder can be renamed between the two calls
    return {
        p.name: (p / "meta.json").stat().st_mtime_ns
        for p in cache.iterdir()
        if not p.name.startswith(".") and (p / "meta.json").is_file()
    }


@pytest.mark.slow
def test_killed_ingest_resumes_without_decoding_again_and_lists_failures(tmp_path):
    src = tmp_path / "scans"
    src.mkdir()
    n = 120
    for i in range(n):
        _write_scan(src / f"scan_{i:03d}.nii.gz", i)
    (src / "broken_a.nii.gz").write_bytes(b"\x1f\x8b not a gzip stream")
    (src / "broken_b.nii.gz").write_bytes(b"")
    out = tmp_path / "corpus"

    proc = _ingest(src, out)
    deadline = time.monotonic() + 240
    while len(_entries(out)) < 15 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the ingest finished before it could be killed: make the corpus larger"
    os.killpg(proc.pid, signal.SIGKILL)  # the ingest and its worker processes, as a kill -9 of the job would
    proc.wait()
    done_before = _entries(out)
    assert 15 <= len(done_before) < n + 2
    assert not (out / MANIFEST_NAME).exists()  # the manifest is written once, at the end

    proc = _ingest(src, out)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    corpus = Corpus.open(out)
    assert len(corpus) == n
    assert sorted(Path(s["source"]).name for s in corpus.skipped) == ["broken_a.nii.gz", "broken_b.nii.gz"]
    assert "skipped" in output and "broken_a.nii.gz" in output
    after = _entries(out)
    # Entries finished before the kill were found by their key, not decoded and written again.
    assert all(after[key] == mtime for key, mtime in done_before.items())
    assert len(after) == n
