"""End to end on a causal LM: a tiny real Llama fine-tuned (attention only) on two arithmetic tasks, then
`taskvec analyze`. The report scores tasks with the fine-tune's own metric (NLL = −mean target
log-probability) and its numbers agree with direct forward passes."""

import json
import math

import numpy as np
import pytest
import torch
from tiny import save_hf, tiny_model, tiny_tokenizer

from taskvec.cli import main as cli_main
from taskvec.collection import load_collection
from taskvec.models import load_model, load_tokenizer
from taskvec.outputs import make_output

TOML = """
name = "tiny-causal"
base = "base"
sizes = { train = 10, validation = 6, test = 6, probe = 5 }
[train]
scope = "attention"
optimizer = "sgd"
lr = 0.05
batch_size = 5
epochs = 2
fractions = []
max_length = 64
[[tasks]]
name = "add"
data = "math:add_or_sub"
[[tasks]]
name = "mul"
data = "math:mul"
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("causal")
    save_hf(tiny_model("llama"), root / "base", tiny_tokenizer(kind="causal"))
    (root / "c.toml").write_text(TOML)
    assert cli_main(["finetune", str(root / "c.toml"), "--out", str(root / "col"), "--no-progress"]) == 0
    assert cli_main(["analyze", str(root / "col"), "--out", str(root / "rep"), "--no-progress"]) == 0
    return root, json.loads((root / "rep" / "results.json").read_text())


def _outputs(col, examples, delta=None):
    model = load_model(col.base, kind="causal-lm")
    f = make_output("logprob", model, load_tokenizer(col.base), max_length=64)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    for k, v in (delta or {}).items():
        params[k] = params[k] + v
    with torch.no_grad():
        return f(params, f.encode(examples))[:, 0].double().numpy()


def _tau(col, t):
    """θ_t − θ₀ on the tensors the fine-tune changed."""
    ft = load_model(col.run(t).final().path, kind="causal-lm")
    b = load_model(col.base, kind="causal-lm")
    fb = dict(b.named_parameters())
    return {n: (p.detach() - fb[n].detach()) for n, p in ft.named_parameters() if not torch.equal(p, fb[n])}


def test_causal_report_uses_nll_and_is_complete(built):
    root, res = built
    assert res["metric"] == "nll" and res["arithmetic"]["metric"] == "nll"
    assert res["config"]["scope"] == "attention"
    html = (root / "rep" / "index.html").read_text()
    assert "NLL" in html and "test MSE" not in html
    for t in res["tasks"]:
        th = res["theory"][t]
        assert th["metric"] == "nll"
        for key in ("sigma", "radius", "predicted_epochs"):
            assert th[key] is not None and math.isfinite(th[key]), (t, key)
        assert math.isfinite(th["kernel_gd"]["test_mse_at_T_hat"])
    assert "not normalised" in html  # the kernel-NLL caveat is printed where those columns are


def test_caveats_follow_the_numbers():
    from taskvec.report.render import caveats

    lin = {"a": {"rows": [{"alpha": 1.0, "relative_error": 2.7}]}, "b": {"rows": [{"alpha": 1.0, "relative_error": 0.3}]}}
    notes = caveats({"metric": "nll", "linearisation": lin})
    assert "not normalised" in notes["Early stopping and kernel predictors"]
    assert "exceeds 1 for a:" in notes["Task arithmetic"]
    assert caveats({"metric": "mse", "linearisation": {"b": lin["b"]}}) == {}
    far = caveats({"theory": {"a": {"predicted_epochs": 5e7, "measured_best_epoch": 2, "sigma": 3e-4},
                              "b": {"predicted_epochs": 8, "measured_best_epoch": 2, "sigma": 1.0}}})
    assert "off by more than 10× for a (T̂ → 5e+07" in far["Early stopping and kernel predictors"]
    assert "b (" not in far["Early stopping and kernel predictors"]


def test_kernel_gd_starts_at_the_pretrained_nll(built):
    """At t = 0 the linearised fine-tune is θ₀, so its test NLL is −mean f(θ₀) on the same test examples."""
    root, res = built
    col = load_collection(root / "col")
    for t in res["tasks"]:
        th = res["theory"][t]
        test = col.task_data(t).split("test")[: th["n_test"]]
        direct = -float(np.mean(_outputs(col, test)))
        kg = th["kernel_gd"]
        assert kg["t"][0] == 0
        assert kg["test_metric"][0] == pytest.approx(direct, rel=1e-5)
        # the squared-loss path is the surrogate (f − 0)²: at t = 0, mean f(θ₀)²
        assert kg["test_mse"][0] == pytest.approx(float(np.mean(_outputs(col, test) ** 2)), rel=1e-5)


def test_negation_and_interference_nll_match_direct(built):
    root, res = built
    col = load_collection(root / "col")
    A, B = res["tasks"]
    tA, tB = _tau(col, A), _tau(col, B)
    assert tA and all(any(k in n for k in ("q_proj", "k_proj", "v_proj", "o_proj")) for n in tA)
    test = col.task_data(A).split("test")[:64]
    own = -np.mean(_outputs(col, test, tA))
    both = -np.mean(_outputs(col, test, {k: tA[k] + tB.get(k, 0) for k in tA}))
    got = res["arithmetic"]["interference"]["measured_delta"][0][1]
    assert got == pytest.approx(both - own, rel=1e-4, abs=1e-6)
    neg = [r for r in res["arithmetic"]["negation"][A]["rows"] if r["task"] == A][0]
    assert neg["measured_metric"] == pytest.approx(-np.mean(_outputs(col, test, {k: -v for k, v in tA.items()})),
                                                   rel=1e-4)
