"""Eigendecomposition of K/n in float64, with round-off negatives clipped and reported."""

from __future__ import annotations

import numpy as np


def fix_signs(vectors: np.ndarray) -> np.ndarray:
    """Deterministic eigenvector signs: the largest-magnitude entry of each column is positive."""
    if vectors.size == 0:
        return vectors
    idx = np.argmax(np.abs(vectors), axis=0)
    signs = np.sign(vectors[idx, np.arange(vectors.shape[1])])
    signs[signs == 0] = 1.0
    return vectors * signs


def spectrum(K: np.ndarray, n: int | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Eigenpairs of K/n (descending). Returns (μ̂, U, info) with info on clipped negatives."""
    K = np.asarray(K, dtype=np.float64)
    n = K.shape[0] if n is None else n
    Ks = (K + K.T) / (2.0 * n)
    vals, vecs = np.linalg.eigh(Ks)
    vals, vecs = vals[::-1].copy(), vecs[:, ::-1].copy()
    neg = vals < 0
    info = {"n_clipped_negative": int(neg.sum()),
            "most_negative": float(vals[neg].min()) if neg.any() else 0.0,
            "most_negative_relative": float(vals[neg].min() / vals[0]) if neg.any() and vals[0] > 0 else 0.0,
            "trace": float(np.trace(Ks))}
    vals = np.where(neg, 0.0, vals)
    return vals, fix_signs(vecs), info
