"""Linearised task arithmetic: exact on a linear model, first-order on a nonlinear one, similarity
measures against brute force in parameter space."""

import numpy as np
import pytest
from scipy.linalg import subspace_angles

from taskvec.arithmetic import (
    alpha_grid, disentanglement_error, function_cosine, interference, linearisation_error, linearised_outputs,
    negation, parameter_cosine, predict_arithmetic, similarity_table, subspace_similarity,
)
from taskvec.errors import TaskvecError
from theory_support import one_blas_thread  # noqa: F401  (autouse fixture)

TASKS = ["a", "b", "c"]


def _linear_setup(m=1, seed=0, p=30):
    """f(x; θ) = x·θ (m = 1) or xᵀW (m = 2): J is exact everywhere."""
    rng = np.random.default_rng(seed)
    shape = (p,) if m == 1 else (p, m)
    theta0 = rng.normal(size=shape)
    taus = {t: 0.5 * rng.normal(size=shape) for t in TASKS}
    X = {t: rng.normal(size=(12 + 3 * i, p)) for i, t in enumerate(TASKS)}
    labels = {t: X[t] @ (theta0 + taus[t]) + 0.05 * rng.normal(size=(X[t].shape[0],) + shape[1:]) for t in TASKS}
    f = lambda A, theta: X[A] @ theta  # noqa: E731  the "real model"
    f0 = {A: f(A, theta0) for A in TASKS}
    jtau = {A: {t: X[A] @ taus[t] for t in TASKS} for A in TASKS}
    return theta0, taus, X, labels, f, f0, jtau


@pytest.mark.parametrize("m", [1, 2])
def test_linear_model_predictions_are_exact(m):
    theta0, taus, X, labels, f, f0, jtau = _linear_setup(m)
    for alphas in [{"a": 1.0, "b": 1.0}, {"a": 0.3, "b": -0.7, "c": 1.4}, {"c": -1.0}]:
        theta = theta0 + sum(a * taus[t] for t, a in alphas.items())
        truth = {A: f(A, theta) for A in TASKS}
        res = predict_arithmetic(f0, jtau, alphas, labels=labels, metric="mse", measured_outputs=truth)
        for A in TASKS:
            row = res["tasks"][A]
            assert np.max(np.abs(row["predicted_outputs"] - truth[A])) <= 1e-10
            assert abs(row["predicted_metric"] - row["measured_metric"]) <= 1e-10
    # interference: predicted change of A's metric = measured on the linear model, ρ = 1
    T = len(TASKS)
    meas = np.full((T, T), np.nan)
    for i, A in enumerate(TASKS):
        single = np.mean((f(A, theta0 + taus[A]) - labels[A]) ** 2)
        for j, B in enumerate(TASKS):
            if i != j:
                meas[i, j] = np.mean((f(A, theta0 + taus[A] + taus[B]) - labels[A]) ** 2) - single
    inter = interference(f0, jtau, labels, metric="mse", measured_delta=meas)
    off = ~np.eye(T, dtype=bool)
    assert np.max(np.abs(inter["predicted_delta"][off] - meas[off])) <= 1e-10
    assert inter["spearman_delta"]["rho"] == pytest.approx(1.0)
    np.testing.assert_allclose(inter["relative_size"][0, 1],
                               np.linalg.norm(X["a"] @ taus["b"]) / np.linalg.norm(X["a"] @ taus["a"]))
    # negation and weight disentanglement: predicted = measured
    neg = negation(f0, jtau, "b", labels=labels, alphas=(1.0,),
                   measured_metric={1.0: {A: np.mean((f(A, theta0 - taus["b"]) - labels[A]) ** 2) for A in TASKS}})
    for row in neg["rows"]:
        assert abs(row["predicted_metric"] - row["measured_metric"]) <= 1e-10

    def measured(alphas):
        theta = theta0 + sum(a * taus[t] for t, a in alphas.items())
        return {t: f(t, theta) for t in TASKS}

    xi = disentanglement_error(f0, jtau, alpha_grid(TASKS, [0.0, 0.5, 1.0]), measured=measured)
    assert len(xi["rows"]) == 27
    for row in xi["rows"]:
        assert abs(row["predicted"] - row["measured"]) <= 1e-9 * max(1.0, row["measured"])
    assert xi["rows"][0]["predicted"] == 0.0  # α = 0: nothing to entangle


