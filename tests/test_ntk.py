"""Every kernel strategy against the brute-force jacrev Jacobian; spectrum, JVP, projections, cross-task."""

import numpy as np
import pytest
import torch
from torch.func import jacrev

from taskvec.errors import TaskvecError
from taskvec.models import load_model
from taskvec.ntk import (build_space, compute_kernel, cross_task, eigendirections, finite_difference, jvp,
                         kernel_alignment, principal_angles, project, random_control, random_like, spectrum)
from taskvec.ntk.kernel import KernelResult, _size
from taskvec.ntk.sketch import CountSketch, sketch_bound
from taskvec.outputs import LinearHead, make_output
from tiny import PROBE_PAIRS, tiny_model, tiny_tokenizer



PAIRS = PROBE_PAIRS[:7]
TEXTS = [{"text": t, "label": i % 3} for i, t in enumerate(
    ["the movie was wonderful", "dull", "what is 3 plus 4 ? 7 and more", "i love this phone",
     "worst purchase ever , broke in two days", "the market rose", "a boring film with terrible pacing"])]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TASKVEC_CACHE", str(tmp_path / "cache"))


def setup(arch, dtype=torch.float64, kind=None, seed=0, **kw):
    model = load_model(tiny_model(arch, seed=seed), dtype=dtype)
    if arch == "bert":
        head = LinearHead(32, kw.pop("m", 1), seed=3)
        f = make_output(kind or "regression", model, tiny_tokenizer(kind="encoder"), head=head, **kw)
        return model, f, TEXTS
    return model, make_output(kind or "logprob", model, tiny_tokenizer(), **kw), (TEXTS if kind in ("logits", "margin") else PAIRS)


def brute_jacobian(model, f, examples, scope="body"):
    """Rows ∇θ f(x_i) from jacrev on each example alone (no padding, no vmap), float64 [n·m, p]."""
    names = build_space(model, scope).names
    params = {k: v.detach() for k, v in model.named_parameters()}
    rows = []
    for ex in examples:
        batch = f.encode([ex])
        J = jacrev(lambda p: f({**params, **p}, batch)[0])({k: params[k] for k in names})
        rows.append(torch.cat([J[k].reshape(f.m, -1) for k in names], 1))
    return torch.cat(rows).double()


_REF = {}


def ref_jacobian(arch, kind=None, scope="body", **kw):
    """Brute-force float64 Jacobian, computed once per configuration for the whole module."""
    key = (arch, kind, scope, tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kw.items())))
    if key not in _REF:
        model, f, ex = setup(arch, torch.float64, kind, **kw)
        _REF[key] = brute_jacobian(model, f, ex, scope)
    return _REF[key]


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


@pytest.mark.parametrize("arch", ["gpt2", "bert", "llama"])
def test_exact_and_recompute_match_brute_force(arch):
    for dtype, tol in ((torch.float64, 1e-8), (torch.float32, 1e-5)):
        model, f, ex = setup(arch, dtype)
        J = ref_jacobian(arch)
        K_ref = (J @ J.T).numpy()
        exact = compute_kernel(model, f, ex, strategy="exact", block_size=3, progress=False)
        rec = compute_kernel(model, f, ex, strategy="recompute", block_size=2, panel_size=3, progress=False)
        assert exact.info["strategy"] == "exact" and rec.info["strategy"] == "recompute"
        assert exact.info["per_example_gradients"] == "hooks" == rec.info["per_example_gradients"]
        assert rel(exact.K, K_ref) <= tol and rel(rec.K, K_ref) <= tol
        assert rec.info["examples_computed"] > len(ex)  # rows really were recomputed
        vals = np.linalg.eigvalsh(K_ref / len(ex))[::-1]
        assert np.allclose(exact.eigenvalues, np.clip(vals, 0, None), rtol=0, atol=tol * vals[0])


