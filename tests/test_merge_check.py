"""check-merge on tiny real GPT-2 merges: recovers λ's, recognises TIES / DARE, flags broken merges."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny import edited, perturbed, save_hf, tiny_model, tiny_tokenizer

from taskvec.cli import main
from taskvec.errors import TaskvecError
from taskvec.merge import MergeParams, merge_checkpoints
from taskvec.merge.check import check_merge, predicted_retention, write_check

BIG = "transformer.h.0.mlp.c_fc.weight"


@pytest.fixture(scope="module")
def coll(tmp_path_factory):
    root = tmp_path_factory.mktemp("check")
    base = tiny_model("gpt2", seed=0)
    save_hf(base, root / "base", tiny_tokenizer())
    fts = [save_hf(perturbed(base, scale=1e-2, seed=s), root / f"ft{s}") for s in (21, 22, 23)]
    return root, root / "base", fts


def kinds(rep):
    return {f["finding"]: f for f in rep["findings"]}


def test_recovers_task_arithmetic_lambdas(coll, tmp_path):
    root, base, fts = coll
    w, lam = (0.3, 0.5, 0.7), 0.9
    out = merge_checkpoints(base, fts, "task_arithmetic", MergeParams(weights=w, lambda_=lam), tmp_path / "m",
                            progress=False)
    rep = check_merge(base, out, fts, progress=False)
    want = lam * np.array(w)
    assert rep["classification"] == "task_arithmetic"
    assert np.abs(np.array(rep["lambda_global"]) - want).max() <= 1e-5
    for g, v in rep["per_layer"].items():
        assert np.abs(np.array(v["lambda"]) - want).max() <= 1e-5, g
    for r in rep["tensors"]:
        assert np.abs(np.array(r["lambda"]) - want).max() <= 1e-5, r["name"]
    assert rep["residual_fraction_global"] < 1e-10
    found = kinds(rep)
    assert found["task_arithmetic"]["level"] == "ok" and "tensors_do_not_fit" not in found
    assert "finite" not in found["task_arithmetic"]["message"]  # said only when some tensor is not
    assert not any(f["level"] == "error" for f in rep["findings"])
    write_check(rep, tmp_path / "report")
    saved = json.loads((tmp_path / "report" / "check.json").read_text())
    assert saved["classification"] == "task_arithmetic" and saved["findings"]
    assert (tmp_path / "report" / "check_merge_layers.png").stat().st_size > 0
    assert (tmp_path / "report" / "check_merge_layers.pdf").is_file()


def test_linear_merge_reads_as_average(coll, tmp_path):
    root, base, fts = coll
    out = merge_checkpoints(base, fts, "linear", MergeParams(weights=(1.0, 1.0, 2.0)), tmp_path / "m", progress=False)
    rep = check_merge(base, out, fts, progress=False)
    assert np.abs(np.array(rep["lambda_global"]) - [0.25, 0.25, 0.5]).max() <= 1e-5
    assert "linear average" in kinds(rep)["task_arithmetic"]["message"]


@pytest.mark.parametrize("weights", [(1.0,), (0.5, 1.0, 2.0)])
def test_recognises_ties(coll, tmp_path, weights):
    root, base, fts = coll
    out = merge_checkpoints(base, fts, "ties", MergeParams(densities=(0.4,), weights=weights), tmp_path / "m",
                            progress=False)
    rep = check_merge(base, out, fts, progress=False)
    found = kinds(rep)
    assert rep["classification"] == "ties"
    assert "trimming" in found and "sign_election" in found
    assert not any(f["level"] == "error" for f in rep["findings"]), rep["findings"]
    assert rep["explained_fraction"] > 0.99


def test_half_precision_ties_of_a_float32_base_reads_as_trimming(tmp_path):
    """Stored in bf16, an entry TIES left at θ₀ holds bf16(θ₀), not θ₀: compared at the merged dtype it
    still reads as trimming (it used to read as DARE dropping)."""
    base = tiny_model("llama", seed=0)
    save_hf(base, tmp_path / "base", tiny_tokenizer())
    fts = [save_hf(perturbed(base, scale=1e-2, seed=s), tmp_path / f"ft{s}") for s in (1, 2)]
    out = merge_checkpoints(tmp_path / "base", fts, "ties", MergeParams(densities=(0.3,)), tmp_path / "m",
                            out_dtype="bfloat16", progress=False)
    rep = check_merge(tmp_path / "base", out, fts, progress=False)
    assert rep["classification"] == "ties" and "trimming" in kinds(rep)


@pytest.mark.parametrize("method,rescale", [("dare_linear", "l1"), ("dare_linear", "paper"), ("dare_ties", "l1")])
def test_recognises_dare(coll, tmp_path, method, rescale):
    root, base, fts = coll
    out = merge_checkpoints(base, fts, method, MergeParams(densities=(0.5,), rescale=rescale, seed=1),
                            tmp_path / "m", progress=False)
    rep = check_merge(base, out, fts, progress=False)
    found = kinds(rep)
    assert rep["classification"] == method
    assert "dropping" in found
    assert ("sign_election" in found) == (method == "dare_ties")
    if method == "dare_linear":
        assert np.allclose(rep["kept_fraction"], 0.5, atol=0.05)
        want = "1/density" if rescale == "paper" else "L1-preserving"
        assert want in found["dropping"]["message"]
    assert not any(f["level"] == "error" for f in rep["findings"]), rep["findings"]


@pytest.mark.parametrize("method,params", [("task_arithmetic", MergeParams(lambda_=0.5)),
                                           ("ties", MergeParams(densities=(0.4,)))])
def test_flags_one_replaced_tensor(coll, tmp_path, method, params):
    root, base, fts = coll
    good = merge_checkpoints(base, fts, method, params, tmp_path / "good", progress=False)
    other = load_file(fts[0] / "model.safetensors")

    def replace(sd):
        sd[BIG] = other[BIG] + 0.01 * torch.randn(other[BIG].shape, generator=torch.Generator().manual_seed(0))

    bad = edited(good, tmp_path / "bad", replace)
    rep = check_merge(base, bad, fts, progress=False)
    found = kinds(rep)
    assert found["tensors_do_not_fit"]["tensors"] == [BIG]
    assert BIG in found["tensors_do_not_fit"]["message"]


def test_flags_task_left_out(coll, tmp_path):
    root, base, fts = coll
    out = merge_checkpoints(base, fts[:2], "task_arithmetic", MergeParams(), tmp_path / "m", progress=False)
    rep = check_merge(base, out, fts, progress=False)
    left = [f for f in rep["findings"] if f["finding"] == "task_left_out"]
    assert len(left) == 1 and f"task 2 ({fts[2].name})" in left[0]["message"]
    out = merge_checkpoints(base, fts[:2], "ties", MergeParams(densities=(0.5,)), tmp_path / "t", progress=False)
    rep = check_merge(base, out, fts, progress=False)
    left = [f for f in rep["findings"] if f["finding"] == "task_left_out"]
    assert len(left) == 1 and f"task 2 ({fts[2].name})" in left[0]["message"]


def test_flags_merge_built_on_another_base(coll, tmp_path):
    root, base, fts = coll
    other = perturbed(tiny_model("gpt2", seed=0), scale=5e-2, seed=99)  # "base v2": moved everywhere
    obase = save_hf(other, tmp_path / "obase")
    ofts = [save_hf(perturbed(other, scale=1e-2, seed=s), tmp_path / f"oft{s}") for s in (41, 42, 43)]
    out = merge_checkpoints(obase, ofts, "task_arithmetic", MergeParams(), tmp_path / "m", progress=False)
    rep = check_merge(base, out, fts, progress=False)
    found = kinds(rep)
    assert rep["classification"] == "unexplained"
    assert found["other_base"]["level"] == "error" and "different base" in found["other_base"]["message"]


def test_flags_fine_tune_missing_from_the_list(coll, tmp_path):
    root, base, fts = coll
    out = merge_checkpoints(base, fts, "ties", MergeParams(densities=(0.3,)), tmp_path / "m", progress=False)
    rep = check_merge(base, out, fts[:2], progress=False)
    found = kinds(rep)
    assert "other_base" not in found
    assert found["unexplained"]["level"] == "error" and "missing from the list" in found["unexplained"]["message"]


def test_flags_nonfinite_missing_and_extra(coll, tmp_path):
    root, base, fts = coll
    good = merge_checkpoints(base, fts, "task_arithmetic", MergeParams(), tmp_path / "good", progress=False)

    def breakit(sd):
        sd[BIG][0, :3] = float("nan")
        sd[BIG][1, 0] = float("inf")
        del sd["transformer.h.1.ln_2.bias"]
        sd["transformer.h.9.extra.weight"] = torch.zeros(3)

    rep = check_merge(base, edited(good, tmp_path / "bad", breakit), fts, progress=False)
    found = kinds(rep)
    assert found["nonfinite"]["tensors"] == [BIG] and "(4)" in found["nonfinite"]["message"]
    assert found["missing_tensors"]["tensors"] == ["transformer.h.1.ln_2.bias"]
    assert found["extra_tensors"]["tensors"] == ["transformer.h.9.extra.weight"]
    assert rep["classification"] == "task_arithmetic"  # the finite entries still fit exactly
    n = rep["n_tensors_checked"]
    assert found["task_arithmetic"]["message"].endswith(
        f"; holds on the {n - 1} of {n} tensors that are finite and on the finite entries of 1 more only")


def fill_every_tensor(value):
    def edit(sd):
        for t in sd.values():
            t.fill_(value)
    return edit


def poison_one_entry(sd):
    sd[BIG][0, 0] = float("nan")


@pytest.mark.parametrize("edit,what", [(fill_every_tensor(float("inf")), "every checked entry"),
                                       (fill_every_tensor(float("nan")), "every checked entry"),
                                       (poison_one_entry, "finite entries do not differ")])
def test_nonfinite_merge_equal_to_the_base_elsewhere_is_not_determined(coll, tmp_path, capsys, edit, what):
    """When NaN/Inf is all that departs from θ₀ there is nothing to fit: one non-finite error and 'not
    determined', never λ = 0 beside 'unchanged' (the fit on the finite entries saw no change)."""
    root, base, fts = coll
    bad = edited(base, tmp_path / "bad", edit)
    out = tmp_path / "chk"
    assert main(["check-merge", "--base", str(base), "--merged", str(bad), *map(str, fts), "--out", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    rep = json.loads((out / "check.json").read_text())
    assert rep["classification"] == "undetermined" and rep["lambda_global"] is None and rep["per_layer"] == {}
    assert [(f["level"], f["finding"]) for f in rep["findings"]] == [("error", "nonfinite"), ("info", "not_determined")]
    assert what in kinds(rep)["not_determined"]["message"]
    assert printed.startswith("undetermined: λ not determined") and "λ = [" not in printed
    assert "unchanged" not in printed and "equals the base" not in printed


def test_tensors_with_no_finite_entry_do_not_vote(coll, tmp_path):
    """Tensors that are all Inf hold no evidence: λ comes from the other tensors (it read 0, beside a
    'task_arithmetic' verdict and 'tensors do not fit', when two thirds of the tensors were Inf), and the
    [ok] verdict says it holds on the finite tensors only (it read as if it held for the whole model)."""
    root, base, fts = coll
    good = merge_checkpoints(base, fts, "task_arithmetic", MergeParams(weights=(0.3, 0.5, 0.7)), tmp_path / "m",
                             progress=False)

    def two_thirds_inf(sd):
        for i, name in enumerate(sorted(sd)):
            if i % 3:
                sd[name].fill_(float("inf"))

    rep = check_merge(base, edited(good, tmp_path / "bad", two_thirds_inf), fts, progress=False)
    assert rep["classification"] == "task_arithmetic"
    assert np.abs(np.array(rep["lambda_global"]) - [0.3, 0.5, 0.7]).max() <= 1e-5
    assert len(rep["nonfinite"]) > rep["n_tensors_checked"] / 2 > len(rep["tensors"])
    assert "tensors_do_not_fit" not in kinds(rep) and kinds(rep)["nonfinite"]["level"] == "error"
    ok = kinds(rep)["task_arithmetic"]  # true of the finite tensors only, and it says so
    assert ok["message"].endswith(f"; holds on the {len(rep['tensors'])} of {rep['n_tensors_checked']} tensors "
                                  "that are finite only")


def test_merge_equal_to_the_base_reads_as_unchanged_without_numpy_warnings(coll, tmp_path):
    """θ_m = θ₀ (τ_merged = 0), where GPT-2's zero biases leave entries with θ_m = θ₀ = 0: one clean finding,
    classified 'unchanged', and no numpy RuntimeWarning (the subset fit divided 0 by a zero tolerance)."""
    root, base, fts = coll
    same = shutil.copytree(base, tmp_path / "same")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rep = check_merge(base, same, fts, progress=False)
    assert rep["classification"] == "unchanged"
    assert [(f["level"], f["finding"]) for f in rep["findings"]] == [("error", "unchanged")]


def test_check_merge_bad_input(coll, tmp_path):
    root, base, fts = coll
    with pytest.raises(TaskvecError, match="fine-tuned models"):
        check_merge(base, fts[0], [], progress=False)
    big = save_hf(perturbed(tiny_model("gpt2", seed=0, vocab_size=160), seed=5), tmp_path / "bigvocab")
    with pytest.raises(TaskvecError, match="vocabulary"):
        check_merge(base, fts[0], [big], progress=False)


def test_predicted_retention_closed_form():
    g = np.random.default_rng(0)
    jtau = {"a": g.normal(size=(2, 5, 3)), "b": g.normal(size=(2, 5, 3))}
    lam = [0.7, 0.4]
    out = predicted_retention(jtau, lam, measured={"a": 0.9 * (0.7 * jtau["a"][0] + 0.4 * jtau["a"][1])})
    own = jtau["a"][0].ravel()
    pred = 0.7 * own + 0.4 * jtau["a"][1].ravel()
    assert out["a"]["predicted_retention"] == pytest.approx(pred @ own / (own @ own), rel=1e-12)
    assert out["a"]["predicted_interference"] == pytest.approx(
        0.4 * np.linalg.norm(jtau["a"][1]) / np.linalg.norm(own), rel=1e-12)
    assert out["a"]["measured_retention"] == pytest.approx(0.9 * out["a"]["predicted_retention"], rel=1e-12)
    assert out["a"]["relative_error"] == pytest.approx(0.1 / 0.9, rel=1e-12)
    assert out["a"]["cosine"] == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(out["a"]["predicted_change"], 0.7 * jtau["a"][0] + 0.4 * jtau["a"][1], rtol=1e-12)
    assert out["a"]["measured_change_norm"] == pytest.approx(0.9 * np.linalg.norm(pred), rel=1e-12)
    ownb = jtau["b"][1].ravel()
    assert out["b"]["self_term"] == 0.4 and "measured_retention" not in out["b"]
    assert out["b"]["predicted_retention"] == pytest.approx(
        (0.7 * jtau["b"][0].ravel() + 0.4 * ownb) @ ownb / (ownb @ ownb), rel=1e-12)
    with pytest.raises(TaskvecError, match="rows"):
        predicted_retention({"a": jtau["a"][:1], "b": jtau["b"]}, lam)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_merges_are_judged_against_their_rounding(coll, tmp_path, dtype):
    root, base, fts = coll
    w = (0.3, 0.5, 0.7)
    out = merge_checkpoints(base, fts, "task_arithmetic", MergeParams(weights=w), tmp_path / "ta", progress=False,
                            out_dtype=dtype)
    rep = check_merge(base, out, fts, progress=False)
    assert rep["classification"] == "task_arithmetic"
    assert np.abs(np.array(rep["lambda_global"]) - w).max() < 1e-3
    assert not any(f["level"] == "error" for f in rep["findings"]), rep["findings"]
    out = merge_checkpoints(base, fts, "dare_ties", MergeParams(densities=(0.5,)), tmp_path / "dt", progress=False,
                            out_dtype=dtype)
    assert check_merge(base, out, fts, progress=False)["classification"] == "dare_ties"


def test_check_scope_leaves_vocabulary_out(coll, tmp_path):
    root, base, fts = coll
    big = save_hf(perturbed(tiny_model("gpt2", seed=0, vocab_size=160), seed=5), tmp_path / "bigvocab")
    out = merge_checkpoints(base, [fts[0], big], "task_arithmetic", MergeParams(), tmp_path / "m", progress=False,
                            scope="body")
    rep = check_merge(base, out, [fts[0], big], scope="body", progress=False)
    assert rep["classification"] == "task_arithmetic"
    assert rep["not_checked"]["transformer.wte.weight"] == "outside --scope"


def test_small_tensor_with_a_spurious_ratio_mode_is_not_a_misfit():
    """Real tensors (tests/data: the demo's MiniLM fine-tunes, TIES density 0.2 by taskvec merge): Adam
    moves small tensors by repeated step sizes, so in encoder.layer.5.output.LayerNorm.bias (384 entries)
    task 0's ratio mode is a spurious 0.285 and the tensor looked like a misfit (explained 0.69). The
    other tensors' coefficients explain it; a correct merge must not be flagged."""
    from pathlib import Path

    from taskvec.checkpoints import MemoryCheckpoint

    sd = load_file(str(Path(__file__).parent / "data" / "minilm_ties_layer5_small.safetensors"))
    part = lambda who: MemoryCheckpoint(who, {k.split("/", 1)[1]: v for k, v in sd.items()  # noqa: E731
                                              if k.startswith(who + "/")})
    rep = check_merge(part("base"), part("merged"), [part(f"ft{i}") for i in range(3)], progress=False)
    assert rep["classification"] == "ties"
    assert "tensors_do_not_fit" not in kinds(rep), kinds(rep)["tensors_do_not_fit"]["message"]
    row = next(r for r in rep["tensors"] if r["name"] == "encoder.layer.5.output.LayerNorm.bias")
    assert row["explained_fraction"] > 0.95 and min(row["kept_fraction"]) > 0.05


def test_printed_lambdas_drop_rounding_noise():
    """check-merge prints a λ that is float noise beside the others (−5e-17 next to 1) as 0, not −5.24e-17."""
    from taskvec.commands.check_merge import _lambda_text

    lam = [1.0, -5.24e-17, 0.3, 2e-6]
    assert [_lambda_text(x, lam) for x in lam] == ["1", "0", "0.3", "2e-06"]
    assert [_lambda_text(x, [0.0, 0.0]) for x in (0.0, 0.0)] == ["0", "0"]
