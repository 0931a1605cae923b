"""End to end: `taskvec finetune` a tiny real BERT on three VADER tasks, `taskvec analyze` it, and check
the report's numbers against direct computations (seconds, CI)."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import save_hf, tiny_model, tiny_tokenizer

from taskvec.cli import main as cli_main
from taskvec.collection import load_collection
from taskvec.errors import TaskvecError
from taskvec.models import load_model, load_tokenizer
from taskvec.outputs import LinearHead, make_output
from taskvec.report import AnalyzeConfig, analyze

TOML = """
name = "tiny-report"
base = "base"
sizes = { train = 12, validation = 6, test = 8, probe = 6 }
[train]
scope = "body"
optimizer = "sgd"
lr = 0.02
batch_size = 6
epochs = 2
fractions = [0.5]
max_length = 32
[[tasks]]
name = "tweets"
data = "vader:tweets"
[[tasks]]
name = "amazon"
data = "vader:amazon"
[[tasks]]
name = "nyt"
data = "vader:nyt"
[rate]
task = "tweets"
sizes = [6, 9, 12]
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    save_hf(tiny_model("bert"), root / "base", tiny_tokenizer(kind="encoder"))
    (root / "c.toml").write_text(TOML)
    assert cli_main(["finetune", str(root / "c.toml"), "--out", str(root / "col"), "--no-progress"]) == 0
    assert cli_main(["analyze", str(root / "col"), "--out", str(root / "rep"), "--no-progress", "--eval-size", "8"]) == 0
    return root, json.loads((root / "rep" / "results.json").read_text())


def _model_and_f(col):
    model = load_model(col.base, kind="encoder")
    f = make_output("regression", model, load_tokenizer(col.base), head=LinearHead.load(col.head_path.parent),
                    max_length=32, truncate_text=True)
    return model, f


def test_report_folder_is_complete(built):
    root, res = built
    rep = root / "rep"
    assert (rep / "index.html").is_file()
    html = (rep / "index.html").read_text()
    for name in ("cosine", "spectra", "energy", "stopping", "predictors", "rates", "linearisation", "interference",
                 "addition", "disentanglement"):
        assert (rep / f"{name}.png").stat().st_size > 1000, name
        assert (rep / f"{name}.pdf").is_file(), name
        assert f"{name}.png" in html
    assert res["tasks"] == ["tweets", "amazon", "nyt"]
    assert res["config"]["scope"] == "body"  # no --scope: the scope the collection was fine-tuned on
    assert not list(root.glob(".rep.partial-*"))
    for t in res["tasks"]:
        th = res["theory"][t]
        for key in ("sigma", "radius", "predicted_epochs", "measured_best_epoch"):
            assert th[key] is not None and math.isfinite(th[key]), (t, key)
        assert math.isfinite(th["kernel_gd"]["test_mse_at_T_hat"]) and math.isfinite(th["finetune"]["best_epoch_test_mse"])


def test_task_vector_norms_and_cosines_match_direct(built):
    root, res = built
    col = load_collection(root / "col")
    base = load_file(str(root / "base" / "model.safetensors"))
    taus = {}
    for t in res["tasks"]:
        ft = load_file(str(col.run(t).final().path / "model.safetensors"))
        taus[t] = torch.cat([(ft[k].double() - base[k].double()).ravel() for k in sorted(ft)
                             if k in base and "word_embeddings" not in k and base[k].is_floating_point()])
    for i, a in enumerate(res["tasks"]):
        assert res["vectors"]["norms"][a] == pytest.approx(float(taus[a].norm()), rel=1e-5)
        for j, b in enumerate(res["tasks"]):
            direct = float(taus[a] @ taus[b] / (taus[a].norm() * taus[b].norm()))
            assert res["vectors"]["cosine"][i][j] == pytest.approx(direct, rel=1e-5, abs=1e-6)


def test_probe_kernel_matches_brute_force_jacobian(built):
    root, res = built
    col = load_collection(root / "col")
    model, f = _model_and_f(col)
    examples = col.task_data("amazon").split("probe")
    names = [n for n, _ in model.named_parameters() if "word_embeddings" not in n]
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}
    batch = f.encode(examples)

    def f_flat(p):
        return f(p, batch)[:, 0]

    J = torch.func.jacrev(f_flat)(params)
    Jm = torch.cat([J[n].reshape(len(examples), -1) for n in names], 1).double()
    K = (Jm @ Jm.T).detach().numpy()
    mu = np.sort(np.linalg.eigvalsh(K / len(examples)))[::-1]
    got = np.asarray(res["kernel"]["blocks"]["amazon"]["eigenvalues"], float)
    np.testing.assert_allclose(got, np.clip(mu, 0, None), rtol=1e-4, atol=1e-6 * mu[0])


