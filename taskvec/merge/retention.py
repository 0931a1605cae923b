"""Kernel-predicted per-task retention of a merge (the hook the eNTK engine feeds).

For task A with probe outputs f_A, the linearised merge moves f_A by Σ_t λ_t J_A τ_t, while the task's
own fine-tune moves it by J_A τ_A. Retention is the projection coefficient of the merge's change on
the task's own change; interference is the size of what the other tasks add, relative to J_A τ_A.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ..errors import TaskvecError


def _retention(change: np.ndarray, own: np.ndarray) -> float:
    den = float(own @ own)
    return float(change @ own) / den if den > 0 else float("nan")


def predicted_retention(jtau: Mapping[str, np.ndarray], lambdas: Sequence[float], *,
                        tasks: Sequence[str] | None = None,
                        measured: Mapping[str, np.ndarray] | None = None) -> dict:
    """Per-task predicted (and, when given, measured) change of a merge.

    jtau: task A → array [T, ...] whose row t is J_A τ_t (task A's probe outputs moved by τ_t, from
    `ntk.jvp`); rows follow the order of `lambdas` (the fitted λ_t of `check_merge`). tasks: the task
    each row belongs to (default: the keys of jtau in order), so J_A τ_A is row tasks.index(A).
    measured: task A → f_A(θ_m) − f_A(θ₀) on the same probe points (same shape as one row).
    Returns {A: {predicted_change (Σ_t λ_t J_A τ_t, shaped like one row), predicted_retention,
    predicted_interference, self_term, norms, [measured_retention, relative_error, cosine]}} — every
    prediction next to its measurement when one is given.
    """
    lam = np.asarray(lambdas, dtype=np.float64)
    tasks = list(tasks) if tasks is not None else list(jtau)
    if len(tasks) != len(lam):
        raise TaskvecError(f"{len(lam)} fitted λ's but {len(tasks)} tasks; give one λ per fine-tune")
    out = {}
    for a, rows in jtau.items():
        rows = np.asarray(rows, dtype=np.float64)
        if rows.shape[0] != len(lam):
            raise TaskvecError(f"jtau[{a!r}] has {rows.shape[0]} rows but there are {len(lam)} λ's; "
                               "give J_A τ_t for every fine-tune t")
        if a not in tasks:
            raise TaskvecError(f"task {a!r} is not one of the merged tasks {tasks}")
        rows = rows.reshape(len(lam), -1)
        i = tasks.index(a)
        own = rows[i]
        pred = lam @ rows
        others = pred - lam[i] * own
        rec = {"predicted_retention": _retention(pred, own),
               "predicted_interference": float(np.linalg.norm(others) / max(np.linalg.norm(own), 1e-300)),
               "self_term": float(lam[i]),
               "predicted_change": pred.reshape(np.shape(jtau[a])[1:]),
               "predicted_change_norm": float(np.linalg.norm(pred)), "own_change_norm": float(np.linalg.norm(own))}
        if measured is not None and a in measured:
            meas = np.asarray(measured[a], dtype=np.float64).reshape(-1)
            if meas.shape != pred.shape:
                raise TaskvecError(f"measured[{a!r}] has {meas.size} values but J_A τ has {pred.size}; "
                                   "use the same probe points and outputs")
            nm = np.linalg.norm(meas)
            rec.update({"measured_retention": _retention(meas, own), "measured_change_norm": float(nm),
                        "relative_error": float(np.linalg.norm(pred - meas) / nm) if nm > 0 else float("nan"),
                        "cosine": float(pred @ meas / (np.linalg.norm(pred) * nm)) if nm > 0 else float("nan")})
        out[a] = rec
    return out
