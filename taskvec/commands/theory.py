"""`taskvec theory`: predictions of the kernel-regime theory from a saved eNTK spectrum (no model needed)."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import warnings
import zipfile
from pathlib import Path

import numpy as np

from ..errors import TaskvecError, TaskvecWarning


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "theory",
        help="decay fits, early-stopping time, rates from saved eNTK eigenvalues",
        description=("Regenerate the theory's predictions from a saved spectrum: decay fits, d(λ), the RWY critical "
                     "radius and stopping time T̂ (in optimiser steps and epochs), predicted rates; writes theory.json "
                     "and figures. Eigenvalues are of K/n; the kernel is never normalised."),
    )
    src = p.add_argument_group("spectrum")
    src.add_argument("--eigenvalues", type=Path, help="eigenvalues of K/n (.npy; top-k allowed with --n); any order: "
                     "they are sorted descending, with a warning if they were not")
    src.add_argument("--kernel", type=Path, help="the eNTK K = J Jᵀ (.npy, n×n, unnormalised); its spectrum is used if --eigenvalues is absent")
    src.add_argument("--ntk", type=Path, help="a folder saved by `taskvec ntk` (kernel.npy and/or eigenvalues.npy)")
    src.add_argument("--n", type=int, help="number of probe examples (default: number of eigenvalues)")
    src.add_argument("--window", type=int, nargs=2, metavar=("FIRST", "LAST"),
                     help="1-based index window of the decay fits (default: 1 to min(last eigenvalue ≥ --tol·μ̂₁, ⌈n/2⌉)); "
                     "a LAST past the eigenvalues above the cut is clipped to them, with a warning")
    src.add_argument("--tol", type=float, default=1e-6, help="noise cut: eigenvalues below tol·μ̂₁ are never fitted (default 1e-6)")
    noise = p.add_argument_group("noise level σ and RKHS radius R")
    g = noise.add_mutually_exclusive_group()
    g.add_argument("--sigma", type=float, help="noise standard deviation of the targets (default: from --residuals or "
                   "--kernel/--targets; without σ there is no stopping time T̂)")
    g.add_argument("--residuals", type=Path, help="held-out residuals of a fitted model (.npy); σ = their RMS (an upper bound)")
    noise.add_argument("--targets", type=Path, help="residual targets y − f(θ₀) on the probes (.npy, one per probe); "
                       "with --kernel: σ by kernel ridge (effective dof) and R by its RKHS norm (default: none)")
    noise.add_argument("--holdout", type=float, default=0.25, help="with --kernel/--targets: seeded fraction of probes held out "
                       "to measure early-stopped kernel GD and kernel ridge on the eNTK (0 disables; default 0.25)")
    noise.add_argument("--radius", type=float, help="RKHS radius R of the target function (default: estimated with --kernel/--targets, else 1)")
    tr = p.add_argument_group("training settings (translate T̂ into steps and epochs)")
    tr.add_argument("--lr", type=float, help="learning rate of the fine-tune (default: none; T̂ is then not translated "
                    "into optimiser steps and epochs)")
    tr.add_argument("--batch-size", type=int, help="batch size of the fine-tune (default: the --curves file's, else none)")
    tr.add_argument("--loss", default="mean", choices=["half_mean", "mean", "half_sum", "sum"], help="loss convention (default mean, i.e. MSE without ½)")
    tr.add_argument("--optimizer", default="sgd", choices=["sgd", "gd", "adam", "adamw"],
                    help="sgd/gd (exact correspondence) or adam/adamw (approximate) (default sgd)")
    tr.add_argument("--epochs-trained", type=float, help="epochs actually trained, compared with the predicted epochs "
                    "(trained_over_predicted); needs --lr and --batch-size (or --curves for the batch size) and σ "
                    "(default: none)")
    tr.add_argument("--curves", type=Path, help="validation curve to compare T̂ with: a `taskvec finetune` curves.json, "
                    'or {"epoch": [...], "error": [...]}; its batch size is used when --batch-size is absent (default: none)')
    rt = p.add_argument_group("rates")
    rt.add_argument("--nested", type=Path, help=".npz of eigenvalues of K/n on two or more nested subsets, arrays named "
                    "n_<size>; the non-parametric rate, needs σ (default: none)")
    rt.add_argument("--measured-errors", type=Path, help='.json {"n": [...], "error": [...], "noise_floor": optional} with '
                    "errors at two or more distinct n; the measured rate (default: none)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for fit intervals (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resamples and the --holdout split (default 0)")
    p.add_argument("--no-figures", action="store_true", help="write theory.json only (default: also the figures, PNG + PDF)")
    p.add_argument("--no-progress", action="store_true", help="accepted like every command's (theory shows no bar)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--out", type=Path, required=True, help="output folder (written atomically)")
    p.set_defaults(func=run)


def _check_numbers(args: argparse.Namespace) -> None:
    """Refuse numeric options outside their meaning before any work."""
    bad = []
    if not args.tol >= 0 or args.tol >= 1:
        bad.append(f"--tol {args.tol} must lie in [0, 1)")
    if args.bootstrap < 0:
        bad.append(f"--bootstrap {args.bootstrap} must be ≥ 0")
    if not 0 <= args.holdout < 1:
        bad.append(f"--holdout {args.holdout} must be a fraction in [0, 1) (0 disables)")
    if args.seed < 0:
        bad.append(f"--seed {args.seed} must be ≥ 0")
    for flag in ("--sigma", "--radius", "--lr", "--epochs-trained"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None and not (math.isfinite(value) and value > 0):
            bad.append(f"{flag} {value} must be a positive finite number")
    if bad:
        raise TaskvecError("; ".join(bad))


def _check_epochs_trained(args: argparse.Namespace) -> None:
    """--epochs-trained is only used beside the predicted epochs, which need --lr and a batch size."""
    if args.epochs_trained is None:
        return
    missing = [flag for flag, given in (("--lr", args.lr is not None),
                                        ("--batch-size", args.batch_size is not None or args.curves is not None))
               if not given]
    if missing:
        raise TaskvecError(f"--epochs-trained is compared with the predicted epochs, which need --lr and --batch-size "
                           f"(or --curves for the batch size); pass {' and '.join(missing)}")


def _recorded_n(folder: Path) -> int | None:
    """The probe count n that `taskvec ntk` recorded in folder/ntk.json (None if absent)."""
    try:
        n = json.loads((folder / "ntk.json").read_text()).get("n")
    except (OSError, ValueError, AttributeError):
        return None
    return int(n) if isinstance(n, int) and n > 0 else None


def _file_format(path: Path) -> str:
    """'npy', 'npz', 'empty' or 'other', from the file's first bytes."""
    with path.open("rb") as fh:
        head = fh.read(6)
    if not head:
        return "empty"
    return "npy" if head == b"\x93NUMPY" else "npz" if head.startswith(b"PK") else "other"


