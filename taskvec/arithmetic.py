"""Linearised task arithmetic from arrays: predictions of θ₀ + Σ α_t τ_t from J_A τ_t, interference,
negation, weight disentanglement, linearisation error and task similarity in three spaces.

Inputs are plain arrays (no model is loaded here):
  f0[A]        f_A(θ₀) on task A's probes, shape (n_A,) or (n_A, m)
  jtau[A][t]   J_A τ_t (the eNTK engineer's `ntk.jvp`), same shape as f0[A]
  labels[A]    targets of task A (for the metric)
Every prediction is returned beside its measured counterpart when that is passed in.
"""

from __future__ import annotations

import itertools
from typing import Callable, Mapping

import numpy as np
from scipy import stats

from .errors import TaskvecError

# ----------------------------------------------------------------------------- metrics

def _as2d(a) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a[:, None] if a.ndim == 1 else a


def metric_mse(outputs, labels) -> float:
    """Mean squared error (regression outputs, m = 1 or per-output mean)."""
    o, y = _as2d(outputs), _as2d(labels)
    return float(np.mean((o - y) ** 2))


def metric_accuracy(outputs, labels) -> float:
    """m > 1: argmax = label; m = 1 (a margin): sign(output) = label with labels in {0,1} or {−1,+1}."""
    o = _as2d(outputs)
    y = np.asarray(labels).ravel()
    if o.shape[1] == 1:
        pred = o[:, 0] > 0
        truth = y > 0
        return float(np.mean(pred == truth))
    return float(np.mean(np.argmax(o, axis=1) == y.astype(int)))


def metric_mean(outputs, labels=None) -> float:
    """Mean output (e.g. target log-probability)."""
    return float(np.mean(outputs))


def metric_nll(outputs, labels=None) -> float:
    """Negative mean output: the NLL of the target when the output is its log-probability."""
    return -float(np.mean(outputs))


METRICS: dict[str, tuple[Callable, bool]] = {  # name → (function, higher is better)
    "mse": (metric_mse, False),
    "nll": (metric_nll, False),
    "accuracy": (metric_accuracy, True),
    "mean": (metric_mean, True),
}


def _metric(metric) -> tuple[Callable, bool, str]:
    if callable(metric):
        return metric, True, getattr(metric, "__name__", "custom")
    if metric not in METRICS:
        raise TaskvecError(f"unknown metric {metric!r}; choose one of {sorted(METRICS)} or pass a callable")
    fn, hib = METRICS[metric]
    return fn, hib, metric


# ----------------------------------------------------------------------------- checks

def _check(f0: Mapping, jtau: Mapping, tasks=None) -> list:
    tasks = list(tasks) if tasks is not None else list(f0)
    for A in tasks:
        if A not in f0:
            raise TaskvecError(f"f0 has no outputs for task {A!r}")
        if A not in jtau:
            raise TaskvecError(f"jtau has no entry for probe set {A!r} (need J_{A} τ_t for every task t)")
        shape = np.shape(f0[A])
        for t in tasks:
            if t not in jtau[A]:
                raise TaskvecError(f"jtau[{A!r}] lacks task vector {t!r}: compute J_{A} τ_{t} on {A}'s probes")
            if np.shape(jtau[A][t]) != shape:
                raise TaskvecError(f"jtau[{A!r}][{t!r}] has shape {np.shape(jtau[A][t])} but f0[{A!r}] has {shape}")
    return tasks


def linearised_outputs(f0_A, jtau_A: Mapping, alphas: Mapping) -> np.ndarray:
    """f_A(θ₀) + Σ_t α_t J_A τ_t — the first-order prediction of task A's outputs at θ₀ + Σ α_t τ_t."""
    out = np.array(f0_A, dtype=np.float64, copy=True)
    for t, a in alphas.items():
        if a == 0:
            continue
        if t not in jtau_A:
            raise TaskvecError(f"no J τ for task vector {t!r} on this probe set")
        out += float(a) * np.asarray(jtau_A[t], dtype=np.float64)
    return out


