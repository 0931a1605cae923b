"""`taskvec check-merge --data`: kernel-predicted per-task change of a merge next to the measured one.

References are computed here without taskvec's AD code: the Jacobian of a float64 copy of the tiny
BERT (+ mean pool + head) by `torch.func.jacrev`, one unpadded example at a time, times τ_t read from
the saved files; the measured change by a plain forward pass of the merged folder.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny import CORPUS, perturbed, save_hf, tiny_model, tiny_tokenizer
from torch.func import functional_call, jacrev
from transformers import BertModel

from taskvec.cli import main
from taskvec.merge.retention_data import retention_from_paths, verdicts
from taskvec.outputs import LinearHead

WEIGHTS = ("0.7", "0.4", "0.9")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _build(root, scale, n_tasks, head_m=1):
    tok = tiny_tokenizer(kind="encoder")
    base = tiny_model("bert", seed=0)
    save_hf(base, root / "base", tok)
    LinearHead(32, head_m, seed=3).save(root / "base")
    fts = [save_hf(perturbed(base, scale=scale, seed=40 + t), root / f"ft{t}") for t in range(n_tasks)]
    data = [_jsonl(root / f"task{t}.jsonl", [{"text": CORPUS[(3 * t + i) % 8], "label": 0.1 * i - 0.2 * t}
                                             for i in range(5)]) for t in range(n_tasks)]
    assert main(["merge", "--base", str(root / "base"), "--method", "task_arithmetic", *map(str, fts),
                 "--weight", *WEIGHTS[:n_tasks], "--out", str(root / "merged"), "--no-progress"]) == 0
    return tok, root / "base", fts, root / "merged", data


def _check(root, base, fts, merged, data, *extra):
    out = root / "check"
    code = main(["check-merge", "--base", str(base), "--merged", str(merged), *map(str, fts), "--out", str(out),
                 "--data", *map(str, data), "--output", "regression", "--no-progress", *extra])
    assert code == 0
    return json.loads((out / "check.json").read_text()), out


def _weights(folder):
    return {k: v.double() for f in sorted(folder.glob("*.safetensors")) if f.name.startswith("model")
            for k, v in load_file(f).items()}


def _f64(folder, head):
    """Body of `folder` in float64 and f(params, text) = head(mean over tokens of the last hidden state)."""
    model = BertModel.from_pretrained(folder, attn_implementation="eager", add_pooling_layer=False).double().eval()
    W, b = head.linear.weight.double(), head.linear.bias.double()

    def f(params, ids):
        hidden = functional_call(model, params, args=(ids,)).last_hidden_state
        return hidden[0].mean(0) @ W.T + b
    return model, f


def _reference(tok, base, fts, merged, texts, lambdas, head=None):
    """Σ λ_t J τ_t (jacrev, float64), f(θ₀), f(θ_m) and f(θ_t) for each text: arrays [n, m]."""
    head = head or LinearHead.load(base)
    model, f = _f64(base, head)
    params = {k: v.detach() for k, v in model.named_parameters()}
    w0 = _weights(base)
    taus = [{k: (v - w0[k]) for k, v in _weights(ft).items()} for ft in fts]
    for tau in taus:
        assert set(params) <= set(tau)
    merged_model, _ = _f64(merged, head)
    mparams = dict(merged_model.named_parameters())
    ft_params = [dict(_f64(ft, head)[0].named_parameters()) for ft in fts]
    pred, f0, fm, fts_out = [], [], [], []
    for text in texts:
        ids = torch.tensor([tok(text)["input_ids"]])
        J = jacrev(f)(params, ids)
        pred.append(sum(lam * sum((J[k] * tau[k]).flatten(1).sum(1) for k in params)
                        for lam, tau in zip(lambdas, taus)))
        with torch.no_grad():
            f0.append(f(params, ids))
            fm.append(f(mparams, ids))
            fts_out.append([f(p, ids) for p in ft_params])
    stack = lambda xs: torch.stack(xs).numpy()  # noqa: E731
    return stack(pred), stack(f0), stack(fm), np.array([[y.numpy() for y in row] for row in fts_out])


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def coll(tmp_path_factory):
    root = tmp_path_factory.mktemp("ret")
    return root, *_build(root, scale=1e-2, n_tasks=2)


def _texts(path, key="text"):
    return [json.loads(line)[key] for line in path.read_text().splitlines()]


def test_predicted_and_measured_change_match_brute_force(coll, capsys):
    root, tok, base, fts, merged, data = coll
    capsys.readouterr()
    rep, out = _check(root, base, fts, merged, data)
    printed = capsys.readouterr().out
    lam = rep["lambda_global"]
    assert np.allclose(lam, [float(w) for w in WEIGHTS[:2]], atol=1e-5)
    ret = rep["retention"]
    assert ret["lambdas"] == lam and list(ret["tasks"]) == ["ft0", "ft1"]
    texts = [t for d in data for t in _texts(d)]
    pred_all, f0_all, fm_all, fft_all = _reference(tok, base, fts, merged, texts, lam)
    for a, name in enumerate(ret["tasks"]):
        r, rows = ret["tasks"][name], slice(5 * a, 5 * a + 5)
        pred, f0, fm, fft = pred_all[rows], f0_all[rows], fm_all[rows], fft_all[rows]
        labels = np.array(_texts(data[a], "label"))
        assert _rel(r["predicted_change"], pred) <= 1e-5
        assert _rel(r["measured_change"], fm - f0) <= 1e-5
        assert _rel(r["own_measured_change"], fft[:, a] - f0) <= 1e-5
        own = np.asarray(r["own_predicted_change"])
        assert r["predicted_retention"] == pytest.approx(float((pred * own).sum() / (own ** 2).sum()), rel=1e-5)
        meas = fm - f0
        assert r["measured_retention"] == pytest.approx(float((meas * own).sum() / (own ** 2).sum()), rel=1e-4)
        # at scale 1e-2 the fine-tunes leave the kernel regime: the prediction is visibly not the measurement
        assert r["relative_error"] > 1e-2
        assert r["slope"] == pytest.approx(float((pred * meas).sum() / (pred ** 2).sum()), rel=1e-4)
        assert f"retention: {name}: retention predicted {r['predicted_retention']:.4g}" in printed
        m = r["metric"]
        assert m["name"] == "mse"
        assert m["merged_measured"] == pytest.approx(float(np.mean((fm[:, 0] - labels) ** 2)), rel=1e-5)
        assert m["merged_predicted"] == pytest.approx(float(np.mean((f0[:, 0] + pred[:, 0] - labels) ** 2)), rel=1e-5)
        assert m["base"] == pytest.approx(float(np.mean((f0[:, 0] - labels) ** 2)), rel=1e-5)
    assert (out / "check_merge_retention.png").is_file() and (out / "check_merge_retention.pdf").is_file()
    assert sum(f["finding"] == "retention" for f in rep["findings"]) == 2


def test_small_perturbations_predicted_equals_measured(tmp_path):
    """Fine-tunes 2e-4·N(0,1) away from θ₀ (1% of the tiny BERT's weight scale): the merge is linear."""
    _, base, fts, merged, data = _build(tmp_path, scale=2e-4, n_tasks=2)
    ret = retention_from_paths(base, merged, fts, data, [0.7, 0.4], output="regression", progress=False)
    for name, r in ret["tasks"].items():
        assert r["relative_error"] <= 1e-2 and r["own_relative_error"] <= 1e-2
        assert r["cosine"] > 0.9999 and r["slope"] == pytest.approx(1.0, abs=2e-2) and r["spearman"] > 0.8
        assert r["measured_retention"] == pytest.approx(r["predicted_retention"], rel=1e-2)
        assert r["measured_interference"] == pytest.approx(r["predicted_interference"], rel=2e-2)
    assert [v["level"] for v in verdicts(ret)] == ["ok", "ok"]


def test_multi_output_head_all_columns(coll, tmp_path):
    """A 2-output head given explicitly: every column predicted (the Evaluator reads one column at a time)."""
    root, tok, base, fts, merged, data = coll
    LinearHead(32, 2, seed=5).save(tmp_path / "head2")
    ret = retention_from_paths(base, merged, fts[1:], data[1:], [0.4], output="regression",
                               head=tmp_path / "head2", progress=False)
    r = ret["tasks"]["ft1"]
    assert np.shape(r["predicted_change"]) == (5, 2) and r["metric"] is None  # 2 outputs vs scalar labels
    pred, f0, fm, _ = _reference(tok, base, fts[1:], merged, _texts(data[1]), [0.4],
                                 head=LinearHead.load(tmp_path / "head2"))
    assert _rel(r["predicted_change"], pred) <= 1e-5
    assert _rel(r["measured_change"], fm - f0) <= 1e-5


def test_bad_data_input(coll, tmp_path, capsys):
    root, tok, base, fts, merged, data = coll
    common = ["check-merge", "--base", str(base), "--merged", str(merged), *map(str, fts), "--no-progress",
              "--output", "regression"]
    assert main([*common, "--out", str(tmp_path / "a"), "--data", *map(str, data[:1])]) == 2
    assert "--data gives 1 JSONL file(s) but there are 2 fine-tunes" in capsys.readouterr().err
    bad = _jsonl(tmp_path / "bad.jsonl", [{"text": "the movie", "label": 1.0}, {"label": 2.0}])
    assert main([*common, "--out", str(tmp_path / "b"), "--data", str(data[0]), str(bad)]) == 2
    assert f"{bad}:2:" in capsys.readouterr().err
    lm = _jsonl(tmp_path / "lm.jsonl", [{"prompt": "what is", "target": " 7"}, {"text": "no target"}])
    args = ["check-merge", "--base", str(base), "--merged", str(merged), *map(str, fts), "--no-progress",
            "--output", "logprob", "--out", str(tmp_path / "c"), "--data", str(lm), str(lm)]
    assert main(args) == 2
    assert f"{lm}:2: output 'logprob' needs fields 'prompt' and 'target'" in capsys.readouterr().err
    textual = _jsonl(tmp_path / "t.jsonl", [{"text": "the movie", "label": "high"}])
    assert main([*common, "--out", str(tmp_path / "d"), "--data", str(textual), str(data[1])]) == 2
    assert f"{textual}:1: regression label 'high' is not a number" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "abcd")