_FOUND = {"empty": "is empty", "npy": "is a single .npy array", "npz": "is an .npz archive",
          "other": "has no numpy header (text or another format)"}


@contextlib.contextmanager
def _about(label: str):
    """Re-raise a library TaskvecError with the option and file it came from prefixed (`label`)."""
    try:
        yield
    except TaskvecError as exc:
        raise TaskvecError(f"{label}: {exc}") from None


def _unsorted_note(arr: np.ndarray) -> str | None:
    """How a spectrum departs from descending order, for a warning (None when it is descending)."""
    d = np.diff(np.asarray(arr, dtype=np.float64).ravel())
    if not np.any(d > 0):
        return None
    return "in ascending order" if np.all(d >= 0) else "not in descending order"


def _load_npy(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise TaskvecError(f"{what} file {path} does not exist")
    fmt = _file_format(path)
    if fmt != "npy":
        raise TaskvecError(f"{what} file {path} {_FOUND[fmt]}: not a .npy array; save the array with numpy.save")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise TaskvecError(f"{what} file {path} is not a readable .npy array ({exc}); save it with numpy.save") from None
    if not np.issubdtype(arr.dtype, np.number):
        raise TaskvecError(f"{what} file {path} holds {arr.dtype} values, not numbers; save a numeric array")
    return arr


def _kernel_predictors(K: np.ndarray, r: np.ndarray, sigma: float, radius: float, holdout: float, seed: int) -> dict:
    """Early-stopped kernel GD and kernel ridge on a seeded train/held-out split of the probes: the
    error at the RWY T̂ (rule applied to the training block's spectrum) beside the oracle-best t."""
    from ..theory.predictors import early_stopped_kernel_gd, kernel_ridge_path

    n = K.shape[0]
    n_test = int(round(holdout * n))
    if not 0 < holdout < 1 or n_test < 2 or n - n_test < 4:
        raise TaskvecError(f"--holdout {holdout} leaves too few probes (n={n}); use a fraction in (0, 1) or 0 to disable")
    perm = np.random.default_rng(seed).permutation(n)
    te, tr = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    Ktr, Kte = K[np.ix_(tr, tr)], K[np.ix_(te, tr)]
    gd = early_stopped_kernel_gd(Ktr, r[tr], sigma, radius=radius, K_test_train=Kte, test_targets=r[te], horizon=50)
    top = float(gd["eigenvalues"][0])
    ridge = kernel_ridge_path(Ktr, r[tr], top * np.logspace(-6, 1, 36), K_test_train=Kte, test_targets=r[te])
    j = int(np.argmin(np.abs(ridge["lambda"] - ridge["gcv_lambda"])))
    summary = {"n_train": int(tr.size), "n_test": int(te.size), "seed": seed, "T_hat": gd["T_hat"],
               "test_mse_at_T_hat": gd["error_at_T_hat"], "oracle_t": gd["oracle_t"], "oracle_test_mse": gd["oracle_error"],
               "oracle_at_horizon": gd["oracle_at_horizon"],
               "test_mse_at_start": float(gd["path"]["test_mse"][0]), "ridge_gcv_lambda": ridge["gcv_lambda"],
               "ridge_test_mse_at_gcv": float(ridge["test_mse"][j]), "ridge_best_test_mse": float(np.min(ridge["test_mse"])),
               "note": "targets are residuals y - f(theta0); test MSE at t=0 is the pretrained model's"}
    return {"gd": gd, "ridge": ridge, "summary": summary}


def _read_curve(path: Path) -> dict:
    """Epochs and validation errors from a finetune curves.json (eval list) or a plain {epoch, error} file,
    checked here so that a bad file is refused before the analysis, naming the file and the curve in it."""
    from ..theory.stopping import compare_with_curve

    if not path.is_file():
        raise TaskvecError(f"--curves file {path} does not exist; pass the curves.json `taskvec finetune` wrote")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TaskvecError(f"--curves {path}: not readable JSON ({exc})") from None
    if isinstance(data, dict) and "eval" in data:
        metric = data.get("primary_metric", "mse")
        evals = data["eval"]
        if not isinstance(evals, list) or not all(isinstance(e, dict) for e in evals):
            raise TaskvecError(f"--curves {path}: 'eval' must be a list of evaluation entries; pass the curves.json "
                               "that `taskvec finetune` wrote")
        rows = [e for e in evals if isinstance(e.get("validation"), dict) and metric in e["validation"]]
        if not rows:
            raise TaskvecError(f"--curves {path}: no eval entries with validation[{metric!r}]")
        where = f"validation[{metric!r}] curve"
        no_epoch = [i for i, e in enumerate(rows) if "epoch" not in e]
        if no_epoch:
            raise TaskvecError(f"--curves {path} ({where}): eval entries with validation[{metric!r}] need an 'epoch'; "
                               f"{len(no_epoch)} of {len(rows)} have none")
        curve = {"epoch": [r["epoch"] for r in rows], "error": [r["validation"][metric] for r in rows],
                 "batch_size": data.get("batch_size"), "metric": metric}
    elif isinstance(data, dict) and "epoch" in data and "error" in data:
        where = '"epoch"/"error" curve'
        curve = {"epoch": data["epoch"], "error": data["error"], "metric": data.get("metric")}
    else:
        raise TaskvecError(f'--curves {path}: expected a taskvec finetune curves.json or {{"epoch": [...], "error": [...]}}')
    with _about(f"--curves {path} ({where})"):
        try:
            compare_with_curve(None, curve["epoch"], curve["error"])
        except (TypeError, ValueError):
            raise TaskvecError("epochs and errors must be lists of numbers, one error per epoch") from None
    return curve


def _read_measured(path: Path) -> dict:
    """{"n": [...], "error": [...], "noise_floor"?} checked (as the measured rate will use it) before the analysis."""
    from ..theory.rates import measured_rate

    try:
        measured = json.loads(path.read_text())
        measured["n"], measured["error"]
    except (OSError, ValueError, KeyError, TypeError):
        raise TaskvecError(f"--measured-errors {path}: expected JSON with keys 'n' and 'error'") from None
    with _about(f"--measured-errors {path}"):
        try:
            measured_rate(measured["n"], measured["error"], noise_floor=float(measured.get("noise_floor", 0.0)))
        except (TypeError, ValueError):
            raise TaskvecError("'n' and 'error' must be lists of numbers (an error may be a list of replicates) "
                               "and 'noise_floor' a number") from None
    return measured


def _read_nested(path: Path) -> dict:
    """{n_k: eigenvalues} from an .npz of arrays named n_<size>, each checked, naming the file and the array."""
    from ..theory._checks import eigenvalues

    if not path.is_file():
        raise TaskvecError(f"--nested file {path} does not exist")
    fmt = _file_format(path)
    if fmt != "npz":
        raise TaskvecError(f"--nested {path} {_FOUND[fmt]}: not an .npz archive; save the nested spectra "
                           "with numpy.savez(n_<size>=eigenvalues, …)")
    try:
        z = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise TaskvecError(f"--nested {path} is not a readable .npz archive ({exc}); save it with "
                           "numpy.savez(n_<size>=eigenvalues, …)") from None
    with z:
        try:
            nested = {int(k.split("_", 1)[1]): z[k] for k in z.files}
        except (IndexError, ValueError):
            raise TaskvecError(f"--nested {path}: arrays must be named n_<size>, got {z.files}") from None
    if len(nested) < 2:
        raise TaskvecError(f"--nested {path} holds {len(nested)} array(s); the non-parametric rate needs spectra of at "
                           "least two nested subsets, saved as numpy.savez(n_<size>=eigenvalues, …)")
    unsorted = []
    for k, arr in sorted(nested.items()):
        label = f"--nested {path} array n_{k}"
        if k < 1 or np.size(arr) > k:
            raise TaskvecError(f"{label}: {np.size(arr)} eigenvalues for a subset of size {k}; name each array "
                               "n_<subset size> with at most that many eigenvalues")
        eigenvalues(arr, name=label)
        if _unsorted_note(arr):
            unsorted.append(f"n_{k}")
    if unsorted:
        warnings.warn(f"--nested {path}: arrays {', '.join(unsorted)} were not in descending order; sorted descending "
                      "(μ̂₁ the largest) before use", TaskvecWarning, stacklevel=2)
    return nested


def run(args: argparse.Namespace) -> int:
    from .. import __version__
    from ..io import atomic_dir, check_out_dir, atomic_write_json, sha256_file

    _check_numbers(args)
    _check_epochs_trained(args)
    input_paths = [x for x in (args.eigenvalues, args.kernel, args.ntk) if x]
    check_out_dir(args.out, overwrite=args.overwrite, inputs=input_paths)  # fail before the work, not after it
    from ..theory import figures
    from ..theory.stopping import rkhs_radius, sigma_heldout, sigma_krr, sigma_spectral_tail
    from ..theory.summary import analyse_spectrum

    ev_option, kernel_option = "--eigenvalues", "--kernel"
    if args.ntk is not None:
        if not args.ntk.is_dir():
            raise TaskvecError(f"--ntk {args.ntk} is not a folder; pass the folder written by `taskvec ntk`")
        if args.kernel is None and (args.ntk / "kernel.npy").is_file():
            args.kernel, kernel_option = args.ntk / "kernel.npy", "--ntk"
        if args.eigenvalues is None and args.kernel is None and (args.ntk / "eigenvalues.npy").is_file():
            args.eigenvalues, ev_option = args.ntk / "eigenvalues.npy", "--ntk"
            if args.n is None:  # a top-k spectrum (lanczos) knows its n only from ntk.json
                args.n = _recorded_n(args.ntk)
        if args.eigenvalues is None and args.kernel is None:
            raise TaskvecError(f"--ntk {args.ntk} holds neither kernel.npy nor eigenvalues.npy; pass the folder "
                               "written by `taskvec ntk`")
    if args.eigenvalues is None and args.kernel is None:
        raise TaskvecError("pass --eigenvalues FILE.npy (eigenvalues of K/n), --kernel FILE.npy or --ntk DIR")
    from ..theory._checks import eigh, square_kernel, vector

    inputs = {}
    K = eig = None
    if args.kernel is not None:
        K = square_kernel(_load_npy(args.kernel, kernel_option), f"{kernel_option} {args.kernel}")
        inputs["kernel"] = {"path": str(args.kernel), "sha256": sha256_file(args.kernel)}
        ev, U = eigh(K / K.shape[0])
        eig = (np.clip(ev, 0.0, None), U)
    if args.eigenvalues is not None:
        mu = _load_npy(args.eigenvalues, ev_option)
        spectrum_label = f"{ev_option} {args.eigenvalues}"
        inputs["eigenvalues"] = {"path": str(args.eigenvalues), "sha256": sha256_file(args.eigenvalues)}
        if mu.ndim != 1:
            raise TaskvecError(f"{spectrum_label}: expected a 1-D array, got shape {mu.shape}")
        if K is not None and mu.size > K.shape[0]:
            raise TaskvecError(f"--eigenvalues has {mu.size} values but --kernel is {K.shape[0]}×{K.shape[0]}; "
                               "they must describe the same probe set")
        order = _unsorted_note(mu)
        if order:
            warnings.warn(f"{spectrum_label}: eigenvalues were {order}; sorted descending (μ̂₁ the largest) before use",
                          TaskvecWarning, stacklevel=2)
    else:
        mu = eig[0][::-1]
        spectrum_label = f"spectrum of {kernel_option} {args.kernel}"
    sigma, sigma_src, estimates = args.sigma, "given" if args.sigma is not None else None, {}
    radius, radius_src = args.radius, "given" if args.radius is not None else None
    if args.residuals is not None:
        resid = _load_npy(args.residuals, "--residuals")  # its errors name the option and file already
        with _about(f"--residuals {args.residuals}"):
            est = sigma_heldout(resid)
        estimates["sigma_heldout"] = est
        sigma, sigma_src = est["sigma"], est["estimator"]
        inputs["residuals"] = {"path": str(args.residuals), "sha256": sha256_file(args.residuals)}
    if args.targets is not None:
        if K is None:
            raise TaskvecError("--targets needs --kernel (σ and R are estimated by kernel ridge on K)")
        r = vector(_load_npy(args.targets, "--targets"), K.shape[0], f"--targets {args.targets}")
        inputs["targets"] = {"path": str(args.targets), "sha256": sha256_file(args.targets)}
        estimates["sigma_krr"] = sigma_krr(K, r, eig=eig)
        estimates["sigma_spectral_tail"] = sigma_spectral_tail(K, r, eig=eig)
        estimates["radius_krr"] = rkhs_radius(K, r, eig=eig)
        if sigma is None:
            sigma, sigma_src = estimates["sigma_krr"]["sigma"], estimates["sigma_krr"]["estimator"]
        if radius is None:
            radius, radius_src = estimates["radius_krr"]["radius"], estimates["radius_krr"]["estimator"]
    if radius is None:
        radius, radius_src = 1.0, "assumed 1 (no --radius and no --kernel/--targets): T̂ and ε̂ are only meaningful relative to R"
    curve = _read_curve(args.curves) if args.curves is not None else None
    if curve is not None:
        inputs["curves"] = {"path": str(args.curves), "sha256": sha256_file(args.curves)}
        if args.batch_size is None and curve.get("batch_size"):
            args.batch_size = int(curve["batch_size"])
    training = None
    if args.lr is not None or args.batch_size is not None:
        if args.lr is None or args.batch_size is None:
            raise TaskvecError("translating T̂ into epochs needs both --lr and --batch-size")
        training = {"lr": args.lr, "batch_size": args.batch_size, "loss": args.loss, "optimizer": args.optimizer}
        if args.epochs_trained is not None:
            training["epochs_trained"] = args.epochs_trained
    nested = None
    if args.nested is not None:
        nested = _read_nested(args.nested)
        if sigma is None:
            raise TaskvecError(f"--nested {args.nested}: the non-parametric rate (ε̂_n² on nested subsets) needs σ; "
                               "pass --sigma, --residuals or --kernel with --targets")
        inputs["nested"] = {"path": str(args.nested), "sha256": sha256_file(args.nested)}
    measured = None
    if args.measured_errors is not None:
        measured = _read_measured(args.measured_errors)
        inputs["measured_errors"] = {"path": str(args.measured_errors), "sha256": sha256_file(args.measured_errors)}

    result = analyse_spectrum(mu, n=args.n, sigma=sigma, radius=radius, window=args.window, tol=args.tol,
                              n_boot=args.bootstrap, seed=args.seed, training=training, nested=nested, measured=measured,
                              sigma_source=sigma_src or "none", radius_source=radius_src, name=spectrum_label)
    if curve is not None:
        from ..theory.stopping import compare_with_curve

        pred = result.get("training", {}).get("epochs")
        with _about(f"--curves {args.curves}"):
            result["stopping_vs_curve"] = compare_with_curve(pred, curve["epoch"], curve["error"])
        result["stopping_vs_curve"]["metric"] = curve.get("metric")
    kernel_runs = None
    if K is not None and args.targets is not None and args.holdout > 0:
        kernel_runs = _kernel_predictors(K, r, sigma, radius, args.holdout, args.seed)
        result["kernel_predictors"] = kernel_runs["summary"]
    if K is not None:
        from ..theory.stopping import constant_mode

        result["constant_mode"] = constant_mode(eig[1], eig[0])
    result["estimates"] = estimates
    result["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    result["inputs"] = inputs
    result["versions"] = {"taskvec": __version__, "numpy": np.__version__, "python": platform.python_version()}

    with atomic_dir(args.out, overwrite=args.overwrite, inputs=input_paths) as tmp:
        figs = []
        if not args.no_figures:
            from ..theory.spectrum import fit_spectrum

            fits = fit_spectrum(np.asarray(mu).ravel(), window=result["decay_fits"]["power"]["window"], tol=args.tol,
                                n_boot=0, name=spectrum_label)  # the window already resolved (and any clip warned)
            figs += figures.plot_spectrum(mu, fits, tmp)
            if "early_stopping" in result:
                es = result["early_stopping"]
                figs += figures.plot_stopping(mu if args.n is None else np.concatenate([np.ravel(mu), np.zeros(args.n - np.size(mu))]),
                                              sigma, es["schedule"]["alpha"], radius=radius, T_hat=es["T_hat"], out_dir=tmp)
            if "nonparametric_rate" in result or "measured_rate" in result:
                meas = None
                if measured is not None:
                    meas = {"n": measured["n"], "error": np.asarray(measured["error"], dtype=float) - float(measured.get("noise_floor", 0.0)),
                            "fit": result["measured_rate"]}
                figs += figures.plot_rates(nonparametric=result.get("nonparametric_rate"), measured=meas,
                                           predicted_exponent=result["predicted_rate"]["exponent"], out_dir=tmp)
            if kernel_runs is not None:
                figs += figures.plot_kernel_predictors(kernel_runs["gd"], kernel_runs["ridge"], out_dir=tmp)
        result["figures"] = [p.name for p in figs]
        atomic_write_json(tmp / "theory.json", result)
    _print_summary(result, args.out)
    return 0


# sections of theory.json whose "note" is a caveat on the numbers printed
_CAVEAT_SECTIONS = ("spectrum_info", "predicted_rate", "early_stopping", "training")


def _caveats(res: dict) -> list[str]:
    """The caveats theory.json records (its sections' "note" fields), each once."""
    return list(dict.fromkeys(res[key]["note"] for key in _CAVEAT_SECTIONS if res.get(key, {}).get("note")))


def _print_summary(res: dict, out: Path) -> None:
    fits = res["decay_fits"]
    pw, ex = fits["power"], fits["exponential"]
    print(f"spectrum: n={res['n']}, window {pw['window']}, power β={pw['rate']:.3f} (R² {pw['r2']:.3f}), "
          f"exponential γ={ex['rate']:.4g} (R² {ex['r2']:.3f}); preferred {fits['preferred']}")
    pr = res["predicted_rate"]
    print(f"predicted rate: {pr['formula']}" + ("" if pr["within_assumption"] else " — outside the assumption"))
    if "early_stopping" in res:
        es = res["early_stopping"]
        print(f"σ={es['sigma']:.4g} ({es['sigma_source']}), R={es['radius']:.4g}: ε̂_n={es['eps_hat']:.4g}, "
              f"T̂={es['T_hat']} kernel-GD steps at α={es['schedule']['alpha']:.4g}")
    if "training" in res:
        t = res["training"]
        ep = "n/a" if t["epochs"] is None else f"{t['epochs']:.3g}"
        trained = ""
        if t.get("trained_over_predicted") is not None:
            trained = f"; trained {t['epochs_trained']:g} epochs = {t['trained_over_predicted']:.3g}× the prediction"
        print(f"training: T̂ = {t['T_hat_steps']} optimiser steps = {ep} epochs" +
              (" (approximate)" if t["approximate"] else "") + trained)
    if "kernel_predictors" in res:
        k = res["kernel_predictors"]
        print(f"kernel GD on held-out probes: MSE {k['test_mse_at_start']:.4g} at θ₀ → {k['test_mse_at_T_hat']:.4g} at T̂={k['T_hat']} "
              f"(oracle {k['oracle_test_mse']:.4g} at t={k['oracle_t']}); kernel ridge (GCV) {k['ridge_test_mse_at_gcv']:.4g}")
    if "stopping_vs_curve" in res:
        c = res["stopping_vs_curve"]
        print(f"validation curve: best epoch {c['best_epoch_measured']:g} (measured) vs {c['predicted_epochs']} (predicted)")
    for note in _caveats(res):
        print(f"caveat: {note}")
    print(f"wrote {out / 'theory.json'}")