def predict_arithmetic(f0, jtau, alphas: Mapping, *, labels=None, metric="mse", measured_outputs=None) -> dict:
    """Predicted outputs (and metric) on every task for θ₀ + Σ α_t τ_t, beside measured outputs if given
    (measured_outputs[A] = f_A(θ₀ + Σ α_t τ_t) from the real model)."""
    tasks = _check(f0, jtau)
    fn, hib, name = _metric(metric)
    res = {"alphas": dict(alphas), "metric": name, "higher_is_better": hib, "tasks": {}}
    for A in tasks:
        pred = linearised_outputs(f0[A], jtau[A], alphas)
        row = {"predicted_outputs": pred}
        if labels is not None:
            row["predicted_metric"] = fn(pred, labels[A])
        if measured_outputs is not None and A in measured_outputs:
            meas = np.asarray(measured_outputs[A], dtype=np.float64)
            row["measured_outputs"] = meas
            row["output_relative_error"] = float(np.linalg.norm(pred - meas) / max(np.linalg.norm(meas - np.asarray(f0[A])), 1e-300))
            if labels is not None:
                row["measured_metric"] = fn(meas, labels[A])
        res["tasks"][A] = row
    return res


# ----------------------------------------------------------------------------- interference

def spearman(predicted, measured) -> dict:
    """Spearman ρ between paired predictions and measurements (non-finite pairs dropped)."""
    p = np.asarray(predicted, dtype=np.float64).ravel()
    m = np.asarray(measured, dtype=np.float64).ravel()
    ok = np.isfinite(p) & np.isfinite(m)
    if ok.sum() < 3:
        return {"rho": float("nan"), "p_value": float("nan"), "n": int(ok.sum()), "note": "needs ≥ 3 pairs"}
    r = stats.spearmanr(p[ok], m[ok])
    return {"rho": float(r.statistic), "p_value": float(r.pvalue), "n": int(ok.sum())}


def interference(f0, jtau, labels, *, metric="mse", alpha: float = 1.0, measured_delta=None) -> dict:
    """Interference of B on A, predicted from J_A τ_B (matrices indexed [A, B]):

    relative_size[A,B] = ‖J_A τ_B‖ / ‖J_A τ_A‖;
    predicted_delta[A,B] = metric_A(f0_A + α J_Aτ_A + α J_Aτ_B) − metric_A(f0_A + α J_Aτ_A);
    measured_delta[A,B] (optional) = the real model's change of A's metric when τ_B is added to α τ_A.
    """
    tasks = _check(f0, jtau)
    fn, hib, name = _metric(metric)
    T = len(tasks)
    rel = np.full((T, T), np.nan)
    delta = np.full((T, T), np.nan)
    single = np.empty(T)
    for i, A in enumerate(tasks):
        own = np.linalg.norm(jtau[A][A])
        base = linearised_outputs(f0[A], jtau[A], {A: alpha})
        single[i] = fn(base, labels[A])
        for j, B in enumerate(tasks):
            rel[i, j] = np.linalg.norm(jtau[A][B]) / own if own > 0 else np.inf
            if i != j:
                delta[i, j] = fn(linearised_outputs(f0[A], jtau[A], {A: alpha, B: alpha}), labels[A]) - single[i]
    out = {"tasks": tasks, "alpha": alpha, "metric": name, "higher_is_better": hib, "relative_size": rel,
           "predicted_single_metric": single, "predicted_delta": delta}
    if measured_delta is not None:
        md = np.asarray(measured_delta, dtype=np.float64)
        if md.shape != (T, T):
            raise TaskvecError(f"measured_delta must be a {T}×{T} matrix in task order {tasks}, got {md.shape}")
        off = ~np.eye(T, dtype=bool)
        out["measured_delta"] = md
        out["spearman_delta"] = spearman(delta[off], md[off])
        out["spearman_size_vs_harm"] = spearman(rel[off], (md if not hib else -md)[off])
    return out


def negation(f0, jtau, task, *, labels=None, metric="mse", alphas=(0.5, 1.0), measured_metric=None) -> dict:
    """Predicted metric on every task for θ₀ − α τ_task (forgetting `task`, controls on the others);
    measured_metric[α][A] (optional) beside it."""
    tasks = _check(f0, jtau)
    if task not in tasks:
        raise TaskvecError(f"negated task {task!r} is not among {tasks}")
    fn, hib, name = _metric(metric)
    rows = []
    for a in alphas:
        for A in tasks:
            pred = linearised_outputs(f0[A], jtau[A], {task: -float(a)})
            row = {"alpha": float(a), "task": A, "negated": task,
                   "predicted_output_change": float(np.linalg.norm(pred - np.asarray(f0[A])) / np.sqrt(np.size(pred)))}
            if labels is not None:
                row["predicted_metric"] = fn(pred, labels[A])
                row["base_metric"] = fn(np.asarray(f0[A]), labels[A])
            if measured_metric is not None and a in measured_metric and A in measured_metric[a]:
                row["measured_metric"] = float(measured_metric[a][A])
            rows.append(row)
    return {"metric": name, "higher_is_better": hib, "rows": rows}