def test_causal_lm_logprob(tmp_path):
    """logprob on a tiny GPT-2 (tied embeddings): the measured change equals a float64 forward pass of the
    merged folder; the kernel prediction's error is second order (×4 when the fine-tunes move 4× further)."""
    from transformers import GPT2LMHeadModel

    from taskvec.merge import MergeParams, merge_checkpoints
    from taskvec.outputs import encode_prompt_target

    tok = tiny_tokenizer()
    base = tiny_model("gpt2", seed=0)
    save_hf(base, tmp_path / "base", tok)
    rows = [[{"prompt": "what is 3 plus 4 ?", "target": " 7"}, {"prompt": "the movie was", "target": " wonderful"},
             {"prompt": "calculate 6 times 7 .", "target": " 42"}],
            [{"prompt": "the market", "target": " rose sharply"}, {"prompt": "worst purchase", "target": " ever"},
             {"prompt": "i love this phone ,", "target": " battery lasts"}]]
    data = [_jsonl(tmp_path / f"lm{t}.jsonl", r) for t, r in enumerate(rows)]

    def logprob(folder, ex):
        model = GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").double().eval()
        ids, n_prompt = encode_prompt_target(tok, ex["prompt"], ex["target"])
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
        return float(sum(logp[i - 1, ids[i]] for i in range(n_prompt, len(ids))))

    errors = {}
    for scale in (1e-4, 4e-4):
        fts = [save_hf(perturbed(base, scale=scale, seed=60 + t), tmp_path / f"{scale}" / f"lm{t}") for t in range(2)]
        merged = merge_checkpoints(tmp_path / "base", fts, "task_arithmetic", MergeParams(weights=(0.5, 0.8)),
                                   tmp_path / f"{scale}" / "merged", progress=False)
        ret = retention_from_paths(tmp_path / "base", merged, fts, data, [0.5, 0.8], output="logprob",
                                   progress=False)
        errors[scale] = np.array([r["relative_error"] for r in ret["tasks"].values()])
        if scale != 1e-4:
            continue
        for t, r in enumerate(ret["tasks"].values()):
            want = np.array([[logprob(merged, ex) - logprob(tmp_path / "base", ex)] for ex in rows[t]])
            assert _rel(r["measured_change"], want) <= 1e-3  # f ~ -10 in float32, change ~ 1e-3
            assert r["relative_error"] <= 2e-2 and r["cosine"] > 0.999
            assert r["metric"]["name"] == "mean_logprob"
            assert r["metric"]["base"] == pytest.approx(np.mean([logprob(tmp_path / "base", ex) for ex in rows[t]]),
                                                        rel=1e-5)
            assert r["metric"]["merged_measured"] - r["metric"]["base"] == pytest.approx(want.mean(), rel=1e-3)
    ratio = errors[4e-4] / errors[1e-4]
    assert np.all((ratio > 2.5) & (ratio < 6)), ratio


