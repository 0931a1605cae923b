"""`taskvec theory` on bad inputs: every error names the option and file (and the curve in it), says what
to give; clipping and reordering of the input are warned once; every option has a help text."""

import argparse
import json
import warnings

import numpy as np
import pytest

from taskvec.cli import build_parser, main
from taskvec.errors import TaskvecError, TaskvecWarning
from taskvec.theory import fit_decay, fit_spectrum, measured_rate
from theory_support import one_blas_thread  # noqa: F401  (autouse fixture)


@pytest.fixture(autouse=True)
def _every_warning():
    """Show repeated warnings too, so that 'warned once' is tested, not Python's once-per-line registry."""
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        yield


def _ev(tmp_path, name="ev.npy", n=64, ascending=False):
    mu = 0.5 * np.arange(1, n + 1.0) ** -2.0
    path = tmp_path / name
    np.save(path, mu[::-1] if ascending else mu)
    return path


def _theory(tmp_path, *argv):
    return main(["theory", *map(str, argv), "--out", str(tmp_path / "out"), "--overwrite"])


def _error(capsys, *parts):
    err = capsys.readouterr().err
    assert err.startswith("taskvec theory: error: ") and err.count("\n") == 1, err
    for part in parts:
        assert part in err, err
    return err


def test_residuals_error_names_the_file_and_what_to_give(tmp_path, capsys):
    ev = _ev(tmp_path)
    empty, nan = tmp_path / "r_empty.npy", tmp_path / "r_nan.npy"
    np.save(empty, np.array([]))
    np.save(nan, np.array([0.1, np.nan, -0.2]))
    assert _theory(tmp_path, "--eigenvalues", ev, "--residuals", empty) == 2
    _error(capsys, f"--residuals {empty}: held-out residuals must be a non-empty finite array, got an empty array; "
                   "give the residuals y − f̂(x) of a fitted model on held-out examples")
    assert _theory(tmp_path, "--eigenvalues", ev, "--residuals", nan) == 2
    _error(capsys, f"--residuals {nan}: ", "got 1 NaN/Inf of 3 values")
    text = tmp_path / "r_text.npy"
    np.save(text, np.array(["a", "b"]))
    assert _theory(tmp_path, "--eigenvalues", ev, "--residuals", text) == 2
    err = _error(capsys, f"--residuals file {text} holds <U1 values, not numbers")
    assert err.count("--residuals") == 1  # said once, not prefixed twice
    assert _theory(tmp_path, "--eigenvalues", ev, "--sigma", "0.3", "--curves", tmp_path / "nope.json") == 2
    _error(capsys, f"--curves file {tmp_path / 'nope.json'} does not exist")


def test_curve_errors_name_the_file_and_the_curve(tmp_path, capsys):
    ev = _ev(tmp_path)
    plain = tmp_path / "curves_bad.json"
    plain.write_text(json.dumps({"epoch": [1, 2], "error": [0.5]}))
    assert _theory(tmp_path, "--eigenvalues", ev, "--sigma", "0.3", "--curves", plain) == 2
    _error(capsys, f'--curves {plain} ("epoch"/"error" curve): validation curve needs one error per epoch, '
                   "got 2 epochs and 1 errors")
    words = tmp_path / "words.json"
    words.write_text(json.dumps({"epoch": [1, 2], "error": ["low", "high"]}))
    assert _theory(tmp_path, "--eigenvalues", ev, "--sigma", "0.3", "--curves", words) == 2
    _error(capsys, f"--curves {words}", "must be lists of numbers, one error per epoch")
    ft = tmp_path / "curves.json"
    ft.write_text(json.dumps({"batch_size": 8, "primary_metric": "mse",
                              "eval": [{"step": 1, "epoch": 1.0, "validation": {"mse": 0.5}},
                                       {"step": 2, "validation": {"mse": 0.4}}]}))
    assert _theory(tmp_path, "--eigenvalues", ev, "--sigma", "0.3", "--curves", ft) == 2
    _error(capsys, f"--curves {ft} (validation['mse'] curve): eval entries with validation['mse'] need an 'epoch'; "
                   "1 of 2 have none")
    ft.write_text(json.dumps({"primary_metric": "mse", "eval": [{"epoch": 1.0, "validation": {"mse": None}}]}))
    assert _theory(tmp_path, "--eigenvalues", ev, "--sigma", "0.3", "--curves", ft) == 2
    _error(capsys, f"--curves {ft} (validation['mse'] curve): validation curve has no finite errors")
    ft.write_text(json.dumps({"eval": "nope"}))
    assert _theory(tmp_path, "--eigenvalues", ev, "--sigma", "0.3", "--curves", ft) == 2
    _error(capsys, f"--curves {ft}: 'eval' must be a list")


