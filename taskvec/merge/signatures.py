"""Per-tensor statistics of a merged tensor against its base and task vectors (pure numpy, float64).

For d = θ_m − θ₀ and the task vectors τ_t (columns of X):
- `least_squares`: λ minimising ‖d − Xλ‖ and the residual fraction ‖d − Xλ‖²/‖d‖²;
- `trim_evidence`: exact zeros of d where some τ is not, and for each model the quantile of the largest
  |τ_t| among those zeros — near 1 for random dropping, ≤ 1 − density for magnitude trimming
  (with a p-value under "zeros fall at random": q^m for m zeros);
- `subset_fit`: whether every entry equals Σ_{t∈S} c_t τ_t (or that sum / |S|) for some subset S of the
  models with per-tensor coefficients c_t — the signature of dropping/trimming ("entries equal 0 or a
  rescaled τ"), with kept fractions per model and whether any S mixes signs (no sign election).
"""

from __future__ import annotations

import itertools

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)
MANTISSA_EPS = {"float32": 2.0 ** -23, "bfloat16": 2.0 ** -7, "float16": 2.0 ** -10, "float64": 2.0 ** -52}


def ulp(x: np.ndarray, eps: float) -> np.ndarray:
    """Spacing of a float format with machine epsilon `eps` at |x| (0 at x = 0): the storage rounding scale."""
    a = np.abs(x)
    with np.errstate(divide="ignore"):
        return np.where(a > 0, np.exp2(np.floor(np.log2(np.where(a > 0, a, 1.0)))) * eps, 0.0)


