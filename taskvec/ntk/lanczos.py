"""Matrix-free top-k eigenpairs of K/n by Lanczos on v ↦ J(Jᵀv)/n (a VJP then a JVP per batch).

Memory O(p): J is never formed. Each operator application costs one backward and one forward-mode
pass over the probe set (m of each for the trace kernel with m > 1).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch.func import jvp, vjp
from tqdm.auto import tqdm

from ..errors import TaskvecError
from ..outputs import OutputFunction
from .jacobian import ProbeBatch
from .params import ParamSpace
from .spectrum import fix_signs


class KernelOperator:
    """v ↦ K v with K = JJᵀ (trace kernel; block kernel when mode='block'), rows in original order."""

    def __init__(self, output: OutputFunction, space: ParamSpace, base: Mapping[str, torch.Tensor],
                 probe: ProbeBatch, *, mode: str = "trace", block_size: int = 32):
        self.output, self.space, self.base, self.probe = output, space, dict(base), probe
        self.mode, self.m = mode, output.m
        self.N = probe.n * (self.m if mode == "block" else 1)
        self.block_size = block_size
        self.dtype = next(iter(self.base.values())).dtype
        self.calls = 0

    def _f(self, batch):
        return lambda p: self.output(self.space.expand(p), batch)

    def matvec(self, v: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self._matvec(v)

    def _matvec(self, v: np.ndarray) -> np.ndarray:
        self.calls += 1
        m, n = self.m, self.probe.n
        V = torch.as_tensor(np.asarray(v).reshape(n, m) if self.mode == "block" else np.asarray(v).reshape(n, 1),
                            dtype=self.dtype)
        outs = range(m) if self.mode == "trace" else [None]
        result = torch.zeros(n, m if self.mode == "block" else 1, dtype=torch.float64)
        for o in outs:
            # g = Jᵀv  (sum of VJPs over blocks)
            g = {k: torch.zeros_like(t) for k, t in self.base.items()}
            for idx, batch in self.probe.blocks(self.block_size):
                _, pull = vjp(self._f(batch), self.base)
                cot = torch.zeros(len(idx), m, dtype=self.dtype)
                if o is None:
                    cot = V[idx]
                else:
                    cot[:, o] = V[idx, 0]
                cot = cot.to(self.probe.device)
                (grads,) = pull(cot)
                for k in g:
                    g[k] += grads[k]
            # J g  (JVPs per block)
            for idx, batch in self.probe.blocks(self.block_size):
                _, jv = jvp(self._f(batch), (self.base,), (g,))
                if o is None:
                    result[idx] += jv.double().cpu()
                else:
                    result[idx, 0] += jv[:, o].double().cpu()
        return result.reshape(-1).numpy()


def lanczos_topk(op: KernelOperator, k: int, *, n_norm: int, tol: float = 1e-10, seed: int = 0,
                 progress: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
    """Top-k eigenpairs of K/n_norm via ARPACK's implicitly restarted Lanczos (scipy eigsh)."""
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    N = op.N
    if k < 1 or k >= N - 1:
        raise TaskvecError(f"Lanczos top-k needs 1 ≤ k < n − 1 (k={k}, n={N}); use --strategy exact for a "
                           f"probe set this small")
    bar = tqdm(desc="eNTK lanczos (K·v)", unit="matvec", disable=not progress)

    def mv(v):
        bar.update(1)
        return op.matvec(v) / n_norm

    lin = LinearOperator((N, N), matvec=mv, dtype=np.float64)
    v0 = np.random.default_rng(seed).standard_normal(N)
    try:
        vals, vecs = eigsh(lin, k=k, which="LA", tol=tol, v0=v0, ncv=min(N, max(2 * k + 1, 20)))
    except ArpackNoConvergence as exc:  # pragma: no cover - depends on the spectrum
        raise TaskvecError(f"Lanczos did not converge for k={k}; lower --top-k or use --strategy exact") from exc
    finally:
        bar.close()
    order = np.argsort(vals)[::-1]
    vals, vecs = vals[order], fix_signs(vecs[:, order])
    return np.clip(vals, 0.0, None), vecs, {"matvecs": op.calls, "tol": tol}
