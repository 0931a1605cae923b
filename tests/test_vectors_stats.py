"""`taskvec vectors` statistics against direct computations on fully loaded float64 tensors (≤ 1e-6 rel.)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from checkpoints_zoo import make_collection, make_lora, state
from taskvec.checkpoints import canonical_name, open_checkpoint
from taskvec.cli import main
from taskvec.scope import group_of, resolve_scope
from taskvec.vector_stats import collection_stats, effective_rank, n_top
from tiny import save_hf, tiny_model

KS = (1.0, 10.0, 50.0)




def _reference(base_sd, ft_sds, names_in_scope):
    """Every statistic from full float64 tensors, by the definitions in taskvec.vector_stats.

    ft_sds: full state dicts, or ("delta", {name: ΔW}) for a LoRA adapter (zero where absent)."""
    bc = {canonical_name(k): v for k, v in base_sd.items()}
    taus = []
    for sd in ft_sds:
        if isinstance(sd, tuple):
            taus.append({n: sd[1][n].double() if n in sd[1] else torch.zeros_like(bc[canonical_name(n)],
                                                                                  dtype=torch.float64)
                         for n in names_in_scope})
            continue
        fc = {canonical_name(k): v for k, v in sd.items()}
        taus.append({n: fc[canonical_name(n)].double() - bc[canonical_name(n)].double() for n in names_in_scope})
    T = len(taus)
    out = {"tensors": {}, "groups": {}}
    tot = {"gram": np.zeros((T, T)), "base": 0.0, "both": np.zeros((T, T)), "conf": np.zeros((T, T)),
           "multi": 0, "any": 0, "top": np.zeros((len(KS), T)), "inter": np.zeros((len(KS), T, T))}
    groups = {}
    for n in names_in_scope:
        X = torch.stack([t[n].reshape(-1) for t in taus])  # T × numel
        b = bc[canonical_name(n)].double().reshape(-1)
        d = {"gram": (X @ X.T).numpy(), "base": float(b @ b)}
        S = torch.sign(X)
        d["both"] = np.array([[float(((S[i] != 0) & (S[j] != 0)).sum()) for j in range(T)] for i in range(T)])
        d["conf"] = np.array([[float((S[i] * S[j] < 0).sum()) for j in range(T)] for i in range(T)])
        multi = (S != 0).sum(0) >= 2
        d["multi"] = int(multi.sum())
        d["any"] = int((multi & (S.max(0).values > 0) & (S.min(0).values < 0)).sum())
        d["top"] = np.zeros((len(KS), T))
        d["inter"] = np.zeros((len(KS), T, T))
        for i, k in enumerate(KS):
            m = n_top(X.shape[1], k)
            masks = []
            for t in range(T):
                srt = X[t].abs().sort(descending=True).values
                d["top"][i, t] = float((srt[:m] ** 2).sum())
                thr = srt[m - 1]
                masks.append((X[t].abs() >= thr) & (X[t] != 0))
            d["inter"][i] = [[float((masks[s] & masks[t]).sum()) for t in range(T)] for s in range(T)]
        out["tensors"][n] = d
        for key in tot:
            tot[key] = tot[key] + d[key]
        g = groups.setdefault(group_of(n), {k: 0 for k in tot})
        for key in tot:
            g[key] = g[key] + d[key]
        shape = bc[canonical_name(n)].shape
        if len(shape) == 2:
            d["svals"] = [np.linalg.svd(t[n].numpy(), compute_uv=False) for t in taus]
    out["total"] = tot
    out["groups"] = groups
    return out


def _check_summary(got, ref, names):
    norms = np.sqrt(np.diag(ref["gram"]))
    base = math.sqrt(ref["base"])
    assert got["base_norm"] == pytest.approx(base, rel=1e-6)
    for t, name in enumerate(names):
        g = got["tasks"][name] if isinstance(got.get("tasks"), dict) else got["global"][name]
        assert g["norm"] == pytest.approx(norms[t], rel=1e-6, abs=1e-12)
        if base > 0:
            assert g["relative_norm"] == pytest.approx(norms[t] / base, rel=1e-6, abs=1e-12)
        else:  # zero-initialised biases: undefined, reported as NaN (null in JSON)
            assert np.isnan(g["relative_norm"])
        for i, k in enumerate(KS):
            want = ref["top"][i, t] / ref["gram"][t, t] if ref["gram"][t, t] > 0 else None
            if want is None:
                assert g["top_mass"][f"{k:g}"] is None or np.isnan(g["top_mass"][f"{k:g}"])
            else:
                assert g["top_mass"][f"{k:g}"] == pytest.approx(want, rel=1e-6)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = ref["gram"] / np.outer(norms, norms)
        conf = ref["conf"] / ref["both"]
    np.testing.assert_allclose(np.array(got["cosine"], dtype=float), cos, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(np.array(got["sign_conflict"]["pairwise"], dtype=float), conf, rtol=1e-12)
    if ref["multi"]:
        assert got["sign_conflict"]["any"] == pytest.approx(ref["any"] / ref["multi"], rel=1e-12)
    for i, k in enumerate(KS):
        inter = ref["inter"][i]
        sizes = np.diag(inter)
        with np.errstate(invalid="ignore", divide="ignore"):
            jac = inter / (sizes[:, None] + sizes[None, :] - inter)
        np.testing.assert_allclose(np.array(got["mask_overlap"][f"{k:g}"], dtype=float), jac, rtol=1e-12)


@pytest.fixture(scope="module")
def gpt2_coll(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats_gpt2")
    c = make_collection(root, "gpt2", n_ft=2)
    make_lora(c["base_model"], root / "lora", "gpt2")
    c["lora"] = root / "lora"
    return c


@pytest.mark.parametrize("dtype,workers,chunk,bins", [
    (torch.float32, 1, None, None), (torch.float64, 1, None, None),
    (torch.float32, 3, 96, None),   # column ranges split over 3 workers, many blocks each
    (torch.float64, 2, 96, 64),     # sign and mask digits in separate histograms
])
def test_collection_stats_match_full_load(gpt2_coll, dtype, workers, chunk, bins, monkeypatch):
    from taskvec import vector_stats

    if chunk:
        monkeypatch.setattr(vector_stats, "_CHUNK", chunk)
    if bins:
        monkeypatch.setattr(vector_stats, "_HIST_BINS", bins)
    c = gpt2_coll
    fts = [c["ft"][0], c["ft"][1], c["ft0_bf16_sharded"], c["lora"]]
    names = ["a", "b", "a_bf16", "lora"]
    lora = open_checkpoint(c["lora"])  # ΔW itself is checked against peft's merge in test_checkpoints
    sds = [c["ft_sd"][0], c["ft_sd"][1], {k: v.float() for k, v in c["ft0_bf16_sd"].items()},
           ("delta", {k: lora.get(k, dtype) for k in lora.keys()})]
    st = collection_stats(c["base"], fts, names, scope="body", top_k_percent=KS, progress=False, dtype=dtype,
                          workers=workers)
    data = st.to_dict()
    json.dumps(data, allow_nan=True)
    in_scope = resolve_scope(open_checkpoint(c["base"]).keys(), "body")
    ref = _reference(c["base_sd"], sds, in_scope)
    assert data["scope"]["n_tensors"] == len(in_scope) and data["scope"]["out_of_scope"] == ["transformer.wte.weight"]
    _check_summary(data, ref["total"], names)
    for g, r in ref["groups"].items():
        _check_summary(data["layers"][g], r, names)
    for n, r in ref["tensors"].items():
        _check_summary(data["tensors"][n], r, names)
        if "svals" in r:
            for t, name in enumerate(names):
                s_ref = r["svals"][t]
                got = data["tensors"][n]["tasks"][name]
                np.testing.assert_allclose(st.spectra[name][n], s_ref, rtol=1e-6, atol=1e-6 * s_ref[0])
                assert got["effective_rank"] == pytest.approx(effective_rank(s_ref), rel=1e-6)
                assert got["stable_rank"] == pytest.approx((s_ref ** 2).sum() / s_ref[0] ** 2 if s_ref[0] > 0 else 0.0,
                                                          rel=1e-6)
                np.testing.assert_allclose(got["top_singular_values"], s_ref[:8], rtol=1e-6, atol=1e-6 * s_ref[0])
    from taskvec.vector_stats import collection_statistics

    basic = collection_statistics(open_checkpoint(c["base"]), fts, names=names, scope="body", progress=False,
                                  dtype=dtype, basic=True)
    assert basic["config"]["statistics"] == "basic" and basic["mask_overlap"] == {}
    np.testing.assert_allclose(np.array(basic["cosine"]), np.array(data["cosine"]), rtol=1e-12)
    np.testing.assert_allclose([basic["global"][n]["norm"] for n in names], [data["global"][n]["norm"] for n in names],
                               rtol=1e-12)  # the same float64 sums, in another order when workers split the columns
    # LoRA ΔW has rank ≤ r: its effective rank says so
    lora_ranks = [data["tensors"][n]["tasks"]["lora"]["effective_rank"] for n in in_scope
                  if n.endswith("c_attn.weight")]
    assert all(0 < e <= 4 for e in lora_ranks)


def test_effective_rank_closed_form():
    assert effective_rank(np.ones(7)) == pytest.approx(7.0)
    assert effective_rank(np.array([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(np.zeros(3)) == 0.0


def test_added_vocab_rows_and_tied_head(tmp_path):
    base = tiny_model("llama")
    save_hf(base, tmp_path / "base")
    ft = tiny_model("llama", seed=5)
    ft.resize_token_embeddings(131)
    save_hf(ft, tmp_path / "ft")
    st = collection_stats(tmp_path / "base", [tmp_path / "ft"], ["grown"], scope="embeddings", progress=False)
    d = st.to_dict()
    emb = "model.embed_tokens.weight"
    full = ft.state_dict()[emb]
    assert d["added_rows"]["grown"][emb]["ft_rows"] == 131
    assert d["added_rows"]["grown"][emb]["added_norm"] == pytest.approx(float(full[128:].double().norm()), rel=1e-6)
    want = float((full[:128].double() - base.state_dict()[emb].double()).norm())
    assert d["global"]["grown"]["norm"] == pytest.approx(want, rel=1e-6)


def test_cli_vectors_writes_everything(gpt2_coll, tmp_path, capsys):
    c = gpt2_coll
    out = tmp_path / "out"
    rc = main(["vectors", str(c["base"]), str(c["ft"][0]), str(c["ft"][1]), str(c["lora"]), "--names", "a,b,l",
               "--out", str(out), "--scope", "attention", "--no-progress", "--top-k", "5"])
    assert rc == 0
    files = {p.name for p in out.iterdir()}
    assert {"vectors.json", "cosine.png", "cosine.pdf", "layer_norms.png", "layer_norms.pdf", "spectra.png",
            "spectra.pdf", "spectra.npz"} <= files
    data = json.loads((out / "vectors.json").read_text())
    assert data["schema"] == "taskvec.vectors/1" and data["tasks"] == ["a", "b", "l"]
    assert len(data["cosine"]) == 3 and data["cosine"][0][0] == pytest.approx(1.0)
    assert set(data["mask_overlap"]) == {"5"}
    assert "cosine" in capsys.readouterr().out
    # scopes command
    assert main(["scopes", str(c["base"]), "--scope", r"h\.0\.", "--names"]) == 0
    text = capsys.readouterr().out
    assert "attention" in text and "transformer.h.0.attn.c_attn.weight" in text


def test_cli_vectors_names_zero_and_skipped_and_refuses_bad_numbers(gpt2_coll, tmp_path, capsys):
    """A fine-tune equal to the base is said to have τ = 0 (not bare NaNs); a tensor missing from a
    fine-tune is named where it is skipped; nonsensical numbers are refused before any work."""
    import warnings

    c = gpt2_coll
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no matplotlib "no artists with labels" for an all-zero τ
        assert main(["vectors", str(c["base"]), str(c["base"]), str(c["ft"][0]), "--names", "same,a",
                     "--out", str(tmp_path / "z"), "--no-progress"]) == 0
    assert "τ of same is zero" in capsys.readouterr().out
    sd = state(tiny_model("gpt2"))
    sd.pop("transformer.h.1.mlp.c_proj.weight")
    torch.save(sd, tmp_path / "partial.pt")
    assert main(["vectors", str(c["base"]), str(tmp_path / "partial.pt"), "--out", str(tmp_path / "p"),
                 "--no-progress", "--no-figures"]) == 0
    out, err = capsys.readouterr()
    assert "(1 tensor out of scope, 1 skipped)" in out  # a count of one in the singular
    assert ("taskvec vectors: warning: 1 tensor in scope missing in partial.pt (" in err
            and "): transformer.h.1.mlp.c_proj.weight; left out of every task's statistics" in err)
    rec = json.loads((tmp_path / "p" / "vectors.json").read_text())["scope"]["skipped"]
    assert rec == {"transformer.h.1.mlp.c_proj.weight": "missing in partial.pt"}
    # the same fine-tune twice is worth a word (its τ's are identical), not a refusal
    assert main(["vectors", str(c["base"]), str(c["ft"][0]), str(c["ft"][0]), "--names", "x,y",
                 "--out", str(tmp_path / "twice"), "--no-progress", "--no-figures", "--basic"]) == 0
    assert f"warning: {c['ft'][0]} is given twice (as x and y)" in capsys.readouterr().err
    assert main(["vectors", str(c["base"]), str(c["ft"][0]), "--out", "", "--no-progress"]) == 2
    assert "--out is empty" in capsys.readouterr().err
    sd = state(tiny_model("gpt2"))
    sd["transformer.h.9.mlp.c_fc.bias"] = torch.zeros(4)  # a layer the base lacks
    torch.save(sd, tmp_path / "deeper.pt")
    assert main(["vectors", str(c["base"]), str(tmp_path / "deeper.pt"), "--out", str(tmp_path / "d"),
                 "--no-progress", "--no-figures"]) == 0
    assert ("taskvec vectors: warning: deeper.pt holds 1 tensor(s) the base lacks (transformer.h.9.mlp.c_fc.bias), left "
            "out of τ") in capsys.readouterr().err
    assert main(["vectors", str(c["base"]), str(c["ft"][0]), str(c["ft"][1]), "--names", "a,",
                 "--out", str(tmp_path / "e")]) == 2
    assert "task names must be non-empty" in capsys.readouterr().err
    for opt, val in [("--n-singular", "-1"), ("--spectra-max-dim", "-3")]:
        assert main(["vectors", str(c["base"]), str(c["ft"][0]), opt, val, "--out", str(tmp_path / "n")]) == 2
        assert f"{opt} {val} must be" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()


def _bad_inputs(root):
    """(base, fine-tune, expected message) for each bad-input case of the issue."""
    base = tiny_model("gpt2")
    save_hf(base, root / "base")
    cases = {}
    save_hf(tiny_model("gpt_neox"), root / "neox")
    cases["architecture"] = (root / "neox", "gpt_neox model but the base")
    sd = state(base)
    sd["transformer.h.0.attn.c_proj.weight"] = torch.zeros(32, 16)
    torch.save(sd, root / "shape.pt")
    cases["wrong shape"] = (root / "shape.pt", r"transformer\.h\.0\.attn\.c_proj\.weight.*\(32, 16\)")
    f = save_hf(base, root / "trunc") / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])
    cases["truncated"] = (root / "trunc", "truncated")
    sd = state(base)
    sd["transformer.h.1.mlp.c_fc.bias"][7] = float("inf")
    torch.save(sd, root / "inf.pt")
    cases["nan/inf"] = (root / "inf.pt", r"transformer\.h\.1\.mlp\.c_fc\.bias.*NaN/Inf")
    (root / "empty").mkdir()
    cases["empty folder"] = (root / "empty", "no model weights found")
    make_lora(tiny_model("gpt2", hidden=48), root / "lora48", "gpt2")
    cases["lora other base"] = (root / "lora48", "different base model")
    return root / "base", cases


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    return _bad_inputs(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("case", ["architecture", "wrong shape", "truncated", "nan/inf", "empty folder",
                                  "lora other base"])
def test_cli_bad_input_clear_error_nothing_written(bad, case, tmp_path, capsys):
    base, cases = bad
    ft, msg = cases[case]
    out = tmp_path / "out"
    rc = main(["vectors", str(base), str(ft), "--out", str(out), "--no-progress", "--scope", "all"])
    err = capsys.readouterr().err
    assert rc == 2 and "error:" in err
    import re

    assert re.search(msg, err), err
    assert str(ft) in err or str(ft / "model.safetensors") in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    if case in ("nan/inf", "wrong shape", "architecture"):  # the block-streaming --basic path says the same
        assert main(["vectors", str(base), str(ft), "--out", str(out), "--no-progress", "--scope", "all",
                     "--basic"]) == 2
        assert re.search(msg, capsys.readouterr().err) and not out.exists()


def test_gram_singular_values_match_svd():
    from taskvec.vector_stats import _singular_values

    g = torch.Generator().manual_seed(0)
    for shape in [(120, 900), (900, 120)]:
        m = torch.randn(shape, generator=g)
        m[:, :5] *= 50  # a few dominant directions
        ref = np.linalg.svd(m.double().numpy(), compute_uv=False)
        got = _singular_values(m, exact_max_numel=0)
        np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12 * ref[0])
        assert effective_rank(got) == pytest.approx(effective_rank(ref), rel=1e-9)
        # the workspace may live in a free float32 buffer (θ₀'s): same values, and only its front is used
        work = torch.full((m.numel() * 3,), 7.0)
        for limit in (0, None):
            np.testing.assert_array_equal(_singular_values(m, exact_max_numel=limit, work=work),
                                          _singular_values(m, exact_max_numel=limit))
        assert (work[-10:] == 7.0).all()
    low = torch.randn(200, 3, generator=g) @ torch.randn(3, 500, generator=g)  # rank 3
    got = _singular_values(low, exact_max_numel=0)
    ref = np.linalg.svd(low.double().numpy(), compute_uv=False)
    np.testing.assert_allclose(got[:3], ref[:3], rtol=1e-9)
    assert got[3] < 1e-6 * got[0]


def test_top_values_exact_on_both_paths():
    """Top-k of |τ| by the sampled bracket (gathered block by block) and by the full partition agree with a sort."""
    from taskvec.vector_stats import _Blocks, _top_values

    g = np.random.default_rng(0)
    blk = _Blocks(1, torch.float32)
    for a in [g.standard_normal(700_000).astype(np.float32),            # sampled fast path
              np.repeat(g.standard_normal(1000), 700).astype(np.float32),  # heavy ties
              np.zeros(600_000, dtype=np.float32),                        # all zero: fallback
              g.standard_normal(5000).astype(np.float32)]:                # small: full partition
        ms = [n_top(a.size, 1.0), n_top(a.size, 10.0)]
        ref = np.sort(np.abs(a))[::-1]
        x = torch.from_numpy(a.copy())
        no_scratch = _top_values(x, ms, blk)
        if a.size > 8 * 65536 and not a.any():
            assert no_scratch is None  # a large tensor whose bracket misses is left to the scratch owner
        for got in (no_scratch, _top_values(x, ms, blk, scratch=torch.empty(a.size))):
            if got is None:
                continue
            for (thr, mass), m in zip(got, ms):
                assert thr == ref[m - 1]
                assert mass == pytest.approx(np.sum(ref[:m].astype(np.float64) ** 2), rel=1e-12)
        assert torch.equal(x, torch.from_numpy(a))  # τ itself is never modified


def test_default_task_names_tell_sources_apart():
    from taskvec.vectors import default_task_names as _default_names

    assert _default_names(["/r/ft0", "/r/ft1"]) == ["ft0", "ft1"]
    assert _default_names(["/r/movies/checkpoints/epoch-3", "/r/nyt/checkpoints/epoch-3",
                           "/r/nyt/checkpoints/epoch-1"]) == ["movies/epoch-3", "nyt/epoch-3", "nyt/epoch-1"]


def test_basic_streaming_matches_full_on_every_format(tmp_path):
    """--basic reads tensors block by block (positioned reads; whole-tensor fallback for .pt/LoRA)."""
    from taskvec import vector_stats

    c = make_collection(tmp_path, "llama", n_ft=1)
    make_lora(c["base_model"], tmp_path / "lora", "llama")
    grown = tiny_model("llama", seed=7)
    grown.resize_token_embeddings(140)
    save_hf(grown, tmp_path / "grown", max_shard_size="20KB")
    fts = [c["ft"][0], c["ft0_bf16_sharded"], c["ft0_pt"], tmp_path / "lora", tmp_path / "grown"]
    old = vector_stats._CHUNK
    vector_stats._CHUNK = 1000  # many blocks per tensor, ragged last block
    try:
        basic = collection_stats(c["base"], fts, scope="all", basic=True, progress=False).to_dict()
    finally:
        vector_stats._CHUNK = old
    full = collection_stats(c["base"], fts, scope="all", progress=False).to_dict()
    np.testing.assert_allclose(np.array(basic["cosine"]), np.array(full["cosine"]), rtol=1e-12, atol=1e-15)
    for n in basic["tasks"]:
        assert basic["global"][n]["norm"] == pytest.approx(full["global"][n]["norm"], rel=1e-12)
    assert basic["added_rows"] == full["added_rows"] and basic["added_rows"]["grown"]
    for name, t in full["tensors"].items():
        assert basic["tensors"][name]["base_norm"] == pytest.approx(t["base_norm"], rel=1e-12)


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc/stat")
def test_busy_cores_counts_other_processes_not_this_one():
    """The spectra's thread choice: a spinning child process shows as ≈ 1 busy core; this process's own
    past work (which the 1-minute load average would count) does not."""
    import subprocess
    import sys
    import time

    from taskvec.vector_stats import _busy_cores, _spectra_threads

    spin = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 5: pass"])
    try:
        time.sleep(0.3)
        assert _busy_cores(0.5) >= 0.7
        if (os.cpu_count() or 1) <= 2:
            assert _spectra_threads(2) == 1
    finally:
        spin.kill()
        spin.wait()