@pytest.mark.parametrize("arch,scope", [("gpt2", "body"), ("bert", "body"), ("llama", "all")])
def test_exact_in_parameter_slices_matches_brute_force(arch, scope, monkeypatch):
    """Above EXACT_SLICE_BYTES, exact computes K = Σ_s J_s J_sᵀ over parameter slices in one buffer."""
    from taskvec.ntk import kernel as kmod

    J = ref_jacobian(arch, scope=scope) if scope != "body" else ref_jacobian(arch)
    K_ref = (J @ J.T).numpy()
    monkeypatch.setattr(kmod, "EXACT_SLICE_BYTES", J.numel() * 8 // 3 + 1)  # three slices in float64
    for dtype, tol in ((torch.float64, 1e-8), (torch.float32, 1e-5)):
        model, f, ex = setup(arch, dtype)
        res = compute_kernel(model, f, ex, scope=scope, strategy="exact", block_size=3, progress=False, cache=False)
        assert res.info["parameter_slices"] == (3 if dtype == torch.float64 else 2)
        assert res.info["examples_computed"] == res.info["parameter_slices"] * len(ex)
        assert rel(res.K, K_ref) <= tol, (dtype, rel(res.K, K_ref))
    space = build_space(model, scope)
    groups = kmod.param_slices(space, 3)
    assert [n for g in groups for n in g] == space.names and len(groups) == 3
    sizes = [sum(space.size(n) for n in g) for g in groups]
    assert max(sizes) <= space.p / 3 + max(space.size(n) for n in space.names)


def test_exact_on_disk_memmap_matches(tmp_path):
    model, f, ex = setup("gpt2")
    ram = compute_kernel(model, f, ex, strategy="exact", progress=False, cache=False)
    J = ref_jacobian("gpt2")
    from taskvec.ntk import kernel as kmod

    pl = kmod.plan("exact", n=len(ex), rows_per_ex=1, P=J.shape[1], itemsize=8, ex_bytes=10**6,
                   model_bytes=10**6, budget=10**6 + 10**6 + 10, sketch_dim=None, top_k=None)
    assert pl.storage == "disk"
    runner = kmod._Runner(f, build_space(model), build_space(model).base(model),
                          kmod.ProbeBatch(f, ex), "trace", torch.float64, False)
    K = kmod._unpermute(runner.exact(pl), kmod._row_order(runner.probe.order, 1))
    assert rel(K, (J @ J.T).numpy()) < 1e-8 and rel(ram.K, K) < 1e-12
    assert not any((tmp_path / "cache" / "tmp").glob("taskvec-J-*"))  # memmap removed


def test_block_kernel_for_multi_output_and_trace():
    model, f, ex = setup("gpt2", kind="logits", label_words=[" dull", " wonderful", " boring"])
    J = brute_jacobian(model, f, ex)  # [n·3, p], example-major
    block = compute_kernel(model, f, ex, strategy="exact", mode="block", block_size=3, progress=False)
    trace = compute_kernel(model, f, ex, strategy="exact", mode="trace", block_size=3, progress=False)
    K_ref = (J @ J.T).numpy()
    assert block.K.shape == (21, 21) and rel(block.K, K_ref) < 1e-8
    tr_ref = K_ref.reshape(7, 3, 7, 3).trace(axis1=1, axis2=3)
    assert rel(trace.K, tr_ref) < 1e-8


def test_word_embeddings_in_scope_use_only_present_rows():
    model, f, ex = setup("bert")
    scope = "all"
    J = brute_jacobian(model, f, ex, scope=scope)
    res = compute_kernel(model, f, ex, scope=scope, strategy="exact", progress=False)
    rows = res.info["scope"]["restricted_rows"]["embeddings.word_embeddings.weight"]
    assert rows < 128 and res.info["n_params"] < J.shape[1]
    assert rel(res.K, (J @ J.T).numpy()) < 1e-8
    assert res.info["per_example_gradients"] == "hooks"


@pytest.mark.parametrize("arch,scope", [("gpt2", "all"), ("bert", "all"), ("llama", "all"), ("llama", "attention")])
def test_hook_and_vmap_gradients_agree_with_brute_force(arch, scope):
    """The batched-hook per-example gradients (every module rule, tied and restricted embeddings)
    and the vmap(grad) fallback both reproduce jacrev on each example alone."""
    model, f, ex = setup(arch)
    K_ref = (lambda J: (J @ J.T).numpy())(brute_jacobian(model, f, ex, scope=scope))
    for method in ("hooks", "vmap"):
        res = compute_kernel(model, f, ex, scope=scope, strategy="exact", block_size=4, progress=False,
                             cache=False, gradients=method)
        assert res.info["per_example_gradients"] == method
        assert rel(res.K, K_ref) < 1e-10


def test_hooks_on_rotary_llama_label_word_logits_in_both_modes():
    """Rotary tables are computed in float32 even in a float64 model; the first-block check must not
    mistake that round-off (~1e-7) for a missing gradient (QA found this false alarm on Qwen2/Phi)."""
    model, f, ex = setup("llama", kind="logits", label_words=[" dull", " wonderful", " boring"])
    J = brute_jacobian(model, f, ex, scope="all")
    K_ref = (J @ J.T).numpy()
    for mode in ("block", "trace"):
        res = compute_kernel(model, f, ex, scope="all", strategy="exact", mode=mode, block_size=2, progress=False,
                             cache=False, gradients="hooks")
        ref = K_ref if mode == "block" else K_ref.reshape(len(ex), 3, len(ex), 3).trace(axis1=1, axis2=3)
        assert res.info["per_example_gradients"] == "hooks" and rel(res.K, ref) < 1e-10


def test_model_with_a_scalar_tensor_is_digested():
    from taskvec.ntk.kernel import model_digest

    model, _, _ = setup("gpt2")
    model.register_buffer("scale0d", torch.tensor(2.0))
    a = model_digest(model)
    model.scale0d.fill_(3.0)
    assert a != model_digest(model)


@pytest.mark.parametrize("cfg", ["opt", "bloom"])
def test_mask_derived_position_models_are_refused_clearly(cfg):
    import transformers as T

    from tiny import tiny_tokenizer

    model = (T.OPTForCausalLM(T.OPTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64,
                                          vocab_size=128, max_position_embeddings=64, word_embed_proj_dim=32))
             if cfg == "opt" else
             T.BloomForCausalLM(T.BloomConfig(hidden_size=32, n_layer=1, n_head=2, vocab_size=128)))
    with pytest.raises(TaskvecError, match=f"model type '{cfg}' is not supported yet"):
        make_output("logprob", model, tiny_tokenizer())