def test_pooler_left_out(tmp_path):
    """A BERT saved with its pooler (as sentence-transformers models are): f mean-pools, so the pooler's
    tensors are left out of J·τ and θ_m − θ₀ and listed, not an error."""
    from tiny import tiny_config

    from taskvec.merge import MergeParams, merge_checkpoints

    torch.manual_seed(0)
    cfg = tiny_config("bert")
    cfg._attn_implementation = "eager"
    base = BertModel(cfg).eval()  # with pooler
    tok = tiny_tokenizer(kind="encoder")
    save_hf(base, tmp_path / "base", tok)
    LinearHead(32, 1, seed=3).save(tmp_path / "base")
    fts = [save_hf(perturbed(base, scale=2e-4, seed=80 + t), tmp_path / f"ft{t}") for t in range(2)]
    merged = merge_checkpoints(tmp_path / "base", fts, "task_arithmetic", MergeParams(weights=(0.5, 0.5)),
                               tmp_path / "merged", progress=False)
    data = [_jsonl(tmp_path / f"d{t}.jsonl", [{"text": CORPUS[t + i]} for i in range(3)]) for t in range(2)]
    ret = retention_from_paths(tmp_path / "base", merged, fts, data, [0.5, 0.5], output="regression",
                               progress=False)
    assert ret["tensors_not_in_model"] == ["pooler.dense.bias", "pooler.dense.weight"]
    assert all(r["relative_error"] <= 3e-2 and r["metric"] is None for r in ret["tasks"].values())