# ----------------------------------------------------------------------------- disentanglement

def _dist(a, b, kind: str) -> float:
    a, b = _as2d(a), _as2d(b)
    if kind == "sq":
        return float(np.mean(np.sum((a - b) ** 2, axis=1)))
    if kind == "l2":
        return float(np.mean(np.linalg.norm(a - b, axis=1)))
    if kind == "disagreement":
        if a.shape[1] == 1:
            return float(np.mean((a[:, 0] > 0) != (b[:, 0] > 0)))
        return float(np.mean(np.argmax(a, axis=1) != np.argmax(b, axis=1)))
    raise TaskvecError(f"unknown distance {kind!r}; choose 'sq', 'l2' or 'disagreement'")


def alpha_grid(tasks, values=np.linspace(0.0, 1.0, 5)) -> list[dict]:
    """Every combination of α_t ∈ values over the tasks (a full grid; keep it small)."""
    return [dict(zip(tasks, combo)) for combo in itertools.product(*[list(values)] * len(tasks))]


def disentanglement_error(f0, jtau, grid, *, dist: str = "sq", measured: Callable | None = None) -> dict:
    """ξ(α) = Σ_t E_{x∈D_t} dist(f(x; θ₀ + α_t τ_t), f(x; θ₀ + Σ_j α_j τ_j)) (Ortiz-Jiménez et al. 2023)
    on a grid of α's. Predicted with the linearised model; measured with `measured(alphas) -> {t: outputs
    on D_t at θ₀ + Σ α_j τ_j}` (the real model) when given. Linearly ξ_pred = Σ_t E dist(0, Σ_{j≠t} α_j J_t τ_j)."""
    tasks = _check(f0, jtau)
    rows = []
    cache: dict = {}

    def meas(alphas):
        key = tuple(float(alphas.get(t, 0.0)) for t in tasks)
        if key not in cache:
            cache[key] = measured(dict(zip(tasks, key)))
        return cache[key]

    for alphas in grid:
        full = {t: float(alphas.get(t, 0.0)) for t in tasks}
        pred = sum(_dist(linearised_outputs(f0[t], jtau[t], {t: full[t]}), linearised_outputs(f0[t], jtau[t], full), dist)
                   for t in tasks)
        row = {"alphas": full, "predicted": pred}
        if measured is not None:
            together = meas(full)
            row["measured"] = sum(_dist(meas({t: full[t]})[t], together[t], dist) for t in tasks)
        rows.append(row)
    out = {"tasks": tasks, "dist": dist, "rows": rows}
    if measured is not None:
        out["spearman"] = spearman([r["predicted"] for r in rows], [r["measured"] for r in rows])
    return out


def linearisation_error(delta_true: Mapping, jtau_A) -> dict:
    """‖Δf_true(α) − α Jτ‖ / ‖Δf_true(α)‖ along α, with Δf_true(α) = f(θ₀ + ατ) − f(θ₀) measured."""
    jt = np.asarray(jtau_A, dtype=np.float64)
    rows = []
    for a in sorted(delta_true):
        d = np.asarray(delta_true[a], dtype=np.float64)
        if d.shape != jt.shape:
            raise TaskvecError(f"Δf_true at α={a} has shape {d.shape}, J τ has {jt.shape}")
        nd = np.linalg.norm(d)
        rows.append({"alpha": float(a), "relative_error": float(np.linalg.norm(d - a * jt) / nd) if nd > 0 else float("nan"),
                     "true_norm": float(nd), "linear_norm": float(abs(a) * np.linalg.norm(jt))})
    return {"rows": rows}


# ----------------------------------------------------------------------------- similarity

def _cos_from_gram(G: np.ndarray) -> np.ndarray:
    d = np.sqrt(np.clip(np.diag(G), 1e-300, None))
    return G / np.outer(d, d)


def parameter_cosine(vectors=None, *, gram=None) -> np.ndarray:
    """Cosine of task vectors in parameter space, from flat vectors (T×p) or their Gram ⟨τ_s, τ_t⟩."""
    if gram is None:
        V = np.asarray(vectors, dtype=np.float64)
        gram = V @ V.T
    return _cos_from_gram(np.asarray(gram, dtype=np.float64))