def test_hooks_fall_back_to_vmap_when_a_parameter_is_used_outside_its_module():
    """A model reading an in-scope weight directly (not through its module's forward) is caught by
    the first-block check: 'auto' falls back to vmap and stays exact, 'hooks' refuses."""
    model, f, ex = setup("gpt2")
    block = model.transformer.h[0]
    original = type(block).forward

    class Peeking(type(block)):
        def forward(self, hidden_states, *args, **kwargs):
            out = original(self, hidden_states, *args, **kwargs)
            first = out[0] if isinstance(out, tuple) else out
            first = first + 0.1 * torch.tanh(self.mlp.c_fc.bias[: first.shape[-1]])
            return (first,) + tuple(out[1:]) if isinstance(out, tuple) else first

    block.__class__ = Peeking
    K_ref = (lambda J: (J @ J.T).numpy())(brute_jacobian(model, f, ex))
    res = compute_kernel(model, f, ex, strategy="exact", progress=False, cache=False)
    assert res.info["per_example_gradients"] == "vmap" and any("vmap" in n for n in res.info["notes"])
    assert rel(res.K, K_ref) < 1e-10
    with pytest.raises(TaskvecError, match="hooks are not possible"):
        compute_kernel(model, f, ex, strategy="exact", progress=False, cache=False, gradients="hooks")


@pytest.mark.parametrize("kind", ["countsketch", "gaussian"])
def test_sketch_within_stated_bound_and_unbiased(kind):
    model, f, ex = setup("llama")
    J = ref_jacobian("llama")
    K = (J @ J.T).numpy()
    k, seeds = (2048, 6) if kind == "countsketch" else (512, 3)
    errs, mean = [], np.zeros_like(K)
    for seed in range(seeds):
        r = compute_kernel(model, f, ex, strategy="sketch", sketch=kind, sketch_dim=k, seed=seed, progress=False)
        bound = sketch_bound(np.trace(K), k, delta=0.05)
        assert np.linalg.norm(r.K - K) <= bound
        assert abs(r.info["sketch_rel_error_on_check"] - rel(r.K, K)) < 1e-6  # check subset = all 7 here
        errs.append(rel(r.K, K))
        mean += r.K / seeds
    assert rel(mean, K) < np.mean(errs)  # averaging independent sketches converges to K


