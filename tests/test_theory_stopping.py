"""The RWY stopping rule against a tiny reference written here from the formula (no library calls)."""

import math

import numpy as np
import pytest

from taskvec.errors import TaskvecError
from taskvec.theory import (
    constant_mode, critical_radius, early_stopping, local_rademacher, project_out_constant, rkhs_radius,
    sensitivity, sigma_first_difference, sigma_heldout, sigma_krr, sigma_spectral_tail, stopping_time,
    translate_to_training,
)
from theory_support import one_blas_thread  # noqa: F401  (autouse fixture)


def ref_R(mu, eps):
    return math.sqrt(float(np.minimum(mu, eps * eps).sum()) / len(mu))


def ref_eps(mu, sigma):
    """Bisection on the defining inequality R(ε) ≤ ε²/(2eσ)."""
    lo, hi = 1e-12, 1.0
    while ref_R(mu, hi) > hi * hi / (2 * math.e * sigma):
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if ref_R(mu, mid) <= mid * mid / (2 * math.e * sigma):
            hi = mid
        else:
            lo = mid
    return hi


def ref_T(mu, sigma, alphas):
    eta = 0.0
    for t in range(1, len(alphas) + 1):
        eta += alphas[t - 1]
        if ref_R(mu, 1 / math.sqrt(eta)) > 1 / (2 * math.e * sigma * eta):
            return t - 1
    return None


SPECTRA = {
    "power1.5": 1.0 * np.arange(1, 201.0) ** -1.5,
    "power2": 0.8 * np.arange(1, 201.0) ** -2.0,
    "power4": 0.5 * np.arange(1, 201.0) ** -4.0,
    "exp": 0.9 * np.exp(-0.1 * np.arange(1, 201.0)),
}


@pytest.mark.parametrize("name", sorted(SPECTRA))
@pytest.mark.parametrize("sigma", [0.05, 0.3, 1.0])
def test_rule_matches_reference(name, sigma):
    mu = SPECTRA[name]
    for eps in [1e-3, 0.05, 0.3, 2.0]:
        assert local_rademacher(mu, eps) == pytest.approx(ref_R(mu, eps), rel=1e-13)
    eps = critical_radius(mu, sigma)
    assert eps == pytest.approx(ref_eps(mu, sigma), rel=1e-10)
    # exactness: the inequality holds at ε̂ (to round-off) and fails just below
    assert local_rademacher(mu, eps) <= eps**2 / (2 * math.e * sigma) * (1 + 1e-12)
    assert local_rademacher(mu, eps * (1 - 1e-9)) > (eps * (1 - 1e-9)) ** 2 / (2 * math.e * sigma)
    alpha = min(1.0, 1.0 / mu[0])
    T = stopping_time(mu, sigma, alpha)["T_hat"]
    assert T == ref_T(mu, sigma, [alpha] * 100000)
    decaying = [alpha / math.sqrt(1 + t) for t in range(200000)]
    st = stopping_time(mu, sigma, lambda t: alpha / np.sqrt(1.0 + t))
    assert st["T_hat"] == ref_T(mu, sigma, decaying) and st["assumption_step_ok"]
    assert stopping_time(mu, sigma, np.array(decaying))["T_hat"] == st["T_hat"]


def test_radius_and_kernel_scale_act_through_sigma():
    mu = SPECTRA["power2"]
    # radius R ⇔ σ/R;  rescaling K by c ⇔ σ/√c (same T̂ once the step is rescaled too)
    assert critical_radius(mu, 0.6, radius=2.0) == pytest.approx(critical_radius(mu, 0.3))
    c = 4.0
    e1 = critical_radius(c * mu, 0.3)
    e2 = critical_radius(mu, 0.3 / math.sqrt(c))
    assert e1 == pytest.approx(math.sqrt(c) * e2, rel=1e-12)
    rows = sensitivity(mu, 0.3, 1.0, 1.0, factors=(0.5, 1.0, 2.0))
    assert len(rows) == 9
    by_ratio = {}
    for r in rows:
        by_ratio.setdefault(round(r["sigma_over_R"], 12), set()).add(r["T_hat"])
    assert all(len(v) == 1 for v in by_ratio.values())
    Ts = [r["T_hat"] for r in rows if r["radius"] == 1.0]
    assert Ts == sorted(Ts, reverse=True)  # more noise → stop earlier


def test_truncated_spectrum_padded_and_reported():
    mu = SPECTRA["power2"][:50]
    out = early_stopping(mu, 0.3, n=200)
    assert out["n"] == 200 and out["spectrum_info"]["padded_zeros"] == 150
    assert out["eps_hat"] == pytest.approx(ref_eps(list(mu) + [0.0] * 150, 0.3), rel=1e-10)
    assert out["bound"]["unit_ball"] == pytest.approx(12 * out["eps_hat"] ** 2)
    with pytest.raises(TaskvecError, match="n must be"):
        early_stopping(mu, 0.3, n=10)
    with pytest.raises(TaskvecError, match="sigma"):
        early_stopping(mu, -1.0)


