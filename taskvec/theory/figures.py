"""Figures of the theory: spectrum with fits, the stopping rule, rates in n, kernel vs fine-tune paths,
interference predicted vs measured. Each function writes PNG+PDF via taskvec.plotting and returns paths."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..plotting import DOUBLE_COLUMN_IN, PALETTE, paper_style, save_figure
from ._checks import eigenvalues
from .spectrum import DecayFit
from .stopping import TWO_E, StepSchedule, local_rademacher


def plot_spectrum(mu, fits: dict | None, out_dir, name: str = "eigenvalues") -> list[Path]:
    """log-log μ̂_i against i, the fitted window shaded, power and exponential fits overlaid."""
    import matplotlib.pyplot as plt

    mu, _ = eigenvalues(mu)
    i = np.arange(1, mu.size + 1)
    with paper_style():
        fig, ax = plt.subplots()
        pos = mu > 0
        ax.loglog(i[pos], mu[pos], ".", ms=2.5, color=PALETTE[7], label="eigenvalues of K/n")
        for k, key in enumerate(("power", "exponential")):
            fit = (fits or {}).get(key)
            if fit is None:
                continue
            fit = fit if isinstance(fit, DecayFit) else DecayFit(**{f: fit[f] for f in DecayFit.__dataclass_fields__ if f in fit})
            lo, hi = fit.window
            xs = np.arange(lo, hi + 1)
            par = "β" if key == "power" else "γ"
            ax.loglog(xs, fit.predict(xs), "-", color=PALETTE[k], label=f"{key}: {par}={fit.rate:.3g}, R²={fit.r2:.3f}")
            if k == 0:
                ax.axvspan(lo, hi, color=PALETTE[0], alpha=0.07, lw=0)
                cut = mu[0] * fit.tol
                if mu.min() < 10 * cut:  # draw the cut only where it touches the spectrum
                    ax.axhline(cut, color=PALETTE[3], ls=":", lw=0.8, label=f"noise cut tol·μ̂₁ (tol={fit.tol:g})")
        ax.set_xlabel("index i")
        ax.set_ylabel("eigenvalue μ̂ᵢ")
        ax.legend(loc="lower left")
        return save_figure(fig, out_dir, name)


def plot_stopping(mu, sigma: float, step, *, radius: float = 1.0, T_hat: int | None = None, out_dir=".",
                  name: str = "stopping_rule", t_max: int | None = None) -> list[Path]:
    """R̂(1/√η_t) and 1/(2eσ_eff η_t) against t (log axes), T̂ marked: the rule stops just before they cross."""
    import matplotlib.pyplot as plt

    mu, _ = eigenvalues(mu)
    sched = step if isinstance(step, StepSchedule) else StepSchedule(step)
    s_eff = sigma / radius
    if t_max is None:
        t_max = max(20, 10 * (T_hat or 10))
    if sched.kind == "array":
        t_max = min(t_max, sched.array.size)
    ts = np.unique(np.round(np.logspace(0, math.log10(t_max), 300)).astype(int))
    etas = np.concatenate([[0.0], np.cumsum(sched.steps(0, int(ts[-1])))])[ts]
    with paper_style():
        fig, ax = plt.subplots()
        ax.loglog(ts, local_rademacher(mu, 1 / np.sqrt(etas)), color=PALETTE[0], label="R̂(1/√η_t)")
        ax.loglog(ts, 1 / (TWO_E * s_eff * etas), color=PALETTE[1], label=f"1/(2eση_t), σ/R={s_eff:.3g}")
        if T_hat is not None and T_hat >= 1:
            ax.axvline(T_hat, color=PALETTE[3], ls="--", lw=0.9, label=f"T̂ = {T_hat}")
        ax.set_xlabel("kernel-GD iteration t")
        ax.legend()
        return save_figure(fig, out_dir, name)


def plot_rates(*, nonparametric: dict | None = None, measured: dict | None = None, predicted_exponent=None,
               out_dir=".", name: str = "rates", labels: dict | None = None) -> list[Path]:
    """Squared error against n on log-log axes: ε̂_n² from nested spectra, measured test errors with
    their fitted slope, and the exponent predicted by the decay fit (a guide line through the data).

    measured: {"n": [...], "error": [...], "fit": loglog_slope result} (any number of such series in
    a dict name → series is also accepted)."""
    import matplotlib.pyplot as plt

    labels = labels or {}
    with paper_style():
        fig, ax = plt.subplots()
        anchor = None
        if nonparametric is not None:
            n, e = np.asarray(nonparametric["n"]), np.asarray(nonparametric["eps_hat_sq"])
            ax.loglog(n, e, "o-", ms=3, color=PALETTE[0],
                      label=labels.get("nonparametric", f"ε̂ₙ² (slope {nonparametric['exponent']:.2f})"))
            anchor = (n[0], e[0])
        series = {}
        if measured is not None:
            series = measured if "n" not in measured else {"measured": measured}
        for k, (key, s) in enumerate(series.items()):
            n, e = np.asarray(s["n"], dtype=float), np.asarray(s["error"], dtype=float)
            fit = s.get("fit")
            lab = f"{key}" + (f" (slope {fit['slope']:.2f} [{fit['ci'][0]:.2f}, {fit['ci'][1]:.2f}])" if fit else "")
            ax.loglog(n, e, "s", ms=3, color=PALETTE[1 + k], label=labels.get(key, lab))
            if fit:
                xs = np.array([n.min(), n.max()])
                ax.loglog(xs, np.exp(fit["intercept"]) * xs ** fit["slope"], "-", color=PALETTE[1 + k], lw=0.9)
            if anchor is None:
                anchor = (n.min(), e[np.argmin(n)])
        if predicted_exponent is not None and anchor is not None:
            xs = np.array([anchor[0], anchor[0] * 16])
            ax.loglog(xs, anchor[1] * (xs / anchor[0]) ** predicted_exponent, ":", color=PALETTE[7],
                      label=f"predicted n^{predicted_exponent:.2f}")
        ax.set_xlabel("training examples n")
        ax.set_ylabel("squared error")
        ax.legend()
        return save_figure(fig, out_dir, name)


def plot_kernel_vs_finetune(aligned: dict | None = None, *, path: dict | None = None, steps_per_epoch: float = 1.0,
                            T_hat: int | None = None, out_dir=".", name: str = "kernel_vs_finetune") -> list[Path]:
    """Test MSE against epochs: early-stopped kernel GD on the eNTK (the linearised fine-tune) beside
    the real fine-tune (from align_with_finetune), with T̂ in epochs marked."""
    import matplotlib.pyplot as plt

    with paper_style():
        fig, ax = plt.subplots()
        if path is not None and "test_mse" in path:
            ax.plot(np.asarray(path["t"]) / steps_per_epoch, path["test_mse"], color=PALETTE[0], label="kernel GD on eNTK")
        if aligned is not None:
            ax.plot(aligned["epoch"], aligned["measured_test_mse"], "o-", ms=3, color=PALETTE[1], label="fine-tune (measured)")
            if path is None:
                ax.plot(aligned["epoch"], aligned["predicted_test_mse"], "--", color=PALETTE[0], label="kernel GD on eNTK")
        if T_hat is not None:
            ax.axvline(T_hat / steps_per_epoch, color=PALETTE[3], ls="--", lw=0.9, label="T̂ (RWY)")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test MSE")
        ax.legend()
        return save_figure(fig, out_dir, name)


def plot_interference(result: dict, out_dir=".", name: str = "interference") -> list[Path]:
    """Predicted interference matrix next to the measured one (when present) and their scatter."""
    import matplotlib.pyplot as plt

    tasks = result["tasks"]
    pred = np.asarray(result["predicted_delta"])
    meas = result.get("measured_delta")
    panels = 3 if meas is not None else 1
    with paper_style():
        fig, axes = plt.subplots(1, panels, figsize=(DOUBLE_COLUMN_IN if panels > 1 else 3.4, 2.4))
        axes = np.atleast_1d(axes)
        mats = [("predicted Δ metric", pred)] + ([("measured Δ metric", np.asarray(meas))] if meas is not None else [])
        vmax = np.nanmax(np.abs(np.concatenate([m[np.isfinite(m)] for _, m in mats]))) or 1.0
        for k, (ax, (title, m)) in enumerate(zip(axes, mats)):
            im = ax.imshow(m, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
            ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
            ax.set_yticks(range(len(tasks)), tasks)
            ax.set_xlabel("added task B")
            if k == 0:
                ax.set_ylabel("evaluated task A")
            ax.set_title(f"{title} ({result.get('metric', '')})")
            ax.grid(False)
        fig.colorbar(im, ax=axes[: len(mats)].tolist(), shrink=0.8)
        if meas is not None:
            off = ~np.eye(len(tasks), dtype=bool)
            ax = axes[2]
            ax.plot(pred[off], np.asarray(meas)[off], "o", ms=3, color=PALETTE[0])
            lim = [np.nanmin([pred[off], np.asarray(meas)[off]]), np.nanmax([pred[off], np.asarray(meas)[off]])]
            ax.plot(lim, lim, ":", color=PALETTE[7])
            rho = result.get("spearman_delta", {}).get("rho", float("nan"))
            ax.set_title(f"Spearman ρ = {rho:.2f}")
            ax.set_xlabel("predicted")
            ax.set_ylabel("measured")
        return save_figure(fig, out_dir, name)


def plot_disentanglement(result: dict, out_dir=".", name: str = "disentanglement") -> list[Path]:
    """ξ(α₁, α₂) for two tasks on their α grid: linearised prediction beside the measurement (if any)."""
    import matplotlib.pyplot as plt

    from ..errors import TaskvecError

    tasks = result["tasks"]
    if len(tasks) != 2:
        raise TaskvecError(f"the disentanglement heat map needs exactly two tasks, got {len(tasks)}")
    a1 = sorted({r["alphas"][tasks[0]] for r in result["rows"]})
    a2 = sorted({r["alphas"][tasks[1]] for r in result["rows"]})
    keys = ["predicted"] + (["measured"] if "measured" in result["rows"][0] else [])
    mats = {k: np.full((len(a2), len(a1)), np.nan) for k in keys}
    for r in result["rows"]:
        i, j = a2.index(r["alphas"][tasks[1]]), a1.index(r["alphas"][tasks[0]])
        for k in keys:
            mats[k][i, j] = r[k]
    vmax = max(np.nanmax(m) for m in mats.values()) or 1.0
    with paper_style():
        fig, axes = plt.subplots(1, len(keys), figsize=(3.4 * len(keys), 2.6), squeeze=False)
        for ax, k in zip(axes[0], keys):
            im = ax.imshow(mats[k], origin="lower", vmin=0, vmax=vmax, aspect="auto",
                           extent=(a1[0], a1[-1], a2[0], a2[-1]) if len(a1) > 1 and len(a2) > 1 else None)
            ax.set_xlabel(f"α ({tasks[0]})")
            ax.set_ylabel(f"α ({tasks[1]})")
            ax.set_title(f"ξ(α) {k}")
            ax.grid(False)
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
        return save_figure(fig, out_dir, name)


def plot_linearisation_error(results: dict, out_dir=".", name: str = "linearisation_error") -> list[Path]:
    """Relative linearisation error ‖Δf_true − αJτ‖/‖Δf_true‖ against α, one line per task vector
    (results: name → linearisation_error output)."""
    import matplotlib.pyplot as plt

    with paper_style():
        fig, ax = plt.subplots()
        for k, (label, res) in enumerate(results.items()):
            a = [r["alpha"] for r in res["rows"]]
            e = [r["relative_error"] for r in res["rows"]]
            ax.plot(a, e, "o-", ms=3, color=PALETTE[k % len(PALETTE)], label=str(label))
        ax.set_xlabel("scale α of the task vector")
        ax.set_ylabel("relative linearisation error")
        ax.legend()
        return save_figure(fig, out_dir, name)


def plot_kernel_predictors(gd: dict, ridge: dict | None = None, out_dir=".", name: str = "kernel_predictors") -> list[Path]:
    """Held-out MSE of kernel GD on the eNTK against η_t (with T̂ and the oracle t marked), and of kernel
    ridge against 1/λ on the same axis (the η ↔ 1/λ correspondence)."""
    import matplotlib.pyplot as plt

    path = gd["path"]
    key = "test_mse" if "test_mse" in path else "train_mse"
    eta = np.asarray(path["eta"], dtype=float)
    with paper_style():
        fig, ax = plt.subplots()
        ok = eta > 0
        ax.semilogx(eta[ok], np.asarray(path[key])[ok], color=PALETTE[0], label=f"kernel GD ({key.replace('_', ' ')})")
        if ridge is not None and "test_mse" in ridge:
            ax.semilogx(1 / np.asarray(ridge["lambda"]), ridge["test_mse"], "--", color=PALETTE[2], label="kernel ridge (η = 1/λ)")
        t = np.asarray(path["t"])
        T = gd["T_hat"]
        ax.axvline(eta[int(np.searchsorted(t, T))] if T > 0 else eta[ok][0], color=PALETTE[3], ls="--", lw=0.9, label=f"RWY T̂ = {T}")
        if "oracle_t" in gd:
            ax.axvline(eta[int(np.searchsorted(t, gd["oracle_t"]))], color=PALETTE[7], ls=":", lw=0.9, label=f"oracle t = {gd['oracle_t']}")
        ax.set_xlabel("η_t = Σ α_τ")
        ax.set_ylabel("held-out MSE (residual targets)")
        ax.legend()
        return save_figure(fig, out_dir, name)