def test_names_and_an_unlabeled_line_are_reported(coll, tmp_path, capsys):
    """--names labels the tasks everywhere; a data file with an unlabeled line says why it has no metric."""
    root, tok, base, fts, merged, data = coll
    partial = _jsonl(tmp_path / "partial.jsonl", [{"text": "a good film", "label": 0.3}, {"text": "dull"}])
    out = tmp_path / "named"
    capsys.readouterr()
    assert main(["check-merge", "--base", str(base), "--merged", str(merged), *map(str, fts), "--out", str(out),
                 "--data", str(data[0]), str(partial), "--output", "regression", "--no-progress",
                 "--names", "movies,nyt"]) == 0
    printed = capsys.readouterr().out
    rep = json.loads((out / "check.json").read_text())
    assert rep["tasks"] == ["movies", "nyt"] and rep["sources"] == [str(f) for f in fts]
    assert list(rep["retention"]["tasks"]) == ["movies", "nyt"]
    assert rep["retention"]["tasks"]["movies"]["metric"]["name"] == "mse"
    nyt = rep["retention"]["tasks"]["nyt"]
    assert nyt["metric"] is None and nyt["metric_missing"] == f"1 of 2 examples in {partial} have no label"
    assert f"no task metric: 1 of 2 examples in {partial} have no label" in printed
    assert main(["check-merge", "--base", str(base), "--merged", str(merged), *map(str, fts), "--out",
                 str(tmp_path / "bad"), "--names", "only-one", "--no-progress"]) == 2
    assert "--names has 1 name for 2 fine-tunes" in capsys.readouterr().err


