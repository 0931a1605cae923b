"""Predicted exponents from fits and nested spectra; measured exponents from errors."""

import numpy as np
import pytest

from taskvec.errors import TaskvecError
from taskvec.theory import fit_decay
from taskvec.theory.rates import compare_rates, kernel_gd_rates, measured_rate, nonparametric_rate, predicted_rate
from theory_support import one_blas_thread  # noqa: F401  (autouse fixture)


def test_predicted_exponent_from_fits():
    i = np.arange(1, 301.0)
    assert predicted_rate(fit_decay(i**-2.0, n_boot=0))["exponent"] == pytest.approx(-2 / 3)
    assert predicted_rate(fit_decay(i**-4.0, n_boot=0))["exponent"] == pytest.approx(-0.8)
    slow = predicted_rate(fit_decay(i**-0.7, n_boot=0))
    assert slow["exponent"] is None and not slow["within_assumption"] and "non-parametric" in slow["note"]
    ex = predicted_rate(fit_decay(np.exp(-0.1 * i), "exponential", n_boot=0))
    assert ex["exponent"] == -1.0 and ex["log_factor"]


def test_measured_rate_recovers_slope_and_ci():
    rng = np.random.default_rng(0)
    ns = np.repeat([50, 100, 200, 400, 800], 4)
    errs = 3.0 * ns**-0.6 * np.exp(0.05 * rng.normal(size=ns.size))
    m = measured_rate(ns, errs)
    assert abs(m["slope"] + 0.6) < 0.03 and m["ci"][0] < -0.6 < m["ci"][1]
    cmp = compare_rates(-0.6, m)
    assert cmp["prediction_in_ci"] and cmp["slope_ratio"] == pytest.approx(m["slope"] / -0.6)
    grouped = measured_rate([50, 100], [[0.5, 0.6], [0.3, 0.35]])
    assert grouped["n_points"] == 4
    floor = measured_rate(ns, errs + 0.01, noise_floor=0.01)
    assert floor["slope"] == pytest.approx(m["slope"], rel=1e-9)
    with pytest.raises(TaskvecError, match="noise floor"):
        measured_rate(ns, errs, noise_floor=1.0)
    with pytest.raises(TaskvecError, match="two or more"):
        measured_rate([10, 10], [0.1, 0.2])


def test_nonparametric_rate_on_sobolev_kernel():
    """Nested subsets of x ~ U[0,1] with K = min(x,x') (μ_i ≍ i^-2): ε̂_n² slope ≈ −2/3."""
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, 400)
    spectra = {}
    for n in [50, 100, 200, 400]:
        K = np.minimum(x[:n, None], x[None, :n])
        spectra[n] = np.linalg.eigvalsh(K / n)[::-1]
    out = nonparametric_rate(spectra, sigma=0.5)
    assert abs(out["exponent"] + 2 / 3) < 0.1, out["exponent"]
    assert np.all(np.diff(out["eps_hat_sq"]) < 0)


def test_kernel_gd_rates_on_known_function():
    rng = np.random.default_rng(2)
    N = 700
    x = rng.uniform(0, 1, N)
    K = np.minimum(x[:, None], x[None, :])
    f = np.sin(3 * x) / 3
    y = f + 0.3 * rng.normal(size=N)
    out = kernel_gd_rates(K, y, [50, 100, 200, 400], np.arange(500, 700), 0.3, seed=0)
    assert len(out["rows"]) == 4 and out["measured"]["slope"] < 0
    # test MSE includes the noise floor σ² = 0.09: the early-stopped excess is what falls
    assert all(row["test_mse_at_T_hat"] < 0.09 + 12 * row["eps_hat_sq_target_units"] for row in out["rows"])
    assert out["nonparametric"]["exponent"] < -0.4


def test_analyse_spectrum_reports_assumptions():
    from taskvec.theory import analyse_spectrum

    i = np.arange(1, 201.0)
    slow = analyse_spectrum(i**-0.7, sigma=0.2, n_boot=0)
    assert not slow["predicted_rate"]["within_assumption"] and slow["predicted_rate"]["exponent"] is None
    assert slow["early_stopping"]["T_hat"] is not None and slow["decay_fits"]["preferred"] == "power"
    ex = analyse_spectrum(np.exp(-0.2 * i), n_boot=0)
    assert ex["decay_fits"]["preferred"] == "exponential" and ex["predicted_rate"]["formula"] == "(log n)/n"
    assert "early_stopping" not in ex  # no σ, no stopping rule
    with pytest.raises(TaskvecError, match="needs σ"):
        analyse_spectrum(i**-2.0, training={"lr": 0.1, "batch_size": 4})
