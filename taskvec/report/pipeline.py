"""`taskvec analyze`: one report that puts every kernel-regime prediction beside its measurement.

Stages (each a function of the loaded collection, model and task vectors):
  vectors      τ_t = θ_t − θ₀ (final checkpoints) and their statistics
  kernel       eNTK on the union of probe sets: blocks, alignment, principal angles
  projection   J τ_t on the probes, spectral energy profiles, random-direction control
  theory       per task, the eNTK of train ∪ test: decay fit, σ̂, R̂, ε̂_n, T̂ → epochs next to the
               best validation epoch; kernel GD / ridge test error next to the fine-tune's
  rates        nested training subsets: measured exponent vs predicted (fit and ε̂_n²)
  linearisation   ‖Δf_true − Δf_lin‖/‖Δf_true‖ along α
  arithmetic   addition (α chosen on validation), negation, interference matrix and weight
               disentanglement, measured on the real model and predicted by the linearised one
"""

from __future__ import annotations

import datetime as _dt
import itertools
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import __version__
from ..errors import TaskvecError
from .evaluate import Evaluator, metric_fn, report_metric, targets


@dataclass
class AnalyzeConfig:
    """Settings of one analysis (all recorded in results.json)."""

    scope: str | None = None  # None: the scope the collection was fine-tuned on (Collection.train_scope)
    strategy: str = "auto"
    memory_gb: float | None = None
    kernel_train: int | None = None  # cap on training points in each task's theory kernel (None: all)
    probe_size: int | None = None  # cap on each task's probe set (None: all)
    eval_size: int | None = 64  # test/validation examples per task for the arithmetic and predictor stages
    addition_alphas: tuple = (0.2, 0.4, 0.6, 0.8, 1.0)
    linearisation_alphas: tuple = (0.25, 0.5, 1.0, 1.5, 2.0)
    disentanglement_grid: tuple = (0.0, 0.5, 1.0)
    negation_alpha: float = 1.0
    top_k: tuple = (1, 5, 10, 20)
    control_seed: int = 0
    batch_size: int = 32
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self):
        for name in ("kernel_train", "probe_size", "eval_size"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise TaskvecError(f"--{name.replace('_', '-')} must be a positive integer (got {v!r})")

    def cache_key(self) -> dict:
        """The settings that change results (not progress display)."""
        d = asdict(self)
        d.pop("progress")
        return d


def _log(msg: str, progress: bool) -> None:
    if progress:
        tqdm.write(f"[taskvec analyze] {msg}")


def _environment() -> dict:
    import sklearn
    import transformers

    return {"taskvec": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__, "sklearn": sklearn.__version__,
            "platform": platform.platform(), "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------ loading
def load_collection_for_analysis(root):
    """The collection, refusing one whose tasks lack data or whose fine-tunes come from another base."""
    from ..checkpoints import open_checkpoint
    from ..collection import load_collection

    col = load_collection(root)
    if not col.tasks:
        raise TaskvecError(f"{col.root}: the collection lists no tasks")
    for t in col.tasks:
        data = col.task_data(t)
        for split in ("train", "validation", "test", "probe"):
            if not data.splits.get(split):
                raise TaskvecError(f"{col.root}: task {t!r} has no {split} examples (data/{t}/{split}.jsonl); "
                                   "rebuild the collection with non-zero split sizes")
    base = open_checkpoint(col.base)
    for run in col.runs:
        for ck in run.checkpoints:
            if not Path(ck.path).exists():
                raise TaskvecError(f"{col.root}: checkpoint {ck.path} listed in collection.json is missing; "
                                   "rerun `taskvec finetune` on the config to rebuild it")
    return col, base


def check_same_base(vec_out: dict) -> None:
    """Refuse fine-tunes of another base, detected from the weights: fine-tuning moves θ₀ a little, so
    θ_t stays nearly parallel to θ₀ tensor by tensor; an independently trained model is near-orthogonal."""
    for t, cos in vec_out["median_cosine_to_base"].items():
        if cos < 0.5:
            raise TaskvecError(
                f"the fine-tune of task {t!r} is not a fine-tune of this base, or its training diverged: its "
                f"matrices have median cosine {cos:.2f} to the base's (a fine-tune stays near 1). Rebuild the "
                "collection from one base model, with a learning rate that does not diverge.")


def _base_geometry(base, tv) -> tuple[float, float]:
    """‖θ₀‖ over τ's tensors and the median over 2-D tensors of cos(θ₀, θ₀ + τ)."""
    total, cosines = 0.0, []
    for name, tau in tv.items():
        b = base.get(name).double()
        tau = tau.double()
        bn2, bt, tn2 = float(b.pow(2).sum()), float((b * tau).sum()), float(tau.pow(2).sum())
        total += bn2
        if b.ndim == 2 and bn2 > 0:
            cosines.append((bn2 + bt) / np.sqrt(bn2 * max(bn2 + 2 * bt + tn2, 1e-300)))
    return float(np.sqrt(total)), float(np.median(cosines)) if cosines else 1.0


# ------------------------------------------------------------------------------------ stages
def stage_vectors(col, base, cfg: AnalyzeConfig) -> tuple[dict, dict]:
    from ..vectors import TaskVector

    vectors = {}
    for t in col.tasks:
        run = col.run(t)
        vectors[t] = TaskVector.from_checkpoints(base, str(run.final().path), scope=cfg.scope, progress=cfg.progress)
    names = list(vectors)
    cos = [[vectors[a].cosine(vectors[b]) for b in names] for a in names]
    geometry = {t: _base_geometry(base, vectors[t]) for t in names}
    out = {"checkpoint": "final epoch of each task's main run", "scope": cfg.scope,
           "norms": {t: vectors[t].norm() for t in names},
           "relative_norms": {t: vectors[t].norm() / geometry[t][0] for t in names},
           "median_cosine_to_base": {t: geometry[t][1] for t in names},
           "numel": {t: vectors[t].numel() for t in names},
           "cosine": cos}
    out["statistics"] = _vector_statistics(base, col, names, cfg)
    return vectors, out


def _vector_statistics(base, col, names, cfg) -> dict | None:
    """Per-tensor / per-layer statistics from the checkpoint layer's streaming pass."""
    try:
        from ..vector_stats import collection_statistics
    except ImportError:
        return None
    paths = [str(col.run(t).final().path) for t in names]
    return collection_statistics(base, paths, names=names, scope=cfg.scope, progress=cfg.progress)


def stage_kernel(model, output, probes: dict, cfg: AnalyzeConfig) -> tuple[Any, dict]:
    from ..ntk.cross import cross_task
    from ..ntk.spectrum import spectrum

    ct = cross_task(model, output, probes, k=10, scope=cfg.scope, strategy=cfg.strategy,
                    memory_gb=cfg.memory_gb, progress=cfg.progress)
    blocks = {}
    for t in ct.names:
        vals, _, info = spectrum(ct.block(t, t))
        blocks[t] = {"n": int(vals.size), "eigenvalues": vals, "spectrum_info": info}
    res = ct.kernel
    out = {"probe_sizes": {t: s.stop - s.start for t, s in ct.slices.items()},
           "union": {"n": res.n, "eigenvalues": res.eigenvalues, "info": res.info},
           "blocks": blocks, **{k: v for k, v in ct.to_dict().items() if k != "tasks"}}
    return ct, out


def _block_result(ct, t: str):
    from ..ntk.kernel import KernelResult
    from ..ntk.spectrum import spectrum

    K = ct.block(t, t)
    vals, vecs, info = spectrum(K)
    return KernelResult(K, vals, vecs, {"n": K.shape[0], **info})


def stage_projection(ev: Evaluator, ct, vectors: dict, cfg: AnalyzeConfig) -> dict:
    from ..ntk.projection import project, random_like

    out = {}
    for t in ct.names:
        res = _block_result(ct, t)
        tv = vectors[t]
        jt = ev.jtau(f"{t}/probe", t)
        p = project(res, jt[:, None], tau_sq_norm=tv.norm() ** 2, ks=cfg.top_k)
        ctrl_dir = random_like(tv, seed=cfg.control_seed)
        ev.vectors[f"control:{t}"] = ctrl_dir
        jc = ev.jtau(f"{t}/probe", f"control:{t}")
        tau_sq = float(sum(float(v.double().pow(2).sum()) for v in ctrl_dir.values()))
        c = project(res, jc[:, None], tau_sq_norm=tau_sq, ks=cfg.top_k)
        out[t] = {"task_vector": p, "control": c, "jtau_norm": float(np.linalg.norm(jt)),
                  "control_jtau_norm": float(np.linalg.norm(jc))}
    return out


def _kernel_for(model, output, examples, cfg):
    from ..ntk.kernel import compute_kernel

    return compute_kernel(model, output, examples, scope=cfg.scope, strategy=cfg.strategy,
                          memory_gb=cfg.memory_gb, progress=cfg.progress)


def _kernel_and_f0(memo: dict, key, model, output, examples, cfg):
    """The eNTK and f(θ₀) on `examples`, computed once per (task, n) and shared by the theory and rate stages."""
    if key not in memo:
        from ..ntk.jvp import outputs_at

        f0 = outputs_at(model, output, examples, batch_size=cfg.batch_size)[:, 0].numpy()
        memo[key] = (_kernel_for(model, output, examples, cfg), f0)
    return memo[key]


def theory_for_task(K: np.ndarray, n_train: int, r_train: np.ndarray, r_test: np.ndarray, run, *,
                    optimizer: str, lr: float, batch_size: int, f0_test: np.ndarray | None = None,
                    metric: str = "mse") -> dict:
    """Theory of one task from the eNTK of train ∪ test and residual targets r = y − f(θ₀).

    Kernel-predictor test errors are in the task's `metric` (the fine-tune's own), evaluated on
    f(θ₀) + predicted residual with y = f0_test + r_test; for 'mse' that is the squared residual error."""
    from .. import theory

    K_tr, K_te = K[:n_train, :n_train], K[n_train:, :n_train]
    eig = theory.eig_normalised(K_tr)  # one eigendecomposition (ascending) shared by every estimator below
    mu = eig[0][::-1].copy()
    fit = {k: (v.to_dict() if hasattr(v, 'to_dict') else v) for k, v in theory.fit_spectrum(mu).items()}
    sig = theory.sigma_krr(K_tr, r_train, eig=eig)
    sig_tail = theory.sigma_spectral_tail(K_tr, r_train, eig=eig)
    rad = theory.rkhs_radius(K_tr, r_train, eig=eig)
    sigma, R = sig["sigma"], rad["radius"]
    tr = theory.translate_to_training(mu, sigma, lr=lr, batch_size=batch_size, n=n_train, radius=R,
                                      loss="mean", optimizer=optimizer)
    alpha = tr["kernel_step_alpha"]
    stable_alpha = min(alpha, 1.0 / mu[0]) if mu[0] > 0 else alpha
    es = theory.early_stopping(mu, sigma, step=stable_alpha, radius=R)
    sens = theory.sensitivity(mu, sigma, R, stable_alpha)
    # kernel predictors from θ₀ on the same points, with the optimiser's kernel step (capped for stability)
    epochs_seen = [ck.epoch for ck in run.checkpoints]
    spe = run.n_train / batch_size  # optimiser steps per epoch of the real run (T̂ counts steps)
    max_steps = int(np.ceil(max(max(epochs_seen) * spe * alpha / stable_alpha, (es["T_hat"] or 1) * 3, 10)))
    path = theory.kernel_gd_path(K_tr, r_train, step=stable_alpha, max_steps=max_steps,
                                 K_test_train=K_te, test_targets=r_test, eig=eig, return_predictions=True)
    ridge = theory.kernel_ridge_path(K_tr, r_train, np.logspace(-8, 2, 41) * max(mu[0], 1e-30),
                                     K_test_train=K_te, test_targets=r_test, eig=eig, return_predictions=True)
    fn = metric_fn(metric)
    f0_te = np.zeros_like(r_test) if f0_test is None else np.asarray(f0_test, float)
    y_te = f0_te + r_test
    path_metric = np.array([fn(f0_te + p, y_te) for p in path["test_predictions"]])
    ridge_metric = np.array([fn(f0_te + p, y_te) for p in ridge["test_predictions"]])
    t_hat = es["T_hat"] or 0
    kgd_at_T = float(np.interp(t_hat, path["t"], path_metric))
    primary = run.record["primary_metric"]
    best = run.best("validation")
    measured_curve = [{"epoch": ck.epoch, "validation": ck.metrics["validation"][primary],
                       "test": ck.metrics["test"][primary]} for ck in run.checkpoints]
    gcv = int(np.argmin(ridge["gcv"]))
    best_ck = best or run.checkpoints[-1]
    return {
        "n_train": n_train, "n_test": int(K.shape[0] - n_train), "n_train_run": run.n_train,
        "note": ("spectrum, σ̂ and R̂ from the eNTK of the first n_train training examples; T̂ counts kernel-GD "
                 "steps = optimiser steps, converted to epochs with the run's own n_train_run / batch size"),
        "spectrum_fit": fit, "eigenvalues": mu,
        "sigma": sigma, "sigma_estimator": sig, "sigma_spectral_tail": sig_tail,
        "radius": R, "radius_estimator": rad,
        "early_stopping": es, "sensitivity": sens,
        "translation": tr, "kernel_step_used": stable_alpha,
        "predicted_epochs": None if es["T_hat"] is None else es["T_hat"] * stable_alpha / alpha / spe,
        "measured_best_epoch": best.epoch if best else 0.0,
        "measured_curve": measured_curve,
        "pretrained": {"validation": run.pretrained["validation"][primary], "test": run.pretrained["test"][primary]},
        "kernel_gd": {"t": path["t"], "test_mse": path["test_mse"], "train_mse": path["train_mse"],
                      "test_metric": path_metric, "test_mse_at_T_hat": kgd_at_T,
                      "oracle_t": int(path["t"][int(np.argmin(path_metric))]),
                      "oracle_test_mse": float(np.min(path_metric))},
        "kernel_ridge": {"lambda_gcv": ridge["gcv_lambda"], "test_mse_gcv": float(ridge_metric[gcv])},
        "finetune": {"best_epoch_test_mse": best_ck.metrics["test"][primary],
                     "final_test_mse": run.checkpoints[-1].metrics["test"][primary]},
        "metric": primary,
    }


def stage_theory(col, model, output, data: dict, cfg: AnalyzeConfig, kernels: dict) -> dict:
    out = {}
    for t in col.tasks:
        run = col.run(t)
        train = data[t].split("train")[: cfg.kernel_train or None]
        test = data[t].split("test")[: cfg.eval_size or None]
        res, f0 = _kernel_and_f0(kernels, (t, len(train)), model, output, train + test, cfg)
        y = targets(output.kind, train + test)
        r = y - f0
        n = len(train)
        opt = run.record["optimizer"]
        lr = float(opt["param_group"]["lr"])
        name = opt["class"].rsplit(".", 1)[-1].lower()
        out[t] = theory_for_task(res.K, n, r[:n], r[n:], run, optimizer=name, lr=lr,
                                 batch_size=int(opt["batch_size"]), f0_test=f0[n:],
                                 metric=report_metric(output.kind))
        out[t]["kernel_info"] = res.info
    return out


def stage_rates(col, theory_out: dict, kernels: dict, model, output, data, cfg) -> dict | None:
    """Measured test-error exponent in n (nested fine-tunes; kernel GD on the eNTK) next to the
    predicted one (decay fit β/(β+1); non-parametric ε̂_n² of the nested spectra)."""
    from .. import theory
    from ..theory import rates

    runs = col.rate_runs()
    if len(runs) < 2:
        return None
    task = runs[0].task
    primary = runs[0].record["primary_metric"]
    ns = [r.n_train for r in runs]
    measured = [(r.best("validation") or r.checkpoints[-1]).metrics["test"][primary] for r in runs]
    train = data[task].split("train")[: cfg.kernel_train or None]
    test = data[task].split("test")[: cfg.eval_size or None]
    n_k = len(train)
    res, f0 = _kernel_and_f0(kernels, (task, n_k), model, output, train + test, cfg)
    K = res.K
    r = targets(output.kind, train + test) - f0
    # kernel GD on the eNTK at the nested sizes its kernel covers; σ and R from the largest, held fixed
    kn = [n for n in ns if n <= n_k]
    if len(kn) < 2:
        kn = sorted({max(2, n_k // 4), max(2, n_k // 2), n_k})
    eig = theory.eig_normalised(K[:n_k, :n_k])
    sigma = theory.sigma_krr(K[:n_k, :n_k], r[:n_k], eig=eig)["sigma"]
    R = theory.rkhs_radius(K[:n_k, :n_k], r[:n_k], eig=eig)["radius"]
    kgd = rates.kernel_gd_rates(K, r, kn, np.arange(n_k, K.shape[0]), sigma, radius=R,
                                train_order=np.arange(n_k))
    fit = theory_out.get(task, {}).get("spectrum_fit")
    predicted = rates.predicted_rate(fit["power"]) if fit else None
    meas = rates.measured_rate(ns, measured)
    return {"task": task, "n": ns, "kernel_n": kn, "metric": primary, "sigma": sigma, "radius": R,
            "measured_test": measured, "measured": meas,
            "kernel_gd_test": [row["test_mse_at_T_hat"] for row in kgd["rows"]], "kernel_gd": kgd["measured"],
            "kernel_gd_rows": kgd["rows"],
            "predicted_eps2": list(kgd["nonparametric"]["eps_hat_sq"]), "nonparametric": kgd["nonparametric"]["fit"],
            "predicted_from_fit": predicted,
            "comparison": {"fit": rates.compare_rates(predicted["exponent"] if predicted else None, meas),
                           "nonparametric": rates.compare_rates(kgd["nonparametric"]["exponent"], meas)}}


def stage_linearisation(ev: Evaluator, tasks, cfg: AnalyzeConfig) -> dict:
    from ..arithmetic import linearisation_error

    out = {}
    for t in tasks:
        s = f"{t}/probe"
        f0 = ev.f(s)
        delta = {a: ev.f(s, {t: a}) - f0 for a in cfg.linearisation_alphas}
        out[t] = linearisation_error(delta, ev.jtau(s, t))
    return out


def stage_arithmetic(ev: Evaluator, tasks: list[str], cfg: AnalyzeConfig) -> dict:
    """Task addition, negation, interference and disentanglement: merged models measured, linearised predicted."""
    from .. import arithmetic as ar

    name = report_metric(ev.output.kind)
    score = metric_fn(name)  # the task metric (MSE for regression, NLL for a target log-probability)
    def arrays(split: str):
        sets = {A: f"{A}/{split}" for A in tasks}
        f0 = {A: ev.f(sets[A]) for A in tasks}
        jt = {A: {t: ev.jtau(sets[A], t) for t in tasks} for A in tasks}
        y = {A: ev.labels(sets[A]) for A in tasks}
        return sets, f0, jt, y

    test, f0, jt, y = arrays("test")
    val, f0v, jtv, yv = arrays("validation")
    # addition: all pairs and all tasks; α chosen on validation as task-arithmetic users do
    subsets = [list(p) for p in itertools.combinations(tasks, 2)] + ([tasks] if len(tasks) > 2 else [])
    addition = []
    for S in tqdm(subsets, desc="task addition", disable=not cfg.progress, leave=False):
        curve_m = [np.mean([score(ev.f(val[A], {u: a for u in S}), yv[A]) for A in S]) for a in cfg.addition_alphas]
        curve_p = [np.mean([score(ar.linearised_outputs(f0v[A], jtv[A], {u: a for u in S}), yv[A]) for A in S])
                   for a in cfg.addition_alphas]
        a_m = cfg.addition_alphas[int(np.argmin(curve_m))]
        a_p = cfg.addition_alphas[int(np.argmin(curve_p))]
        coeffs = {u: a_m for u in S}
        pred = ar.predict_arithmetic({A: f0[A] for A in S}, {A: {u: jt[A][u] for u in S} for A in S}, coeffs,
                                     labels={A: y[A] for A in S}, metric=name,
                                     measured_outputs={A: ev.f(test[A], coeffs) for A in S})
        addition.append({"tasks": S, "alpha_measured": a_m, "alpha_predicted": a_p,
                         "validation_curve": {"alpha": list(cfg.addition_alphas), "measured": curve_m, "predicted": curve_p},
                         "test": {A: {"measured": pred["tasks"][A]["measured_metric"],
                                      "predicted": pred["tasks"][A]["predicted_metric"],
                                      "output_relative_error": pred["tasks"][A]["output_relative_error"],
                                      "single_task_finetune": score(ev.f(test[A], {A: 1.0}), y[A])} for A in S}})
    # interference of B on A: ΔMSE_A when τ_B joins τ_A (α = 1), measured on the real merged model
    T = len(tasks)
    measured = np.zeros((T, T))
    for i, A in enumerate(tasks):
        own = score(ev.f(test[A], {A: 1.0}), y[A])
        for j, B in enumerate(tasks):
            if i != j:
                measured[i, j] = score(ev.f(test[A], {A: 1.0, B: 1.0}), y[A]) - own
    interference = ar.interference(f0, jt, y, metric=name, measured_delta=measured)
    # negation θ₀ − α τ_t on every task
    a = cfg.negation_alpha
    negation = {t: ar.negation(f0, jt, t, labels=y, metric=name, alphas=(a,),
                               measured_metric={a: {A: score(ev.f(test[A], {t: -a}), y[A]) for A in tasks}})
                for t in tasks}
    # weight disentanglement ξ(α) on each pair's probe sets
    xi = []
    for A, B in itertools.combinations(tasks, 2):
        probes = {t: f"{t}/probe" for t in (A, B)}
        f0p = {t: ev.f(probes[t]) for t in (A, B)}
        jtp = {t: {u: ev.jtau(probes[t], u) for u in (A, B)} for t in (A, B)}
        grid = ar.alpha_grid([A, B], cfg.disentanglement_grid)
        res = ar.disentanglement_error(f0p, jtp, grid,
                                       measured=lambda al: {t: ev.f(probes[t], al) for t in (A, B)})
        xi.append(res)
    points = [(r["predicted"], r["measured"]) for res in xi for r in res["rows"]]
    return {"metric": name, "addition": addition, "interference": interference, "negation": negation,
            "disentanglement": xi,
            "disentanglement_spearman": ar.spearman([p for p, _ in points], [m for _, m in points])}


# ------------------------------------------------------------------------------------ driver
def analyze(collection, out, *, config: AnalyzeConfig | None = None, overwrite: bool = False) -> dict:
    """Run every stage on a built collection and write the report folder `out` atomically."""
    from ..io import atomic_dir, atomic_write_json, check_out_dir, sha256_file
    from ..models import load_model, load_tokenizer
    from ..outputs import LinearHead, make_output
    from .render import render_report

    cfg = config or AnalyzeConfig()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TaskvecError(f"{out} exists and is not a folder; choose another --out")
    check_out_dir(out, overwrite=overwrite, inputs=(collection,))  # before the long analysis
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    def timed(name: str, fn: Callable):
        _log(name, cfg.progress)
        t0 = time.perf_counter()
        r = fn()
        timings[name] = time.perf_counter() - t0
        return r

    col, base = load_collection_for_analysis(collection)
    report_metric(col.output["kind"])  # refuse an output kind the report cannot score before any work
    if cfg.scope is None:  # τ is zero outside the trained scope; the kernel is taken over the same parameters
        cfg = replace(cfg, scope=col.train_scope)
    data = {t: col.task_data(t) for t in col.tasks}
    vectors, vec_out = timed("task vectors", lambda: stage_vectors(col, base, cfg))
    check_same_base(vec_out)
    model = load_model(col.base, kind=col.model_kind, device=cfg.device)
    tok = load_tokenizer(col.base)
    head = LinearHead.load(col.head_path.parent) if col.head_path else None
    ocfg = col.output
    output = make_output(ocfg["kind"], model, tok, head=head, max_length=ocfg.get("max_length"),
                         truncate_text=str(ocfg.get("truncation", "")).startswith("right"))
    cap = cfg.eval_size or None
    sets = {}
    for t in col.tasks:
        sets[f"{t}/probe"] = data[t].split("probe")[: cfg.probe_size or None]
        sets[f"{t}/test"] = data[t].split("test")[:cap]
        sets[f"{t}/validation"] = data[t].split("validation")[:cap]
    ev = Evaluator(model, output, sets, vectors, batch_size=cfg.batch_size)
    probes = {t: sets[f"{t}/probe"] for t in col.tasks}
    kernels: dict = {}
    ct, kernel_out = timed("eNTK on the union of probe sets", lambda: stage_kernel(model, output, probes, cfg))
    projection = timed("projections", lambda: stage_projection(ev, ct, vectors, cfg))
    theory_out = timed("theory per task", lambda: stage_theory(col, model, output, data, cfg, kernels))
    rates = timed("rates", lambda: stage_rates(col, theory_out, kernels, model, output, data, cfg))
    lin = timed("linearisation error", lambda: stage_linearisation(ev, col.tasks, cfg))
    arith = timed("task arithmetic", lambda: stage_arithmetic(ev, col.tasks, cfg)) if len(col.tasks) > 1 else None
    timings["total"] = time.perf_counter() - t_all
    results = {
        "format": "taskvec-results-v1",
        "meta": {"taskvec_version": __version__, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
                 "collection": str(col.root), "base": col.base, "output": ocfg,
                 "environment": _environment(), "timings_s": timings,
                 "inputs": {"collection.json": sha256_file(col.root / "collection.json"),
                            "base": base.fingerprint()}},
        "config": asdict(cfg),
        "tasks": col.tasks,
        "metric": report_metric(ocfg["kind"]),
        "vectors": vec_out, "kernel": kernel_out, "projection": projection, "theory": theory_out,
        "rates": rates, "linearisation": lin, "arithmetic": arith,
    }
    with atomic_dir(out, overwrite=overwrite, inputs=(collection,)) as tmp:
        atomic_write_json(tmp / "results.json", results)
        render_report(results, tmp)
    _log(f"report written to {out} ({timings['total']:.0f} s)", cfg.progress)
    return results
