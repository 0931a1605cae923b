"""The theory on a tiny *real* transformer (BERT body + frozen regression head, float64): linearised
task arithmetic against the model itself, and one real gradient step against one kernel-GD step on
the eNTK computed by taskvec.ntk."""

import numpy as np
import pytest
import torch
from torch.func import grad

from taskvec.arithmetic import interference, linearisation_error, predict_arithmetic
from taskvec.models import load_model
from taskvec.ntk import build_space, compute_kernel, jvp
from taskvec.ntk.jvp import outputs_at
from taskvec.outputs import LinearHead, make_output
from taskvec.theory import kernel_gd_path
from theory_support import one_blas_thread  # noqa: F401  (autouse fixture)
from tiny import tiny_model, tiny_tokenizer

TEXTS = {
    "a": ["the movie was wonderful", "a dull , boring film", "i love this phone", "worst purchase ever"],
    "b": ["what is 3 plus 4 ? 7", "calculate 6 times 7 . 42", "what is 12 minus 5 ? 7", "3 plus 4"],
    "c": ["the market rose sharply", "after the news", "battery lasts forever", "broke in two days"],
}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TASKVEC_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = load_model(tiny_model("bert", seed=0), dtype=torch.float64)
    f = make_output("regression", model, tiny_tokenizer(kind="encoder"), head=LinearHead(32, 1, seed=3))
    names = build_space(model, "body").names
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(7)
    taus = {}
    for t in TEXTS:  # small random "task vectors": 1e-3 of each tensor's norm
        taus[t] = {k: 1e-3 * params[k].detach().norm() * (z := torch.randn(params[k].shape, generator=g, dtype=torch.float64)) / z.norm()
                   for k in names}
    examples = {A: [{"text": s, "label": float(i)} for i, s in enumerate(TEXTS[A])] for A in TEXTS}
    return model, f, names, taus, examples


def _combine(taus, alphas):
    keys = next(iter(taus.values())).keys()
    return {k: sum(a * taus[t][k] for t, a in alphas.items()) for k in keys}


def test_linearised_arithmetic_on_real_transformer(setup):
    model, f, names, taus, ex = setup
    f0 = {A: outputs_at(model, f, ex[A]).numpy() for A in TEXTS}
    jt = {A: {t: jvp(model, f, ex[A], taus[t]).numpy() for t in TEXTS} for A in TEXTS}
    alphas = {"a": 1.0, "b": 0.5, "c": -1.0}
    truth = {A: outputs_at(model, f, ex[A], _combine(taus, alphas)).numpy() for A in TEXTS}
    res = predict_arithmetic(f0, jt, alphas, labels={A: np.arange(4.0) for A in TEXTS}, measured_outputs=truth)
    for A in TEXTS:
        assert res["tasks"][A]["output_relative_error"] < 2e-3, (A, res["tasks"][A]["output_relative_error"])
    # second-order remainder: the relative linearisation error grows ∝ α
    d = {a: (outputs_at(model, f, ex["a"], taus["a"], alpha=a) - outputs_at(model, f, ex["a"])).numpy() for a in (1.0, 2.0, 4.0)}
    errs = [r["relative_error"] for r in linearisation_error(d, jt["a"]["a"])["rows"]]
    np.testing.assert_allclose(np.array(errs[1:]) / errs[:-1], 2.0, rtol=0.15)
    # interference predicted from J_A τ_B vs measured on the model
    labels = {A: f0[A][:, 0] + 3 * jt[A][A][:, 0] for A in TEXTS}  # targets that τ_A moves towards
    T = list(TEXTS)
    meas = np.full((3, 3), np.nan)
    for i, A in enumerate(T):
        single = np.mean((outputs_at(model, f, ex[A], taus[A]).numpy()[:, 0] - labels[A]) ** 2)
        for j, B in enumerate(T):
            if i != j:
                both = outputs_at(model, f, ex[A], _combine(taus, {A: 1.0, B: 1.0})).numpy()[:, 0]
                meas[i, j] = np.mean((both - labels[A]) ** 2) - single
    inter = interference(f0, jt, labels, measured_delta=meas)
    off = ~np.eye(3, dtype=bool)
    np.testing.assert_allclose(inter["predicted_delta"][off], meas[off], rtol=0.05, atol=1e-3 * np.abs(meas[off]).max())
    assert inter["spearman_delta"]["rho"] > 0.9


def test_one_gradient_step_is_one_kernel_gd_step(setup):
    model, f, names, taus, ex = setup
    examples = ex["a"] + ex["b"]
    n = len(examples)
    kr = compute_kernel(model, f, examples, strategy="exact", progress=False, cache=False)
    batch = f.encode(examples)
    theta0 = {k: v.detach() for k, v in model.named_parameters()}
    f0 = f(theta0, batch)[:, 0].detach().numpy()
    y = f0 + np.linspace(-1, 1, n)

    def loss(p):  # L = (1/2n) Σ (f − y)² over the scoped parameters
        out = f({**theta0, **p}, batch)[:, 0]
        return 0.5 * torch.mean((out - torch.as_tensor(y)) ** 2)

    scoped = {k: theta0[k] for k in names}
    g = grad(loss)(scoped)
    errs = []
    for lr in (0.02, 0.01):
        new = {k: scoped[k] - lr * g[k] for k in names}
        moved = f({**theta0, **new}, batch)[:, 0].detach().numpy() - f0
        path = kernel_gd_path(kr.K, y - f0, step=lr, times=[0, 1], return_predictions=True)
        pred = path["train_predictions"][1]
        errs.append(np.linalg.norm(moved - pred) / np.linalg.norm(moved))
    assert errs[0] < 1e-2
    assert 1.6 < errs[0] / errs[1] < 2.4  # the gap is the O(lr²) curvature term


def test_subspace_similarity_agrees_with_ntk_cross_blocks():
    """arithmetic.subspace_similarity (K/n eigenpairs) and taskvec.ntk.cross (K eigenpairs) agree."""
    from taskvec.arithmetic import subspace_similarity
    from taskvec.ntk import kernel_alignment, principal_angles

    rng = np.random.default_rng(5)
    JA, JB = rng.normal(size=(9, 30)), rng.normal(size=(7, 30)) + 0.5 * rng.normal(size=(7, 1))
    KAA, KBB, KAB = JA @ JA.T, JB @ JB.T, JA @ JB.T
    mine = subspace_similarity(KAA, KBB, KAB, k=5)
    np.testing.assert_allclose(mine["principal_cosines"], principal_angles(KAA, KBB, KAB, 5), atol=1e-10)
    assert mine["operator_alignment"] == pytest.approx(kernel_alignment(KAA, KBB, KAB), rel=1e-12)
