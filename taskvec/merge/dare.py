"""DARE (Yu et al. 2024): drop each task-vector entry at random, keep it with probability `density`,
rescale the survivors; then combine linearly (`dare_linear`) or with TIES sign election (`dare_ties`).

Rescale conventions (labelled in the merge record): "l1" (mergekit: survivors scaled so the tensor's
L1 norm is unchanged), "paper" (DARE paper: ×1/density), "none". Masks come from a torch.Generator
seeded by (seed, model index, tensor name): reproducible in any streaming order, but not the same
random stream as mergekit's global RNG.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .base import MergeMethod, MergeParams, TensorContext, tensor_seed
from .task_arithmetic import mix_deltas, task_deltas

L1_EPS = 1e-7  # mergekit: no rescale when either L1 norm is below this


def drop_mask(shape: torch.Size, density: float, seed: int) -> torch.Tensor:
    """Boolean keep-mask, each entry kept independently with probability `density`."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=torch.float32) < density


def rescale_kept(delta: torch.Tensor, kept: torch.Tensor, density: float, rescale: str) -> torch.Tensor:
    """Zero the dropped entries of delta and rescale the kept ones by the chosen convention."""
    masked = delta * kept.to(delta.dtype)
    if rescale == "paper":
        return masked / density
    if rescale == "l1":
        before, after = delta.abs().sum(), masked.abs().sum()
        if before < L1_EPS or after < L1_EPS:
            return masked
        return masked * (before / after)
    return masked


def drop_and_rescale(delta: torch.Tensor, density: float, seed: int, rescale: str) -> torch.Tensor:
    """DARE sparsification of one task-vector tensor; density ≥ 1 returns it unchanged."""
    if density >= 1:
        return delta
    return rescale_kept(delta, drop_mask(delta.shape, density, seed), density, rescale)


def _dare(base, finetunes, params: MergeParams, ctx: TensorContext | None, elect: bool):
    name = ctx.name if ctx is not None else ""
    deltas = task_deltas(base, finetunes)
    dropped = [drop_and_rescale(d, rho, tensor_seed(params.seed, name, t), params.rescale)
               for t, (d, rho) in enumerate(zip(deltas, params.densities))]
    return base + mix_deltas(torch.stack(dropped), params.weights, normalize=params.normalize,
                             lambda_=params.lambda_, elect=elect)


def combine_linear(base: torch.Tensor, finetunes: Sequence[torch.Tensor], params: MergeParams,
                   ctx: TensorContext | None = None) -> torch.Tensor:
    """dare_linear for one tensor: drop/rescale each τ_t, then task arithmetic."""
    return _dare(base, finetunes, params, ctx, elect=False)


def combine_ties(base: torch.Tensor, finetunes: Sequence[torch.Tensor], params: MergeParams,
                 ctx: TensorContext | None = None) -> torch.Tensor:
    """dare_ties for one tensor: drop/rescale each τ_t, then TIES sign election and (optional) disjoint mean."""
    return _dare(base, finetunes, params, ctx, elect=True)


_CONV = {
    "density": "probability of keeping an entry (DARE paper's drop rate p = 1 - density)",
    "rng": "torch.Generator seeded per (seed, model index, tensor name); not mergekit's RNG stream",
}
METHODS = [
    MergeMethod(name="dare_linear", description="DARE drop-and-rescale of each tau_t, then task arithmetic",
                combine=combine_linear, uses_density=True, uses_seed=True, default_normalize=False,
                default_rescale="l1", conventions=dict(_CONV)),
    MergeMethod(name="dare_ties", description="DARE drop-and-rescale of each tau_t, then TIES sign election",
                combine=combine_ties, uses_density=True, uses_seed=True, default_normalize=False,
                default_rescale="l1",
                conventions={**_CONV, "sign_election": "sign of sum_t w_t tau_hat_t; zero counts as +"}),
]
