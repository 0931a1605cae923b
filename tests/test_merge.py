"""Merge methods against direct references computed here on fully loaded tensors (tiny real GPT-2 files)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import perturbed, save_hf, tiny_model, tiny_tokenizer

from taskvec.errors import TaskvecError
from taskvec.merge import METHODS, MergeParams, get_method, merge_checkpoints
from taskvec.merge.base import tensor_seed
from taskvec.merge.ties import GlobalMagnitudeThreshold

SEEDS = (11, 12, 13)


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    base = tiny_model("gpt2", seed=0)
    save_hf(base, root / "base", tiny_tokenizer())
    fts = []
    for s in SEEDS:
        fts.append(save_hf(perturbed(base, scale=1e-2, seed=s), root / f"ft{s}"))
    return root, root / "base", fts


def load_all(folder):
    """Every tensor of a saved HF folder, fully loaded (the test's own reader: plain safetensors)."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def refs(collection):
    root, base, fts = collection
    b = {k: v.double().numpy() for k, v in load_all(base).items()}
    taus = [{k: load_all(f)[k].double().numpy() - b[k] for k in b} for f in fts]
    return b, taus


def decided(margin):
    """Entries whose elected sign is no float32 round-off tie (|Σ w τ̂| clear of 0, or exactly 0)."""
    return (margin > 1e-6) | (margin == 0)


def merged(folder):
    return {k: v.double().numpy() for k, v in load_all(folder).items()}


def test_registry_lists_the_five_methods():
    assert sorted(METHODS) == ["dare_linear", "dare_ties", "linear", "task_arithmetic", "ties"]
    with pytest.raises(TaskvecError, match="unknown merge method"):
        get_method("slerp")


@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic_matches_reference(collection, tmp_path, normalize):
    root, base, fts = collection
    w, lam = (0.5, 1.25, -0.3), 0.8
    out = merge_checkpoints(base, fts, "task_arithmetic", MergeParams(weights=w, lambda_=lam, normalize=normalize),
                            tmp_path / "m", progress=False, max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").is_file()
    b, taus = refs(collection)
    m = merged(out)
    assert set(m) == set(b)
    for k in b:
        s = sum(wt * t[k] for wt, t in zip(w, taus))
        if normalize:
            s = s / sum(w)
        np.testing.assert_allclose(m[k], b[k] + lam * s, rtol=0, atol=2e-7 * (1 + np.abs(b[k]).max()), err_msg=k)
    rec = json.loads((out / "taskvec_merge.json").read_text())
    assert rec["method"] == "task_arithmetic" and rec["lambda"] == lam and rec["normalize"] is normalize
    assert rec["weights"] == list(w) and len(rec["models"]) == 3
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()


def _ties_reference(b, taus, w, dens, lam, normalize, thresholds=None):
    out = {}
    for k in b:
        trimmed = []
        for t, (tau, rho) in enumerate(zip(taus, dens)):
            x = tau[k].ravel()
            if thresholds is not None:
                keep = np.abs(x) >= thresholds[t]
            else:
                kk = max(1, int(rho * x.size))
                kth = np.sort(np.abs(x))[::-1][kk - 1]
                keep = np.abs(x) >= kth
            trimmed.append(np.where(keep, x, 0.0))
        wt = np.array([wi * ti for wi, ti in zip(w, trimmed)])
        total = wt.sum(0)
        elected = np.where(total >= 0, 1.0, -1.0)
        agree = np.sign(wt) == elected
        num = (wt * agree).sum(0)
        den = (np.array(w)[:, None] * agree).sum(0)
        den[den == 0] = 1
        mixed = num / den if normalize else num
        out[k] = (b[k].ravel() + lam * mixed).reshape(b[k].shape), np.abs(total).ravel()
    return out


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_per_tensor_matches_reference(collection, tmp_path, normalize):
    root, base, fts = collection
    w, dens, lam = (1.0, 0.7, 1.3), (0.3, 0.5, 0.9), 1.1
    out = merge_checkpoints(base, fts, "ties", MergeParams(weights=w, densities=dens, lambda_=lam,
                                                          normalize=normalize), tmp_path / "m", progress=False)
    b, taus = refs(collection)
    m = merged(out)
    for k, (ref, margin) in _ties_reference(b, taus, w, dens, lam, normalize).items():
        ok = decided(margin).reshape(ref.shape)
        np.testing.assert_allclose(m[k][ok], ref[ok], rtol=0, atol=3e-7 * (1 + np.abs(b[k]).max()), err_msg=k)
        assert ok.mean() > 0.99
    rec = json.loads((out / "taskvec_merge.json").read_text())
    assert rec["trim"]["scope"] == "tensor" and rec["densities"] == list(dens)


def test_ties_global_trim_matches_reference(collection, tmp_path):
    root, base, fts = collection
    dens = (0.2, 0.4, 0.6)
    out = merge_checkpoints(base, fts, "ties", MergeParams(densities=dens), tmp_path / "m", progress=False)
    out_g = merge_checkpoints(base, fts, "ties", MergeParams(densities=dens, trim="global"), tmp_path / "g",
                              progress=False)
    b, taus = refs(collection)
    # reference global thresholds: k-th largest |tau| over all tensors of each model, computed in float32
    thr = []
    for tau, rho in zip(taus, dens):
        allv = np.sort(np.concatenate([np.abs(tau[k].astype(np.float32)).ravel() for k in b]))[::-1]
        thr.append(float(allv[int(rho * allv.size) - 1]))
    rec = json.loads((out_g / "taskvec_merge.json").read_text())
    np.testing.assert_allclose(rec["global_trim_thresholds"], thr, rtol=1e-6)
    m, m_tensor = merged(out_g), merged(out)
    for k, (ref, margin) in _ties_reference(b, taus, (1, 1, 1), dens, 1.0, True, thresholds=thr).items():
        ok = decided(margin).reshape(ref.shape)
        np.testing.assert_allclose(m[k][ok], ref[ok], rtol=0, atol=3e-7 * (1 + np.abs(b[k]).max()), err_msg=k)
    assert any(not np.array_equal(m[k], m_tensor[k]) for k in b)  # global and per-tensor trimming differ


def test_global_threshold_is_exact_kth_largest():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(257, 3, generator=g) * 1e-3, torch.randn(1000, generator=g), torch.zeros(40)]
    allv = torch.cat([x.abs().reshape(-1) for x in xs]).sort(descending=True).values
    dens = (0.001, 0.25, 0.999, 1.0)
    est = GlobalMagnitudeThreshold(dens)
    for add in ("coarse", "fine"):
        for t in range(len(dens)):
            for x in xs:
                getattr(est, f"add_{add}")(t, x.abs())
        if add == "coarse":
            est.split()
    got = est.thresholds()
    for d, thr in zip(dens[:3], got):
        assert thr == float(allv[int(d * allv.numel()) - 1])
    assert got[3] == 0.0


def _dare_reference(b, taus, names, w, dens, lam, seed, rescale, elect, normalize):
    out = {}
    for k in names:
        dropped = []
        for t, (tau, rho) in enumerate(zip(taus, dens)):
            x = tau[k].astype(np.float32)
            gen = torch.Generator().manual_seed(tensor_seed(seed, k, t))
            keep = (torch.rand(x.shape, generator=gen) < rho).numpy()
            y = np.where(keep, x, 0).astype(np.float64)
            if rescale == "paper":
                y = y / rho
            elif rescale == "l1":
                y = y * (np.abs(x).sum(dtype=np.float64) / np.abs(y).sum())
            dropped.append(y)
        wt = np.array([wi * yi for wi, yi in zip(w, dropped)])
        if elect:
            agree = np.sign(wt) == np.where(wt.sum(0) >= 0, 1.0, -1.0)
            num = (wt * agree).sum(0)
            den = (np.array(w).reshape((-1,) + (1,) * (wt.ndim - 1)) * agree).sum(0)
            den[den == 0] = 1
        else:
            num, den = wt.sum(0), sum(w)
        out[k] = b[k] + lam * (num / den if normalize else num), np.abs(wt.sum(0))
    return out


@pytest.mark.parametrize("method,rescale,normalize", [("dare_linear", "l1", False), ("dare_linear", "paper", True),
                                                      ("dare_ties", "l1", False), ("dare_ties", "paper", True)])
def test_dare_matches_reference(collection, tmp_path, method, rescale, normalize):
    root, base, fts = collection
    w, dens, lam, seed = (1.0, 0.5, 0.8), (0.3, 0.6, 0.9), 0.9, 7
    out = merge_checkpoints(base, fts, method, MergeParams(weights=w, densities=dens, lambda_=lam, seed=seed,
                                                           rescale=rescale, normalize=normalize),
                            tmp_path / "m", progress=False)
    b, taus = refs(collection)
    m = merged(out)
    for k, (ref, margin) in _dare_reference(b, taus, list(b), w, dens, lam, seed, rescale,
                                            method == "dare_ties", normalize).items():
        ok = decided(margin)
        np.testing.assert_allclose(m[k][ok], ref[ok], rtol=0, atol=3e-7 * (1 + np.abs(b[k]).max()), err_msg=k)
    rec = json.loads((out / "taskvec_merge.json").read_text())
    assert rec["rescale"]["convention"] == rescale and rec["seed"] == seed


def test_dare_reproducible_by_seed_and_keeps_density(collection, tmp_path):
    root, base, fts = collection
    a = merged(merge_checkpoints(base, fts, "dare_linear", MergeParams(densities=(0.3,), seed=3), tmp_path / "a",
                                 progress=False))
    a2 = merged(merge_checkpoints(base, fts, "dare_linear", MergeParams(densities=(0.3,), seed=3), tmp_path / "b",
                                  progress=False))
    c = merged(merge_checkpoints(base, fts, "dare_linear", MergeParams(densities=(0.3,), seed=4), tmp_path / "c",
                                 progress=False))
    assert all(np.array_equal(a[k], a2[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)
    # one model: kept fraction ≈ density (binomial, 5 sigma) and the l1 rescale keeps the tensor's L1 norm
    b, taus = refs(collection)
    one = merged(merge_checkpoints(base, fts[:1], "dare_linear", MergeParams(densities=(0.3,), seed=3),
                                   tmp_path / "one", progress=False))
    k = "transformer.h.0.mlp.c_fc.weight"
    d = one[k] - b[k]
    kept = np.abs(d) > 1e-9
    n = d.size
    assert abs(kept.mean() - 0.3) < 5 * np.sqrt(0.3 * 0.7 / n)
    np.testing.assert_allclose(np.abs(d).sum(), np.abs(taus[0][k]).sum(), rtol=1e-4)


def test_linear_matches_reference_and_output_dtype(collection, tmp_path):
    root, base, fts = collection
    w = (1.0, 2.0, 3.0)
    out = merge_checkpoints(base, fts, "linear", MergeParams(weights=w), tmp_path / "m", progress=False,
                            out_dtype="bfloat16")
    raw = load_all(out)
    assert all(v.dtype == torch.bfloat16 for v in raw.values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    thetas = [{k: v.double().numpy() for k, v in load_all(f).items()} for f in fts]
    for k, v in raw.items():
        ref = sum(wi * th[k] for wi, th in zip(w, thetas)) / sum(w)
        np.testing.assert_allclose(v.double().numpy(), ref, rtol=2 ** -8, atol=1e-6, err_msg=k)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)  # a real, loadable HF folder
    assert model.config.vocab_size == 128


def test_scope_copies_other_tensors_from_base(collection, tmp_path):
    root, base, fts = collection
    out = merge_checkpoints(base, fts, "task_arithmetic", MergeParams(), tmp_path / "m", progress=False,
                            scope="attention")
    b, m = merged(base), merged(out)
    rec = json.loads((out / "taskvec_merge.json").read_text())
    assert "transformer.wte.weight" in rec["copied_from_base"]
    assert np.array_equal(m["transformer.wte.weight"], b["transformer.wte.weight"])
    assert not np.array_equal(m["transformer.h.0.attn.c_attn.weight"], b["transformer.h.0.attn.c_attn.weight"])


# ----------------------------------------------------------------------------- bad input


def test_parameters_out_of_range(collection, tmp_path):
    root, base, fts = collection
    cases = [("ties", MergeParams(densities=(0.0,)), "density must lie in"),
             ("dare_linear", MergeParams(densities=(1.5,)), "density must lie in"),
             ("task_arithmetic", MergeParams(weights=(1.0, 2.0)), "2 --weight values for 3"),
             ("task_arithmetic", MergeParams(lambda_=float("nan")), "--lambda"),
             ("task_arithmetic", MergeParams(densities=(0.5,)), "takes no --density"),
             ("linear", MergeParams(weights=(1.0, -1.0, 0.0)), "sum to 0"),
             ("dare_ties", MergeParams(densities=(0.5,), rescale="l2"), "--rescale"),
             ("ties", MergeParams(densities=(0.5,), trim="layer"), "--trim"),
             ("dare_linear", MergeParams(densities=(0.5,), seed=-1), "--seed")]
    for method, params, msg in cases:
        with pytest.raises(TaskvecError, match=msg):
            merge_checkpoints(base, fts, method, params, tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()


def test_mismatched_shapes_and_vocab(collection, tmp_path):
    root, base, fts = collection
    sd = load_all(fts[0])
    sd["transformer.h.1.mlp.c_fc.weight"] = sd["transformer.h.1.mlp.c_fc.weight"][:, :100].contiguous()
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    (bad / "config.json").write_text((fts[0] / "config.json").read_text())
    with pytest.raises(TaskvecError, match="transformer.h.1.mlp.c_fc.weight"):
        merge_checkpoints(base, [fts[1], bad], "task_arithmetic", MergeParams(), tmp_path / "o1", progress=False)
    big = save_hf(perturbed(tiny_model("gpt2", seed=0, vocab_size=160), seed=5), tmp_path / "bigvocab")
    with pytest.raises(TaskvecError, match="vocabulary"):
        merge_checkpoints(base, [fts[1], big], "ties", MergeParams(densities=(0.5,)), tmp_path / "o2", progress=False)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    # the vocabulary matrices can be left out of the merge (copied from the base)
    merge_checkpoints(base, [fts[1], big], "ties", MergeParams(densities=(0.5,)), tmp_path / "o3", progress=False,
                      scope="body")


def test_output_folder_holding_a_model_is_untouched(collection, tmp_path):
    root, base, fts = collection
    out = tmp_path / "existing"
    save_hf(tiny_model("gpt2", seed=3), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(TaskvecError, match="already holds a model"):
        merge_checkpoints(base, fts, "task_arithmetic", MergeParams(), out, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(TaskvecError, match="one of the input models"):
        merge_checkpoints(base, fts, "task_arithmetic", MergeParams(), fts[0], progress=False)
    assert not list(tmp_path.glob(".*partial*"))


def test_trim_keeps_at_least_one_entry_like_mergekit():
    from taskvec.merge.ties import trim_magnitude

    x = torch.tensor([0.1, -0.3])
    assert torch.equal(trim_magnitude(x, 0.3), torch.tensor([0.0, -0.3]))
    y = torch.tensor([[0.5, -2.0], [1.0, 0.0]])
    assert torch.equal(trim_magnitude(y, 0.5), torch.tensor([[0.0, -2.0], [1.0, 0.0]]))
    assert trim_magnitude(y, 1.0) is y


def test_lora_adapter_as_finetune_matches_peft_merge(tmp_path):
    """A PEFT LoRA folder is a fine-tune θ₀ + ΔW: task arithmetic with weight 1 equals peft's merge_and_unload."""
    from peft import LoraConfig, get_peft_model

    base = tiny_model("llama", seed=0)
    save_hf(base, tmp_path / "base", tiny_tokenizer())
    torch.manual_seed(3)
    peft_model = get_peft_model(tiny_model("llama", seed=0), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(tmp_path / "adapter")
    want = {k: v.double().numpy() for k, v in peft_model.merge_and_unload().state_dict().items()}
    out = merge_checkpoints(tmp_path / "base", [tmp_path / "adapter"], "task_arithmetic", MergeParams(),
                            tmp_path / "m", progress=False)
    got = merged(out)
    assert json.loads((out / "taskvec_merge.json").read_text())["models"][0]["lora_adapter"] is True
    changed = 0
    for k, v in got.items():
        np.testing.assert_allclose(v, want[k], rtol=0, atol=1e-6, err_msg=k)
        changed += not np.array_equal(v, merged(tmp_path / "base")[k])
    assert changed == 4  # q_proj and v_proj of both layers
