"""Kernel predictors on the eNTK from the pretrained start: early-stopped kernel gradient descent and
kernel ridge regression on the residual targets r = y − f(θ₀) (the "linearised fine-tune").

Kernel GD f ← f − α K̂(f − r), K̂ = K/n, from f = 0 (i.e. f(θ₀)) is full-batch GD of the linearised
model on L = (1/2n)Σ(f − y)². Paths are evaluated in closed form in the eigenbasis of K̂:
train change after t steps = U diag(1 − Π_{s<t}(1 − α_s μ̂_i)) Uᵀ r, test change = K_te,tr c_t with
c_t = U diag((1 − Π(1 − α_s μ̂_i)) / (n μ̂_i)) Uᵀ r (→ η_t/n as μ̂_i → 0).
"""

from __future__ import annotations

import numpy as np

from ..errors import TaskvecError
from ._checks import eigh, square_kernel, vector
from .stopping import StepSchedule, stopping_time


def _split(K_train, targets, K_test_train, test_targets):
    K = square_kernel(K_train, "K_train")
    n = K.shape[0]
    r = vector(targets, n, "targets (y - f(theta0)) on the training probes")
    Kte = rte = None
    if K_test_train is not None:
        Kte = np.asarray(K_test_train, dtype=np.float64)
        if Kte.ndim != 2 or Kte.shape[1] != n:
            raise TaskvecError(f"K_test_train must be n_test×n_train = ?×{n}, got shape {Kte.shape}")
        if test_targets is not None:
            rte = vector(test_targets, Kte.shape[0], "test targets (y - f(theta0)) on the test probes")
    return K, n, r, Kte, rte


def _record_times(max_steps: int, n_points: int = 200) -> np.ndarray:
    if max_steps <= n_points:
        return np.arange(max_steps + 1)
    return np.unique(np.concatenate([[0], np.round(np.logspace(0, np.log10(max_steps), n_points)).astype(int)]))


