"""Theory figures render to PNG+PDF from real results (files non-empty, both formats)."""

import numpy as np

from taskvec.arithmetic import alpha_grid, disentanglement_error, interference, linearisation_error
from taskvec.theory import align_with_finetune, fit_spectrum, kernel_gd_path, stopping_time
from taskvec.theory import figures
from theory_support import one_blas_thread  # noqa: F401  (autouse fixture)


def test_figures_written(tmp_path):
    i = np.arange(1, 121.0)
    mu = 0.4 * i**-1.8
    paths = figures.plot_spectrum(mu, fit_spectrum(mu, n_boot=0), tmp_path)
    st = stopping_time(mu, 0.3, 1.0)
    paths += figures.plot_stopping(mu, 0.3, 1.0, T_hat=st["T_hat"], out_dir=tmp_path)
    paths += figures.plot_rates(nonparametric={"n": [50, 100, 200], "eps_hat_sq": [0.1, 0.06, 0.04], "exponent": -0.66},
                                measured={"n": [50, 100, 200], "error": [0.2, 0.12, 0.08],
                                          "fit": {"slope": -0.66, "intercept": 1.0, "ci": (-0.8, -0.5)}},
                                predicted_exponent=-0.64, out_dir=tmp_path)
    rng = np.random.default_rng(0)
    J = rng.normal(size=(30, 10))
    r = J @ rng.normal(size=10) + 0.1 * rng.normal(size=30)
    path = kernel_gd_path(J[:20] @ J[:20].T, r[:20], step=0.05, max_steps=100, K_test_train=J[20:] @ J[:20].T,
                          test_targets=r[20:])
    aligned = align_with_finetune(path, [0, 1, 2, 3], [1.0, 0.6, 0.5, 0.55], steps_per_epoch=20)
    paths += figures.plot_kernel_vs_finetune(aligned, path=path, steps_per_epoch=20, T_hat=30, out_dir=tmp_path)
    f0 = {t: np.zeros(5) for t in "ab"}
    jt = {A: {t: rng.normal(size=5) for t in "ab"} for A in "ab"}
    labels = {t: rng.normal(size=5) for t in "ab"}
    inter = interference(f0, jt, labels, measured_delta=np.array([[np.nan, 0.1], [0.2, np.nan]]))
    paths += figures.plot_interference(inter, tmp_path)
    xi = disentanglement_error(f0, jt, alpha_grid("ab", [0.0, 0.5, 1.0]),
                               measured=lambda al: {t: f0[t] + sum(al[s] * jt[t][s] for s in "ab") for t in "ab"})
    paths += figures.plot_disentanglement(xi, tmp_path)
    lin = linearisation_error({a: a * jt["a"]["a"] + a**2 * 0.1 for a in (0.5, 1.0, 2.0)}, jt["a"]["a"])
    paths += figures.plot_linearisation_error({"tau_a": lin}, tmp_path)
    assert len(paths) == 14
    for p in paths:
        assert p.exists() and p.stat().st_size > 1000, p