def test_countsketch_is_its_dense_matrix_and_leaves_rows_alone():
    cs = CountSketch(1000, 64, seed=3)
    bucket, negative = cs.slot.long() % 64, cs.slot.long() >= 64
    S = torch.zeros(1000, 64, dtype=torch.float64)
    S[torch.arange(1000), bucket] = torch.where(negative, -1.0, 1.0).double()
    assert 0.3 < negative.double().mean() < 0.7 and len(bucket.unique()) == 64
    rows = torch.randn(5, 1000, dtype=torch.float64)
    before = rows.clone()
    assert torch.allclose(cs(rows), rows @ S, rtol=1e-12, atol=1e-12) and torch.equal(rows, before)
    with pytest.raises(ValueError, match="length 1000"):
        cs(rows[:, :10])


def test_sketch_check_is_the_within_block_error():
    from taskvec.ntk.jacobian import ProbeBatch

    model, f, ex = setup("llama")
    J = ref_jacobian("llama")
    K = (J @ J.T).numpy()
    k = 1024
    r = compute_kernel(model, f, ex, strategy="sketch", sketch_dim=k, block_size=3, progress=False, cache=False)
    order = ProbeBatch(f, ex).order.numpy()
    blocks = [order[s:s + 3] for s in range(0, len(ex), 3)]  # 3, 3, 1 examples in sorted order
    err2 = sum(np.sum((r.K[np.ix_(b, b)] - K[np.ix_(b, b)]) ** 2) for b in blocks)
    ref2 = sum(np.sum(K[np.ix_(b, b)] ** 2) for b in blocks)
    assert r.info["check_rows"] == len(ex)
    assert r.info["sketch_rel_error_on_check"] == pytest.approx(np.sqrt(err2 / ref2), rel=1e-6)
    tr2 = sum(np.trace(K[np.ix_(b, b)]) ** 2 for b in blocks)
    assert r.info["sketch_rel_bound_on_check_delta_0.05"] == pytest.approx(
        sketch_bound(np.sqrt(tr2), k) / np.sqrt(ref2), rel=1e-6)
    assert r.info["sketch_rel_error_on_check"] <= r.info["sketch_rel_bound_on_check_delta_0.05"]


def test_lanczos_topk_matches_exact_eigenvalues():
    model, f, ex = setup("gpt2")
    J = ref_jacobian("gpt2")
    ref = np.linalg.eigh((J @ J.T).numpy() / len(ex))
    res = compute_kernel(model, f, ex, strategy="lanczos", top_k=3, progress=False)
    assert res.K is None and res.info["matvecs"] > 0
    assert np.max(np.abs(res.eigenvalues - ref[0][::-1][:3]) / ref[0][::-1][:3]) <= 1e-6
    for i in range(3):
        assert abs(abs(res.eigenvectors[:, i] @ ref[1][:, ::-1][:, i]) - 1) < 1e-6


def test_lanczos_trace_kernel_with_several_outputs():
    model, f, ex = setup("gpt2", kind="logits", label_words=[" dull", " wonderful", " boring"])
    exact = compute_kernel(model, f, ex, strategy="exact", progress=False)
    lan = compute_kernel(model, f, ex, strategy="lanczos", top_k=2, progress=False)
    assert np.max(np.abs(lan.eigenvalues - exact.eigenvalues[:2]) / exact.eigenvalues[:2]) <= 1e-6


def test_tied_embeddings_stay_dense_and_exact():
    model, f, ex = setup("llama")  # tie_word_embeddings=True: lm_head shares the matrix
    J = brute_jacobian(model, f, ex, scope="all")
    res = compute_kernel(model, f, ex, scope="all", strategy="exact", progress=False)
    assert res.info["scope"]["dense_embeddings"] == ["model.embed_tokens.weight"]
    assert not res.info["scope"]["restricted_rows"] and res.info["n_params"] == J.shape[1]
    assert rel(res.K, (J @ J.T).numpy()) < 1e-8


