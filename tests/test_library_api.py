"""taskvec used as a Python library: argument shapes a user plausibly passes, inputs that must be refused
(a kernel matrix for eigenvalues, a saved task vector for a model), and the package's public surface."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny import base_and_finetunes

from taskvec.checkpoints import SafetensorsCheckpoint, open_checkpoint
from taskvec.errors import TaskvecError
from taskvec.merge import MergeParams, check_merge, merge_checkpoints
from taskvec.merge.retention_data import task_names
from taskvec.ntk import KernelResult
from taskvec.theory import (analyse_spectrum, critical_radius, early_stopping, effective_dimension, fit_decay,
                            fit_spectrum, noise_cut, statistical_dimension)
from taskvec.theory.spectrum import DecayFit
from taskvec.vector_stats import CollectionStats, collection_stats
from taskvec.vectors import TaskVector


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    return root, *base_and_finetunes(root, "gpt2", (31, 32))


# ----------------------------------------------------------------------------- theory: eigenvalues in

def _kernel(n=40, seed=0):
    """A real Gram matrix K = J Jᵀ of a random J, its eigenpairs of K/n (descending) as compute_kernel keeps them."""
    J = np.random.default_rng(seed).standard_normal((n, 3 * n)) / np.arange(1, 3 * n + 1)
    K = J @ J.T
    vals, vecs = np.linalg.eigh(K / n)
    return K, vals[::-1].copy(), vecs[:, ::-1].copy()


@pytest.mark.parametrize("call", [
    lambda a: critical_radius(a, 0.1),
    lambda a: early_stopping(a, 0.1),
    lambda a: fit_decay(a, n_boot=0),
    lambda a: fit_spectrum(a, n_boot=0),
    lambda a: analyse_spectrum(a, n_boot=0),
    lambda a: effective_dimension(a, 1e-3),
    lambda a: statistical_dimension(a, 0.1),
    lambda a: noise_cut(a),
], ids=["critical_radius", "early_stopping", "fit_decay", "fit_spectrum", "analyse_spectrum",
        "effective_dimension", "statistical_dimension", "noise_cut"])
def test_theory_refuses_a_kernel_matrix(call):
    K, mu, _ = _kernel()
    with pytest.raises(TaskvecError, match=r"40×40 array.*eigenvalues of K/n.*KernelResult\.eigenvalues") as e:
        call(K)
    assert "\n" not in str(e.value)
    with pytest.raises(TaskvecError, match=r"2×20 array"):
        call(mu.reshape(2, 20))


def test_theory_accepts_a_row_or_column_of_eigenvalues():
    _, mu, _ = _kernel()
    want = critical_radius(mu, 0.1)
    assert critical_radius(mu[None, :], 0.1) == want
    assert critical_radius(mu[:, None], 0.1) == want
    assert fit_decay(mu[:, None], n_boot=0).rate == fit_decay(mu, n_boot=0).rate


def test_theory_takes_a_kernel_result_for_its_eigenvalues():
    K, mu, U = _kernel()
    res = KernelResult(K, mu, U, {"n": K.shape[0]})
    assert critical_radius(res, 0.1) == critical_radius(mu, 0.1)
    assert early_stopping(res, 0.1)["T_hat"] == early_stopping(mu, 0.1)["T_hat"]
    assert fit_decay(res, n_boot=0).rate == fit_decay(mu, n_boot=0).rate
    a = analyse_spectrum(res, sigma=0.1, n_boot=0)
    assert a["early_stopping"]["eps_hat"] == analyse_spectrum(mu, sigma=0.1, n_boot=0)["early_stopping"]["eps_hat"]
    # a top-k result (as Lanczos keeps) with n given: the missing eigenvalues are zeros, the fit uses the top k
    top = KernelResult(None, mu[:15], U[:, :15], {"n": 40})
    b = analyse_spectrum(top, n=40, sigma=0.1, n_boot=0)
    assert b["spectrum_info"]["padded_zeros"] == 25 and b["n"] == 40
    assert b["decay_fits"]["power"]["rate"] == fit_decay(mu[:15], n_boot=0).rate
    with pytest.raises(TaskvecError, match="expected numbers"):
        critical_radius(["a", "b"], 0.1)


# ----------------------------------------------------------------------------- a saved τ is not a model

def test_saved_task_vector_is_refused_as_a_model(models, tmp_path):
    root, base, fts = models
    tau = TaskVector.from_checkpoints(base, fts[0], progress=False)
    f = tau.save(tmp_path / "tau.safetensors")
    folder = tmp_path / "tau_folder"
    folder.mkdir()
    tau.save(folder / "model.safetensors")
    msg = r"task vector \(TaskVector\.save\) holds τ.*not model weights; load it with TaskVector\.load.*apply_to"
    for src in (f, str(f), folder, SafetensorsCheckpoint(str(f), [f], None)):
        with pytest.raises(TaskvecError, match=msg):
            open_checkpoint(src)
    with pytest.raises(TaskvecError, match=msg):
        TaskVector.from_checkpoints(base, f, progress=False)
    with pytest.raises(TaskvecError, match=msg):
        TaskVector.from_checkpoints(f, fts[0], progress=False)
    with pytest.raises(TaskvecError, match=msg):
        merge_checkpoints(base, [fts[1], f], "task_arithmetic", out=tmp_path / "m", progress=False)
    assert not (tmp_path / "m").exists()
    with pytest.raises(TaskvecError, match=msg):
        collection_stats(base, [fts[1], f], progress=False)
    # TaskVector.load reads it, and apply_to turns it into a model that is accepted
    back = TaskVector.load(f)
    assert back.keys() == tau.keys() and all(torch.equal(back[k], tau[k]) for k in tau.keys())
    applied = back.apply_to(base, tmp_path / "applied", progress=False)
    assert open_checkpoint(applied).keys() == open_checkpoint(base).keys()


# ----------------------------------------------------------------------------- argument shapes

def test_one_finetune_as_a_string_or_path(models, tmp_path):
    root, base, fts = models
    listed = merge_checkpoints(base, [fts[0]], "task_arithmetic", MergeParams(weights=0.5), tmp_path / "a",
                               progress=False)
    for i, one in enumerate((str(fts[0]), Path(fts[0]))):
        out = merge_checkpoints(str(base), one, "task_arithmetic", {"weights": 0.5}, tmp_path / f"s{i}",
                                progress=False)
        a, b = load_file(listed / "model.safetensors"), load_file(out / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    stats = collection_stats(base, str(fts[0]), basic=True, progress=False)
    assert stats.names == ["ft31"] and stats.cosine().shape == (1, 1)
    rep = check_merge(base, listed, str(fts[0]), progress=False)
    assert rep["sources"] == [str(fts[0])]


def test_names_as_comma_separated_string(models):
    root, base, fts = models
    stats = collection_stats(base, fts, names="a, b", basic=True, progress=False)
    assert stats.names == ["a", "b"] == stats.to_dict()["tasks"]
    assert task_names([str(f) for f in fts], "x,y") == ["x", "y"]
    with pytest.raises(TaskvecError, match="1 name for 2 fine-tunes"):
        collection_stats(base, fts, names="a", basic=True, progress=False)


def test_merge_params_accept_single_values_and_dicts(models, tmp_path):
    assert MergeParams(weights=0.5).weights == (0.5,)
    assert MergeParams(densities=0.3).densities == (0.3,)
    assert MergeParams(weights=[1, 2], densities=np.float64(0.5)).weights == (1.0, 2.0)
    assert MergeParams(weights=torch.tensor(0.25)).weights == (0.25,)
    assert MergeParams().densities is None
    for bad in ("0.5", None, (), object(), True, ["0.5", "0.5"]):
        with pytest.raises(TaskvecError, match="weights"):
            MergeParams(weights=bad)
    # a truthy string is not a bool (normalize="no" would have normalised), nor "2" a number
    for kw, what in (({"normalize": "no"}, "normalize"), ({"lambda_": "2"}, "lambda_"), ({"seed": 1.5}, "seed")):
        with pytest.raises(TaskvecError, match=f"MergeParams {what}="):
            MergeParams(**kw)
    assert MergeParams(lambda_=np.float32(2), seed=np.int64(3)).seed == 3
    root, base, fts = models
    via_dict = merge_checkpoints(base, fts, "ties", {"weights": 0.7, "density": 0.5, "lambda": 0.9},
                                 tmp_path / "d", progress=False)
    via_params = merge_checkpoints(base, fts, "ties", MergeParams(weights=(0.7, 0.7), densities=(0.5,), lambda_=0.9),
                                   tmp_path / "p", progress=False)
    a, b = load_file(via_dict / "model.safetensors"), load_file(via_params / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(TaskvecError, match=r"unknown key 'alpha'; valid keys are weights, densities, lambda_"):
        merge_checkpoints(base, fts, "ties", {"alpha": 1}, tmp_path / "x", progress=False)
    with pytest.raises(TaskvecError, match="lambda_ is given twice"):
        merge_checkpoints(base, fts, "ties", {"lambda": 1, "lambda_": 2}, tmp_path / "x", progress=False)
    with pytest.raises(TaskvecError, match="expected MergeParams or a dict"):
        merge_checkpoints(base, fts, "ties", [0.5], tmp_path / "x", progress=False)
    with pytest.raises(TaskvecError, match=r"no output folder; pass out="):
        merge_checkpoints(base, fts, "task_arithmetic")
    assert not (tmp_path / "x").exists() and not Path("merged").exists()


# ----------------------------------------------------------------------------- the package's surface

def test_package_exports_the_main_objects_lazily():
    import taskvec.merge.driver
    import taskvec.ntk.kernel
    import taskvec.theory.stopping

    assert taskvec.TaskVector is TaskVector and taskvec.open_checkpoint is open_checkpoint
    assert taskvec.merge_checkpoints is taskvec.merge.driver.merge_checkpoints
    assert taskvec.compute_kernel is taskvec.ntk.kernel.compute_kernel
    assert taskvec.critical_radius is taskvec.theory.stopping.critical_radius
    for name in taskvec.__all__:
        assert getattr(taskvec, name) is not None, name
    assert set(taskvec.__all__) <= set(dir(taskvec))
    with pytest.raises(AttributeError):
        taskvec.no_such_thing  # noqa: B018
    # `import taskvec` loads none of the heavy modules (the CLI's start-up depends on it)
    code = ("import sys, taskvec; heavy = [m for m in ('torch', 'numpy', 'taskvec.vectors', 'transformers') "
            "if m in sys.modules]; print(heavy); taskvec.TaskVector; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["[]", "True"]


@pytest.mark.parametrize("obj", [CollectionStats.cosine, CollectionStats.names, CollectionStats.to_dict,
                                 KernelResult.load, KernelResult.n, DecayFit.predict, DecayFit.to_dict])
def test_public_methods_have_docstrings(obj):
    assert (obj.__doc__ or "").strip()
