"""Centred kernel alignment (CKA) estimators: pure torch/numpy, no models, no files.

Two estimators, both on ``(n, d)`` representations whose rows are the same ``n`` examples:

* **linear CKA** (Kornblith et al. 2019): biased HSIC of linear kernels after centring,
  ``CKA = ||YᵀX||²_F / (||XᵀX||_F ||YᵀY||_F)`` on column-centred X, Y, computed in float64.
  It lies in [0, 1], equals 1 for identical representations and is invariant to orthogonal
  transforms and isotropic scaling of either side, but not to general invertible linear maps.
* **minibatch CKA** (Nguyen et al. 2021): per batch the unbiased HSIC estimator of Song et al.
  (2012) on linear Gram matrices, summed over batches,
  ``CKA = Σ HSIC₁(Kᵢ, Lᵢ) / sqrt(Σ HSIC₁(Kᵢ, Kᵢ) · Σ HSIC₁(Lᵢ, Lᵢ))``. Every batch term is an
  unbiased estimate of the population HSIC, so the ratio converges to the population CKA as the
  number of batches grows, while memory stays at one batch's Gram matrices.

The activations they compare come from ``medssl.analysis.activations``; a CKA run (two models on
crops of a task, written to a run directory) is ``medssl.analysis.cka_run``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

MIN_HSIC_SAMPLES = 4  # the unbiased estimator divides by n(n-3)


def _representation(x: Tensor | np.ndarray, name: str) -> Tensor:
    t = torch.as_tensor(x).detach()
    if t.ndim != 2:
        raise ValueError(f"{name} must be a (n, d) matrix, got shape {tuple(t.shape)}")
    return t.to(torch.float64)


def linear_cka(x: Tensor | np.ndarray, y: Tensor | np.ndarray) -> float:
    """Linear CKA of two representations of the same ``n`` examples (Kornblith et al. 2019).

    Returns NaN when either side has no variance (every row identical): its Gram matrix is zero
    after centring and similarity is undefined.
    """
    x = _representation(x, "x")
    y = _representation(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y need the same number of rows, got {x.shape[0]} and {y.shape[0]}")
    x = x - x.mean(dim=0, keepdim=True)
    y = y - y.mean(dim=0, keepdim=True)
    # Feature-space form: d×d products instead of n×n Grams (n = crops × tokens is the large side).
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    denominator = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    if not torch.isfinite(denominator) or denominator <= 0:
        return float("nan")
    # Cauchy-Schwarz bounds the ratio by 1; only rounding can push it past (e.g. CKA(X, X)).
    return float(torch.clamp(cross / denominator, 0.0, 1.0))


class _GramStats:
    """A linear Gram matrix with its diagonal zeroed, plus the sums the unbiased HSIC needs."""

    def __init__(self, gram: Tensor) -> None:
        n = gram.shape[0]
        if gram.ndim != 2 or gram.shape[1] != n:
            raise ValueError(f"a Gram matrix must be square, got shape {tuple(gram.shape)}")
        if n < MIN_HSIC_SAMPLES:
            raise ValueError(f"unbiased HSIC needs at least {MIN_HSIC_SAMPLES} samples, got {n}")
        self.n = n
        self.gram = gram.to(torch.float64).clone()
        self.gram.fill_diagonal_(0.0)
        self.row_sums = self.gram.sum(dim=1)
        self.col_sums = self.gram.sum(dim=0)
        self.total = self.gram.sum()

    @classmethod
    def from_features(cls, x: Tensor | np.ndarray, name: str = "x") -> _GramStats:
        x = _representation(x, name)
        # The unbiased HSIC is unchanged by a shift of the features, but its terms are not: with a common
        # mean far larger than the spread (a deep stage, few distinct rows per batch) they are ~||mean||^4
        # and cancel to float64 noise, which made the self-similarity <= 0 and the CKA NaN. Centred, the
        # same estimate is computed from terms of the spread's size.
        x = x - x.mean(dim=0, keepdim=True)
        return cls(x @ x.T)


def _hsic_from_stats(k: _GramStats, l: _GramStats) -> float:  # noqa: E741 - K, L as in the papers
    if k.n != l.n:
        raise ValueError(f"Gram matrices of different sizes: {k.n} and {l.n}")
    n = k.n
    trace_kl = (k.gram * l.gram.T).sum()  # tr(K̃ L̃)
    sums = k.total * l.total / ((n - 1) * (n - 2))  # (1ᵀK̃1)(1ᵀL̃1) / ((n-1)(n-2))
    cross = 2.0 / (n - 2) * torch.dot(k.col_sums, l.row_sums)  # 2/(n-2) · 1ᵀK̃L̃1
    return float((trace_kl + sums - cross) / (n * (n - 3)))


def unbiased_hsic(k: Tensor | np.ndarray, l: Tensor | np.ndarray) -> float:  # noqa: E741
    """Unbiased HSIC estimator of two ``(n, n)`` kernel matrices (Song et al. 2012, eq. 5).

    ``HSIC₁ = [tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1/((n-1)(n-2)) − 2/(n-2)·1ᵀK̃L̃1] / (n(n-3))`` where K̃, L̃ are
    K, L with their diagonals set to zero. Needs n ≥ 4; can be slightly negative (it is unbiased,
    not non-negative).
    """
    return _hsic_from_stats(_GramStats(torch.as_tensor(k)), _GramStats(torch.as_tensor(l)))


def _ratio(cross: float | np.ndarray, self_a: float | np.ndarray, self_b: float | np.ndarray):
    """cross / sqrt(self_a · self_b), NaN where the denominator is not positive."""
    denominator = np.sqrt(np.clip(np.multiply(self_a, self_b), 0.0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        value = np.where(denominator > 0, np.asarray(cross) / np.where(denominator > 0, denominator, 1.0), np.nan)
    return value


class MinibatchCKA:
    """Streaming minibatch CKA between every layer of model A and every layer of model B.

    ``update(acts_a, acts_b)`` takes one batch: ``n_layers_a`` and ``n_layers_b`` matrices whose rows
    are the same ``n`` examples (n ≥ 4; d may differ per layer). ``compute()`` returns the
    ``(n_layers_a, n_layers_b)`` matrix. Only the running HSIC sums are kept between batches.
    """

    def __init__(self, n_layers_a: int, n_layers_b: int) -> None:
        if n_layers_a < 1 or n_layers_b < 1:
            raise ValueError("need at least one layer on each side")
        self.n_layers_a = n_layers_a
        self.n_layers_b = n_layers_b
        self.cross = np.zeros((n_layers_a, n_layers_b))
        self.self_a = np.zeros(n_layers_a)
        self.self_b = np.zeros(n_layers_b)
        self.n_batches = 0
        self.n_samples = 0
        # per layer, the fewest distinct rows a batch had (a coarse stage repeats one token over the
        # positions sampled in its cell; below MIN_HSIC_SAMPLES the unbiased estimate is undefined)
        self.min_distinct_a = np.full(n_layers_a, np.iinfo(np.int64).max)
        self.min_distinct_b = np.full(n_layers_b, np.iinfo(np.int64).max)

    def update(self, acts_a: Sequence[Tensor | np.ndarray], acts_b: Sequence[Tensor | np.ndarray]) -> None:
        if len(acts_a) != self.n_layers_a or len(acts_b) != self.n_layers_b:
            raise ValueError(
                f"expected {self.n_layers_a} and {self.n_layers_b} layers, got {len(acts_a)} and {len(acts_b)}"
            )
        grams_a = [_GramStats.from_features(a, f"layer a{i}") for i, a in enumerate(acts_a)]
        grams_b = [_GramStats.from_features(b, f"layer b{j}") for j, b in enumerate(acts_b)]
        sizes = {g.n for g in grams_a + grams_b}
        if len(sizes) != 1:
            raise ValueError(f"every layer of a batch needs the same number of rows, got {sorted(sizes)}")
        for i, a in enumerate(acts_a):
            self.min_distinct_a[i] = min(self.min_distinct_a[i], _distinct_rows(a))
        for j, b in enumerate(acts_b):
            self.min_distinct_b[j] = min(self.min_distinct_b[j], _distinct_rows(b))
        for i, ga in enumerate(grams_a):
            self.self_a[i] += _hsic_from_stats(ga, ga)
            for j, gb in enumerate(grams_b):
                self.cross[i, j] += _hsic_from_stats(ga, gb)
        for j, gb in enumerate(grams_b):
            self.self_b[j] += _hsic_from_stats(gb, gb)
        self.n_batches += 1
        self.n_samples += sizes.pop()

    def compute(self) -> np.ndarray:
        """The CKA matrix; NaN where a layer's similarity with itself is not positive (see :meth:`undefined`)."""
        if self.n_batches == 0:
            raise ValueError("no batches were added")
        return _ratio(self.cross, self.self_a[:, None], self.self_b[None, :])

    def undefined(self) -> tuple[dict[int, str], dict[int, str]]:
        """Why a layer's row (model A) or column (model B) of :meth:`compute` is undefined:
        ``({layer: reason}, {layer: reason})`` for the layers whose HSIC with themselves is not positive."""
        out: tuple[dict[int, str], dict[int, str]] = ({}, {})
        for side, (hsic, distinct) in enumerate(
            ((self.self_a, self.min_distinct_a), (self.self_b, self.min_distinct_b))
        ):
            for layer, (value, rows) in enumerate(zip(hsic, distinct, strict=True)):
                if np.isfinite(value) and value > 0:
                    continue
                if rows < MIN_HSIC_SAMPLES:
                    out[side][layer] = (
                        f"a minibatch had only {int(rows)} distinct rows at this layer (one token per crop at a "
                        f"coarse stage; the unbiased HSIC needs {MIN_HSIC_SAMPLES}): use more crops per batch or "
                        "larger crops"
                    )
                else:
                    out[side][layer] = "no spread across the rows of a minibatch (a constant representation)"
        return out