def test_spectrum_clips_and_reports_negatives():
    U = np.linalg.qr(np.random.default_rng(0).standard_normal((5, 5)))[0]
    K = U @ np.diag([3.0, 1.0, 0.5, 0.2, -1e-6]) @ U.T * 5
    vals, vecs, info = spectrum(K, 5)
    assert info["n_clipped_negative"] == 1 and info["most_negative"] == pytest.approx(-1e-6, rel=1e-6)
    assert vals[-1] == 0 and np.allclose(vals[:4], [3, 1, 0.5, 0.2])
    assert np.allclose(np.abs(vecs[:, :4].T @ U[:, :4]), np.eye(4), atol=1e-10)


# transformers' Llama runs RMSNorm and the attention softmax in float32 even in a float64 model,
# so its "float64" reference is only float32-accurate inside those ops (measured ≈ 1e-7 on J·τ).
@pytest.mark.parametrize("arch,tol", [("gpt2", 1e-10), ("bert", 1e-10), ("llama", 1e-6)])
def test_jvp_matches_brute_force_and_finite_differences(arch, tol):
    model, f, ex = setup(arch)
    names = build_space(model, "body").names
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    tau = {k: 1e-2 * torch.randn(params[k].shape, generator=g, dtype=torch.float64) for k in names}
    Jtau = jvp(model, f, ex, tau, batch_size=3)
    J = ref_jacobian(arch)
    ref = J @ torch.cat([tau[k].reshape(-1) for k in names])
    assert rel(Jtau[:, 0].numpy(), ref.numpy()) < tol
    if arch != "llama":
        fd = finite_difference(model, f, ex, tau, eps=1e-4)
        assert rel(fd.numpy(), Jtau.numpy()) < 1e-7  # O(ε²) truncation


def test_closed_form_final_norm_bias_is_a_constant_kernel():
    """f = w·mean_t(LN(h_t)) + b' is affine in the last LayerNorm bias β with ∂f/∂β = w for every x:
    K = ‖w‖² 11ᵀ, K/n has one eigenvalue ‖w‖² with the constant eigenvector, and J·τ = w·τ exactly."""
    model, f, ex = setup("bert")
    name = "encoder.layer.1.output.LayerNorm.bias"
    res = compute_kernel(model, f, ex, scope=name.replace(".", r"\."), strategy="exact", progress=False)
    w = f.head.linear.weight[0].double()
    n = len(ex)
    assert np.allclose(res.K, float(w @ w) * np.ones((n, n)), rtol=1e-12)
    assert res.eigenvalues[0] == pytest.approx(float(w @ w), rel=1e-12) and np.allclose(res.eigenvalues[1:], 0)
    tau = {name: torch.linspace(-1, 1, 32, dtype=torch.float64)}
    Jtau = jvp(model, f, ex, tau)
    assert torch.allclose(Jtau[:, 0], (w @ tau[name]).expand(n), rtol=1e-12)
    out = project(res, Jtau, tau_sq_norm=float(tau[name].norm() ** 2))
    assert out["constant_mode"]["top_mode_constant_cos2"] == pytest.approx(1.0)
    assert out["constant_mode"]["jtau_constant_share"] == pytest.approx(1.0)
    # row space = span{w}: E/‖τ‖² = cos²(τ, w)
    cos2 = float((w @ tau[name]) ** 2 / (w @ w) / (tau[name] @ tau[name]))
    assert out["energy_fraction"] == pytest.approx(cos2, rel=1e-10)


def _linear_result(X):
    K = X @ X.T
    vals, vecs, info = spectrum(K, X.shape[0])
    return KernelResult(K, vals, vecs, {"n": X.shape[0], "mode": "trace"})


