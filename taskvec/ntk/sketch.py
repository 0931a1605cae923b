"""Unbiased random sketches of Jacobian rows: Φ = J S with E[S Sᵀ] = I, so E[ΦΦᵀ] = JJᵀ.

- CountSketch: coordinate j goes to bucket h(j) with sign s(j) (one streaming pass per row, no matmul).
- Gaussian: S has i.i.d. N(0, 1/k) entries, generated in seeded column chunks (never stored whole).

For either, Var[(ΦΦᵀ)_ij] ≤ 2‖J_i‖²‖J_j‖²/k, hence E‖ΦΦᵀ − K‖_F² ≤ (2/k)(tr K)² and, by Markov,
‖ΦΦᵀ − K‖_F ≤ sqrt(2/(k δ))·tr K with probability ≥ 1 − δ — the bound reported beside the error.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch

SKETCHES = ("countsketch", "gaussian")


def sketch_bound(trace: float, k: int, delta: float = 0.05) -> float:
    """Frobenius error bound sqrt(2/(kδ))·tr K that holds with probability ≥ 1 − δ."""
    return math.sqrt(2.0 / (k * delta)) * trace


class CountSketch:
    """Seeded CountSketch R^P → R^k.

    The sign is folded into the bucket: coordinate j adds to slot h(j) + k·[s(j) < 0] of a 2k-vector,
    and Φ = first half − second half. So a row is read once, never multiplied or modified, and the
    int32 slot index costs half the bandwidth of int64. Rows are spread over the intra-op threads.
    """

    def __init__(self, P: int, k: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.P, self.k = P, k
        bucket = torch.randint(0, k, (P,), generator=g)
        negative = torch.randint(0, 2, (P,), generator=g, dtype=torch.int8) == 0
        self.slot = bucket.add_(negative.to(torch.int64) * k).to(torch.int32)

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """Φ = rows S (rows are left unchanged)."""
        if rows.dim() != 2 or rows.shape[1] != self.P:
            raise ValueError(f"CountSketch expects rows of length {self.P}, got shape {tuple(rows.shape)}")
        halves = torch.zeros(rows.shape[0], 2 * self.k, dtype=rows.dtype)
        rows = rows.cpu()

        def one(i: int) -> None:
            halves[i].index_add_(0, self.slot, rows[i])

        workers = min(rows.shape[0], torch.get_num_threads())
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(one, range(rows.shape[0])))
        else:
            for i in range(rows.shape[0]):
                one(i)
        return halves[:, :self.k] - halves[:, self.k:]


class GaussianSketch:
    """Seeded block-Gaussian R^P → R^k; chunk c of S is regenerated from (seed, c) on demand."""

    def __init__(self, P: int, k: int, seed: int = 0, chunk: int = 8192):
        self.P, self.k, self.seed, self.chunk = P, k, seed, chunk

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(rows.shape[0], self.k, dtype=rows.dtype)
        scale = 1.0 / math.sqrt(self.k)
        for c, start in enumerate(range(0, self.P, self.chunk)):
            stop = min(start + self.chunk, self.P)
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + c)
            S = torch.randn(stop - start, self.k, generator=g, dtype=rows.dtype).mul_(scale)
            out.addmm_(rows[:, start:stop], S)
        return out


def make_sketch(kind: str, P: int, k: int, seed: int = 0):
    if kind == "countsketch":
        return CountSketch(P, k, seed)
    if kind == "gaussian":
        return GaussianSketch(P, k, seed)
    from ..errors import TaskvecError

    raise TaskvecError(f"unknown sketch {kind!r}; choose one of {SKETCHES}")
