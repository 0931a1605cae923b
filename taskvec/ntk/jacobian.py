"""Per-example Jacobian rows J[i] = ∇_θ f(x_i; θ₀) in row blocks: batched hooks where they cover the
model (:mod:`taskvec.ntk.persample`), torch.func vmap(grad / jacrev) otherwise.

Rows are laid out as the kernel needs them: the *trace* kernel (Σ_o ∇f_o·∇f_o) is the Gram matrix
of the flattened [m·p] rows, the *block* kernel (nm × nm) that of [p] rows ordered example-major.
"""

from __future__ import annotations

from typing import Iterator, Mapping, Sequence

import torch
from torch.func import grad, jacrev, vmap

from ..errors import TaskvecError
from ..outputs import OutputFunction
from .params import ParamSpace
from .persample import PerExampleGrads, Unsupported

ROW_METHODS = ("auto", "hooks", "vmap")


class ProbeBatch:
    """An encoded probe set, sorted by length so row blocks carry little padding."""

    def __init__(self, output: OutputFunction, examples: Sequence[Mapping]):
        self.output = output
        self.batch = output.encode(examples)
        self.n = len(examples)
        self.lengths = self.batch["attention_mask"].sum(1)
        self.order = torch.argsort(self.lengths, stable=True)  # processing order → original index
        self.device = next(output.model.parameters()).device

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())

    def block(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows `idx` (original indices), trimmed to their longest sequence."""
        L = int(self.lengths[idx].max())
        return {k: (v[idx, :L] if v.ndim == 2 else v[idx]).to(self.device) for k, v in self.batch.items()}

    def blocks(self, size: int, *, sorted_order: bool = True) -> Iterator[tuple[torch.Tensor, dict]]:
        order = self.order if sorted_order else torch.arange(self.n)
        for start in range(0, self.n, size):
            idx = order[start:start + size]
            yield idx, self.block(idx)


class RowEngine:
    """Computes J row blocks for one (output, space): the batched-hook fast path
    (:mod:`taskvec.ntk.persample`) where it covers the model, vmap(grad) otherwise.

    ``method``: 'auto' (hooks, falling back to vmap for good on the first unsupported use), 'hooks'
    (raise if unsupported) or 'vmap'. ``used`` records which one produced the rows; ``note`` why not hooks.
    """

    def __init__(self, output: OutputFunction, space: ParamSpace, method: str = "auto"):
        if method not in ROW_METHODS:
            raise TaskvecError(f"unknown per-example gradient method {method!r}; choose one of {ROW_METHODS}")
        self.output, self.space, self.method = output, space, method
        self.hooks, self.note = None, None
        if method != "vmap":
            try:
                self.hooks = PerExampleGrads(output, space)
            except Unsupported as exc:
                self._unsupported(exc)

    @property
    def used(self) -> str:
        return "hooks" if self.hooks is not None else "vmap"

    def _unsupported(self, exc: Exception) -> None:
        if self.method == "hooks":
            raise TaskvecError(f"per-example gradients by hooks are not possible for this model: {exc}") from exc
        self.hooks, self.note = None, f"vmap(grad) used: {exc}"

    def __call__(self, base, batch, *, mode: str = "trace", dtype=None, out: torch.Tensor | None = None):
        if self.hooks is not None:
            try:
                target = _target(out, (batch["input_ids"].shape[0], self.output.m, self.space.p), dtype)
                rows = self.hooks.rows(base, batch, out=target)
                return _finish(rows, mode, dtype)
            except Unsupported as exc:
                self._unsupported(exc)
        return jacobian_rows(self.output, self.space, base, batch, mode=mode, dtype=dtype, out=out)


def _target(out: torch.Tensor | None, shape: tuple, dtype) -> torch.Tensor | None:
    """`out` viewed as `shape` when rows can be written into it directly (same dtype), else None."""
    return out.view(shape) if out is not None and (dtype is None or out.dtype == dtype) else None


def _finish(rows: torch.Tensor, mode: str, dtype) -> torch.Tensor:
    """[b, m, p] → [b, m·p] (trace) or [b·m, p] (block), cast to `dtype`."""
    if dtype is not None and rows.dtype != dtype:
        rows = rows.to(dtype)
    b = rows.shape[0]
    return rows.reshape(b, -1) if mode == "trace" else rows.reshape(-1, rows.shape[-1])


def jacobian_rows(output: OutputFunction, space: ParamSpace, base: Mapping[str, torch.Tensor],
                  batch: Mapping[str, torch.Tensor], *, mode: str = "trace", dtype=None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """J rows for one batch by vmap over examples: [b, m·p] (mode='trace') or [b·m, p] (mode='block').

    Scalar outputs use vmap(grad) (one VJP per example, ~25% faster than jacrev's extra vmap level);
    `out` (same dtype, right shape) receives the rows directly, saving one copy of the block.
    """
    b, m = batch["input_ids"].shape[0], output.m
    # the transforms ignore the outer no_grad; it keeps out-of-scope weights from recording a graph
    with torch.no_grad():
        if m == 1:
            def f1(params, example):
                return output.single(space.expand(params), example)[0]

            jac = vmap(grad(f1), in_dims=(None, 0))(dict(base), dict(batch))  # name → [b, *shape]
        else:
            def f(params, example):
                return output.single(space.expand(params), example)

            jac = vmap(jacrev(f), in_dims=(None, 0))(dict(base), dict(batch))  # name → [b, m, *shape]
    lead = (b,) if m == 1 else (b, m)
    rows = space.flatten(jac, lead=len(lead), out=_target(out, lead + (space.p,), dtype))
    del jac
    return _finish(rows.view(b, m, space.p), mode, dtype)


def per_example_bytes(output: OutputFunction, space: ParamSpace, probe: ProbeBatch, itemsize: int) -> int:
    """Rough peak memory of one example inside a vmap(jacrev) block (gradients + activations)."""
    cfg = getattr(output.model, "config", None)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 768)
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 12)
    inter = getattr(cfg, "intermediate_size", None) or 4 * hidden
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 12)
    L = int(probe.lengths.max())
    act = L * layers * (12 * hidden + 3 * inter + 3 * heads * L)
    if output.causal:
        act += 3 * L * int(getattr(cfg, "vocab_size", 0) or 0)
    return int(itemsize * (2 * output.m * space.p + 2 * act))
