"""Where a task vector lives in the eNTK eigenbasis (DESIGN §2, "Projection of a task vector").

With eigenpairs (μ̂_i, u_i) of K/n and a_i = u_iᵀ(Jτ):
  c_i = a_i / sqrt(n μ̂_i) = ⟨τ, v_i⟩,  v_i = Jᵀu_i / sqrt(n μ̂_i) (orthonormal in parameter space);
  row-space energy E = Σ c_i² (E/‖τ‖² = the part of τ the probe outputs see at first order);
  spectral profile a_i² / ‖Jτ‖² and its cumulative sums.
The constant mode (a uniform shift of all outputs) is reported separately, and the profile is
repeated with the constant function projected out of both the kernel and Jτ.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import vjp, vmap

from ..errors import TaskvecError
from ..outputs import OutputFunction
from .spectrum import spectrum

TOP_KS = (1, 5, 10, 20, 50, 100)


def _as_vector(result, J_tau) -> np.ndarray:
    y = np.asarray(J_tau.detach().cpu().double() if isinstance(J_tau, torch.Tensor) else J_tau, dtype=np.float64)
    N = result.eigenvectors.shape[0]
    if y.ndim == 2 and y.shape[1] > 1 and y.size != N:
        raise TaskvecError(f"J·τ has {y.shape[1]} outputs per example but the kernel is the trace kernel over "
                           f"{N} rows; recompute the kernel with mode='block' to project multi-output f")
    y = y.reshape(-1)
    if y.size != N:
        raise TaskvecError(f"J·τ has {y.size} entries but the kernel has {N} rows; use the same probe set")
    return y


def _profile(vals: np.ndarray, vecs: np.ndarray, y: np.ndarray, n: int, tol: float, ks) -> dict:
    a = vecs.T @ y
    total = float(y @ y)
    keep = vals > tol * max(vals[0], 0.0) if vals.size and vals[0] > 0 else np.zeros(vals.shape, bool)
    c = np.where(keep, a / np.sqrt(np.where(keep, n * vals, 1.0)), 0.0)
    frac = a ** 2 / total if total > 0 else np.zeros_like(a)
    cum = np.cumsum(frac)
    return {"a": a, "c": c, "energy_row_space": float((c ** 2).sum()), "jtau_sq_norm": total,
            "spectral_fraction": frac, "cumulative": cum,
            "top_k_cumulative": {int(k): float(cum[min(k, cum.size) - 1]) for k in ks if cum.size},
            "unresolved_fraction": float(max(0.0, 1.0 - cum[-1])) if cum.size else 1.0,
            "n_modes_used": int(keep.sum())}


def project(result, J_tau, *, tau_sq_norm: float | None = None, tol: float = 1e-10, ks=TOP_KS) -> dict:
    """Projection of a task vector τ, given J·τ on the kernel's probe set (see module docstring).

    tau_sq_norm: ‖τ‖² over the same scope, for the row-space energy fraction E/‖τ‖².
    Modes with μ̂_i ≤ tol·μ̂₁ are numerically null and get c_i = 0.
    """
    y = _as_vector(result, J_tau)
    n = int(result.info.get("n", result.eigenvectors.shape[0]))
    vals, vecs = np.asarray(result.eigenvalues, float), np.asarray(result.eigenvectors, float)
    out = _profile(vals, vecs, y, n, tol, ks)
    if tau_sq_norm is not None:
        out["tau_sq_norm"] = float(tau_sq_norm)
        out["energy_fraction"] = out["energy_row_space"] / tau_sq_norm if tau_sq_norm > 0 else float("nan")
    N = y.size
    one = np.full(N, 1.0 / np.sqrt(N))
    total = float(vals.sum()) if result.K is None else float(np.trace(result.K)) / n
    out["constant_mode"] = {
        "top_mode_trace_share": float(vals[0] / total) if total > 0 else float("nan"),
        "top_mode_constant_cos2": float((vecs[:, 0] @ one) ** 2),
        "kernel_constant_share": float(one @ (result.K / n) @ one / total) if result.K is not None and total > 0
        else None,
        "jtau_constant_share": float((one @ y) ** 2 / (y @ y)) if y @ y > 0 else float("nan"),
    }
    if result.K is not None:
        P = np.eye(N) - np.outer(one, one)
        vals_c, vecs_c, _ = spectrum(P @ result.K @ P, n)
        out["without_constant"] = _profile(vals_c, vecs_c, P @ y, n, tol, ks)
        out["without_constant"]["eigenvalues"] = vals_c
    else:
        out["without_constant"] = None
        out["without_constant_note"] = "needs the full kernel (not available from Lanczos top-k)"
    return out


def random_like(direction: Mapping[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """A Gaussian direction with exactly the per-tensor Frobenius norms of `direction` (seeded)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in direction.keys():
        t = direction[name]
        r = torch.randn(t.shape, generator=g, dtype=torch.float64)
        norm = float(t.double().norm())
        out[name] = (r * (norm / float(r.norm())) if r.norm() > 0 else r).to(t.dtype)
    return out


def random_control(task_vector, seed: int = 0):
    """The chance baseline for a task vector: same tensors, same per-tensor norms, random directions."""
    tensors = random_like(task_vector, seed)
    try:
        from ..vectors import TaskVector

        if isinstance(task_vector, TaskVector):
            return TaskVector(tensors, meta={**getattr(task_vector, "meta", {}), "random_control_seed": seed})
    except ImportError:  # pragma: no cover
        pass
    return tensors


def eigendirections(model: nn.Module, output: OutputFunction, examples: Sequence[Mapping], result, k: int, *,
                    scope="body", batch_size: int = 16, tol: float = 1e-10) -> dict[str, torch.Tensor]:
    """v_i = Jᵀu_i / sqrt(n μ̂_i) for the top k modes: name → [k, *shape] (only k·p numbers held)."""
    from .jacobian import ProbeBatch
    from .params import build_space

    have = len(result.eigenvalues)
    if k > have:
        raise TaskvecError(f"{k} eigendirections asked for, but the kernel has only {have} eigenvalues (n probes, "
                           f"or --top-k for lanczos); lower --directions to ≤ {have}")
    vals = np.asarray(result.eigenvalues, float)[:k]
    if result.info.get("mode", "trace") != "trace" or output.m != 1:
        raise TaskvecError("eigendirections are implemented for scalar outputs (m = 1)")
    if (vals <= tol * vals[0]).any():
        raise TaskvecError(f"only {(vals > tol * vals[0]).sum()} of the top {k} modes are non-null; lower --directions")
    space = build_space(model, scope)
    base = space.base(model)
    U = torch.as_tensor(np.asarray(result.eigenvectors)[:, :k] / np.sqrt(result.n * vals), dtype=torch.float64)
    probe = ProbeBatch(output, examples)
    acc = {nm: torch.zeros((k,) + tuple(t.shape), dtype=t.dtype, device=t.device) for nm, t in base.items()}
    for idx, batch in probe.blocks(batch_size):
        with torch.no_grad():
            _, pull = vjp(lambda p: output(p, batch), base)
            ref = next(iter(base.values()))
            cots = U[idx].T.to(dtype=ref.dtype, device=ref.device)[:, :, None]  # [k, b, 1]
            (g,) = vmap(pull)(cots)
        for nm in acc:
            acc[nm] += g[nm]
    return acc