def test_linearisation_and_interference_match_direct(built):
    root, res = built
    col = load_collection(root / "col")
    model, f = _model_and_f(col)
    base = load_file(str(root / "base" / "model.safetensors"))
    tasks = res["tasks"]

    def tau(t):
        ft = load_file(str(col.run(t).final().path / "model.safetensors"))
        return {k: ft[k] - base[k] for k in ft if "word_embeddings" not in k and base[k].is_floating_point()}

    def outputs(delta, examples):
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        for k, v in delta.items():
            params[k] = params[k] + v
        with torch.no_grad():
            return f(params, f.encode(examples))[:, 0].double().numpy()

    A, B = tasks[0], tasks[1]
    tA, tB = tau(A), tau(B)
    test = col.task_data(A).split("test")[:8]
    y = np.array([e["label"] for e in test])
    own = np.mean((outputs(tA, test) - y) ** 2)
    both = np.mean((outputs({k: tA[k] + tB[k] for k in tA}, test) - y) ** 2)
    got = res["arithmetic"]["interference"]["measured_delta"][0][1]
    assert got == pytest.approx(both - own, rel=1e-4, abs=1e-7)
    # negation θ₀ − α τ_A, measured on A and on B, and the report's negation table shows it
    a = res["config"].get("negation_alpha", 1.0)
    neg = {r["task"]: r for r in res["arithmetic"]["negation"][A]["rows"]}
    forgot = np.mean((outputs({k: -a * v for k, v in tA.items()}, test) - y) ** 2)
    assert neg[A]["measured_metric"] == pytest.approx(forgot, rel=1e-4, abs=1e-7)
    from taskvec.report.render import negation_rows

    rows = negation_rows(res)
    assert len(rows) == len(tasks) ** 2 and {r["negated"] for r in rows} == set(tasks)
    assert "Task negation" in (root / "rep" / "index.html").read_text()
    # linearisation error at α = 1, recomputed in float64 with an exact forward-mode J·τ
    model64, f = _model_and_f(col)
    model64 = model64.double()
    f.head = f.head.double()
    probe = f.encode(col.task_data(A).split("probe"))
    p0 = {n: p.detach() for n, p in model64.named_parameters()}
    tan = {n: torch.zeros_like(p) for n, p in p0.items()}
    tan.update({k: v.double() for k, v in tA.items()})
    f0, jt = torch.func.jvp(lambda p: f(p, probe)[:, 0], (p0,), (tan,))
    with torch.no_grad():
        d = f({n: p0[n] + tan[n] for n in p0}, probe)[:, 0] - f0
    direct = float((d - jt).norm() / d.norm())
    row = [r for r in res["linearisation"][A]["rows"] if r["alpha"] == 1.0][0]
    assert row["relative_error"] == pytest.approx(direct, rel=5e-2, abs=1e-5)


def test_rates_and_predictions_beside_measurements(built):
    from taskvec.report.render import headline_rows

    _, res = built
    for row in headline_rows(res):  # every headline cell is filled from results.json
        assert all(v is not None for v in row.values()), row
    r = res["rates"]
    assert r["n"] == [6, 9, 12]
    slope = np.polyfit(np.log(r["n"]), np.log(r["measured_test"]), 1)[0]
    assert r["measured"]["slope"] == pytest.approx(slope, rel=1e-8)
    assert len(r["predicted_eps2"]) == 3 and all(v > 0 for v in r["predicted_eps2"])
    for row in res["arithmetic"]["addition"]:
        for t in row["tasks"]:
            assert set(row["test"][t]) >= {"measured", "predicted"}


def test_figures_rerender_from_results_alone(built, tmp_path):
    root, _ = built
    assert cli_main(["figures", str(root / "rep"), "--out", str(tmp_path / "figs"), "--format", "svg"]) == 0
    assert (tmp_path / "figs" / "interference.svg").stat().st_size > 1000


def test_interrupted_analysis_leaves_no_report(built, tmp_path, monkeypatch):
    root, _ = built
    from taskvec.report import pipeline

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "stage_projection", boom)
    with pytest.raises(KeyboardInterrupt):
        analyze(root / "col", tmp_path / "rep", config=AnalyzeConfig(progress=False, eval_size=8))
    assert not (tmp_path / "rep").exists()
    assert not list(tmp_path.glob(".rep.partial-*"))


def test_refuses_finetune_of_another_base(built, tmp_path):
    root, _ = built
    col = shutil.copytree(root / "col", tmp_path / "col")
    other = tiny_model("bert", seed=123)
    ck = load_collection(col).run("amazon").final().path
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(ck / "model.safetensors"))
    with pytest.raises(TaskvecError, match="not a fine-tune of this base"):
        analyze(col, tmp_path / "rep", config=AnalyzeConfig(progress=False, eval_size=8))
    assert not (tmp_path / "rep").exists()


def test_refuses_missing_collection_and_task_data(tmp_path, built):
    with pytest.raises(TaskvecError, match="collection"):
        analyze(tmp_path / "nothing", tmp_path / "rep", config=AnalyzeConfig(progress=False))
    root, _ = built
    col = shutil.copytree(root / "col", tmp_path / "col")
    (col / "data" / "nyt" / "probe.jsonl").write_text("")
    with pytest.raises(TaskvecError, match="nyt"):
        analyze(col, tmp_path / "rep", config=AnalyzeConfig(progress=False))