def least_squares(gram: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Minimum-norm solution of the normal equations G λ = r (pseudo-inverse; τ's may be collinear or zero)."""
    return np.linalg.pinv(gram, rcond=1e-12, hermitian=True) @ rhs


def fit_stats(X: np.ndarray, d: np.ndarray) -> dict:
    """Normal-equation pieces (G = XᵀX, r = Xᵀd, ‖d‖²), the per-tensor λ and residual fraction."""
    gram, rhs, dd = X.T @ X, X.T @ d, float(d @ d)
    lam = least_squares(gram, rhs)
    res = d - X @ lam
    rr = float(res @ res)
    return {"gram": gram, "rhs": rhs, "dd": dd, "lambda": lam, "residual_fraction": rr / dd if dd > 0 else 0.0}


def trim_evidence(X: np.ndarray, d: np.ndarray, visible: np.ndarray | None = None) -> dict:
    """Exact zeros of d where some τ_t ≠ 0, and per model the magnitude quantile of the largest zeroed |τ_t|.

    visible: entries where a task's change would survive the merged model's storage rounding (default
    all); zeros elsewhere may be rounding, not trimming, and are not counted.
    """
    moved = np.any(X != 0, axis=1)
    if visible is not None:
        moved &= visible
    zero = (d == 0) & moved
    m = int(zero.sum())
    out = {"zero_entries": m, "zero_fraction": m / max(int(moved.sum()), 1), "quantile": [], "p_random": []}
    if m == 0:
        return out
    for t in range(X.shape[1]):
        a = np.abs(X[:, t])
        q = float(np.mean(a <= a[zero].max()))
        out["quantile"].append(q)
        out["p_random"].append(float(q ** m))
    return out


def ratio_mode(x: np.ndarray, d: np.ndarray, rel: float = 1e-3, min_count: int = 3) -> tuple[float, float]:
    """Most frequent value c of d_i / x_i (to `rel`) and the fraction of entries where d_i = c·x_i.

    A value must occur at least `min_count` times to count as a mode; otherwise (0, 0) is returned.
    """
    ok = (x != 0) & (d != 0)
    if ok.sum() < min_count:
        return 0.0, 0.0
    r = d[ok] / x[ok]
    key = 2 * np.round(np.log(np.abs(r)) / rel).astype(np.int64) + (r < 0)
    vals, counts = np.unique(key, return_counts=True)
    if counts.max() < min_count:
        return 0.0, 0.0
    best = int(vals[np.argmax(counts)])
    c0 = (-1.0 if best % 2 else 1.0) * np.exp((best // 2) * rel)
    near = np.abs(r / c0 - 1) < 2 * rel
    c = float(np.median(r[near]))
    return c, float(np.sum(np.abs(r / c - 1) < rel)) / len(d)


def subset_fit(X: np.ndarray, d: np.ndarray, coef: np.ndarray, theta_m: np.ndarray, *, rel: float = 2e-5,
               eps: float = EPS32, max_models: int = 10) -> dict:
    """Explain each entry by a subset S of the models, with per-tensor coefficients c_t.

    Families: 'sum' d = Σ_{t∈S} c_t τ_t (task arithmetic, DARE, TIES without normalize); 'mean' the same
    divided by |S| (TIES disjoint mean, equal weights); 'convex' d between min and max of c_t τ_t over a
    sign-consistent S (TIES disjoint mean with unequal weights). Returns the explained fraction, the
    family explaining most multi-model entries, per-model kept fractions (t ∈ S among explained
    entries with τ_t ≠ 0), ‖τ_t‖₁ / ‖τ_t over kept entries‖₁ (the L1 rescale a DARE merge would apply)
    and the number of explained entries that only a sign-mixing S explains (no sign election).
    """
    n, T = X.shape
    if T > max_models:
        return {"explained_fraction": float("nan"), "family": f"skipped (more than {max_models} models)",
                "kept_fraction": [float("nan")] * T, "l1_ratio": [float("nan")] * T, "mixed_sign_subsets": 0}
    subsets = np.array(list(itertools.product([0, 1], repeat=T)), dtype=bool)          # [K, T]
    K = len(subsets)
    size = subsets.sum(1)
    chunk = max(1024, (1 << 21) // K)
    explained = np.zeros(n, dtype=bool)
    kept, moved_t, l1_kept = np.zeros(T), np.zeros(T), np.zeros(T)
    mixed = 0
    fams = {"sum": 0, "mean": 0, "convex": 0}
    for s in range(0, n, chunk):
        Xc, dc = X[s:s + chunk] * coef, d[s:s + chunk]
        Sf = subsets.T.astype(np.float64)
        cand_sum = Xc @ Sf                                                             # [c, K]
        cand_mean = cand_sum / np.maximum(size, 1)
        mixed_S = (((Xc > 0) @ Sf) > 0) & (((Xc < 0) @ Sf) > 0)                      # S mixes signs here
        tol = (rel * np.abs(Xc).sum(1) + 4 * EPS32 * np.abs(theta_m[s:s + chunk] - dc)
               + 2 * ulp(theta_m[s:s + chunk], max(eps, EPS32)))[:, None]
        err_sum, err_mean = np.abs(cand_sum - dc[:, None]), np.abs(cand_mean - dc[:, None])
        ok_sum, ok_mean = err_sum <= tol, err_mean <= tol
        ok_conv = np.zeros_like(ok_sum)
        need = ~((ok_sum | ok_mean) & ~mixed_S).any(1)  # convex family only where no sign-consistent exact fit
        if need.any():
            Xn, dn, tn = Xc[need], dc[need][:, None], tol[need]
            for k in np.flatnonzero(size >= 2):
                cols = Xn[:, subsets[k]]
                ok_conv[need, k] = ((dn >= cols.min(1, keepdims=True) - tn)
                                    & (dn <= cols.max(1, keepdims=True) + tn))[:, 0]
            ok_conv &= ~mixed_S
        ok_any = ok_sum | ok_mean | ok_conv
        ex = ok_any.any(1)
        consistent = (ok_any & ~mixed_S).any(1)
        explained[s:s + chunk] = ex
        mixed += int((ex & ~consistent).sum())
        # best subset: exact fits (sign-consistent first) before convex ones; tol is 0 only where θ_m = θ₀ = 0 and
        # every c_t τ_t = 0 (e.g. a zero bias the merge left unchanged): an exact fit, scored 0
        rel_err = np.divide(np.minimum(err_sum, err_mean), tol, out=np.zeros_like(err_sum), where=tol > 0)
        err = np.where(ok_sum | ok_mean, rel_err + 10.0 * mixed_S, np.where(ok_conv, 100.0, np.inf))
        best = err.argmin(1)
        rows = np.arange(len(dc))
        multi = ex & (size[best] > 1)
        fams["sum"] += int((multi & ok_sum[rows, best]).sum())
        fams["mean"] += int((multi & ~ok_sum[rows, best] & ok_mean[rows, best]).sum())
        fams["convex"] += int((multi & ~ok_sum[rows, best] & ~ok_mean[rows, best]).sum())
        S = subsets[best][ex]
        nz = Xc[ex] != 0
        kept += (S & nz).sum(0)
        moved_t += nz.sum(0)
        l1_kept += (np.abs(X[s:s + chunk][ex]) * S).sum(0)
    return {"explained_fraction": float(explained.mean()) if n else 1.0,
            "family": max(fams, key=fams.get) if any(fams.values()) else "single",
            "kept_fraction": (kept / np.maximum(moved_t, 1)).tolist(),
            "l1_ratio": (np.abs(X).sum(0) / np.maximum(l1_kept, 1e-300)).tolist(),
            "mixed_sign_subsets": mixed}