def test_measured_errors_errors_name_the_file(tmp_path, capsys):
    ev = _ev(tmp_path)
    me = tmp_path / "me1.json"
    for data, words in (({"n": [100, 100], "error": [0.3, 0.2]},
                         "a rate needs errors at two or more distinct sample sizes n, got n = 100; add errors measured "
                         "at another n"),
                        ({"n": [50, 100, 200], "error": [0.3, 0.2]},  # was silently cut to the first two
                         "3 sample sizes n but 2 errors; give one error (or a list of replicate errors) per n"),
                        ({"n": ["fifty", 100], "error": [0.3, 0.2]}, "'n' and 'error' must be lists of numbers"),
                        ({"n": [50, 100], "error": [0.3, 0.2], "noise_floor": 0.25}, "test error at n=100 is not above the noise floor 0.25")):
        me.write_text(json.dumps(data))
        assert _theory(tmp_path, "--eigenvalues", ev, "--sigma", "0.3", "--measured-errors", me) == 2
        _error(capsys, f"--measured-errors {me}: {words}")
    with pytest.raises(TaskvecError, match="3 sample sizes n but 2 errors"):
        measured_rate([50, 100, 200], [0.3, 0.2])


def test_nested_errors_name_the_file_and_array(tmp_path, capsys):
    ev = _ev(tmp_path)
    nested = tmp_path / "nested.npz"
    np.savez(nested, n_50=0.5 * np.arange(1, 51.0) ** -2)
    assert _theory(tmp_path, "--eigenvalues", ev, "--sigma", "0.3", "--nested", nested) == 2
    _error(capsys, f"--nested {nested} holds 1 array(s); the non-parametric rate needs spectra of at least two")
    np.savez(nested, n_50=0.5 * np.arange(1, 51.0) ** -2, n_10=np.ones(20))
    assert _theory(tmp_path, "--eigenvalues", ev, "--sigma", "0.3", "--nested", nested) == 2
    _error(capsys, f"--nested {nested} array n_10: 20 eigenvalues for a subset of size 10")
    np.savez(nested, n_50=0.5 * np.arange(1, 51.0) ** -2, n_10=np.array([1.0, np.nan]))
    assert _theory(tmp_path, "--eigenvalues", ev, "--sigma", "0.3", "--nested", nested) == 2
    _error(capsys, f"--nested {nested} array n_10: 1 eigenvalue(s) are NaN/Inf")
    np.savez(nested, n_50=0.5 * np.arange(1, 51.0) ** -2, n_100=0.5 * np.arange(1, 101.0) ** -2)
    assert _theory(tmp_path, "--eigenvalues", ev, "--nested", nested) == 2
    _error(capsys, f"--nested {nested}: the non-parametric rate (ε̂_n² on nested subsets) needs σ; pass --sigma")
    np.savez(nested, n_50=0.5 * np.arange(50, 0.0, -1) ** -2, n_100=0.5 * np.arange(1, 101.0) ** -2)
    assert _theory(tmp_path, "--eigenvalues", ev, "--sigma", "0.3", "--nested", nested, "--no-figures") == 0
    err = capsys.readouterr().err
    assert err == (f"taskvec theory: warning: --nested {nested}: arrays n_50 were not in descending order; "
                   "sorted descending (μ̂₁ the largest) before use\n")