def test_a_merge_holding_nan_is_reported_not_refused_when_data_is_given(tmp_path, capsys):
    """NaN in the merged weights: the tensor check is written (non-finite error) and retention is skipped
    with a finding, rather than the whole run failing after the tensor pass and writing nothing."""
    from tiny import edited

    tok, base, fts, merged, data = _build(tmp_path, 1e-3, 2)
    name = next(iter(_weights(merged)))

    def poison(sd):
        sd[name].view(-1)[0] = float("nan")

    bad = edited(merged, tmp_path / "bad", poison)
    rep, out = _check(tmp_path, base, fts, bad, data)
    kinds = {f["finding"]: f for f in rep["findings"]}
    assert list(rep["nonfinite"]) == [name] and kinds["nonfinite"]["level"] == "error"
    assert "NaN/Inf in 1 tensor(s)" in kinds["retention_skipped"]["message"] and "retention" not in rep
    assert "retention_skipped" in capsys.readouterr().out


def test_causal_lm_margin_and_logits_with_label_words(tmp_path, capsys):
    """check-merge --output margin --label-words on a tiny GPT-2 (one-token words ' the', ' was'): the measured
    change is a float64 forward pass's z_was − z_the at the last prompt token, merged minus base; fine-tunes
    1% away from θ₀ are predicted closely; labels given as label words give an accuracy. logits: both words."""
    from transformers import GPT2LMHeadModel

    tok, words = tiny_tokenizer(), [" the", " was"]
    ids = [tok.convert_tokens_to_ids(w.strip()) for w in words]
    base = tiny_model("gpt2", seed=0)
    save_hf(base, tmp_path / "base", tok)
    fts = [save_hf(perturbed(base, scale=2e-4, seed=70 + t), tmp_path / f"ft{t}") for t in range(2)]
    assert main(["merge", "--base", str(tmp_path / "base"), "--method", "task_arithmetic", *map(str, fts),
                 "--weight", "0.6", "0.9", "--out", str(tmp_path / "merged"), "--no-progress"]) == 0
    rows = [[{"text": " ".join(CORPUS[(3 * t + i) % 8].split()[:4]), "label": words[i % 2]} for i in range(4)]
            for t in range(2)]
    data = [_jsonl(tmp_path / f"d{t}.jsonl", r) for t, r in enumerate(rows)]

    def label_logits(folder, texts):
        model = GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").double().eval()
        with torch.no_grad():
            return np.array([model(torch.tensor([tok(x)["input_ids"]])).logits[0, -1, ids].numpy() for x in texts])

    common = ["check-merge", "--base", str(tmp_path / "base"), "--merged", str(tmp_path / "merged"), *map(str, fts),
              "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "c"), "--data", *map(str, data), "--output", "margin",
                 "--label-words", " the, was"]) == 0
    assert "retention: ft0: retention predicted" in capsys.readouterr().out
    ret = json.loads((tmp_path / "c" / "check.json").read_text())["retention"]
    assert ret["output"]["label_words"] == words and ret["output"]["m"] == 1
    for t, r in enumerate(ret["tasks"].values()):
        texts = [ex["text"] for ex in rows[t]]
        z0, zm = label_logits(tmp_path / "base", texts), label_logits(tmp_path / "merged", texts)
        want = (zm[:, 1] - zm[:, 0] - (z0[:, 1] - z0[:, 0]))[:, None]
        assert _rel(r["measured_change"], want) <= 1e-3
        assert r["relative_error"] <= 2e-2 and r["cosine"] > 0.999
        labels = np.array([words.index(ex["label"]) for ex in rows[t]])
        assert r["metric"]["name"] == "accuracy"
        assert r["metric"]["base"] == pytest.approx(np.mean((z0[:, 1] > z0[:, 0]) == (labels == 1)))
    ret = retention_from_paths(tmp_path / "base", tmp_path / "merged", fts, data, [0.6, 0.9], output="logits",
                               label_words=words, progress=False)
    r = ret["tasks"]["ft1"]
    z0, zm = (label_logits(tmp_path / f, [ex["text"] for ex in rows[1]]) for f in ("base", "merged"))
    assert np.shape(r["predicted_change"]) == (4, 2) and _rel(r["measured_change"], zm - z0) <= 1e-3
    assert main([*common, "--out", str(tmp_path / "e"), "--label-words", " the, was"]) == 2
    assert "--label-words" in capsys.readouterr().err and not (tmp_path / "e").exists()


