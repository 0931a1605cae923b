"""The Raskutti–Wainwright–Yu (2014) early-stopping rule for kernel gradient descent.

All functions take the eigenvalues μ̂ of K̂ = K/n (K never silently normalised). With an RKHS
radius R the rule is applied with σ_eff = σ/R (f*/R lies in the unit ball, noise σ/R).
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import TaskvecError
from ._checks import eigenvalues, eigh, positive

TWO_E = 2.0 * math.e
RWY_BOUND_CONSTANT = 12.0  # RWY 2014 Thm 1(b): ‖f_T̂ − f*‖²_n ≤ 12 ε̂_n² w.p. ≥ 1 − c₁exp(−c₂ n ε̂_n²)


def local_rademacher(mu, eps, *, n: int | None = None):
    """R̂(ε) = sqrt((1/n) Σ_i min(μ̂_i, ε²)), vectorised over ε."""
    mu, _ = eigenvalues(mu, n=n)
    e = np.asarray(eps, dtype=np.float64)
    e2 = e.ravel() ** 2
    # Σ_i min(μ_i, x) = S_j + (n − j)·x with j = #{μ_i ≤ x} and S_j their sum (ascending prefix sums)
    asc = mu[::-1]
    csum = np.concatenate([[0.0], np.cumsum(asc)])
    j = np.searchsorted(asc, e2, side="right")
    with np.errstate(invalid="ignore"):  # (n − j)·∞ when j = n is masked out below
        tot = csum[j] + np.where(j < mu.size, (mu.size - j) * e2, 0.0)
    out = np.sqrt(tot / mu.size)
    return float(out[0]) if e.ndim == 0 else out.reshape(e.shape)


def critical_radius(mu, sigma: float, *, radius: float = 1.0, n: int | None = None) -> float:
    """ε̂_n = smallest ε > 0 with R̂(ε) ≤ ε²/(2eσ_eff), σ_eff = σ/R. Solved exactly, segment by segment.

    On a segment where the j smallest eigenvalues are ≤ x = ε², the condition is the quadratic
    a x² − (k/n) x − S_j/n ≥ 0 (a = 1/(2eσ_eff)², k = n − j, S_j their sum); R̂(ε)/ε is
    non-increasing while ε/(2eσ_eff) increases, so the root is unique.
    """
    mu, _ = eigenvalues(mu, n=n)
    s_eff = positive(sigma, "sigma") / positive(radius, "radius")
    a = 1.0 / (TWO_E * s_eff) ** 2
    n_ = mu.size
    asc = mu[::-1]
    lower = np.concatenate([[0.0], asc])  # segment j covers x in [lower[j], upper[j]]
    upper = np.concatenate([asc, [np.inf]])
    S = np.concatenate([[0.0], np.cumsum(asc)])
    k = n_ - np.arange(n_ + 1)
    b = k / n_
    x = (b + np.sqrt(b * b + 4.0 * a * S / n_)) / (2.0 * a)
    slack = 1e-12 * np.maximum(x, 1e-300)
    ok = (x >= lower - slack) & (x <= upper + slack)
    if not ok.any():  # cannot happen mathematically; guard against round-off
        j = int(np.argmin(np.maximum(lower - x, x - upper)))
    else:
        j = int(np.argmax(ok))
    return float(math.sqrt(x[j]))


class StepSchedule:
    """Step sizes α_t: a constant, a finite array α_0..α_{L−1}, or a callable t ↦ α_t (vectorised)."""

    def __init__(self, step):
        self.kind = "constant" if np.isscalar(step) else ("callable" if callable(step) else "array")
        if self.kind == "constant":
            self.value = positive(step, "step size")
        elif self.kind == "array":
            arr = np.asarray(step, dtype=np.float64).ravel()
            if arr.size == 0 or np.any(~np.isfinite(arr)) or np.any(arr <= 0):
                raise TaskvecError("step-size schedule must be a non-empty array of positive finite numbers")
            self.array = arr
        else:
            self.fn = step

    def steps(self, t0: int, t1: int) -> np.ndarray:
        """α_t for t in [t0, t1) (t1 clipped to the array length for finite schedules)."""
        t = np.arange(t0, t1)
        if self.kind == "constant":
            return np.full(t.size, self.value)
        if self.kind == "array":
            return self.array[t0 : min(t1, self.array.size)]
        vals = np.asarray(self.fn(t), dtype=np.float64).reshape(-1)
        if vals.size != t.size or np.any(~np.isfinite(vals)) or np.any(vals <= 0):
            raise TaskvecError("step-size callable must map an integer array t to positive finite α_t")
        return vals

    def eta(self, t: int) -> float:
        """η_t = Σ_{τ<t} α_τ."""
        if self.kind == "constant":
            return self.value * t
        return float(np.sum(self.steps(0, t)))

    def describe(self) -> dict:
        if self.kind == "constant":
            return {"kind": "constant", "alpha": self.value}
        if self.kind == "array":
            return {"kind": "array", "length": int(self.array.size), "alpha_0": float(self.array[0]), "alpha_last": float(self.array[-1])}
        return {"kind": "callable"}


def _stop_condition(mu, s_eff: float, eta: float) -> bool:
    """R̂(1/√η_t) > 1/(2eσ η_t) evaluated directly (False at η = 0)."""
    if eta <= 0:
        return False
    return local_rademacher(mu, 1.0 / math.sqrt(eta)) > 1.0 / (TWO_E * s_eff * eta)


def stopping_time(mu, sigma: float, step, *, radius: float = 1.0, n: int | None = None,
                  max_steps: int = 10**12) -> dict:
    """T̂ = (first t ≥ 1 with R̂(1/√η_t) > 1/(2eσ_eff η_t)) − 1.

    The condition holds exactly when 1/√η_t < ε̂_n, i.e. η_t > 1/ε̂_n², so the first such t is
    located by the running sum of step sizes and then confirmed by evaluating the rule directly.
    Returns T̂ (None if a finite schedule ends first), η_T̂ and checks of the step-size assumption.
    """
    mu, info = eigenvalues(mu, n=n)
    s_eff = positive(sigma, "sigma") / positive(radius, "radius")
    sched = step if isinstance(step, StepSchedule) else StepSchedule(step)
    eps = critical_radius(mu, sigma, radius=radius)
    eta_star = 1.0 / eps**2
    bound_alpha = min(1.0, 1.0 / mu[0])
    t_first = None
    checked_alpha_max, non_increasing = 0.0, True
    if sched.kind == "constant":
        t_first = int(math.floor(eta_star / sched.value)) + 1
        checked_alpha_max = sched.value
    else:
        t0, chunk, eta0, prev = 0, 1024, 0.0, math.inf
        while t0 < max_steps:
            a = sched.steps(t0, t0 + chunk)
            if a.size == 0:
                break
            checked_alpha_max = max(checked_alpha_max, float(a.max()))
            non_increasing &= bool(a[0] <= prev * (1 + 1e-12) and np.all(np.diff(a) <= 1e-12 * a[:-1]))
            prev = float(a[-1])
            etas = eta0 + np.cumsum(a)  # η_{t0+1}, …, η_{t0+len}
            hit = np.nonzero(etas > eta_star)[0]
            if hit.size:
                t_first = t0 + int(hit[0]) + 1
                break
            eta0 = float(etas[-1])
            t0 += a.size
            chunk = min(chunk * 2, 1 << 22)
            if sched.kind == "array" and t0 >= sched.array.size:
                break
    result = {
        "T_hat": None, "eta_T_hat": None, "eps_hat": eps, "eta_star": eta_star, "sigma": float(sigma),
        "radius": float(radius), "sigma_eff": s_eff, "schedule": sched.describe(),
        "alpha_bound": bound_alpha, "alpha_max_checked": checked_alpha_max,
        "assumption_step_ok": bool(checked_alpha_max <= bound_alpha * (1 + 1e-12) and non_increasing),
        "spectrum_info": info,
    }
    if t_first is None:
        result["note"] = "the step-size schedule ends (or max_steps is reached) before the rule stops"
        return result
    # confirm with the definition itself; step across a round-off boundary if needed
    while t_first > 1 and _stop_condition(mu, s_eff, sched.eta(t_first - 1)):
        t_first -= 1
    while not _stop_condition(mu, s_eff, sched.eta(t_first)):
        t_first += 1
    result["T_hat"] = t_first - 1
    result["eta_T_hat"] = sched.eta(t_first - 1)
    if not result["assumption_step_ok"]:
        result["note"] = (f"step sizes must be non-increasing with α_t ≤ min(1, 1/μ̂₁) = {bound_alpha:.4g}; "
                          f"max α checked = {checked_alpha_max:.4g}: the RWY guarantee does not apply as stated")
    return result


def rwy_bound(eps_hat: float, radius: float = 1.0) -> dict:
    """The RWY bound ‖f_T̂ − f*‖²_n ≤ 12 ε̂_n² on the unit-ball scale, and ×R² in target units."""
    return {"constant": RWY_BOUND_CONSTANT, "unit_ball": RWY_BOUND_CONSTANT * eps_hat**2,
            "target_units": RWY_BOUND_CONSTANT * (radius * eps_hat) ** 2,
            "statement": "||f_T - f*||_n^2 <= 12 eps_n^2 with probability >= 1 - c1 exp(-c2 n eps_n^2) (RWY 2014, Thm 1b)"}


def sensitivity(mu, sigma: float, radius: float, step, *, factors=(0.25, 0.5, 1.0, 2.0, 4.0),
                n: int | None = None) -> list[dict]:
    """T̂, ε̂_n and the bound on a grid σ·f_σ × R·f_R (only σ/R matters; the table shows it)."""
    rows = []
    for fs in factors:
        for fr in factors:
            s, r = sigma * fs, radius * fr
            st = stopping_time(mu, s, step, radius=r, n=n)
            rows.append({"sigma": s, "radius": r, "sigma_over_R": s / r, "eps_hat": st["eps_hat"],
                         "T_hat": st["T_hat"], "bound_target_units": rwy_bound(st["eps_hat"], r)["target_units"]})
    return rows


def early_stopping(mu, sigma: float, step=None, *, radius: float = 1.0, n: int | None = None) -> dict:
    """Everything the rule says for one spectrum: ε̂_n, T̂ (step default: α = min(1, 1/μ̂₁)), the bound,
    the statistical dimension at ε̂_n and d(ε̂_n²)."""
    from .spectrum import effective_dimension, statistical_dimension

    mu_arr, info = eigenvalues(mu, n=n)
    if step is None:
        step = min(1.0, 1.0 / mu_arr[0])
    st = stopping_time(mu_arr, sigma, step, radius=radius)
    eps = st["eps_hat"]
    st["spectrum_info"] = info
    st["n"] = int(mu_arr.size)
    st["R_hat_at_eps"] = local_rademacher(mu_arr, eps)
    st["bound"] = rwy_bound(eps, radius)
    st["eps_hat_target_units"] = radius * eps
    st["statistical_dimension"] = statistical_dimension(mu_arr, eps)
    st["effective_dimension_at_eps2"] = effective_dimension(mu_arr, eps**2)
    return st


# ----------------------------------------------------------------------------- translation

LOSS_FACTORS = {
    "half_mean": "L = (1/2n) Σ (f − y)²: one step at lr is kernel GD with α = lr",
    "mean": "L = (1/n) Σ (f − y)² (no ½): α = 2·lr",
    "half_sum": "L = ½ Σ_batch (f − y)²: α = b·lr (b = batch size)",
    "sum": "L = Σ_batch (f − y)²: α = 2·b·lr",
}


def kernel_step(lr: float, *, loss: str = "mean", batch_size: int | None = None, n: int | None = None) -> float:
    """The kernel-GD step α that one optimiser step at learning rate `lr` corresponds to."""
    lr = positive(lr, "learning rate")
    b = batch_size if batch_size is not None else n
    if loss == "half_mean":
        return lr
    if loss == "mean":
        return 2.0 * lr
    if loss in ("half_sum", "sum"):
        if b is None:
            raise TaskvecError(f"loss convention {loss!r} needs the batch size (or n for full batch)")
        return (1.0 if loss == "half_sum" else 2.0) * b * lr
    raise TaskvecError(f"unknown loss convention {loss!r}; choose one of {sorted(LOSS_FACTORS)}")


def translate_to_training(mu, sigma: float, *, lr: float, batch_size: int, n: int, radius: float = 1.0,
                          loss: str = "mean", optimizer: str = "sgd", lr_schedule=None) -> dict:
    """T̂ in optimiser steps and epochs for a user's lr, batch size, n and loss convention.

    Assumption: the fine-tune stays in the kernel (linearised) regime, so one SGD step is in
    expectation one kernel-GD step with α = factor·lr on K̂ = K/n (n/b steps per epoch). Adam and
    other adaptive optimisers have no exact counterpart: the result is labelled approximate.
    `lr_schedule` (optional callable t ↦ lr_t or array) replaces the constant lr.
    """
    n = int(n)
    batch_size = int(batch_size)
    if batch_size < 1 or batch_size > n:
        raise TaskvecError(f"batch size {batch_size} must be between 1 and n={n}")
    alpha = kernel_step(lr, loss=loss, batch_size=batch_size, n=n)
    factor = alpha / float(lr)
    if lr_schedule is None:
        step = alpha
    elif callable(lr_schedule):
        step = lambda t: factor * np.asarray(lr_schedule(t), dtype=np.float64)  # noqa: E731
    else:
        step = factor * np.asarray(lr_schedule, dtype=np.float64)
    st = stopping_time(mu, sigma, step, radius=radius, n=n)
    steps_per_epoch = n / batch_size
    exact = optimizer.lower() in ("sgd", "gd")
    out = {
        "lr": float(lr), "batch_size": batch_size, "n": n, "loss": loss, "loss_convention": LOSS_FACTORS[loss],
        "optimizer": optimizer, "kernel_step_alpha": alpha, "steps_per_epoch": steps_per_epoch,
        "T_hat_steps": st["T_hat"], "eta_T_hat": st["eta_T_hat"], "eps_hat": st["eps_hat"],
        "epochs": None if st["T_hat"] is None else st["T_hat"] / steps_per_epoch,
        "assumption_step_ok": st["assumption_step_ok"], "alpha_bound": st["alpha_bound"],
        "approximate": not exact,
        "assumption": ("kernel regime: full-batch GD on the linearised model = kernel GD f ← f − α K̂(f − y); "
                       "SGD with batch b takes n/b such steps per epoch in expectation"),
    }
    notes = ([f"{optimizer} is adaptive: no exact kernel-GD counterpart; the step count uses α = {factor:g}·lr and "
              "is approximate"] if not exact else []) + ([st.get("note")] if not st["assumption_step_ok"] else [])
    if notes:
        out["note"] = "; ".join(n for n in notes if n)
    return out


# ----------------------------------------------------------------------------- σ and R estimators

def _eig(K, eig=None):
    """Ascending eigenpairs of K/n (or the `eig=(mu, U)` given, to avoid recomputing)."""
    if eig is not None:
        mu, U = eig
        return np.clip(np.asarray(mu, dtype=np.float64), 0.0, None), np.asarray(U, dtype=np.float64), U.shape[0]
    from ._checks import square_kernel

    K = square_kernel(K)
    n = K.shape[0]
    mu, U = eigh(K / n)
    return np.clip(mu, 0.0, None), U, n


def _gcv_lambda(mu: np.ndarray, z2: np.ndarray, n: int, lams=None) -> tuple[float, np.ndarray, np.ndarray]:
    if lams is None:
        top = max(mu.max(), 1e-300)
        lams = top * np.logspace(-10, 1, 111)
    lams = np.asarray(lams, dtype=np.float64)
    s = mu[None, :] / (mu[None, :] + lams[:, None])
    rss = np.sum((1.0 - s) ** 2 * z2[None, :], axis=1)
    df = s.sum(axis=1)
    gcv = n * rss / np.maximum(n - df, 1e-12) ** 2
    return float(lams[int(np.argmin(gcv))]), lams, gcv


def sigma_krr(K, targets, *, lam: float | None = None, eig=None) -> dict:
    """σ̂² = ‖(I − S_λ) r‖² / (n − tr S_λ) for kernel ridge S_λ = K̂(K̂ + λI)⁻¹ on the residual targets
    r = y − f(θ₀); λ by generalised cross-validation unless given (Wahba's effective-dof estimator)."""
    from ._checks import vector

    mu, U, n = _eig(K, eig)
    r = vector(targets, n, "targets")
    z2 = (U.T @ r) ** 2
    if lam is None:
        lam, _, _ = _gcv_lambda(mu, z2, n)
    s = mu / (mu + lam)
    rss = float(np.sum((1 - s) ** 2 * z2))
    df = float(s.sum())
    return {"sigma": math.sqrt(rss / max(n - df, 1e-12)), "lambda": lam, "dof": df, "n": n,
            "estimator": "kernel ridge residuals with effective-dof correction, RSS/(n - tr S_lambda), lambda by GCV"}


def sigma_spectral_tail(K, targets, *, fraction: float = 0.5, eig=None) -> dict:
    """σ̂² = mean of (u_iᵀ r)² over the `fraction` of eigen-directions with the smallest μ̂_i.

    An RKHS function of norm R puts at most n μ̂_i R² into mode i, so the tail modes hold mostly
    noise; the estimate is biased upward by what signal remains there."""
    from ._checks import vector

    mu, U, n = _eig(K, eig)  # ascending
    order = np.argsort(mu, kind="stable")
    mu, U = mu[order], U[:, order]
    r = vector(targets, n, "targets")
    k = max(1, int(round(fraction * n)))
    z2 = (U[:, :k].T @ r) ** 2
    return {"sigma": math.sqrt(float(z2.mean())), "n_modes": k, "mu_max_used": float(mu[k - 1]),
            "estimator": f"mean squared projection of the targets on the {k} lowest eNTK eigenvectors"}


def sigma_first_difference(y, order=None) -> dict:
    """Rice's estimator σ̂² = Σ (y_(i+1) − y_(i))² / (2(n − 1)) with examples sorted by a covariate
    (`order`: sort key or permutation); valid when the regression function varies slowly along it."""
    y = np.asarray(y, dtype=np.float64).ravel()
    if y.size < 3:
        raise TaskvecError("first-difference σ estimate needs at least 3 targets")
    if order is not None:
        y = y[np.argsort(np.asarray(order), kind="stable")]
    d = np.diff(y)
    return {"sigma": math.sqrt(float(np.sum(d**2)) / (2 * (y.size - 1))), "n": int(y.size),
            "estimator": "first differences along the covariate ordering (Rice 1984)"}


def sigma_heldout(residuals) -> dict:
    """σ̂ = RMS of a fitted predictor's residuals on held-out data: an upper bound on σ (it also
    contains the predictor's own error)."""
    r = np.asarray(residuals, dtype=np.float64).ravel()
    if r.size == 0 or not np.all(np.isfinite(r)):
        got = "an empty array" if r.size == 0 else f"{int(np.sum(~np.isfinite(r)))} NaN/Inf of {r.size} values"
        raise TaskvecError(f"held-out residuals must be a non-empty finite array, got {got}; give the residuals "
                           "y − f̂(x) of a fitted model on held-out examples, one per example")
    return {"sigma": float(np.sqrt(np.mean(r**2))), "n": int(r.size),
            "estimator": "RMS of held-out residuals (upper bound: includes the predictor's error)"}


def rkhs_radius(K, targets, *, lam: float | None = None, eig=None) -> dict:
    """R̂ = ‖f̂_λ‖_H for the kernel ridge fit f̂_λ = K(K + nλI)⁻¹ r of the residual targets:
    ‖f̂_λ‖²_H = αᵀKα = (1/n) Σ μ̂_i (u_iᵀr)² / (μ̂_i + λ)², λ by GCV unless given. The RKHS of the
    eNTK has ‖g‖_H = the smallest parameter change w with J w = g on the probes."""
    from ._checks import vector

    mu, U, n = _eig(K, eig)
    r = vector(targets, n, "targets")
    z2 = (U.T @ r) ** 2
    if lam is None:
        lam, _, _ = _gcv_lambda(mu, z2, n)
    norm2 = float(np.sum(mu * z2 / (mu + lam) ** 2) / n)
    return {"radius": math.sqrt(norm2), "lambda": lam,
            "estimator": "RKHS norm of the kernel ridge fit of y - f(theta0), lambda by GCV"}


# ----------------------------------------------------------------------------- constant mode

def constant_mode(eigvecs, eigvals=None) -> dict:
    """Share of the top eigenvector that is the constant function: (u₁ᵀ1/√n)², the eigenvector most
    aligned with the constant, and the top eigenvalue's share of the trace."""
    U = np.asarray(eigvecs, dtype=np.float64)
    if U.ndim != 2:
        raise TaskvecError(f"eigenvectors must be an n×k matrix, got shape {U.shape}")
    n = U.shape[0]
    order = np.arange(U.shape[1])
    if eigvals is not None:
        ev = np.asarray(eigvals, dtype=np.float64).ravel()
        if ev.size != U.shape[1]:
            raise TaskvecError(f"{ev.size} eigenvalues for {U.shape[1]} eigenvectors")
        order = np.argsort(-ev, kind="stable")
    cos2 = (U[:, order].sum(axis=0) / math.sqrt(n)) ** 2
    out = {"top_constant_share": float(cos2[0]), "most_constant_index": int(np.argmax(cos2)) + 1,
           "most_constant_share": float(cos2.max()), "constant_share_by_mode": cos2[: min(10, cos2.size)]}
    if eigvals is not None:
        ev = np.clip(np.asarray(eigvals, dtype=np.float64)[order], 0, None)
        out["top_trace_share"] = float(ev[0] / ev.sum()) if ev.sum() > 0 else float("nan")
    return out


def project_out_constant(K) -> np.ndarray:
    """P K P with P = I − 11ᵀ/n: the kernel with the constant function projected out."""
    from ._checks import square_kernel

    K = square_kernel(K)
    Kc = K - K.mean(axis=0, keepdims=True)
    return Kc - Kc.mean(axis=1, keepdims=True)


def compare_with_curve(predicted_epochs: float | None, epochs, errors, *, higher_is_better: bool = False) -> dict:
    """The predicted stopping epoch beside a real fine-tune's validation curve: the measured best
    epoch, their ratio, and how much worse the evaluated epoch nearest the prediction is than the best."""
    ep = np.asarray(epochs, dtype=np.float64).ravel()
    err = np.asarray(errors, dtype=np.float64).ravel()
    if ep.size == 0 or ep.size != err.size:
        raise TaskvecError(f"validation curve needs one error per epoch, got {ep.size} epochs and {err.size} errors")
    ok = np.isfinite(err)
    if not ok.any():
        raise TaskvecError("validation curve has no finite errors; give at least one evaluated epoch's error")
    ep, err = ep[ok], err[ok]
    best = int(np.argmax(err) if higher_is_better else np.argmin(err))
    out = {"best_epoch_measured": float(ep[best]), "best_error_measured": float(err[best]),
           "predicted_epochs": predicted_epochs, "higher_is_better": higher_is_better}
    if predicted_epochs is not None:
        near = int(np.argmin(np.abs(ep - predicted_epochs)))
        out["ratio_predicted_over_measured"] = predicted_epochs / ep[best] if ep[best] > 0 else None
        out["nearest_evaluated_epoch"] = float(ep[near])
        out["error_at_nearest"] = float(err[near])
        out["relative_excess_at_nearest"] = float(abs(err[near] - err[best]) / abs(err[best])) if err[best] != 0 else None
    return out