def test_projection_on_a_linear_model_in_closed_form():
    """f(x; θ) = xᵀθ: J = X, v_i = right singular vectors, c_i = ⟨τ, v_i⟩, E = ‖P_row τ‖²."""
    rng = np.random.default_rng(1)
    X, tau = rng.standard_normal((6, 20)), rng.standard_normal(20)
    res = _linear_result(X)
    out = project(res, X @ tau, tau_sq_norm=float(tau @ tau))
    _, s, Vt = np.linalg.svd(X, full_matrices=False)
    V = Vt * np.sign(Vt @ X.T @ res.eigenvectors).diagonal()[:, None]  # match eigenvector signs
    assert np.allclose(out["c"], V @ tau, atol=1e-10)
    P_row = np.linalg.pinv(X) @ X
    assert out["energy_row_space"] == pytest.approx(float(tau @ P_row @ tau), rel=1e-10)
    assert out["cumulative"][-1] == pytest.approx(1.0) and out["unresolved_fraction"] < 1e-12
    a = res.eigenvectors.T @ (X @ tau)
    assert np.allclose(out["spectral_fraction"], a ** 2 / np.sum(a ** 2))
    assert out["top_k_cumulative"][1] == pytest.approx(out["spectral_fraction"][0])
    # with the constant function projected out: the centred kernel and centred Jτ
    C = np.eye(6) - 1 / 6
    vals_c = np.clip(np.linalg.eigvalsh(C @ X @ X.T @ C / 6)[::-1], 0, None)
    assert np.allclose(out["without_constant"]["eigenvalues"], vals_c, atol=1e-12)
    assert out["without_constant"]["jtau_sq_norm"] == pytest.approx(float(np.sum((C @ X @ tau) ** 2)))


def test_cross_task_blocks_alignment_and_angles_on_linear_model():
    from scipy.linalg import subspace_angles

    rng = np.random.default_rng(2)
    XA, XB = rng.standard_normal((5, 12)), rng.standard_normal((4, 12))
    Kaa, Kbb, Kab = XA @ XA.T, XB @ XB.T, XA @ XB.T
    assert kernel_alignment(Kaa, Kbb, Kab) == pytest.approx(
        np.sum((XA.T @ XA) * (XB.T @ XB)) / np.linalg.norm(XA.T @ XA) / np.linalg.norm(XB.T @ XB))
    cos = principal_angles(Kaa, Kbb, Kab, k=3)

    def top(X, k):
        return np.linalg.svd(X, full_matrices=False)[2][:k].T

    ref = np.sort(np.cos(subspace_angles(top(XA, 3), top(XB, 3))))[::-1]
    assert np.allclose(cos, ref, atol=1e-10)
    assert np.allclose(principal_angles(Kaa, Kaa, Kaa, k=3), 1.0)


def test_cross_task_on_a_model_uses_one_union_kernel():
    model, f, ex = setup("gpt2")
    res = cross_task(model, f, {"a": ex[:4], "b": ex[4:]}, k=2, strategy="exact", progress=False)
    J = ref_jacobian("gpt2")
    K = (J @ J.T).numpy()
    assert rel(res.block("a", "b"), K[:4, 4:]) < 1e-8
    assert res.alignment["a|b"] == pytest.approx(kernel_alignment(K[:4, :4], K[4:, 4:], K[:4, 4:]))
    assert res.to_dict()["sizes"] == {"a": 4, "b": 3}


def test_eigendirections_are_orthonormal_and_give_c():
    model, f, ex = setup("gpt2")
    res = compute_kernel(model, f, ex, strategy="exact", progress=False)
    V = eigendirections(model, f, ex, res, k=3)
    names = build_space(model, "body").names
    Vf = torch.stack([torch.cat([V[k][i].reshape(-1) for k in names]) for i in range(3)])
    assert torch.allclose(Vf @ Vf.T, torch.eye(3, dtype=torch.float64), atol=1e-10)
    tau = random_like({k: p.detach() for k, p in model.named_parameters() if k in names}, seed=3)
    out = project(res, jvp(model, f, ex, tau))
    taus = torch.cat([tau[k].reshape(-1) for k in names])
    assert np.allclose(out["c"][:3], (Vf @ taus).numpy(), rtol=1e-8)


