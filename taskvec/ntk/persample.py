"""Per-example gradients from one batched forward and backward pass (the fast path behind J rows).

vmap(grad) over a transformer re-batches every op and pays for it in copies (≈ 3.5× the cost of a
plain forward + backward on MiniLM). Here the model runs once on the whole block with forward hooks
on the modules that own in-scope parameters; autograd gives the gradient δ at each hooked module's
output (parameter gradients are never requested, so their GEMMs are skipped), and each module's
per-example parameter gradient is formed from its input x and δ:

- ``nn.Linear`` / GPT-2 ``Conv1D``: ∇W_i = Σ_t δ_i[t] x_i[t]ᵀ (one GEMM per example, written straight
  into its row of J), ∇b_i = Σ_t δ_i[t];
- ``nn.Embedding``: δ_i[t] scattered into the rows of the token ids (padding_idx masked), restricted
  to the space's rows when the input embeddings are restricted;
- any other module called with one tensor (LayerNorm, RMSNorm, …): vmap(vjp) of that module alone.

This is exact because examples do not interact in an eval-mode forward. The first block is checked:
Σ_i of the per-example gradients must equal autograd's gradient of Σ_i f(x_i); a model that uses an
in-scope parameter outside its module (or a module the rules cannot see into) fails that check or the
capture, and :class:`taskvec.ntk.jacobian.RowEngine` falls back to vmap(grad) for good.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap

from ..outputs import OutputFunction
from .params import ParamSpace


class Unsupported(Exception):
    """The model uses an in-scope parameter in a way the per-module rules do not cover."""


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def _rule(module: nn.Module) -> str:
    """'linear', 'conv1d', 'embedding' (stock forward only) or 'generic'."""
    t = type(module)
    if isinstance(module, nn.Linear) and t.forward is nn.Linear.forward:
        return "linear"
    conv = _conv1d_type()
    if conv is not None and isinstance(module, conv) and t.forward is conv.forward:
        return "conv1d"
    if isinstance(module, nn.Embedding) and t.forward is nn.Embedding.forward:
        return "embedding"
    return "generic"


class PerExampleGrads:
    """Per-example ∇θ f rows for one (output, space): ``rows(base, batch, out)`` → [b, m, p]."""

    def __init__(self, output: OutputFunction, space: ParamSpace):
        self.output, self.space = output, space
        self.checked = False
        self._buffers: dict[str, torch.Tensor] = {}
        model = output.model
        canonical = {id(p): n for n, p in model.named_parameters()}
        self.offsets = offsets = space.offsets
        # every (module, attribute) through which an in-scope parameter is reached (tied weights: several)
        self.owners: dict[str, tuple[nn.Module, str, dict[str, str]]] = {}
        for mname, mod in model.named_modules():
            local = {a: canonical[id(p)] for a, p in mod._parameters.items()
                     if p is not None and canonical.get(id(p)) in offsets}
            if local:
                self.owners[mname] = (mod, _rule(mod), local)
        covered = {n for _, _, local in self.owners.values() for n in local.values()}
        missing = [n for n in space.names if n not in covered]
        if missing:
            raise Unsupported(f"no owning module found for {missing[:3]}")
        for mod, rule, local in self.owners.values():
            restricted = [n for n in local.values() if n in space.rows]
            if restricted and rule != "embedding":
                raise Unsupported(f"restricted rows of {restricted} are used by a {type(mod).__name__}")
        self.row_map = {}
        for n, rows in space.rows.items():
            full = space.shapes[n][0]
            m = torch.full((full,), -1, dtype=torch.long)
            m[rows] = torch.arange(len(rows))
            self.row_map[n] = m

    # ------------------------------------------------------------------ capture
    def _forward(self, params: Mapping[str, torch.Tensor], batch):
        """Run f on the block with capture hooks; returns (y [b, m], captures)."""
        captures: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (module name, input, output)
        b = batch["input_ids"].shape[0]
        handles = []

        def hook_for(mname):
            def hook(mod, args, kwargs, out):
                if len(args) != 1 or not torch.is_tensor(args[0]) or not torch.is_tensor(out) or \
                        any(torch.is_tensor(v) for v in kwargs.values()):
                    raise Unsupported(f"module {mname} ({type(mod).__name__}) is not called with one tensor")
                x = args[0].detach()
                if out.ndim and out.shape[0] != b:
                    if out.shape[0] != 1 or x.ndim == 0 or x.shape[0] != 1:
                        raise Unsupported(f"module {mname} ({type(mod).__name__}) output is not batched by example")
                    # shared across the batch (e.g. position embeddings of position_ids [1, L]): give every
                    # example its own copy so that its gradient stays per example
                    out = out.expand(b, *out.shape[1:])
                    x = x.expand(b, *x.shape[1:])
                captures.append((mname, x, out))
                return out.clone()  # later in-place edits of the output must not touch the captured tensor
            return hook

        for mname, (mod, _, _) in self.owners.items():
            handles.append(mod.register_forward_hook(hook_for(mname), with_kwargs=True))
        try:
            y = self.output(self.space.expand(params), batch)
        finally:
            for h in handles:
                h.remove()
        return y, captures

    # ------------------------------------------------------------------ rules
    def _scratch(self, name: str, shape: tuple, like: torch.Tensor) -> torch.Tensor:
        """A reused output buffer per tensor: a fresh multi-MB result per call costs page faults that
        take longer than the GEMM writing it (3–4× measured on 16 × 1536 × 384 blocks)."""
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._buffers[name] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buf

    def _module_grads(self, mname, x, delta, params, dest) -> dict[str, torch.Tensor | None]:
        """Per-example gradients [b, *shape in space] of module `mname`'s in-scope parameters.

        dest(name) → the [b, *shape] view of the output rows where that gradient goes, or None; a
        weight gradient written there directly is returned as None."""
        mod, rule, local = self.owners[mname]
        b = x.shape[0]
        out = {}
        if rule in ("linear", "conv1d"):
            xs = x.reshape(b, -1, x.shape[-1])
            ds = delta.reshape(b, -1, delta.shape[-1])
            for attr, name in local.items():
                if attr == "weight":
                    a, c = (ds, xs) if rule == "linear" else (xs, ds)
                    view = dest(name)
                    if view is not None and view.device == a.device and view.dtype == a.dtype:
                        # one GEMM per example straight into its row: no batch temporary, no copy
                        # (bmm cannot write a row-strided batch without a temporary)
                        for k in range(b):
                            torch.mm(a[k].T, c[k], out=view[k])
                        out[name] = None
                    else:
                        out[name] = torch.bmm(a.transpose(1, 2), c,
                                              out=self._scratch(name, (b, a.shape[-1], c.shape[-1]), a))
                elif attr == "bias":
                    out[name] = ds.sum(1)
                else:
                    raise Unsupported(f"{mname}.{attr}")
            return out
        if rule == "embedding":
            name = local.get("weight")
            if name is None or len(local) != 1:
                raise Unsupported(f"{mname}: unexpected parameters {list(local)}")
            ids = x.reshape(b, -1)
            ds = delta.reshape(b, ids.shape[1], -1)
            keep = torch.ones_like(ids, dtype=torch.bool)
            if mod.padding_idx is not None:
                keep &= ids != mod.padding_idx
            if name in self.row_map:
                rows = self.row_map[name].to(ids.device)[ids]
                keep &= rows >= 0
                R = len(self.space.rows[name])
            else:
                rows, R = ids, mod.num_embeddings
            ds = ds * keep[..., None].to(ds.dtype)
            flat = (torch.arange(b, device=ids.device)[:, None] * R + rows.clamp_min(0)).reshape(-1)
            g = self._scratch(name, (b * R, ds.shape[-1]), ds).zero_()
            g.index_add_(0, flat, ds.reshape(-1, ds.shape[-1]))
            out[name] = g.view(b, R, -1)
            return out
        local_params = {attr: params[name] for attr, name in local.items()}

        def one(p, xi, di):
            _, pull = vjp(lambda q: functional_call(mod, q, (xi[None],))[0], p)
            return pull(di)[0]

        grads = vmap(one, in_dims=(None, 0, 0))(local_params, x, delta)
        return {local[attr]: g for attr, g in grads.items()}

    # ------------------------------------------------------------------ rows
    def rows(self, base: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor],
             out: torch.Tensor | None = None) -> torch.Tensor:
        """[b, m, p] per-example gradients of every output (written into `out` if given)."""
        b, m = batch["input_ids"].shape[0], self.output.m
        params = {k: v.detach().requires_grad_(True) for k, v in base.items()}
        with torch.enable_grad():
            y, captures = self._forward(params, batch)
            outs = [c[2] for c in captures]
            if out is None:
                out = torch.empty(b, m, self.space.p, dtype=y.dtype, device=y.device)
            for o in range(m):
                deltas = torch.autograd.grad(y[:, o].sum(), outs, retain_graph=o < m - 1 or not self.checked,
                                             allow_unused=True)
                written: set[str] = set()
                for (mname, x, yo), d in zip(captures, deltas):
                    if d is None:
                        d = torch.zeros_like(yo)
                    def dest(name):
                        if name in written:
                            return None
                        s, size = self.offsets[name]
                        return out[:, o, s:s + size].view(b, *self.space.shape(name))

                    for name, g in self._module_grads(mname, x, d.detach(), params, dest).items():
                        s, size = self.offsets[name]
                        view = out[:, o, s:s + size]
                        if g is None:
                            written.add(name)
                        elif name in written:
                            view += g.reshape(b, size).to(view.device)  # rows may live on the CPU
                        else:
                            view.copy_(g.reshape(b, size))
                            written.add(name)
                for name in self.space.names:
                    if name not in written:  # in scope but unused by this output
                        s, size = self.offsets[name]
                        out[:, o, s:s + size] = 0
            if not self.checked:
                self._check(y, params, out)
        return out

    def _check(self, y, params, out) -> None:
        """Σ_i,o of the per-example rows must equal autograd's gradient of Σ f (else: not covered)."""
        names = self.space.names
        ref = torch.autograd.grad(y.sum(), [params[n] for n in names], allow_unused=True)
        total = out.sum(dim=(0, 1))
        ref = [torch.zeros(self.offsets[n][1], dtype=total.dtype, device=total.device) if r is None
               else r.reshape(-1).to(device=total.device, dtype=total.dtype) for n, r in zip(names, ref)]
        # float64 models still run some parts in float32 (transformers computes rotary tables in float32):
        # jacrev and autograd then differ by ~1e-7 relative (QA: Qwen2/Mistral/Phi logits); a rule that
        # misses a use of a weight is off by O(1)
        rtol = 1e-6 if total.dtype == torch.float64 else 1e-3
        overall = float(torch.sqrt(sum(r.pow(2).sum() for r in ref)))
        for name, r in zip(names, ref):
            s, size = self.offsets[name]
            err = float((total[s:s + size] - r).norm())
            # relative to the tensor's own gradient, with a floor for tensors whose gradient is ~0 by
            # symmetry (e.g. attention key biases) and only round-off remains
            scale = float(r.norm()) + 1e-3 * overall * (size / self.space.p) ** 0.5
            if err > rtol * scale + 1e-30:
                raise Unsupported(f"summed per-example gradient of {name} differs from autograd's "
                                  f"({err:.3g} vs norm {float(r.norm()):.3g})")
        self.checked = True
