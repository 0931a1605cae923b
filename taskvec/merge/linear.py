"""Linear merge: the weighted average of fine-tuned weights, Σ_t w_t θ_t / Σ_t w_t (mergekit `linear`).

The base model only supplies tensor names, config and tokenizer; `normalize=False` gives Σ_t w_t θ_t.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .base import MergeMethod, MergeParams, TensorContext, weight_column


def combine(base: torch.Tensor, finetunes: Sequence[torch.Tensor], params: MergeParams,
            ctx: TensorContext | None = None) -> torch.Tensor:
    """Σ w_t θ_t (/ Σ w_t when normalize) for one tensor."""
    stack = torch.stack(list(finetunes), dim=0)
    w = weight_column(params.weights, stack)
    out = (w * stack).sum(dim=0)
    if params.normalize:
        out = out / w.sum(dim=0)
    return out


METHODS = [MergeMethod(
    name="linear",
    description="sum_t w_t theta_t / sum_t w_t (weighted average of the fine-tuned models)",
    combine=combine,
    uses_lambda=False,
    default_normalize=True,
    conventions={"base": "the base model is not averaged in unless listed as a model (mergekit YAML)"},
)]