def test_linearisation_error_is_first_order_on_tanh_model():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(20, 8))
    theta0, tau = 0.3 * rng.normal(size=8), rng.normal(size=8)
    f = lambda th: np.tanh(X @ th)  # noqa: E731
    J = (1 - np.tanh(X @ theta0) ** 2)[:, None] * X  # exact Jacobian
    alphas = [0.01, 0.02, 0.04, 0.08]
    out = linearisation_error({a: f(theta0 + a * tau) - f(theta0) for a in alphas}, J @ tau)
    errs = np.array([r["relative_error"] for r in out["rows"]])
    ratios = errs[1:] / errs[:-1]
    np.testing.assert_allclose(ratios, 2.0, rtol=0.1)  # error ∝ α: second-order remainder
    assert errs[0] < 0.05


def test_similarities_against_parameter_space_brute_force():
    rng = np.random.default_rng(2)
    p = 40
    basis = rng.normal(size=(p, 6))
    JA = rng.normal(size=(15, 6)) @ basis[:, :6].T + 0.1 * rng.normal(size=(15, p))
    JB = rng.normal(size=(11, 4)) @ basis[:, 2:6].T + 0.1 * rng.normal(size=(11, p))
    K_AA, K_BB, K_AB = JA @ JA.T, JB @ JB.T, JA @ JB.T
    k = 4
    res = subspace_similarity(K_AA, K_BB, K_AB, k=k)

    def top_dirs(J):  # explicit parameter-space eigendirections: top right singular vectors
        return np.linalg.svd(J, full_matrices=False)[2][:k].T

    ref = np.sort(np.cos(subspace_angles(top_dirs(JA), top_dirs(JB))))[::-1]
    np.testing.assert_allclose(res["principal_cosines"], ref, atol=1e-9)
    CA, CB = JA.T @ JA, JB.T @ JB
    ref_align = np.sum(CA * CB) / (np.linalg.norm(CA) * np.linalg.norm(CB))
    assert res["operator_alignment"] == pytest.approx(ref_align, rel=1e-10)
    with pytest.raises(TaskvecError, match="K_AB"):
        subspace_similarity(K_AA, K_BB, K_AB.T)


def test_similarity_table_and_cosines():
    theta0, taus, X, labels, f, f0, jtau = _linear_setup(1, seed=3)
    V = np.stack([taus[t] for t in TASKS])
    cos = parameter_cosine(V)
    assert cos[0, 1] == pytest.approx(taus["a"] @ taus["b"] / np.linalg.norm(taus["a"]) / np.linalg.norm(taus["b"]))
    np.testing.assert_allclose(parameter_cosine(gram=V @ V.T), cos)
    common = {t: X["a"] @ taus[t] for t in TASKS}
    fc = function_cosine(common, TASKS)
    assert fc[1, 2] == pytest.approx(common["b"] @ common["c"] / np.linalg.norm(common["b"]) / np.linalg.norm(common["c"]))
    blocks = {(a, b): X[a] @ X[b].T for a in TASKS for b in TASKS}
    tab = similarity_table(TASKS, param_gram=V @ V.T, jtau_common=common, gram_blocks=blocks, k=5,
                           measured=np.arange(9.0).reshape(3, 3))
    assert set(tab["spaces"]) == {"parameter_cosine", "function_cosine", "subspace_mean_cos2", "operator_alignment"}
    assert "parameter_cosine~measured" in tab["spearman"]


def test_bad_inputs():
    theta0, taus, X, labels, f, f0, jtau = _linear_setup(1)
    broken = {A: dict(v) for A, v in jtau.items()}
    del broken["a"]["c"]
    with pytest.raises(TaskvecError, match="lacks task vector 'c'"):
        predict_arithmetic(f0, broken, {"a": 1.0})
    with pytest.raises(TaskvecError, match="metric"):
        interference(f0, jtau, labels, metric="bleu")
    with pytest.raises(TaskvecError, match="3×3"):
        interference(f0, jtau, labels, measured_delta=np.zeros((2, 2)))
    assert linearised_outputs(f0["a"], jtau["a"], {}).tolist() == f0["a"].tolist()
