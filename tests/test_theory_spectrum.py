"""Decay fits recover known exponents; effective/statistical dimension against brute force."""

import numpy as np
import pytest

from taskvec.errors import TaskvecError
from taskvec.theory import effective_dimension, fit_decay, fit_spectrum, noise_cut, statistical_dimension
from theory_support import one_blas_thread  # noqa: F401  (autouse fixture)


@pytest.mark.parametrize("beta", [1.5, 2.0, 4.0])
def test_power_law_recovered_with_noise_tail_and_outlier(beta):
    rng = np.random.default_rng(0)
    i = np.arange(1, 401, dtype=float)
    mu = 2.0 * i ** (-beta) * np.exp(0.02 * rng.normal(size=i.size))  # 2% multiplicative jitter
    mu[0] *= 8.0  # a dominant constant mode: the robust fit must shrug it off
    mu = np.concatenate([mu, np.full(50, 1e-19)])  # numerical-noise tail, must be cut
    fit = fit_decay(mu, "power", n_boot=100, seed=1)
    assert abs(fit.rate - beta) / beta < 0.03, fit
    assert fit.rate_ci[0] <= beta <= fit.rate_ci[1] or abs(fit.rate - beta) < 0.01 * beta
    assert fit.window[1] <= fit.n_above_tol < 400 + 1
    assert fit.r2 > 0.95
    exact = fit_decay(2.0 * i ** (-beta), "power", n_boot=0)
    assert exact.rate == pytest.approx(beta, rel=1e-10) and exact.c == pytest.approx(2.0, rel=1e-9)


@pytest.mark.parametrize("gamma", [0.02, 0.1, 0.5])
def test_exponential_recovered(gamma):
    i = np.arange(1, 301, dtype=float)
    mu = 5.0 * np.exp(-gamma * i) * np.exp(0.01 * np.random.default_rng(2).normal(size=i.size))
    fit = fit_decay(mu, "exponential", n_boot=50)
    assert abs(fit.rate - gamma) / gamma < 0.03
    both = fit_spectrum(mu, n_boot=0)
    assert both["preferred"] == "exponential"
    assert both["power"].window == both["exponential"].window


def test_window_and_noise_cut_are_stated_and_respected():
    i = np.arange(1, 101, dtype=float)
    mu = i**-2.0
    assert noise_cut(mu, tol=1e-3) == int(np.sum(mu >= 1e-3))
    fit = fit_decay(mu, window=(5, 40), n_boot=0)
    assert fit.window == (5, 40) and fit.n_points == 36
    d = fit.to_dict()
    assert d["parameter"] == "beta" and d["window"] == (5, 40)
    with pytest.raises(TaskvecError, match="window"):
        fit_decay(mu, window=(1, 2))
    with pytest.raises(TaskvecError, match=r"window \[5, 2\] must be FIRST ≤ LAST"):
        fit_decay(mu, window=(5, 2))
    with pytest.raises(TaskvecError, match="NaN"):
        fit_decay(np.array([1.0, np.nan, 0.1]))
    with pytest.raises(TaskvecError, match="PSD"):
        fit_decay(np.array([1.0, 0.5, -0.2]))


def test_effective_and_statistical_dimension_brute_force():
    mu = np.array([3.0, 1.0, 0.5, 0.1, 0.0])
    for lam in [1e-3, 0.1, 1.0, 10.0]:
        ref = sum(m / (m + lam) for m in mu)
        assert effective_dimension(mu, lam) == pytest.approx(ref, rel=1e-14)
    np.testing.assert_allclose(effective_dimension(mu, np.array([0.1, 1.0])),
                               [sum(m / (m + 0.1) for m in mu), sum(m / (m + 1.0) for m in mu)])
    assert statistical_dimension(mu, np.sqrt(0.5)) == 2  # strictly above δ² = 0.5
    assert statistical_dimension(mu, 0.2) == 4