def test_step_assumption_flagged():
    mu = SPECTRA["power2"]
    st = stopping_time(mu, 0.3, 3.0)  # α > 1/μ̂₁
    assert not st["assumption_step_ok"] and "does not apply" in st["note"]


def test_translation_to_optimiser_steps():
    mu = SPECTRA["power2"]
    n, b, lr = 200, 8, 0.1
    tr = translate_to_training(mu, 0.3, lr=lr, batch_size=b, n=n, loss="mean")
    assert tr["kernel_step_alpha"] == pytest.approx(2 * lr)
    assert tr["T_hat_steps"] == ref_T(mu, 0.3, [2 * lr] * 100000)
    assert tr["epochs"] == pytest.approx(tr["T_hat_steps"] * b / n)
    half = translate_to_training(mu, 0.3, lr=lr, batch_size=b, n=n, loss="half_mean")
    assert half["kernel_step_alpha"] == pytest.approx(lr)
    assert abs(half["T_hat_steps"] - 2 * tr["T_hat_steps"]) <= 2
    adam = translate_to_training(mu, 0.3, lr=lr, batch_size=b, n=n, optimizer="adam")
    assert adam["approximate"] and "approximate" in adam["note"]
    big = translate_to_training(mu, 0.3, lr=3.0, batch_size=b, n=n, optimizer="adam")  # α > 1/μ̂₁ as well
    assert not big["assumption_step_ok"] and "approximate" in big["note"] and "does not apply" in big["note"]
    with pytest.raises(TaskvecError, match="batch size"):
        translate_to_training(mu, 0.3, lr=lr, batch_size=0, n=n)


def _rkhs_problem(seed=0, n=200, sigma=0.2):
    rng = np.random.default_rng(seed)
    x = np.sort(rng.uniform(0, 1, n))
    K = np.minimum(x[:, None], x[None, :])
    f = np.sin(2 * x) / 2
    return x, K, f, f + sigma * rng.normal(size=n)


def test_sigma_estimators_on_known_noise():
    sigma = 0.2
    ests = {"krr": [], "tail": [], "diff": []}
    for seed in range(5):
        x, K, f, y = _rkhs_problem(seed, sigma=sigma)
        ests["krr"].append(sigma_krr(K, y)["sigma"])
        ests["tail"].append(sigma_spectral_tail(K, y)["sigma"])
        ests["diff"].append(sigma_first_difference(y, order=x)["sigma"])
    for name, v in ests.items():
        assert abs(np.mean(v) - sigma) / sigma < 0.12, (name, v)
    assert sigma_heldout([0.3, -0.3, 0.3, -0.3])["sigma"] == pytest.approx(0.3)
    mu, U = np.linalg.eigh(K / K.shape[0])  # precomputed eigenpairs give the same estimates
    assert sigma_krr(K, y, eig=(mu, U))["sigma"] == pytest.approx(sigma_krr(K, y)["sigma"], rel=1e-10)
    assert sigma_spectral_tail(K, y, eig=(mu[::-1], U[:, ::-1]))["sigma"] == pytest.approx(
        sigma_spectral_tail(K, y)["sigma"], rel=1e-10)


def test_rkhs_radius_matches_direct_formula():
    x, K, f, y = _rkhs_problem(1)
    n = K.shape[0]
    out = rkhs_radius(K, y, lam=1e-3)
    a = np.linalg.solve(K + n * 1e-3 * np.eye(n), y)
    assert out["radius"] == pytest.approx(math.sqrt(a @ K @ a), rel=1e-8)
    # true f = sin(2x)/2 has ‖f‖²_H = ∫ f'² = ∫ cos²(2x) ≈ 0.5 + sin(4)/8; the GCV estimate is near it
    true = math.sqrt(0.5 + math.sin(4) / 8)
    assert 0.5 * true < rkhs_radius(K, y)["radius"] < 1.5 * true


def test_constant_mode_share():
    n = 50
    rng = np.random.default_rng(3)
    J = rng.normal(size=(n, 20)) + 3.0  # shared offset → dominant near-constant mode
    K = J @ J.T
    mu, U = np.linalg.eigh(K / n)
    cm = constant_mode(U, mu)
    assert cm["top_constant_share"] > 0.95 and cm["most_constant_index"] == 1
    assert cm["top_trace_share"] == pytest.approx(mu.max() / mu.sum())
    Kc = project_out_constant(K)
    np.testing.assert_allclose(Kc @ np.ones(n), 0, atol=1e-9)
    P = np.eye(n) - np.ones((n, n)) / n
    np.testing.assert_allclose(Kc, P @ K @ P, atol=1e-9)
