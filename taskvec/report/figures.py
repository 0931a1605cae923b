"""Report figures drawn from results.json alone (no model, no recomputation), so `taskvec figures`
can restyle or regenerate them. Each function takes the results dict and returns a Figure or None."""

from __future__ import annotations

import numpy as np
import matplotlib.pyplot as plt

from ..plotting import DOUBLE_COLUMN_IN, PALETTE, SINGLE_COLUMN_IN


def _tasks(results):
    return list(results.get("tasks", []))


def metric_label(results) -> str:
    """The report's task metric as printed: MSE (regression) or NLL (target log-probability)."""
    return str(results.get("metric") or "mse").upper()


def cosine_heatmap(results):
    vec = results.get("vectors") or {}
    C = np.asarray(vec.get("cosine") or [], float)
    if C.size == 0:
        return None
    tasks = _tasks(results)
    fig, ax = plt.subplots(figsize=(SINGLE_COLUMN_IN, SINGLE_COLUMN_IN * 0.85))
    im = ax.imshow(C, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    ax.set_yticks(range(len(tasks)), tasks)
    for i in range(len(tasks)):
        for j in range(len(tasks)):
            ax.text(j, i, f"{C[i, j]:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if abs(C[i, j]) > 0.6 else "black")
    ax.grid(False)
    fig.colorbar(im, ax=ax, shrink=0.8, label="cosine(τ_a, τ_b)")
    ax.set_title("Task vectors: parameter-space cosine")
    return fig


def spectra(results):
    th = results.get("theory") or {}
    if not th:
        return None
    fig, ax = plt.subplots(figsize=(SINGLE_COLUMN_IN, 2.6))
    for c, t in zip(PALETTE, _tasks(results)):
        mu = np.asarray(th[t]["eigenvalues"], float)
        i = np.arange(1, mu.size + 1)
        keep = mu > 0
        ax.loglog(i[keep], mu[keep], ".", ms=2.5, color=c, label=t)
        fit = (th[t].get("spectrum_fit") or {}).get("power")
        if fit and fit.get("rate") is not None and fit.get("c") is not None:
            lo, hi = fit["window"][:2]
            ii = np.arange(max(int(lo), 1), int(hi) + 1)
            ax.loglog(ii, fit["c"] * ii ** (-fit["rate"]), "-", color=c, lw=0.8)
    ax.set_xlabel("index i")
    ax.set_ylabel("eigenvalue μ̂_i of K/n")
    ax.set_title("eNTK spectra on each task's training set (lines: power-law fits)")
    ax.legend(frameon=False)
    return fig


def energy_profiles(results):
    pr = results.get("projection") or {}
    if not pr:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(DOUBLE_COLUMN_IN, 2.6), sharey=True, layout="constrained")
    for ax, which, title in ((axes[0], None, "all modes"), (axes[1], "without_constant", "constant function projected out")):
        for c, t in zip(PALETTE, _tasks(results)):
            for key, style in (("task_vector", "-"), ("control", ":")):
                src = pr[t][key] if which is None else (pr[t][key].get(which) or {})
                prof = src.get("cumulative")
                if prof is None or len(prof) == 0:
                    continue
                prof = np.asarray(prof, float)
                ax.semilogx(np.arange(1, prof.size + 1), prof, style, color=c,
                            label=t if key == "task_vector" and which is None else None)
        ax.set_xlabel("top-k eNTK modes")
        ax.set_title(title)
        ax.set_ylim(0, 1.02)
    axes[0].plot([], [], "k:", label="random control")
    axes[0].set_ylabel("cumulative share of ‖Jτ‖²")
    axes[0].legend(frameon=False, fontsize=6)
    fig.suptitle("Where task vectors live in the eNTK eigenbasis of each task's probe kernel", fontsize=8)
    return fig


def stopping(results):
    th = results.get("theory") or {}
    if not th:
        return None
    tasks = _tasks(results)
    fig, axes = plt.subplots(1, len(tasks), figsize=(DOUBLE_COLUMN_IN, 2.3), squeeze=False, layout="constrained")
    for ax, c, t in zip(axes[0], PALETTE, tasks):
        cur = th[t]["measured_curve"]
        ep = [0.0] + [p["epoch"] for p in cur]
        val = [th[t]["pretrained"]["validation"]] + [p["validation"] for p in cur]
        ax.plot(ep, val, "o-", color=c, ms=3, label="validation (measured)")
        pe = th[t].get("predicted_epochs")
        right = max(ep) * 1.25
        if pe is not None and pe <= right:
            ax.axvline(pe, color="k", ls="--", lw=0.9, label=f"T̂ → {pe:.2g} ep (predicted)")
        elif pe is not None:  # beyond the trained range: say so at the right edge
            ax.annotate(f"T̂ → {pe:.3g} ep →", xy=(1, 0.5), xycoords="axes fraction", ha="right", fontsize=6)
        ax.set_xlim(-0.05 * right, right)
        ax.axvline(th[t]["measured_best_epoch"], color=c, ls=":", lw=0.9, label="best epoch (measured)")
        ax.set_title(t)
        ax.set_xlabel("epoch")
        ax.legend(frameon=False, fontsize=5)
    axes[0][0].set_ylabel(th[tasks[0]].get("metric", "metric"))
    fig.suptitle("Early stopping: RWY stopping time T̂ (dashed; → when beyond the epochs shown) vs best "
                 "validation epoch (dotted)", fontsize=8)
    return fig


def predictors(results):
    th = results.get("theory") or {}
    if not th:
        return None
    tasks = _tasks(results)
    rows = [("pretrained θ₀", [th[t]["pretrained"]["test"] for t in tasks]),
            ("fine-tune (best val. epoch)", [th[t]["finetune"]["best_epoch_test_mse"] for t in tasks]),
            ("kernel GD at T̂", [th[t]["kernel_gd"]["test_mse_at_T_hat"] for t in tasks]),
            ("kernel ridge (GCV)", [th[t]["kernel_ridge"]["test_mse_gcv"] for t in tasks])]
    fig, ax = plt.subplots(figsize=(SINGLE_COLUMN_IN, 2.4))
    w = 0.8 / len(rows)
    x = np.arange(len(tasks))
    for k, (c, (label, vals)) in enumerate(zip(PALETTE, rows)):
        ax.bar(x + (k - (len(rows) - 1) / 2) * w, vals, w, color=c, label=label)
    ax.set_xticks(x, tasks)
    ax.set_ylabel(f"test {metric_label(results)}")
    ax.set_title("Linearised fine-tune (eNTK predictors) vs real fine-tune")
    ax.legend(frameon=False, fontsize=6)
    return fig


def rates(results):
    r = results.get("rates")
    if not r:
        return None
    fig, ax = plt.subplots(figsize=(SINGLE_COLUMN_IN, 2.6))
    for c, key, slope_key, label in ((PALETTE[0], "measured_test", "measured", "fine-tune (measured)"),
                                     (PALETTE[1], "kernel_gd_test", "kernel_gd", "kernel GD at T̂"),
                                     (PALETTE[2], "predicted_eps2", "nonparametric", "R²ε̂_n² (predicted)")):
        v = np.asarray(r[key], float)
        n = np.asarray(r["n"] if key == "measured_test" else r.get("kernel_n", r["n"]), float)
        slope = (r.get(slope_key) or {}).get("slope")
        ax.loglog(n, v, "o-", color=c, ms=3, label=f"{label}, slope {slope:.2f}" if slope is not None else label)
    ax.set_xlabel("training examples n")
    ticks = sorted(set(int(v) for v in r["n"]) | set(int(v) for v in r.get("kernel_n", [])))
    ax.set_xticks(ticks, [str(v) for v in ticks])
    ax.minorticks_off()
    ax.set_ylabel(f"test {metric_label(results)}")
    ax.set_title(f"Error vs sample size ({r['task']})")
    ax.legend(frameon=False, fontsize=6)
    return fig


def linearisation(results):
    lin = results.get("linearisation") or {}
    if not lin:
        return None
    fig, ax = plt.subplots(figsize=(SINGLE_COLUMN_IN, 2.4))
    for c, t in zip(PALETTE, _tasks(results)):
        rows = lin[t]["rows"]
        ax.plot([r["alpha"] for r in rows], [r["relative_error"] for r in rows], "o-", color=c, ms=3, label=t)
    ax.set_xlabel("α  (θ₀ + α τ)")
    ax.set_ylabel("‖Δf − JατΔ‖ / ‖Δf‖")
    ax.set_title("Linearisation error on probe points")
    ax.legend(frameon=False)
    return fig


def interference(results):
    ar = results.get("arithmetic")
    if not ar:
        return None
    tasks = _tasks(results)
    I = ar["interference"]
    fig, axes = plt.subplots(1, 3, figsize=(DOUBLE_COLUMN_IN, 2.4), layout="constrained")
    M, P = np.asarray(I["measured_delta"], float), np.asarray(I["predicted_delta"], float)
    off = ~np.eye(len(tasks), dtype=bool)
    M, P = np.where(off, M, np.nan), np.where(off, P, np.nan)  # A with itself is no interference: grey in both
    lim = max(np.nanmax(np.abs(M)), np.nanmax(np.abs(P)), 1e-12) if off.any() else 1e-12
    cmap = plt.get_cmap("RdBu_r").copy()
    cmap.set_bad("0.85")
    for ax, A, title in ((axes[0], P, "predicted (linearised)"), (axes[1], M, "measured")):
        im = ax.imshow(A, cmap=cmap, vmin=-lim, vmax=lim)
        ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
        ax.set_yticks(range(len(tasks)), tasks)
        ax.set_xlabel("added τ_B")
        ax.set_title(title)
        ax.grid(False)
    axes[0].set_ylabel("task A")
    fig.colorbar(im, ax=axes[1], shrink=0.8, label=f"Δ{metric_label(results)} of A")
    axes[2].plot(P[off], M[off], "o", color=PALETTE[0], ms=3)
    lo, hi = min(P[off].min(), M[off].min()), max(P[off].max(), M[off].max())
    axes[2].plot([lo, hi], [lo, hi], "k--", lw=0.7)
    rho = (I.get("spearman_delta") or {}).get("rho")
    axes[2].set_title(f"Spearman ρ = {rho:.2f}" if rho is not None else "Spearman ρ: n/a")
    axes[2].set_xlabel(f"predicted Δ{metric_label(results)}")
    axes[2].set_ylabel(f"measured Δ{metric_label(results)}")
    return fig


def addition(results):
    ar = results.get("arithmetic")
    if not ar:
        return None
    meas, pred = [], []
    for r in ar["addition"]:
        for t in r["tasks"]:
            meas.append(r["test"][t]["measured"])
            pred.append(r["test"][t]["predicted"])
    fig, ax = plt.subplots(figsize=(SINGLE_COLUMN_IN, 2.6))
    ax.plot(pred, meas, "o", color=PALETTE[0], ms=3)
    lo, hi = min(pred + meas), max(pred + meas)
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.7)
    ax.set_xlabel(f"predicted test {metric_label(results)} (linearised)")
    ax.set_ylabel(f"measured test {metric_label(results)} (merged model)")
    ax.set_title("Task addition θ₀ + α Σ τ_t (α chosen on validation)")
    return fig


