"""Input validation shared by the theory modules: arrays in, TaskvecError out."""

from __future__ import annotations

import numpy as np

from ..errors import TaskvecError


def eigenvalues(mu, *, name: str = "eigenvalues", n: int | None = None) -> tuple[np.ndarray, dict]:
    """Return eigenvalues of K/n as float64, sorted descending, round-off negatives clipped to 0.

    `mu`: a 1-D array (a single row or column is accepted too) or a `taskvec.ntk.KernelResult`, whose
    `eigenvalues` are used (pass `n` yourself when it holds only the top-k). A matrix is refused: the
    eigenvalues of K/n are wanted, not K. If `n` exceeds the number given (a top-k spectrum), the missing
    eigenvalues are taken as 0, which makes R̂(ε) a lower bound; the returned info says so.
    """
    if not isinstance(mu, np.ndarray) and hasattr(mu, "eigenvalues") and hasattr(mu, "eigenvectors"):
        mu = mu.eigenvalues  # a KernelResult (duck-typed: theory stays free of torch)
    try:
        arr = np.asarray(mu, dtype=np.float64)
    except (TypeError, ValueError):
        raise TaskvecError(f"{name}: expected numbers (the eigenvalues of K/n), got {type(mu).__name__}; pass "
                           "a 1-D array such as KernelResult.eigenvalues") from None
    if sum(s > 1 for s in arr.shape) > 1:
        raise TaskvecError(f"{name}: got a {'×'.join(map(str, arr.shape))} array, not a vector of eigenvalues; pass "
                           "the eigenvalues of K/n (e.g. KernelResult.eigenvalues, or np.linalg.eigvalsh(K / n) "
                           "for a kernel matrix K)")
    arr = arr.ravel()
    if arr.size == 0:
        raise TaskvecError(f"{name}: empty array; pass the eigenvalues of K/n (one per probe example)")
    if not np.all(np.isfinite(arr)):
        bad = int(np.sum(~np.isfinite(arr)))
        raise TaskvecError(f"{name}: {bad} eigenvalue(s) are NaN/Inf; recompute the kernel in float64")
    arr = np.sort(arr)[::-1]
    top = arr[0]
    if top <= 0:
        raise TaskvecError(f"{name}: the largest eigenvalue is {top:g} ≤ 0; the kernel is zero or not PSD")
    neg = arr < 0
    info = {"n_negative_clipped": int(neg.sum()), "most_negative": float(arr[neg].min()) if neg.any() else 0.0}
    if neg.any() and -arr[neg].min() > 1e-6 * top:
        raise TaskvecError(
            f"{name}: eigenvalue {arr[neg].min():g} is negative beyond round-off (top {top:g}); "
            "the matrix is not a PSD kernel — pass eigenvalues of K/n = J Jᵀ/n"
        )
    arr = np.clip(arr, 0.0, None)
    if n is not None:
        n = int(n)
        if n < arr.size:
            raise TaskvecError(f"{name}: {arr.size} eigenvalues given but n={n}; n must be ≥ the number of eigenvalues")
        if n > arr.size:
            info["padded_zeros"] = n - arr.size
            info["note"] = f"only the top {arr.size} of n={n} eigenvalues given; the rest taken as 0 (R̂ is then a lower bound)"
            arr = np.concatenate([arr, np.zeros(n - arr.size)])
    return arr, info


def positive(value, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TaskvecError(f"{name} must be a positive number, got {value!r}") from None
    if not np.isfinite(v) or v <= 0:
        raise TaskvecError(f"{name} must be a positive finite number, got {value!r}")
    return v


def square_kernel(K, name: str = "K") -> np.ndarray:
    K = np.asarray(K, dtype=np.float64)
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise TaskvecError(f"{name}: expected a square n×n kernel matrix, got shape {K.shape}")
    if not np.all(np.isfinite(K)):
        raise TaskvecError(f"{name}: contains NaN/Inf; recompute the kernel")
    asym = np.abs(K - K.T).max() if K.size else 0.0
    if asym > 1e-6 * max(np.abs(K).max(), 1e-300):
        raise TaskvecError(f"{name}: not symmetric (max |K-Kᵀ| = {asym:g}); pass the Gram matrix J Jᵀ")
    return 0.5 * (K + K.T)


def vector(v, n: int | None, name: str) -> np.ndarray:
    arr = np.asarray(v, dtype=np.float64)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise TaskvecError(f"{name}: expected a vector (one value per example), got shape {arr.shape}")
    if n is not None and arr.size != n:
        raise TaskvecError(f"{name}: has {arr.size} entries but the kernel has n={n}; they must match")
    if not np.all(np.isfinite(arr)):
        raise TaskvecError(f"{name}: contains NaN/Inf")
    return arr


_SMALL = 1024


def eigh(A: np.ndarray):
    """np.linalg.eigh, single-threaded for n ≤ 1024: on 2 busy cores a 2-thread OpenBLAS eigh of a
    300×300 matrix measured 100× slower (4.5 s vs 0.04 s) than one thread, which loses nothing here."""
    if A.shape[0] > _SMALL:
        return np.linalg.eigh(A)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return np.linalg.eigh(A)


def eigvalsh(A: np.ndarray) -> np.ndarray:
    """np.linalg.eigvalsh with the same threading rule as `eigh`."""
    if A.shape[0] > _SMALL:
        return np.linalg.eigvalsh(A)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return np.linalg.eigvalsh(A)
