"""Figures of a task-vector collection: cosine heatmap, per-layer norm profile, singular-value spectra."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .plotting import DOUBLE_COLUMN_IN, PALETTE, SINGLE_COLUMN_IN, paper_style, save_figure

__all__ = ["plot_cosine", "plot_layer_norms", "plot_spectra", "save_vector_figures"]


def plot_cosine(data: dict):
    """Task × task cosine similarity of the task vectors (parameter space), annotated."""
    import matplotlib.pyplot as plt

    names = data["tasks"]
    cos = np.array(data["cosine"], dtype=float)
    T = len(names)
    side = min(DOUBLE_COLUMN_IN, max(SINGLE_COLUMN_IN * 0.8, 0.55 * T + 1.2))
    fig, ax = plt.subplots(figsize=(side + 0.6, side))
    lim = max(1e-12, float(np.nanmax(np.abs(cos - np.eye(T) * cos)))) if T > 1 else 1.0
    im = ax.imshow(cos, cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_xticks(range(T), names, rotation=45, ha="right")
    ax.set_yticks(range(T), names)
    ax.grid(False)
    for i in range(T):
        for j in range(T):
            ax.text(j, i, f"{cos[i, j]:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if abs(cos[i, j]) > 0.6 * lim else "black")
    fig.colorbar(im, ax=ax, shrink=0.8, label="cosine (off-diagonal scale)")
    ax.set_title(f"cos(τ_s, τ_t), scope {data['config']['scope']}")
    return fig


def plot_layer_norms(data: dict):
    """‖τ‖ and ‖τ‖/‖θ₀‖ per layer group, one line per task."""
    import matplotlib.pyplot as plt

    groups = list(data["layers"])
    x = np.arange(len(groups))
    fig, axes = plt.subplots(1, 2, figsize=(DOUBLE_COLUMN_IN, 2.5), layout="constrained")

    def positive(vals):  # zero (a LoRA leaves the layer alone) cannot sit on a log axis: leave a gap
        return [v if v is not None and v > 0 else np.nan for v in vals]

    for t, name in enumerate(data["tasks"]):
        c = PALETTE[t % len(PALETTE)]
        axes[0].plot(x, positive([data["layers"][g]["tasks"][name]["norm"] for g in groups]), "o-", ms=2.5, color=c,
                     label=name)
        axes[1].plot(x, positive([data["layers"][g]["tasks"][name]["relative_norm"] for g in groups]), "o-", ms=2.5,
                     color=c)
    labels = [g.replace("layer.", "") for g in groups]
    for ax, yl in zip(axes, ("‖τ‖₂", "‖τ‖₂ / ‖θ₀‖₂")):
        ax.set_xticks(x, labels, rotation=90 if len(groups) > 16 else 0)
        ax.set_ylabel(yl)
        if any(np.isfinite(np.asarray(line.get_ydata(), float)).any() for line in ax.get_lines()):
            ax.set_yscale("log")  # an all-zero τ (fine-tune identical to the base) stays on a linear axis
    fig.supxlabel("layer (block index; embeddings and final norm/head outside the blocks)", fontsize=8)
    axes[0].legend(frameon=False, ncol=1 if len(data["tasks"]) < 5 else 2)
    fig.suptitle("Task-vector norm per layer", fontsize=8)
    return fig


def plot_spectra(data: dict, spectra: dict):
    """Normalised singular values σ_i/σ_1 of each 2-D τ tensor (faint) and their median (bold), per task."""
    import matplotlib.pyplot as plt

    names = [n for n in data["tasks"] if spectra.get(n)]
    if not names:
        return None
    cols = min(len(names), 4)
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(DOUBLE_COLUMN_IN, 2.0 * rows + 0.4), squeeze=False, sharey=True,
                             layout="constrained")
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for t, name in enumerate(names):
        ax = axes.flat[t]
        curves = [np.where(s > 0, s / s[0], np.nan) for s in spectra[name].values() if len(s) and s[0] > 0]
        for s in curves:
            ax.plot(np.arange(1, len(s) + 1), s, color=PALETTE[t % len(PALETTE)], alpha=0.15, lw=0.6)
        if curves:  # median at each index over the tensors that have it, while at least half do
            L = max(len(s) for s in curves)
            pad = np.full((len(curves), L), np.nan)
            for i, s in enumerate(curves):
                pad[i, : len(s)] = s
            have = np.isfinite(pad).sum(0)
            keep = int(np.sum(have >= max(1, len(curves) / 2)))
            if keep:
                ax.plot(np.arange(1, keep + 1), np.nanmedian(pad[:, :keep], axis=0), color="black", lw=1.2,
                        label="median")
        erank = [data["tensors"][k]["tasks"][name].get("effective_rank") for k in spectra[name]]
        erank = [e for e in erank if e]  # zero tensors (left alone by a LoRA) have no rank to speak of
        short = name if len(name) <= 24 else name[:11] + "…" + name[-12:]
        ax.set_title(f"{short}\nmedian effective rank {np.median(erank):.1f}" if erank else short, fontsize=7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("index i")
    for r in range(rows):
        axes[r, 0].set_ylabel("σ_i / σ_1")
    if axes.flat[0].get_legend_handles_labels()[0]:  # no median line when every τ tensor is zero
        axes.flat[0].legend(frameon=False)
    return fig


def save_vector_figures(data: dict, spectra: dict, out_dir) -> list[Path]:
    """Write cosine.{png,pdf}, layer_norms.{png,pdf} and (if any 2-D spectra) spectra.{png,pdf}."""
    paths = []
    with paper_style():
        paths += save_figure(plot_cosine(data), out_dir, "cosine")
        paths += save_figure(plot_layer_norms(data), out_dir, "layer_norms")
        fig = plot_spectra(data, spectra)
        if fig is not None:
            paths += save_figure(fig, out_dir, "spectra")
    return paths
