"""The parameter space S of a kernel: in-scope tensors flattened into one coordinate vector.

Input word embeddings (not tied to an output layer) get a gradient only in the rows of tokens that
occur, so when they are in scope they are restricted to the rows of tokens present in the probe set
(exact: every other row's gradient is identically zero) instead of densifying the whole vocabulary
matrix per example.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from ..errors import TaskvecError


@dataclass
class ParamSpace:
    """Ordered in-scope parameters; `rows[name]` restricts an embedding matrix to some rows."""

    names: list[str]
    shapes: dict[str, tuple]
    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    dense_embeddings: list[str] = field(default_factory=list)  # in scope, tied to an output layer: dense
    full: dict[str, torch.Tensor] = field(default_factory=dict)  # detached full tensors of restricted names

    def shape(self, name: str) -> tuple:
        if name in self.rows:
            return (len(self.rows[name]),) + tuple(self.shapes[name][1:])
        return tuple(self.shapes[name])

    def size(self, name: str) -> int:
        return math.prod(self.shape(name))

    @property
    def p(self) -> int:
        return sum(self.size(n) for n in self.names)

    @property
    def offsets(self) -> dict[str, tuple[int, int]]:
        """name → (start, size) of its coordinates in the flattened vector, in `names` order."""
        out, off = {}, 0
        for n in self.names:
            out[n] = (off, self.size(n))
            off += out[n][1]
        return out

    @property
    def p_full(self) -> int:
        return sum(math.prod(self.shapes[n]) for n in self.names)

    def base(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """θ₀ restricted to the space (detached; restricted embeddings sliced to their rows)."""
        params = dict(model.named_parameters())
        out = {}
        for n in self.names:
            t = params[n].detach()
            out[n] = t.index_select(0, self.rows[n].to(t.device)) if n in self.rows else t
        return out

    def expand(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Space coordinates → model parameters (restricted rows scattered into the frozen full matrix)."""
        out = dict(params)
        for n, idx in self.rows.items():
            if n in out:
                full = self.full[n]
                out[n] = full.index_copy(0, idx.to(full.device), out[n].to(full.dtype))
        return out

    def restrict(self, direction: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A full-shape direction (e.g. a task vector) restricted to the space's coordinates."""
        out = {}
        for n in self.names:
            if n not in direction:
                continue
            t = direction[n]
            out[n] = t.index_select(0, self.rows[n].to(t.device)) if n in self.rows else t
        return out

    def flatten(self, grads: Mapping[str, torch.Tensor], lead: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Per-name tensors with `lead` leading dims → [*lead_shape, p] (written into `out` if given)."""
        first = grads[self.names[0]]
        lead_shape = tuple(first.shape[:lead])
        if out is None:
            out = torch.empty(lead_shape + (self.p,), dtype=first.dtype, device=first.device)
        for n, (off, size) in self.offsets.items():
            out[..., off:off + size] = grads[n].reshape(lead_shape + (size,))
        return out

    def describe(self) -> dict:
        return {"tensors": list(self.names), "n_params": self.p, "n_params_full": self.p_full,
                "restricted_rows": {n: int(len(r)) for n, r in self.rows.items()},
                "dense_embeddings": list(self.dense_embeddings)}


def _input_embedding_name(model: nn.Module) -> str | None:
    """Name of the input word-embedding weight if it is *not* shared with an output layer."""
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if emb is None:
        return None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and out.weight is emb.weight:
        return None
    for name, p in model.named_parameters():
        if p is emb.weight:
            return name
    return None


def build_space(model: nn.Module, scope="body", token_ids: torch.Tensor | None = None) -> ParamSpace:
    """Resolve `scope` on `model.named_parameters()` and set up embedding row restriction.

    scope: a preset / regex understood by :func:`taskvec.scope.resolve_scope`, or a list of names.
    token_ids: all token ids of the probe set (for restricting untied input embeddings).
    """
    from ..scope import resolve_scope

    named = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    if not named:
        raise TaskvecError("the model has no floating-point parameters")
    names = resolve_scope([n for n, _ in named], scope)
    params = dict(named)
    space = ParamSpace(names=names, shapes={n: tuple(params[n].shape) for n in names})
    emb = _input_embedding_name(model)
    try:
        in_emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        in_emb = None
    if in_emb is not None and emb is None:
        # tied to the output layer: the softmax makes every row's gradient non-zero, so it stays dense
        space.dense_embeddings = [n for n in names if params[n] is in_emb.weight]
    if emb in names and token_ids is not None:
        rows = torch.unique(token_ids.reshape(-1)).to(torch.long)
        space.rows[emb] = rows
        space.full[emb] = params[emb].detach()
    return space
