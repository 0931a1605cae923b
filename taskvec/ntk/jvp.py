"""J·τ for a parameter-space direction τ (a task vector) by forward-mode AD, and a finite-difference check.

Δf_lin = J τ is computed per batch with :func:`torch.func.jvp` (needs eager attention); the central
difference (f(θ₀+ετ) − f(θ₀−ετ)) / 2ε is an independent check that shares no AD code.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn
from torch.func import jvp as _jvp
from tqdm.auto import tqdm

from ..errors import TaskvecError
from ..outputs import OutputFunction


def match_direction(model: nn.Module, direction: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Direction keyed by model parameter names, cast to each parameter's dtype/device; shapes checked.

    Keys may be checkpoint names (a TaskVector's): they are mapped with
    :func:`taskvec.checkpoints.match_parameter_names`. Tensors outside the model are an error.
    """
    params = dict(model.named_parameters())
    keys = list(direction.keys())
    if not keys:
        raise TaskvecError("the direction (task vector) holds no tensors")
    if all(k in params for k in keys):
        mapping = {k: k for k in keys}
    else:
        from ..checkpoints import match_parameter_names

        mapping = match_parameter_names(keys, model)
    out = {}
    for k, name in mapping.items():
        t, p = direction[k], params[name]
        if tuple(t.shape) != tuple(p.shape):
            raise TaskvecError(f"tensor {k!r}: shape {tuple(t.shape)} does not match the model's {name!r} "
                               f"{tuple(p.shape)}; was the task vector made from this base model?")
        out[name] = t.detach().to(device=p.device, dtype=p.dtype)
    return out


def _batches(output: OutputFunction, examples: Sequence[Mapping], batch_size: int):
    from .jacobian import ProbeBatch

    probe = ProbeBatch(output, examples)
    return probe, probe.blocks(batch_size)


def jvp(model: nn.Module, output: OutputFunction, examples: Sequence[Mapping],
        direction: Mapping[str, torch.Tensor], *, batch_size: int = 16, progress: bool = False) -> torch.Tensor:
    """J·τ on the probe set: [n, m] (float64), τ restricted to the tensors it holds."""
    tangent = match_direction(model, direction)
    params = dict(model.named_parameters())
    base = {k: params[k].detach() for k in tangent}  # same key order as the tangent
    probe, blocks = _batches(output, examples, batch_size)
    out = torch.zeros(probe.n, output.m, dtype=torch.float64)
    with tqdm(total=probe.n, desc="J·τ (forward-mode)", unit="ex", disable=not progress) as bar:
        for idx, batch in blocks:
            with torch.no_grad():
                _, jv = _jvp(lambda p: output(p, batch), (base,), (tangent,))
            out[idx] = jv.detach().double().cpu()
            bar.update(len(idx))
    return out


def outputs_at(model: nn.Module, output: OutputFunction, examples: Sequence[Mapping],
               direction: Mapping[str, torch.Tensor] | None = None, alpha: float = 1.0,
               *, batch_size: int = 16) -> torch.Tensor:
    """f(x; θ₀ + α τ) on the probe set: [n, m] float64 (τ = None gives f(θ₀))."""
    params = {k: p.detach() for k, p in model.named_parameters()}
    if direction is not None:
        for k, t in match_direction(model, direction).items():
            params[k] = params[k] + alpha * t
    probe, blocks = _batches(output, examples, batch_size)
    out = torch.zeros(probe.n, output.m, dtype=torch.float64)
    with torch.no_grad():
        for idx, batch in blocks:
            out[idx] = output(params, batch).double().cpu()
    return out


def finite_difference(model: nn.Module, output: OutputFunction, examples: Sequence[Mapping],
                      direction: Mapping[str, torch.Tensor], *, eps: float = 1e-3,
                      batch_size: int = 16) -> torch.Tensor:
    """Central difference (f(θ₀+ετ) − f(θ₀−ετ)) / 2ε: [n, m] float64 (error O(ε²))."""
    plus = outputs_at(model, output, examples, direction, eps, batch_size=batch_size)
    minus = outputs_at(model, output, examples, direction, -eps, batch_size=batch_size)
    return (plus - minus) / (2 * eps)