def test_random_control_keeps_per_tensor_norms():
    from taskvec.vectors import TaskVector

    g = torch.Generator().manual_seed(0)
    tv = TaskVector({"a.weight": torch.randn(4, 3, generator=g), "b.bias": torch.randn(5, generator=g) * 7})
    ctrl = random_control(tv, seed=1)
    assert isinstance(ctrl, TaskVector)
    for k in tv.keys():
        assert float(ctrl[k].norm()) == pytest.approx(float(tv[k].norm()), rel=1e-6)
        assert not torch.allclose(ctrl[k], tv[k])
    again = random_control(tv, seed=1)
    assert all(torch.equal(again[k], ctrl[k]) for k in tv.keys())


def test_cache_hit_and_determinism():
    model, f, ex = setup("gpt2", dtype=torch.float32)
    a = compute_kernel(model, f, ex, strategy="exact", progress=False)
    b = compute_kernel(model, f, ex, strategy="exact", progress=False)
    c = compute_kernel(model, f, ex, strategy="exact", progress=False, cache=False, block_size=2)
    assert not a.info["cache_hit"] and b.info["cache_hit"] and np.array_equal(a.K, b.K)
    assert rel(c.K, a.K) < 1e-6  # a different blocking only changes round-off
    d = compute_kernel(model, f, ex[:-1], strategy="exact", progress=False)
    assert not d.info["cache_hit"]


def test_interrupt_leaves_no_cache(tmp_path):
    model, f, ex = setup("gpt2")

    class Interrupting(type(f)):
        calls = 0

        def __call__(self, params, batch):
            raise KeyboardInterrupt

    f.__class__ = Interrupting
    with pytest.raises(KeyboardInterrupt):
        compute_kernel(model, f, ex, strategy="exact", progress=False)
    cache = tmp_path / "cache" / "ntk"
    assert not cache.exists() or not any(p.name[0] != "." for p in cache.iterdir())


@pytest.mark.parametrize("nbytes, text", [(1073, "1.0 kB"), (3 << 20, "3.0 MB"), ((1 << 30) - 1, "1024.0 MB"),
                                          (3 << 29, "1.50 GB")])
def test_sizes_in_messages_are_human_readable(nbytes, text):
    assert _size(nbytes) == text


def test_bad_inputs():
    model, f, ex = setup("gpt2")
    with pytest.raises(TaskvecError, match="selects none"):
        compute_kernel(model, f, ex, scope="no_such_tensor_xyz", progress=False)
    with pytest.raises(TaskvecError, match="too small for any strategy"):
        compute_kernel(model, f, ex, memory_gb=1e-6, progress=False)
    with pytest.raises(TaskvecError, match="give --top-k"):
        compute_kernel(model, f, ex, strategy="lanczos", progress=False)
    with pytest.raises(TaskvecError, match="unknown strategy"):
        compute_kernel(model, f, ex, strategy="magic", progress=False)
    with pytest.raises(TaskvecError, match="empty"):
        compute_kernel(model, f, [], progress=False)
    with pytest.raises(TaskvecError, match="shape"):
        jvp(model, f, ex, {"transformer.h.0.attn.c_attn.weight": torch.zeros(3, 3)})
    other = load_model(tiny_model("gpt2", seed=9))
    with pytest.raises(TaskvecError, match="different model"):
        compute_kernel(other, f, ex, progress=False)


def test_auto_picks_by_budget():
    model, f, ex = setup("gpt2", dtype=torch.float32)
    big = compute_kernel(model, f, ex, memory_gb=4, progress=False, cache=False)
    assert big.info["strategy"] == "exact"
    from taskvec.ntk.kernel import plan

    P, ex_b, mb = 10**6, 10**6, 10**6
    assert plan("auto", n=100, rows_per_ex=1, P=P, itemsize=4, ex_bytes=ex_b, model_bytes=mb,
                budget=mb + 5 * 10**8, sketch_dim=None, top_k=None).strategy == "exact"
    assert plan("auto", n=1000, rows_per_ex=1, P=P, itemsize=4, ex_bytes=ex_b, model_bytes=mb,
                budget=mb + 2 * 10**9, sketch_dim=None, top_k=None).strategy == "recompute"
    assert plan("auto", n=1000, rows_per_ex=1, P=P, itemsize=4, ex_bytes=ex_b, model_bytes=mb,
                budget=mb + 10**8, sketch_dim=None, top_k=None).strategy == "sketch"