def eig_normalised(K) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs (ascending) of K/n, round-off negatives clipped; pass as `eig=` to skip recomputing."""
    K = square_kernel(K, "K_train")
    mu, U = eigh(K / K.shape[0])
    return np.clip(mu, 0.0, None), U


def kernel_gd_path(K_train, targets, *, step, max_steps: int | None = None, times=None, K_test_train=None,
                   test_targets=None, f_star=None, return_predictions: bool = False, eig=None) -> dict:
    """Kernel GD on the residual targets; train/test mean squared errors along t (and ‖f_t − f*‖²_n when
    the noiseless `f_star` on the training probes is known). `step`: α constant, array or callable."""
    K, n, r, Kte, rte = _split(K_train, targets, K_test_train, test_targets)
    sched = step if isinstance(step, StepSchedule) else StepSchedule(step)
    if times is None:
        if max_steps is None:
            raise TaskvecError("kernel_gd_path needs max_steps or an explicit array of times")
        times = _record_times(int(max_steps))
    times = np.unique(np.asarray(times, dtype=np.int64))
    if times.size == 0 or times[0] < 0:
        raise TaskvecError("times must be non-negative integers")
    mu, U = eig if eig is not None else eig_normalised(K)
    z = U.T @ r
    T = int(times[-1])
    # log Π_{s<t}(1 − α_s μ) for each recorded t
    if sched.kind == "constant":
        a = sched.value
        am = a * mu
        with np.errstate(divide="ignore"):
            logq = np.where(am < 1, np.log1p(-np.minimum(am, 1.0)), np.log(np.abs(1.0 - am)))
        tt = times[:, None].astype(np.float64)
        with np.errstate(invalid="ignore"):
            logprod = np.where(tt == 0, 0.0, tt * logq[None, :])
        sgn = np.where((am[None, :] > 1) & (times[:, None] % 2 == 1), -1.0, 1.0)
        etas = a * times.astype(np.float64)
    else:  # accumulate log|Π(1 − α_s μ)| and its sign in chunks; memory O(chunk·n)
        logprod = np.zeros((times.size, mu.size))
        sgn = np.ones((times.size, mu.size))
        etas = np.zeros(times.size)
        run_log, run_neg, run_eta = np.zeros(mu.size), np.zeros(mu.size, dtype=np.int64), 0.0
        k = int(np.searchsorted(times, 0, side="right"))  # times equal to 0 keep the zero state
        t0, chunk = 0, 4096
        while k < times.size:
            alphas = sched.steps(t0, min(t0 + chunk, T))
            if alphas.size == 0:
                raise TaskvecError(f"step-size schedule has {t0} steps, fewer than the {T} requested")
            fac = 1.0 - alphas[:, None] * mu[None, :]
            cl = run_log + np.cumsum(np.log(np.abs(fac) + 1e-300), axis=0)  # state after steps t0+1 … t0+len
            cn = run_neg + np.cumsum(fac < 0, axis=0)
            ce = run_eta + np.cumsum(alphas)
            end = t0 + alphas.size
            while k < times.size and times[k] <= end:
                row = times[k] - t0 - 1
                logprod[k], sgn[k], etas[k] = cl[row], np.where(cn[row] % 2 == 1, -1.0, 1.0), ce[row]
                k += 1
            run_log, run_neg, run_eta, t0 = cl[-1], cn[-1], float(ce[-1]), end
    prod = sgn * np.exp(logprod)
    phi = 1.0 - prod  # filter on the training modes
    if np.any(np.abs(prod) > 1e6):
        raise TaskvecError(f"kernel GD diverges: step α exceeds 2/μ̂₁ = {2 / mu.max():.4g}")
    # errors in the eigenbasis (U orthonormal): O(T·n), no n×n products unless predictions are asked for
    out = {"t": times, "eta": etas, "train_mse": np.sum(((1.0 - phi) * z[None, :]) ** 2, axis=1) / n, "n_train": n}
    if f_star is not None:
        zs = U.T @ vector(f_star, n, "f_star")
        out["error_vs_f_star"] = np.sum((phi * z[None, :] - zs[None, :]) ** 2, axis=1) / n
    if Kte is not None:
        safe = np.where(mu > 1e-300, mu, 1.0)
        psi = np.where(mu[None, :] > 1e-14 * max(mu.max(), 1e-300), phi / (n * safe[None, :]), etas[:, None] / n)
        A = Kte @ U
        test_pred = (psi * z[None, :]) @ A.T
        out["n_test"] = Kte.shape[0]
        if rte is not None:
            out["test_mse"] = np.mean((test_pred - rte[None, :]) ** 2, axis=1)
        if return_predictions:
            out["test_predictions"] = test_pred
    if return_predictions:
        out["train_predictions"] = (phi * z[None, :]) @ U.T
    return out


def kernel_ridge_path(K_train, targets, lambdas, *, K_test_train=None, test_targets=None, f_star=None,
                      return_predictions: bool = False, eig=None) -> dict:
    """Kernel ridge f̂_λ = K(K + nλI)⁻¹ r for each λ (on the K/n scale: λ ↔ 1/η of kernel GD), with
    train/test MSE and GCV score; `gcv_lambda` is the GCV choice."""
    K, n, r, Kte, rte = _split(K_train, targets, K_test_train, test_targets)
    lams = np.asarray(lambdas, dtype=np.float64).ravel()
    if lams.size == 0 or np.any(lams <= 0):
        raise TaskvecError("kernel ridge needs positive λ values")
    mu, U = eig if eig is not None else eig_normalised(K)
    z = U.T @ r
    s = mu[None, :] / (mu[None, :] + lams[:, None])
    train_pred = (s * z[None, :]) @ U.T
    rss = np.sum(((1 - s) * z[None, :]) ** 2, axis=1)
    df = s.sum(axis=1)
    gcv = n * rss / np.maximum(n - df, 1e-12) ** 2
    out = {"lambda": lams, "train_mse": rss / n, "dof": df, "gcv": gcv, "gcv_lambda": float(lams[np.argmin(gcv)])}
    if f_star is not None:
        fs = vector(f_star, n, "f_star")
        out["error_vs_f_star"] = np.mean((train_pred - fs[None, :]) ** 2, axis=1)
    if Kte is not None:
        coef = (z[None, :] / (n * (mu[None, :] + lams[:, None]))) @ U.T  # (K + nλI)⁻¹ r per λ
        test_pred = coef @ Kte.T
        if rte is not None:
            out["test_mse"] = np.mean((test_pred - rte[None, :]) ** 2, axis=1)
        if return_predictions:
            out["test_predictions"] = test_pred
    if return_predictions:
        out["train_predictions"] = train_pred
    return out


def early_stopped_kernel_gd(K_train, targets, sigma: float, *, radius: float = 1.0, step=None,
                            K_test_train=None, test_targets=None, f_star=None, horizon: float = 4.0) -> dict:
    """Run kernel GD to `horizon`·T̂ and report the error at the RWY T̂ next to the oracle-best t
    (by ‖f_t − f*‖²_n when f* is known, else by test MSE)."""
    K = square_kernel(K_train, "K_train")
    mu, U = eig_normalised(K)
    if step is None:
        step = min(1.0, 1.0 / mu.max())
    rule = stopping_time(mu, sigma, step, radius=radius)
    if rule["T_hat"] is None:
        raise TaskvecError("the step-size schedule ends before the stopping rule fires; give a longer schedule")
    T = max(int(np.ceil(horizon * max(rule["T_hat"], 1))), 10)
    # every iteration up to 5000, else a log grid (the oracle t is then located on that grid)
    times = np.arange(T + 1) if T <= 5000 else np.union1d(_record_times(T, 2000), [rule["T_hat"]])
    path = kernel_gd_path(K, targets, step=step, times=times, K_test_train=K_test_train,
                          test_targets=test_targets, f_star=f_star, eig=(mu, U))
    out = {"rule": rule, "path": path, "T_hat": rule["T_hat"], "eigenvalues": mu[::-1].copy()}
    key = "error_vs_f_star" if f_star is not None else ("test_mse" if "test_mse" in path else None)
    if key is not None:
        err = path[key]
        t = path["t"]
        out["oracle_by"] = key
        out["oracle_t"] = int(t[np.argmin(err)])
        out["oracle_error"] = float(err.min())
        out["error_at_T_hat"] = float(err[int(np.searchsorted(t, rule["T_hat"]))])
        out["oracle_at_horizon"] = bool(out["oracle_t"] >= t[-1] * 0.99)  # raise `horizon` to locate it
        out["eps_hat_sq_target_units"] = (radius * rule["eps_hat"]) ** 2
    return out


def align_with_finetune(path: dict, epochs, measured_test_mse, *, steps_per_epoch: float) -> dict:
    """Put a kernel-GD test-error path beside a real fine-tune's per-epoch test MSE: kernel step
    t = epoch·(n/b) (the path must use α = the kernel step of the optimiser, see kernel_step)."""
    if "test_mse" not in path:
        raise TaskvecError("the kernel path has no test_mse; pass K_test_train and test_targets")
    ep = np.asarray(epochs, dtype=np.float64).ravel()
    meas = np.asarray(measured_test_mse, dtype=np.float64).ravel()
    if ep.size != meas.size:
        raise TaskvecError(f"{ep.size} epochs but {meas.size} measured test errors")
    t = ep * float(steps_per_epoch)
    if t.max() > path["t"][-1]:
        raise TaskvecError(f"the kernel path stops at t={path['t'][-1]} but epoch {ep.max():g} needs t={t.max():.0f}; extend max_steps")
    pred = np.interp(t, path["t"], path["test_mse"])
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = (pred - meas) / meas
    return {"epoch": ep, "kernel_step": t, "predicted_test_mse": pred, "measured_test_mse": meas,
            "relative_error": rel, "best_epoch_predicted": float(ep[np.argmin(pred)]),
            "best_epoch_measured": float(ep[np.argmin(meas)])}
