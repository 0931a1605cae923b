"""Task arithmetic: θ_m = θ₀ + λ · Σ_t w_t τ_t (with `normalize`, Σ_t w_t τ_t / Σ_t w_t before λ).

`mix_deltas` is the shared last step of every task-vector method (TIES and DARE reuse it):
weighting, optional sign election with disjoint mean, normalisation, λ.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .base import MergeMethod, MergeParams, TensorContext, weight_column


def task_deltas(base: torch.Tensor, finetunes: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack of task vectors τ_t = θ_t − θ₀ for one tensor, shape [T, *base.shape]."""
    return torch.stack([ft - base for ft in finetunes], dim=0)


def elect_sign(weighted: torch.Tensor) -> torch.Tensor:
    """TIES sign election by summed mass: +1 where Σ_t w_t τ̂_t ≥ 0 (zero counts as +), else −1."""
    return torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(weighted.dtype)


def mix_deltas(deltas: torch.Tensor, weights: Sequence[float], *, normalize: bool, lambda_: float,
               elect: bool = False) -> torch.Tensor:
    """Merged task vector from a [T, ...] stack of (possibly sparsified) task vectors.

    elect=False: Σ w_t τ̂_t, divided by Σ w_t when normalize (a |Σ w| < 1e-8 divides by 1).
    elect=True (TIES): only entries whose sign of w_t τ̂_t matches the elected sign count (zeros never
    do); normalize divides each entry by the summed weights of the models that agree there (disjoint mean).
    """
    w = weight_column(weights, deltas)
    weighted = deltas * w
    if elect:
        agree = (torch.sign(weighted) == elect_sign(weighted)).to(deltas.dtype)
        mixed = (weighted * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
        total = float(sum(weights))
        divisor = torch.tensor(1.0 if abs(total) < 1e-8 else total, dtype=deltas.dtype)
    if normalize:
        mixed = mixed / divisor
    if lambda_ != 1:
        mixed = mixed * lambda_
    return mixed


def combine(base: torch.Tensor, finetunes: Sequence[torch.Tensor], params: MergeParams,
            ctx: TensorContext | None = None) -> torch.Tensor:
    """θ₀ + λ Σ w_t τ_t for one tensor (fp32 in, fp32 out)."""
    mixed = mix_deltas(task_deltas(base, finetunes), params.weights, normalize=params.normalize,
                       lambda_=params.lambda_)
    return base + mixed


METHODS = [MergeMethod(
    name="task_arithmetic",
    description="theta_0 + lambda * sum_t w_t tau_t (normalize: divide by sum_t w_t first)",
    combine=combine,
    default_normalize=False,
    conventions={"order": "mergekit: weights, then normalize, then lambda, all per tensor"},
)]
