"""What counts as a real scalar where taskvec takes a number (a scale α, a merge weight)."""

from __future__ import annotations

import numbers

import numpy as np
import torch


def is_real_scalar(x) -> bool:
    """A real number — Python, numpy, or a 0-d numpy array / torch tensor — and not a bool (True is not 1.0
    here: a flag passed where a number belongs is a mistake)."""
    if isinstance(x, torch.Tensor):
        return x.ndim == 0 and x.dtype != torch.bool and not x.is_complex()
    if isinstance(x, (np.ndarray, np.generic)):
        return x.ndim == 0 and x.dtype.kind in "iuf"
    return isinstance(x, numbers.Real) and not isinstance(x, bool)