def test_targets_of_the_wrong_length_name_the_file(tmp_path, capsys):
    K = np.eye(6) + 0.1
    np.save(tmp_path / "K.npy", K)
    np.save(tmp_path / "r.npy", np.ones(5))
    assert _theory(tmp_path, "--kernel", tmp_path / "K.npy", "--targets", tmp_path / "r.npy") == 2
    _error(capsys, f"--targets {tmp_path / 'r.npy'}: has 5 entries but the kernel has n=6")


def _ntk(tmp_path, name, mu):
    folder = tmp_path / name
    folder.mkdir()
    np.save(folder / "eigenvalues.npy", np.asarray(mu, dtype=float))
    return folder


def test_no_window_possible_says_what_prevents_it(tmp_path, capsys):
    """The window already covers every eigenvalue: 'widen the window' was wrong advice."""
    small_tail = _ntk(tmp_path, "tail", np.r_[1.0, 0.5, np.full(62, 1e-9)])
    assert _theory(tmp_path, "--ntk", small_tail, "--sigma", "0.5") == 2
    err = _error(capsys, f"--ntk {small_tail / 'eigenvalues.npy'}: only 2 of 64 eigenvalues are ≥ --tol 1e-06 × μ̂₁, "
                         "so no --window holds the 3 a decay fit needs", "lower --tol to 1e-09 (μ̂₃/μ̂₁) or less")
    assert "widen" not in err
    assert _theory(tmp_path, "--ntk", small_tail, "--sigma", "0.5", "--tol", "1e-9", "--no-figures") == 0  # the advice works
    capsys.readouterr()
    rank2 = _ntk(tmp_path, "rank2", np.r_[1.0, 0.5, np.zeros(62)])
    for tol in ("1e-6", "0"):  # zeros are never fitted, whatever --tol
        assert _theory(tmp_path, "--ntk", rank2, "--sigma", "0.5", "--tol", tol) == 2
        err = _error(capsys, "only 2 of 64 eigenvalues are nonzero (the kernel has rank 2)",
                     "whatever --window and --tol", "recompute it on more varied probe examples")
        assert "widen" not in err and "lower --tol" not in err
    two = _ntk(tmp_path, "two", [1.0, 0.5])
    assert _theory(tmp_path, "--ntk", two, "--sigma", "0.5") == 2
    _error(capsys, "only 2 eigenvalue(s); a decay fit needs at least 3", "--top-k")


def test_window_errors_use_the_option_names(tmp_path, capsys):
    ev = _ev(tmp_path)
    assert _theory(tmp_path, "--eigenvalues", ev, "--window", "1", "2") == 2
    _error(capsys, "--window 1 2 holds 2 eigenvalue(s); a decay fit needs at least 3 — widen --window (e.g. --window 1 32)")
    assert _theory(tmp_path, "--eigenvalues", ev, "--window", "63", "100") == 2
    err = _error(capsys, "--window 63 100: there are only 64 eigenvalues, so a window starting at 63 holds 2 of the 3 "
                         "a decay fit needs; start --window at 62 or lower")
    assert "--tol" not in err  # lowering --tol cannot help here
    cut = tmp_path / "cut.npy"
    np.save(cut, np.r_[0.5 * np.arange(1, 41.0) ** -2, np.full(24, 1e-12)])
    assert _theory(tmp_path, "--eigenvalues", cut, "--window", "39", "60") == 2
    err = _error(capsys, "--window 39 60: eigenvalues 41–64 lie below --tol 1e-06 × μ̂₁", "or lower --tol")
    assert "warning" not in err  # no clip warning before an error
    assert _theory(tmp_path, "--eigenvalues", ev, "--window", "5", "2") == 2
    _error(capsys, "--window 5 2: decay-fit window [5, 2] must be FIRST ≤ LAST")