def function_cosine(jtau_common: Mapping, tasks=None) -> np.ndarray:
    """Cosine of J τ_t on a common probe set (function space)."""
    tasks = list(tasks) if tasks is not None else list(jtau_common)
    F = np.stack([np.asarray(jtau_common[t], dtype=np.float64).ravel() for t in tasks])
    return _cos_from_gram(F @ F.T)


def _top_eig(K: np.ndarray, k: int, tol: float) -> tuple[np.ndarray, np.ndarray]:
    n = K.shape[0]
    from .theory._checks import eigh

    mu, U = eigh(K / n)
    mu, U = mu[::-1], U[:, ::-1]
    keep = min(k, int(np.sum(mu > tol * mu[0])))
    return mu[:keep], U[:, :keep]


def subspace_similarity(K_AA, K_BB, K_AB, *, k: int = 10, tol: float = 1e-10) -> dict:
    """Eigen-subspace similarity of tasks A and B from Gram blocks only.

    Principal angles between the top-k parameter-space eigendirections V_A = J_Aᵀ U_A (n_A μ_A)^{-1/2}:
    cosines = singular values of (n_A μ_A)^{-1/2} U_Aᵀ K_AB U_B (n_B μ_B)^{-1/2}.
    Operator alignment ⟨J_AᵀJ_A, J_BᵀJ_B⟩_F / (‖·‖_F ‖·‖_F) = ‖K_AB‖²_F / (‖K_AA‖_F ‖K_BB‖_F).
    """
    K_AA, K_BB, K_AB = (np.asarray(x, dtype=np.float64) for x in (K_AA, K_BB, K_AB))
    if K_AB.shape != (K_AA.shape[0], K_BB.shape[0]):
        raise TaskvecError(f"K_AB has shape {K_AB.shape}; expected ({K_AA.shape[0]}, {K_BB.shape[0]}) = (n_A, n_B)")
    muA, UA = _top_eig(K_AA, k, tol)
    muB, UB = _top_eig(K_BB, k, tol)
    nA, nB = K_AA.shape[0], K_BB.shape[0]
    M = (UA / np.sqrt(nA * muA)).T @ K_AB @ (UB / np.sqrt(nB * muB))
    cos = np.clip(np.linalg.svd(M, compute_uv=False), 0.0, 1.0)
    align = float(np.sum(K_AB**2) / (np.linalg.norm(K_AA) * np.linalg.norm(K_BB)))
    return {"k": int(min(muA.size, muB.size)), "principal_cosines": cos,
            "principal_angles_deg": np.degrees(np.arccos(cos)), "mean_cos2": float(np.mean(cos**2)),
            "operator_alignment": align}


def similarity_table(tasks, *, param_gram=None, jtau_common=None, gram_blocks=None, k: int = 10,
                     measured=None) -> dict:
    """Task similarity in parameter space, function space and eigen-subspace space side by side
    (T×T each), with Spearman ρ between every pair of spaces over task pairs, and against a measured
    pairwise quantity (e.g. interference) if given. gram_blocks[(A, B)] = K_AB."""
    tasks = list(tasks)
    T = len(tasks)
    spaces: dict[str, np.ndarray] = {}
    if param_gram is not None:
        spaces["parameter_cosine"] = parameter_cosine(gram=param_gram)
    if jtau_common is not None:
        spaces["function_cosine"] = function_cosine(jtau_common, tasks)
    if gram_blocks is not None:
        S, A_ = np.eye(T), np.eye(T)
        for i, j in itertools.combinations(range(T), 2):
            a, b = tasks[i], tasks[j]
            kab = gram_blocks[(a, b)] if (a, b) in gram_blocks else np.asarray(gram_blocks[(b, a)]).T
            r = subspace_similarity(gram_blocks[(a, a)], gram_blocks[(b, b)], kab, k=k)
            S[i, j] = S[j, i] = r["mean_cos2"]
            A_[i, j] = A_[j, i] = r["operator_alignment"]
        spaces["subspace_mean_cos2"] = S
        spaces["operator_alignment"] = A_
    iu = np.triu_indices(T, 1)
    out = {"tasks": tasks, "spaces": spaces, "spearman": {}}
    names = list(spaces)
    for a, b in itertools.combinations(names, 2):
        out["spearman"][f"{a}~{b}"] = spearman(spaces[a][iu], spaces[b][iu])
    if measured is not None:
        m = np.asarray(measured, dtype=np.float64)
        msym = 0.5 * (m + m.T)
        out["measured"] = m
        for a in names:
            out["spearman"][f"{a}~measured"] = spearman(spaces[a][iu], msym[iu])
    return out
