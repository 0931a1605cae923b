"""Rates in the sample size n: predicted from the eigen-decay fit, predicted non-parametrically from
ε̂_n² on nested subsets' spectra, and measured from test errors at nested n — side by side."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from ..errors import TaskvecError
from .spectrum import DecayFit
from .stopping import critical_radius


def predicted_rate(fit: DecayFit | dict) -> dict:
    """Exponent of n in the squared-error rate implied by a decay fit.

    power μ̂_i ≍ i^{−β}, β > 1: n^{−β/(β+1)}; exponential: (log n)/n (exponent −1 up to the log);
    β ≤ 1 lies outside the formula's assumption — rely on the non-parametric prediction instead.
    """
    d = fit.to_dict() if isinstance(fit, DecayFit) else dict(fit)
    model, rate = d["model"], float(d["rate"])
    if model == "exponential":
        return {"model": model, "exponent": -1.0, "formula": "(log n)/n", "within_assumption": rate > 0,
                "log_factor": True}
    if rate > 1:
        return {"model": model, "exponent": -rate / (rate + 1), "formula": f"n^(-beta/(beta+1)), beta={rate:.4g}",
                "within_assumption": True, "log_factor": False}
    return {"model": model, "exponent": None, "formula": "n^(-beta/(beta+1)) needs beta > 1",
            "within_assumption": False, "log_factor": False,
            "note": f"fitted beta = {rate:.3g} ≤ 1: the spectrum decays slower than 1/i over the window, outside "
                    "the formula's assumption; use the non-parametric prediction (eps_n^2 on nested subsets)"}


def loglog_slope(x, y, level: float = 0.95) -> dict:
    """OLS slope of log y on log x with a t-interval; replicates allowed (repeat x)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.size != y.size:
        raise TaskvecError(f"{x.size} sample sizes but {y.size} errors")
    if np.any(x <= 0) or np.any(y <= 0) or not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise TaskvecError("log-log rate needs positive finite sample sizes and errors")
    if np.unique(x).size < 2:
        raise TaskvecError(f"a rate needs errors at two or more distinct sample sizes n, got n = "
                           f"{', '.join(f'{v:g}' for v in sorted(set(x.tolist())))}; add errors measured at another n")
    lx, ly = np.log(x), np.log(y)
    res = stats.linregress(lx, ly)
    dof = x.size - 2
    if dof > 0:
        half = stats.t.ppf((1 + level) / 2, dof) * res.stderr
        ci = (res.slope - half, res.slope + half)
    else:
        ci = (float("nan"), float("nan"))
    return {"slope": float(res.slope), "intercept": float(res.intercept), "ci": (float(ci[0]), float(ci[1])),
            "ci_level": level, "r2": float(res.rvalue**2), "n_points": int(x.size)}


def nonparametric_rate(spectra: dict, sigma: float, *, radius: float = 1.0) -> dict:
    """ε̂_n² (target units: (R·ε̂_n)²) from the eigenvalues of K/n on nested subsets {n_k: μ̂^(k)}, and
    its log-log slope in n — a prediction that needs no decay fit."""
    if len(spectra) < 2:
        raise TaskvecError("the non-parametric rate needs spectra of at least two nested subsets")
    ns = np.array(sorted(int(k) for k in spectra), dtype=np.float64)
    eps2 = np.array([(radius * critical_radius(spectra[k], sigma, radius=radius)) ** 2
                     for k in sorted(spectra, key=int)])
    for k in spectra:
        if len(np.asarray(spectra[k]).ravel()) > int(k):
            raise TaskvecError(f"subset n={k} has more than {k} eigenvalues; keys must be the subset sizes")
    out = {"n": ns, "eps_hat_sq": eps2, "sigma": float(sigma), "radius": float(radius)}
    out.update({"fit": loglog_slope(ns, eps2)})
    out["exponent"] = out["fit"]["slope"]
    return out


