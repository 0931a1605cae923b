"""`taskvec theory` end to end on saved arrays: theory.json contents, figures, errors."""

import json

import numpy as np
import pytest

from taskvec.cli import main
from theory_support import one_blas_thread  # noqa: F401  (autouse fixture)


def _spectrum(tmp_path, beta=2.0, n=200):
    i = np.arange(1, n + 1.0)
    path = tmp_path / "ev.npy"
    np.save(path, 0.5 * i**-beta)
    return path


def test_theory_from_eigenvalues(tmp_path, capsys):
    ev = _spectrum(tmp_path)
    nested = tmp_path / "nested.npz"
    np.savez(nested, **{f"n_{n}": 0.5 * np.arange(1, n + 1.0) ** -2.0 for n in (50, 100, 200)})
    meas = tmp_path / "meas.json"
    meas.write_text(json.dumps({"n": [50, 100, 200], "error": [0.2, 0.13, 0.08]}))
    out = tmp_path / "out"
    rc = main(["theory", "--eigenvalues", str(ev), "--sigma", "0.3", "--lr", "0.05", "--batch-size", "8",
               "--epochs-trained", "3", "--nested", str(nested), "--measured-errors", str(meas),
               "--bootstrap", "20", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "theory.json").read_text())
    assert res["decay_fits"]["power"]["rate"] == pytest.approx(2.0, rel=1e-6)
    assert res["predicted_rate"]["exponent"] == pytest.approx(-2 / 3, rel=1e-6)
    es = res["early_stopping"]
    assert es["radius_source"].startswith("assumed 1")
    assert es["T_hat"] == int(np.floor(es["eta_star"]))  # α = 1: T̂ = ⌊1/ε̂²⌋
    tr = res["training"]
    assert tr["kernel_step_alpha"] == pytest.approx(0.1) and tr["epochs"] == pytest.approx(tr["T_hat_steps"] * 8 / 200)
    assert tr["trained_over_predicted"] == pytest.approx(3 / tr["epochs"])
    assert len(res["sensitivity"]) == 25
    assert set(res["rate_comparison"]) == {"decay_fit", "nonparametric"}
    assert {"eigenvalues.png", "stopping_rule.pdf", "rates.png"} <= {p.name for p in out.iterdir()}
    assert res["inputs"]["eigenvalues"]["sha256"]
    printed = capsys.readouterr().out
    assert "T̂" in printed and f"trained 3 epochs = {3 / tr['epochs']:.3g}× the prediction" in printed


def test_theory_from_kernel_and_targets_estimates_sigma_and_radius(tmp_path):
    rng = np.random.default_rng(0)
    x = np.sort(rng.uniform(0, 1, 150))
    K = np.minimum(x[:, None], x[None, :])
    y = np.sin(2 * x) / 2 + 0.2 * rng.normal(size=x.size)
    (tmp_path / "ntk").mkdir()
    np.save(tmp_path / "ntk" / "kernel.npy", K)  # the layout KernelResult.save writes
    np.save(tmp_path / "r.npy", y)
    out = tmp_path / "out"
    assert main(["theory", "--ntk", str(tmp_path / "ntk"), "--targets", str(tmp_path / "r.npy"),
                 "--no-figures", "--bootstrap", "0", "--out", str(out)]) == 0
    res = json.loads((out / "theory.json").read_text())
    est = res["estimates"]
    assert 0.14 < est["sigma_krr"]["sigma"] < 0.26 and "sigma_spectral_tail" in est
    es = res["early_stopping"]
    assert es["sigma"] == pytest.approx(est["sigma_krr"]["sigma"]) and es["radius"] == pytest.approx(est["radius_krr"]["radius"])
    assert "constant_mode" in res
    kp = res["kernel_predictors"]
    assert kp["n_test"] == 38 and kp["test_mse_at_T_hat"] < kp["test_mse_at_start"]
    assert kp["oracle_test_mse"] <= kp["test_mse_at_T_hat"] and kp["ridge_best_test_mse"] <= kp["ridge_test_mse_at_gcv"]