def disentanglement(results):
    ar = results.get("arithmetic")
    if not ar or not ar.get("disentanglement"):
        return None
    rows = [r for res in ar["disentanglement"] for r in res["rows"] if r.get("measured") is not None]
    if not rows:
        return None
    m = np.array([r["measured"] for r in rows], float)
    p = np.array([r["predicted"] for r in rows], float)
    fig, ax = plt.subplots(figsize=(SINGLE_COLUMN_IN, 2.6))
    ax.loglog(np.maximum(p, 1e-12), np.maximum(m, 1e-12), "o", color=PALETTE[2], ms=3)
    lo, hi = max(min(p.min(), m.min()), 1e-12), max(p.max(), m.max(), 1e-11)
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.7)
    rho = (ar.get("disentanglement_spearman") or {}).get("rho")
    ax.set_xlabel("ξ(α) predicted (linearised)")
    ax.set_ylabel("ξ(α) measured")
    ax.set_title(f"Weight disentanglement error (Spearman ρ = {rho:.2f})" if rho is not None
                 else "Weight disentanglement error")
    return fig


FIGURES = {
    "cosine": (cosine_heatmap, "Cosine similarity of the task vectors in parameter space (measured)."),
    "spectra": (spectra, "Eigenvalues of K/n of the pretrained model's eNTK on each task's training set, with the "
                         "power-law fit over the stated window (the decay sets the predicted rate)."),
    "energy": (energy_profiles, "Cumulative share of ‖Jτ‖² in the top-k eNTK eigenvectors of each task's probe "
                                "kernel, for the task vector (solid) and a random direction with the same per-tensor "
                                "norms (dotted), with all modes (left) and with the constant function projected out "
                                "(right; the top mode is close to a constant shift). Concentration above the "
                                "control is what the theory expects."),
    "stopping": (stopping, "Validation error per epoch (measured) with the Raskutti–Wainwright–Yu stopping time T̂ "
                           "translated to epochs (predicted, dashed) and the measured best epoch (dotted)."),
    "predictors": (predictors, "Test MSE of the pretrained model, the real fine-tune, and the linearised fine-tune "
                               "(early-stopped kernel gradient descent and kernel ridge on the eNTK from θ₀)."),
    "rates": (rates, "Test error against training-set size: the real fine-tunes on nested subsets (measured), "
                     "kernel GD on the eNTK (linearised), and R²ε̂_n² from the nested spectra (predicted)."),
    "linearisation": (linearisation, "Relative error of the first-order prediction J·ατ of the output change along "
                                     "θ₀ + ατ (measured on probe points)."),
    "interference": (interference, "Interference: change of task A's test MSE when τ_B is added to θ₀ + τ_A — "
                                   "predicted by the linearised model (left), measured on the merged model (middle), and the "
                                   "off-diagonal pairs plotted against each other with their Spearman ρ (right)."),
    "addition": (addition, "Task addition with α chosen on validation: each task's test MSE in every pair and in the "
                           "all-task merge, predicted by the linearised model against the measured merged model."),
    "disentanglement": (disentanglement, "Weight-disentanglement error ξ(α) over an α grid for every pair: "
                                         "linearised prediction against measurement."),
}


def render_figures(results: dict, out_dir, formats=("png", "pdf"), style: str = "paper") -> list[dict]:
    """Draw every figure the results support; return [{name, caption, files}]."""
    from ..plotting import paper_style, save_figure

    done = []
    ctx = paper_style() if style == "paper" else _null()
    with ctx:
        for name, (fn, caption) in FIGURES.items():
            fig = fn(results)
            if fig is None:
                continue
            files = save_figure(fig, out_dir, name, formats)
            done.append({"name": name, "caption": caption.replace("MSE", metric_label(results)),
                         "files": [f.name for f in files]})
    return done


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