def measured_rate(ns, errors, level: float = 0.95, *, noise_floor: float = 0.0) -> dict:
    """Measured exponent: slope of log test error on log n (errors: one per n or a list of replicates).

    The theory's rate is for the excess error ‖f̂ − f*‖²; with squared loss, test MSE = excess + σ², so
    pass noise_floor=σ² to fit the excess (every error must then exceed the floor)."""
    if len(ns) != len(errors):
        raise TaskvecError(f"{len(ns)} sample sizes n but {len(errors)} errors; give one error (or a list of "
                           "replicate errors) per n")
    xs, ys = [], []
    for n_k, e in zip(ns, errors):
        e = np.atleast_1d(np.asarray(e, dtype=np.float64)) - float(noise_floor)
        if np.any(e <= 0):
            raise TaskvecError(f"test error at n={n_k} is not above the noise floor {noise_floor:g}; "
                               "lower the floor (σ² estimate) or fit the raw errors")
        xs.extend([float(n_k)] * e.size)
        ys.extend(e.tolist())
    return loglog_slope(xs, ys, level)


def compare_rates(predicted_exponent: float | None, measured: dict) -> dict:
    """Prediction beside measurement: slope ratio measured/predicted and whether the prediction is in the CI."""
    out = {"predicted_exponent": predicted_exponent, "measured_exponent": measured["slope"], "measured_ci": measured["ci"]}
    if predicted_exponent is None or predicted_exponent == 0:
        out["slope_ratio"] = None
        out["prediction_in_ci"] = None
    else:
        out["slope_ratio"] = measured["slope"] / predicted_exponent
        lo, hi = measured["ci"]
        out["prediction_in_ci"] = bool(lo <= predicted_exponent <= hi) if math.isfinite(lo) else None
    return out


def kernel_gd_rates(K, targets, train_sizes, test_index, sigma: float, *, radius: float = 1.0,
                    train_order=None, seed: int = 0) -> dict:
    """Early-stopped kernel GD on the eNTK itself at nested training sizes (a measured rate with no
    fine-tuning): Gram blocks of the union K, nested prefixes of a seeded permutation of the non-test
    indices, RWY T̂ per subset, test MSE at T̂ and at the oracle-best t; plus ε̂_n² per subset."""
    from tqdm.auto import tqdm

    from ._checks import square_kernel, vector
    from .predictors import early_stopped_kernel_gd

    K = square_kernel(K)
    N = K.shape[0]
    r = vector(targets, N, "targets")
    test_index = np.asarray(test_index, dtype=np.int64)
    pool = np.setdiff1d(np.arange(N), test_index)
    order = np.asarray(train_order, dtype=np.int64) if train_order is not None else np.random.default_rng(seed).permutation(pool)
    sizes = sorted(int(s) for s in train_sizes)
    if sizes[-1] > order.size:
        raise TaskvecError(f"largest training size {sizes[-1]} exceeds the {order.size} non-test examples")
    rows, spectra = [], {}
    for m in tqdm(sizes, desc="kernel GD at nested n", leave=False):
        idx = order[:m]
        Kt = K[np.ix_(idx, idx)]
        res = early_stopped_kernel_gd(Kt, r[idx], sigma, radius=radius, K_test_train=K[np.ix_(test_index, idx)],
                                      test_targets=r[test_index], horizon=4.0)
        spectra[m] = res["eigenvalues"]
        rows.append({"n": m, "T_hat": res["T_hat"], "test_mse_at_T_hat": res["error_at_T_hat"],
                     "oracle_t": res["oracle_t"], "oracle_test_mse": res["oracle_error"],
                     "eps_hat_sq_target_units": res["eps_hat_sq_target_units"]})
    ns = [row["n"] for row in rows]
    meas = measured_rate(ns, [row["test_mse_at_T_hat"] for row in rows])
    excess = [row["test_mse_at_T_hat"] - sigma**2 for row in rows]
    meas_excess = measured_rate(ns, excess) if min(excess) > 0 else None  # excess over σ²
    return {"rows": rows, "measured": meas, "measured_excess": meas_excess, "noise_floor": sigma**2, "nonparametric": nonparametric_rate(spectra, sigma, radius=radius),
            "spectra": spectra, "seed": seed}
