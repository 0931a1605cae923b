"""Cross-task Gram blocks over the union of probe sets, kernel alignment and principal angles.

One kernel over the union X_A ∪ X_B ∪ … gives every block K_AB = J_A J_Bᵀ. From the blocks alone:
- kernel alignment ⟨J_AᵀJ_A, J_BᵀJ_B⟩_F / (‖K_AA‖_F ‖K_BB‖_F) = ‖K_AB‖_F² / (‖K_AA‖_F ‖K_BB‖_F) —
  the cosine between the tasks' parameter-space second-moment operators (1 = same directions);
- principal angles between the top-k parameter-space eigen-subspaces span{v_i^A}, span{v_j^B}:
  cos θ = singular values of D_A^{-1/2} U_Aᵀ K_AB U_B D_B^{-1/2} (D = eigenvalues of K, not K/n).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from ..errors import TaskvecError
from .spectrum import spectrum


def kernel_alignment(K_aa: np.ndarray, K_bb: np.ndarray, K_ab: np.ndarray) -> float:
    """‖K_AB‖_F² / (‖K_AA‖_F ‖K_BB‖_F) ∈ [0, 1]."""
    den = np.linalg.norm(K_aa) * np.linalg.norm(K_bb)
    return float(np.linalg.norm(K_ab) ** 2 / den) if den > 0 else float("nan")


def principal_angles(K_aa: np.ndarray, K_bb: np.ndarray, K_ab: np.ndarray, k: int, tol: float = 1e-10) -> np.ndarray:
    """Cosines of the principal angles (descending) between the top-k eigen-subspaces of tasks A and B."""
    out = []
    for K in (K_aa, K_bb):
        vals, vecs, _ = spectrum(K, 1)  # eigenvalues of K itself
        r = int(min(k, (vals > tol * vals[0]).sum() if vals.size and vals[0] > 0 else 0))
        if r == 0:
            raise TaskvecError("a task's kernel is zero; principal angles are undefined")
        out.append((vals[:r], vecs[:, :r]))
    (da, ua), (db, ub) = out
    M = (ua / np.sqrt(da)).T @ K_ab @ (ub / np.sqrt(db))
    return np.clip(np.linalg.svd(M, compute_uv=False), 0.0, 1.0)


@dataclass
class CrossTaskResult:
    names: list[str]
    slices: dict[str, slice]
    kernel: object  # KernelResult over the union
    alignment: dict = field(default_factory=dict)
    angles: dict = field(default_factory=dict)

    def block(self, a: str, b: str) -> np.ndarray:
        return self.kernel.K[self.slices[a], self.slices[b]]

    def to_dict(self) -> dict:
        return {"tasks": self.names, "sizes": {k: s.stop - s.start for k, s in self.slices.items()},
                "kernel_alignment": self.alignment,
                "principal_angle_cosines": {k: v.tolist() for k, v in self.angles.items()}}


def cross_task(model, output, probe_sets: Mapping[str, Sequence[Mapping]], *, k: int = 10, **kernel_kw) -> CrossTaskResult:
    """Gram blocks over the union of the tasks' probe sets (one kernel computation), alignment and angles."""
    from .kernel import compute_kernel

    if len(probe_sets) < 2:
        raise TaskvecError("cross-task blocks need at least two probe sets")
    if kernel_kw.get("mode", "trace") != "trace":
        raise TaskvecError("cross-task blocks use the trace kernel (one row per example); drop mode='block'")
    if kernel_kw.get("strategy") == "lanczos":
        raise TaskvecError("cross-task blocks need the full Gram matrix; use exact, recompute or sketch")
    names, union, slices = list(probe_sets), [], {}
    for name in names:
        rows = list(probe_sets[name])
        if not rows:
            raise TaskvecError(f"probe set {name!r} is empty")
        slices[name] = slice(len(union), len(union) + len(rows))
        union.extend(rows)
    res = compute_kernel(model, output, union, **kernel_kw)
    out = CrossTaskResult(names, slices, res)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            Kaa, Kbb, Kab = out.block(a, a), out.block(b, b), out.block(a, b)
            out.alignment[f"{a}|{b}"] = kernel_alignment(Kaa, Kbb, Kab)
            out.angles[f"{a}|{b}"] = principal_angles(Kaa, Kbb, Kab, k)
    return out
