"""One call that turns a saved spectrum (and optionally σ, R, training settings, nested spectra and
measured errors) into the theory's predictions, each beside its measurement when given."""

from __future__ import annotations

import numpy as np

from ..errors import TaskvecError
from ._checks import eigenvalues
from .rates import compare_rates, measured_rate, nonparametric_rate, predicted_rate
from .spectrum import DEFAULT_TOL, effective_dimension, fit_spectrum
from .stopping import early_stopping, sensitivity, translate_to_training


def analyse_spectrum(mu, *, n: int | None = None, sigma: float | None = None, radius: float = 1.0,
                     window=None, tol: float = DEFAULT_TOL, n_boot: int = 200, seed: int = 0, training: dict | None = None,
                     nested: dict | None = None, measured: dict | None = None, sigma_source: str = "given",
                     radius_source: str = "given", name: str = "eigenvalues") -> dict:
    """Decay fits, d(λ), predicted rate; with σ: ε̂_n, T̂, the bound, a σ×R sensitivity table, and T̂ in
    optimiser steps/epochs for `training` = {lr, batch_size, loss, optimizer[, epochs_trained]};
    `nested` = {n_k: eigenvalues} gives the non-parametric rate; `measured` = {"n": [...], "error": [...]}
    the measured one, compared with both predictions. `mu` may come in any order (it is sorted
    descending); `name` labels the spectrum in error messages (the CLI passes the file and option)."""
    mu_arr, info = eigenvalues(mu, n=n, name=name)
    n_ = mu_arr.size
    fits = fit_spectrum(mu_arr[: mu_arr.size - info.get("padded_zeros", 0)], window=window, tol=tol, n_boot=n_boot, seed=seed, name=name)
    preferred = fits[fits["preferred"]]
    lam_grid = mu_arr[0] * np.logspace(-6, 0, 7)
    out: dict = {
        "n": n_, "spectrum_info": info, "trace": float(mu_arr.sum()), "top_eigenvalue": float(mu_arr[0]),
        "top_trace_share": float(mu_arr[0] / mu_arr.sum()),
        "decay_fits": {"power": fits["power"].to_dict(), "exponential": fits["exponential"].to_dict(),
                       "preferred": fits["preferred"]},
        "predicted_rate": predicted_rate(fits["power"] if fits["preferred"] == "power" else preferred),
        "effective_dimension": {"lambda": lam_grid, "d": effective_dimension(mu_arr, lam_grid)},
    }
    if fits["preferred"] == "power":
        out["predicted_rate_exponential_fit"] = predicted_rate(fits["exponential"])
    if sigma is not None:
        rule = early_stopping(mu_arr, sigma, radius=radius)
        rule["sigma_source"], rule["radius_source"] = sigma_source, radius_source
        out["early_stopping"] = rule
        out["sensitivity"] = sensitivity(mu_arr, sigma, radius, rule["schedule"]["alpha"])
        if training:
            t = dict(training)
            epochs_trained = t.pop("epochs_trained", None)
            tr = translate_to_training(mu_arr, sigma, radius=radius, n=n_, **t)
            if epochs_trained is not None:
                tr["epochs_trained"] = float(epochs_trained)
                tr["trained_over_predicted"] = (float(epochs_trained) / tr["epochs"]) if tr["epochs"] else None
            out["training"] = tr
    elif training:
        raise TaskvecError("translating T̂ into epochs needs σ: pass --sigma, --residuals or --kernel with --targets")
    if nested:
        if sigma is None:
            raise TaskvecError("the non-parametric rate (ε̂_n² on nested subsets) needs σ")
        out["nonparametric_rate"] = nonparametric_rate(nested, sigma, radius=radius)
    if measured:
        m = measured_rate(measured["n"], measured["error"], noise_floor=float(measured.get("noise_floor", 0.0)))
        out["measured_rate"] = m
        out["rate_comparison"] = {"decay_fit": compare_rates(out["predicted_rate"]["exponent"], m)}
        if "nonparametric_rate" in out:
            out["rate_comparison"]["nonparametric"] = compare_rates(out["nonparametric_rate"]["exponent"], m)
    return out