def test_theory_errors_exit_2_and_leave_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["theory", "--eigenvalues", str(tmp_path / "missing.npy"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.npy"
    np.save(bad, np.array([1.0, np.nan]))
    assert main(["theory", "--eigenvalues", str(bad), "--out", str(out)]) == 2
    assert "NaN" in capsys.readouterr().err
    ev = _spectrum(tmp_path)
    assert main(["theory", "--eigenvalues", str(ev), "--lr", "0.1", "--out", str(out)]) == 2
    assert "--batch-size" in capsys.readouterr().err
    for extra, missing in ([], "pass --lr and --batch-size"), (["--lr", "0.1"], "pass --batch-size"), \
                          (["--batch-size", "8"], "pass --lr"):  # --epochs-trained alone would be silently unused
        assert main(["theory", "--eigenvalues", str(ev), "--sigma", "0.3", "--epochs-trained", "3", *extra,
                     "--out", str(out)]) == 2
        assert f"--epochs-trained is compared with the predicted epochs, which need --lr and --batch-size (or " \
               f"--curves for the batch size); {missing}" in capsys.readouterr().err
    assert main(["theory", "--eigenvalues", str(ev), "--targets", str(ev), "--out", str(out)]) == 2
    assert main(["theory", "--ntk", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "taskvec ntk" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["theory", "--ntk", str(tmp_path / "empty"), "--out", str(out)]) == 2
    assert "holds neither kernel.npy nor eigenvalues.npy" in capsys.readouterr().err
    for opt, val, words in [("--tol", "-1", "--tol -1.0 must lie in [0, 1)"), ("--bootstrap", "-1", "must be ≥ 0"),
                            ("--holdout", "2", "must be a fraction"), ("--seed", "-5", "--seed -5 must be ≥ 0"),
                            ("--epochs-trained", "-3", "--epochs-trained -3.0 must be a positive finite number"),
                            ("--epochs-trained", "inf", "--epochs-trained inf must be a positive finite number"),
                            ("--radius", "-2", "--radius -2.0 must be a positive finite number"),
                            ("--sigma", "nan", "--sigma nan must be a positive finite number"),
                            ("--lr", "inf", "--lr inf must be a positive finite number")]:
        assert main(["theory", "--eigenvalues", str(ev), opt, val, "--out", str(out)]) == 2
        assert words in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: not one of the optimisers the translation knows
        main(["theory", "--eigenvalues", str(ev), "--optimizer", "banana", "--out", str(out)])
    assert "invalid choice" in capsys.readouterr().err
    text = tmp_path / "notes.txt"
    text.write_text("not an archive")
    assert main(["theory", "--eigenvalues", str(ev), "--n", "64", "--sigma", "0.5", "--nested", str(text),
                 "--out", str(out)]) == 2
    assert "notes.txt has no numpy header (text or another format): not an .npz archive" in capsys.readouterr().err
    assert main(["theory", "--eigenvalues", str(ev), "--n", "64", "--sigma", "0.5", "--nested", str(ev),
                 "--out", str(out)]) == 2
    assert "single .npy array" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_arrays_that_are_not_npy_files_are_refused_in_one_line(tmp_path, capsys):
    """numpy would call a text file 'pickled (object) data', and raise on an .npz or empty file."""
    (tmp_path / "mu.txt").write_text("0.5\n0.25\n")
    np.savez(tmp_path / "mu.npz", mu=np.ones(3))
    (tmp_path / "empty.npy").write_bytes(b"")
    for name, found in (("mu.txt", "has no numpy header (text or another format)"),
                        ("mu.npz", "is an .npz archive"), ("empty.npy", "is empty")):
        assert main(["theory", "--eigenvalues", str(tmp_path / name), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert f"{name} {found}: not a .npy array; save the array with numpy.save" in err and err.count("\n") == 1


def test_theory_prints_its_caveats(tmp_path, capsys):
    """A step α = 2·lr above min(1, 1/μ̂₁) voids the RWY guarantee: said on the console, not only in theory.json."""
    ev = _spectrum(tmp_path)
    assert main(["theory", "--eigenvalues", str(ev), "--sigma", "1", "--lr", "1", "--batch-size", "4", "--n", "400",
                 "--no-figures", "--bootstrap", "0", "--out", str(tmp_path / "out")]) == 0
    res = json.loads((tmp_path / "out" / "theory.json").read_text())
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("caveat: ")]
    assert printed == [f"caveat: {res['spectrum_info']['note']}", f"caveat: {res['training']['note']}"]
    assert "the RWY guarantee does not apply as stated" in printed[1]


def test_theory_compares_with_finetune_curve(tmp_path):
    ev = _spectrum(tmp_path)
    curves = {"n_train": 200, "batch_size": 8, "steps_per_epoch": 25, "loss": "mse", "primary_metric": "mse",
              "eval": [{"step": 25 * e, "epoch": float(e), "validation": {"mse": v}}
                       for e, v in enumerate([1.0, 0.6, 0.45, 0.5, 0.58])]}
    path = tmp_path / "curves.json"
    path.write_text(json.dumps(curves))
    out = tmp_path / "out"
    assert main(["theory", "--eigenvalues", str(ev), "--sigma", "0.3", "--lr", "0.05", "--curves", str(path),
                 "--epochs-trained", "4", "--no-figures", "--bootstrap", "0", "--out", str(out)]) == 0
    res = json.loads((out / "theory.json").read_text())
    c = res["stopping_vs_curve"]
    assert res["training"]["batch_size"] == 8  # taken from the curve
    assert res["training"]["trained_over_predicted"] == pytest.approx(4 / res["training"]["epochs"])
    assert c["best_epoch_measured"] == 2.0 and c["metric"] == "mse"
    assert c["ratio_predicted_over_measured"] == pytest.approx(res["training"]["epochs"] / 2.0)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"foo": 1}))
    assert main(["theory", "--eigenvalues", str(ev), "--sigma", "0.3", "--curves", str(bad), "--out", str(tmp_path / "o2")]) == 2


def test_theory_reads_n_of_a_top_k_spectrum_from_ntk_json(tmp_path):
    """A lanczos folder holds only the top-k eigenvalues; n comes from its ntk.json, not from k."""
    import json as _json

    folder = tmp_path / "ntk"
    folder.mkdir()
    mu = 1.0 / np.arange(1, 11) ** 2
    np.save(folder / "eigenvalues.npy", mu)
    (folder / "ntk.json").write_text(_json.dumps({"n": 200, "strategy": "lanczos"}))
    out = tmp_path / "o"
    assert main(["theory", "--ntk", str(folder), "--sigma", "0.1", "--out", str(out), "--no-figures",
                 "--window", "1", "8"]) == 0
    res = _json.loads((out / "theory.json").read_text())
    assert res["n"] == 200
    assert main(["theory", "--eigenvalues", str(folder / "eigenvalues.npy"), "--n", "200", "--sigma", "0.1",
                 "--out", str(tmp_path / "o2"), "--no-figures", "--window", "1", "8"]) == 0
    res2 = _json.loads((tmp_path / "o2" / "theory.json").read_text())
    assert res["early_stopping"] == res2["early_stopping"]  # the same as giving --n 200 by hand