def test_window_past_the_spectrum_is_clipped_with_one_warning(tmp_path, capsys):
    ev = _ev(tmp_path)
    assert _theory(tmp_path, "--eigenvalues", ev, "--window", "1", "1000", "--sigma", "0.3", "--bootstrap", "0") == 0
    err = capsys.readouterr().err  # figures on: the figure's fit must not warn a second time
    assert err == "taskvec theory: warning: --window 1 1000 clipped to [1, 64]: there are only 64 eigenvalues\n"
    assert json.loads((tmp_path / "out" / "theory.json").read_text())["decay_fits"]["power"]["window"] == [1, 64]
    cut = tmp_path / "cut.npy"
    np.save(cut, np.r_[0.5 * np.arange(1, 41.0) ** -2, np.full(24, 1e-12)])
    assert _theory(tmp_path, "--eigenvalues", cut, "--window", "1", "60", "--no-figures") == 0
    assert capsys.readouterr().err == ("taskvec theory: warning: --window 1 60 clipped to [1, 40]: eigenvalues 41–64 "
                                       "lie below --tol 1e-06 × μ̂₁ (lower --tol to fit them)\n")
    assert _theory(tmp_path, "--eigenvalues", ev, "--window", "1", "64", "--no-figures") == 0
    assert capsys.readouterr().err == ""  # a window inside the spectrum: nothing to say


def test_library_fits_warn_once_on_a_clipped_window():
    mu = np.arange(1, 21.0) ** -2
    with pytest.warns(TaskvecWarning, match=r"--window 2 50 clipped to \[2, 20\]: there are only 20 eigenvalues"):
        assert fit_decay(mu, window=(2, 50), n_boot=0).window == (2, 20)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fits = fit_spectrum(mu, window=(2, 50), n_boot=0)
    assert [str(w.message).split(":")[0] for w in caught] == ["--window 2 50 clipped to [2, 20]"]
    assert fits["power"].window == fits["exponential"].window == (2, 20)
    zeros = np.r_[mu, np.zeros(10)]  # exact zeros are never fitted, even with tol = 0
    assert fit_decay(zeros, tol=0, n_boot=0).window == (1, 15)
    assert fit_decay(zeros, window=(1, None), tol=0, n_boot=0).window == (1, 20)


def test_ascending_eigenvalues_are_sorted_with_one_warning(tmp_path, capsys):
    asc = _ev(tmp_path, "ev_asc.npy", ascending=True)
    assert _theory(tmp_path, "--eigenvalues", asc, "--sigma", "0.3", "--bootstrap", "0") == 0
    res_asc = json.loads((tmp_path / "out" / "theory.json").read_text())
    assert capsys.readouterr().err == (f"taskvec theory: warning: --eigenvalues {asc}: eigenvalues were in ascending "
                                       "order; sorted descending (μ̂₁ the largest) before use\n")
    shuffled = tmp_path / "ev_mixed.npy"
    np.save(shuffled, np.random.default_rng(0).permutation(np.load(asc)))
    assert _theory(tmp_path, "--eigenvalues", shuffled, "--sigma", "0.3", "--bootstrap", "0", "--no-figures") == 0
    assert "eigenvalues were not in descending order; sorted descending" in capsys.readouterr().err
    desc = _ev(tmp_path)
    assert _theory(tmp_path, "--eigenvalues", desc, "--sigma", "0.3", "--bootstrap", "0") == 0
    assert capsys.readouterr().err == ""
    res = json.loads((tmp_path / "out" / "theory.json").read_text())
    assert res["decay_fits"] == res_asc["decay_fits"] and res["early_stopping"] == res_asc["early_stopping"]


def _theory_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["theory"]


def test_every_theory_option_has_help_with_its_default():
    parser = _theory_parser()
    for action in parser._actions:
        name = "/".join(action.option_strings)
        assert action.help and action.help.strip(), f"{name} has no help text"
        if action.default not in (None, False, argparse.SUPPRESS):
            assert "default" in action.help, f"{name} (default {action.default!r}) does not state its default"
    text = parser.format_help()
    assert "seed of the bootstrap resamples and the --holdout split (default 0)" in " ".join(text.split())
    assert "write theory.json only" in text
    assert "they are sorted descending" in " ".join(text.split())  # --eigenvalues: any order
