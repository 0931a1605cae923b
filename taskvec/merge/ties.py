"""TIES merging (Yadav et al. 2023): trim each task vector to its largest-magnitude entries, elect a
sign per entry by summed weighted mass, average only the entries that agree (disjoint mean), scale by λ.

Trimming is per tensor by default (mergekit and the paper's released code); `trim="global"` keeps a
model's entries above one magnitude threshold taken over all merged tensors, found exactly by
`GlobalMagnitudeThreshold` in two streaming passes.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .base import MergeMethod, MergeParams, TensorContext
from .task_arithmetic import mix_deltas, task_deltas


def trim_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top max(1, floor(density·numel)) entries of |delta|, zero the rest (mergekit's rule).

    density ≥ 1 returns delta unchanged. Equal magnitudes at the cut are broken the way mergekit breaks
    them (the first k of a descending torch.argsort), so both tools keep the same entries.
    """
    if density >= 1:
        return delta
    if delta.numel() == 0:
        return delta
    k = max(1, int(density * delta.numel()))
    flat = delta.reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.argsort(flat.abs(), descending=True)[:k]] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).reshape(delta.shape)


def trim_threshold(delta: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep entries with |delta| ≥ threshold (global trimming); threshold = inf keeps nothing."""
    if math.isinf(threshold):
        return torch.zeros_like(delta)
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


class GlobalMagnitudeThreshold:
    """Exact k-th largest |τ| per model over many tensors, streamed in two passes with O(1) memory.

    Non-negative float32 values order like their int32 bit patterns, so pass 1 histograms the top 16
    bits (`add_coarse`), `split()` finds the bin holding the k-th largest value, and pass 2 histograms
    the low 16 bits inside that bin (`add_fine`). `thresholds()` then returns the exact values.
    """

    def __init__(self, densities: Sequence[float]):
        self.densities = [float(d) for d in densities]
        n = len(self.densities)
        self.total = 0
        self.coarse = torch.zeros(n, 1 << 15, dtype=torch.int64)
        self.fine = torch.zeros(n, 1 << 16, dtype=torch.int64)
        self.bins: list[int] | None = None
        self.rank: list[int] = []

    @staticmethod
    def _bits(absval: torch.Tensor) -> torch.Tensor:
        return absval.detach().to(torch.float32).contiguous().reshape(-1).view(torch.int32).to(torch.int64)

    def add_coarse(self, model: int, absval: torch.Tensor) -> None:
        bits = self._bits(absval)
        if model == 0:
            self.total += bits.numel()
        self.coarse[model] += torch.bincount(bits >> 16, minlength=1 << 15)

    def split(self) -> None:
        self.bins, self.rank = [], []
        for t, d in enumerate(self.densities):
            k = int(d * self.total)
            above = torch.flip(torch.cumsum(torch.flip(self.coarse[t], [0]), 0), [0])  # count(hi >= b)
            if d >= 1 or k <= 0:
                self.bins.append(-1)
                self.rank.append(k)
                continue
            b = int(torch.nonzero(above >= k).max())
            self.bins.append(b)
            self.rank.append(k - int(above[b] - self.coarse[t, b]))  # rank inside bin b

    def add_fine(self, model: int, absval: torch.Tensor) -> None:
        b = self.bins[model]
        if b < 0:
            return
        bits = self._bits(absval)
        inside = bits[(bits >> 16) == b] & 0xFFFF
        self.fine[model] += torch.bincount(inside, minlength=1 << 16)

    def thresholds(self) -> tuple[float, ...]:
        out = []
        for t, d in enumerate(self.densities):
            if d >= 1:
                out.append(0.0)
                continue
            if self.bins[t] < 0:
                out.append(math.inf)
                continue
            above = torch.flip(torch.cumsum(torch.flip(self.fine[t], [0]), 0), [0])
            low = int(torch.nonzero(above >= self.rank[t]).max())
            bits = torch.tensor([(self.bins[t] << 16) | low], dtype=torch.int32)
            out.append(float(bits.view(torch.float32)))
        return tuple(out)


def combine(base: torch.Tensor, finetunes: Sequence[torch.Tensor], params: MergeParams,
            ctx: TensorContext | None = None) -> torch.Tensor:
    """TIES for one tensor: trim each τ_t, elect signs, disjoint (weighted) mean, λ."""
    deltas = task_deltas(base, finetunes)
    if params.trim == "global":
        if ctx is None or ctx.thresholds is None:
            raise ValueError("global trimming needs per-model thresholds (GlobalMagnitudeThreshold)")
        trimmed = [trim_threshold(d, thr) for d, thr in zip(deltas, ctx.thresholds)]
    else:
        trimmed = [trim_magnitude(d, rho) for d, rho in zip(deltas, params.densities)]
    mixed = mix_deltas(torch.stack(trimmed), params.weights, normalize=params.normalize,
                       lambda_=params.lambda_, elect=True)
    return base + mixed


METHODS = [MergeMethod(
    name="ties",
    description="trim each tau_t to its top-density entries by |tau|, elect sign by summed weighted mass, "
                "disjoint mean over agreeing models, times lambda",
    combine=combine,
    uses_density=True,
    uses_trim=True,
    default_normalize=True,
    conventions={
        "sign_election": "sign of sum_t w_t tau_hat_t; zero counts as +",
        "normalize": "divide each entry by the summed weights of the models agreeing there (mergekit); "
                     "with equal weights this is the TIES paper's disjoint mean",
    },
)]