def _distinct_rows(x: Tensor | np.ndarray) -> int:
    return int(torch.unique(torch.as_tensor(x).detach(), dim=0).shape[0])


def minibatch_cka(batches_x: Iterable[Tensor | np.ndarray], batches_y: Iterable[Tensor | np.ndarray]) -> float:
    """Minibatch CKA (Nguyen et al. 2021) of paired batches ``(n_i, d1)`` and ``(n_i, d2)``.

    With a single batch this is the unbiased (full-data) CKA of that batch.
    """
    accumulator = MinibatchCKA(1, 1)
    for bx, by in zip(batches_x, batches_y, strict=True):
        accumulator.update([bx], [by])
    return float(accumulator.compute()[0, 0])


def batch_bounds(n_rows: int, rows_per_batch: int) -> list[int]:
    """Row boundaries of consecutive minibatches; every batch has ≥ 4 rows (the unbiased HSIC's
    minimum): a last batch smaller than that joins the one before it."""
    if n_rows < MIN_HSIC_SAMPLES:
        raise ValueError(f"CKA needs at least {MIN_HSIC_SAMPLES} rows, got {n_rows} (more crops or tokens)")
    step = max(int(rows_per_batch), MIN_HSIC_SAMPLES)
    bounds = list(range(0, n_rows, step)) + [n_rows]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < MIN_HSIC_SAMPLES:
        bounds.pop(-2)
    return bounds