def test_bad_output_options_fail_before_the_tensor_pass(tmp_path, capsys, monkeypatch):
    """check-merge --data with output options the model cannot take (one label word for a causal LM's margin)
    says so before reading a single tensor, and writes nothing."""
    import taskvec.merge.check as check

    tok = tiny_tokenizer()
    base = tiny_model("gpt2", seed=0)
    save_hf(base, tmp_path / "base", tok)
    fts = [save_hf(perturbed(base, scale=2e-4, seed=80 + t), tmp_path / f"ft{t}") for t in range(2)]
    data = [_jsonl(tmp_path / f"d{t}.jsonl", [{"text": "the cat", "label": " the"}]) for t in range(2)]

    def no_tensor_pass(*a, **k):
        raise AssertionError("the tensor pass ran before the output options were checked")

    monkeypatch.setattr(check, "check_merge", no_tensor_pass)
    assert main(["check-merge", "--base", str(tmp_path / "base"), "--merged", str(fts[0]), *map(str, fts),
                 "--out", str(tmp_path / "c"), "--no-progress", "--data", *map(str, data), "--output", "margin",
                 "--label-words", " the"]) == 2
    assert "≥ 2 label words" in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_a_merge_equal_to_the_base_skips_retention_and_zero_changes_are_said_in_words(coll, tmp_path, capsys):
    """θ_m = θ₀: check-merge --data reports 'unchanged' and one 'retention_skipped', not a retention warning
    of 'off by nan%'. The verdicts themselves never print nan: with no change predicted or measured there is
    nothing to compare (info); a change predicted but none measured is a warning that gives both norms."""
    import shutil

    root, tok, base, fts, merged, data = coll
    same = shutil.copytree(base, tmp_path / "same")
    capsys.readouterr()
    rep, _ = _check(tmp_path, base, fts, same, data)
    printed = capsys.readouterr().out
    assert [(f["level"], f["finding"]) for f in rep["findings"]] == [("error", "unchanged"),
                                                                     ("error", "retention_skipped")]
    assert "equals the base" in rep["findings"][1]["message"] and "retention" not in rep
    assert "nan" not in printed
    nothing = verdicts(retention_from_paths(base, same, fts, data, [0.0, 0.0], output="regression", progress=False))
    assert [v["level"] for v in nothing] == ["info", "info"]
    assert all("no change to compare" in v["message"] and "nan" not in v["message"] for v in nothing)
    claimed = verdicts(retention_from_paths(base, same, fts, data, [0.7, 0.4], output="regression", progress=False))
    assert [v["level"] for v in claimed] == ["warning", "warning"]
    assert all("but measured change of norm 0;" in v["message"] and "nan" not in v["message"] for v in claimed)
    # a fine-tune equal to the base moves none of its task's outputs on its own: retention and interference
    # (ratios to that change) are said to be undefined, next to how well the merge's change was predicted
    idle = verdicts(retention_from_paths(base, merged, [same, fts[1]], data, [0.7, 0.4], output="regression",
                                         progress=False, names=["same", "ft1"]))
    assert "retention and interference not defined" in idle[0]["message"]
    assert "predicted change off by" in idle[0]["message"] and "nan" not in idle[0]["message"]
    assert "retention predicted" in idle[1]["message"]


def test_finetunes_after_data_are_named_not_a_usage_dump(tmp_path, capsys):
    """`--data a.jsonl b.jsonl ft1 ft2` swallows the fine-tunes: the error says so and how to order them."""
    base = save_hf(tiny_model("gpt2", seed=0), tmp_path / "base", tiny_tokenizer())
    assert main(["check-merge", "--base", str(base), "--merged", str(base), "--out", str(tmp_path / "c"),
                 "--output", "regression", "--data", "a.jsonl", "b.jsonl", "ft1", "ft2"]) == 2
    err = capsys.readouterr().err
    assert "--data took every path after it (a.jsonl, b.jsonl, ft1, ft2); list the fine-tunes before --data" in err
    assert "usage:" not in err and not (tmp_path / "c").exists()
    assert main(["check-merge", "--base", str(base), "--merged", str(base), "--out", str(tmp_path / "c")]) == 2
    assert "no fine-tuned models given; list the fine-tunes" in capsys.readouterr().err
