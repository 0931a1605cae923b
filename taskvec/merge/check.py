"""`check_merge`: does a merged model equal what its base and fine-tunes say it should?

Streams tensor by tensor (one tensor of each model in memory): fits θ_m − θ₀ ≈ Σ λ_t τ_t by least
squares per tensor, per layer and globally, and collects the signatures in `signatures.py` (exact
zeros, magnitude trimming, subset structure, sign mixing), NaN/Inf, tensors changed where no task
changed, and missing / extra / reshaped tensors. `findings` turns them into one verdict line per
finding, naming tensors. `write_check` writes check.json and the per-layer figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..checkpoints import align, check_finite, extra_tensors, name_list, open_checkpoint, source_list
from ..errors import TaskvecError
from ..io import atomic_dir, atomic_write_json
from ..scope import group_of, resolve_scope
from . import signatures as sig
from .base import align_finetunes, refuse_duplicate_finetunes
from .retention import predicted_retention  # noqa: F401  (re-exported hook)

SUBSAMPLE = 1 << 18   # subset fit / ratio modes on at most this many (strided) entries per tensor
MIN_SUBSET_NUMEL = 256  # smaller tensors hold too few entries to estimate per-tensor DARE/TIES coefficients
DEFER_NUMEL = 1 << 16  # tensors this small without a ratio mode are redone with the median mode of the others
DENSE_TOL = 1e-5      # global residual fraction below which the merge *is* Σ λ_t τ_t (fp32 round-off)


def _read(ck, al, name, base_t):
    """θ_t of one fine-tune as a flat float64 array; NaN/Inf in it is refused (the fit would be meaningless)."""
    if ck.is_delta:
        if name not in al.pairs:
            return base_t
        return base_t + check_finite(ck, al.pairs[name], ck.get(al.pairs[name])).double().numpy().ravel()
    return check_finite(ck, al.pairs[name], ck.get(al.pairs[name])).double().numpy().ravel()


def tensor_report(name: str, b: np.ndarray, m: np.ndarray, thetas: Sequence[np.ndarray],
                  fallback: Sequence[float | None] | None = None, eps: float = sig.EPS32,
                  coef: Sequence[float] | None = None) -> dict:
    """All statistics of one tensor (flattened float64 arrays of base, merged and fine-tunes).

    Subset coefficients c_t come from the tensor's own ratio mode; where it has none, from `fallback`
    (the median mode of the other tensors), else from the least-squares λ_t. eps: machine epsilon of
    the merged model's storage dtype; its rounding noise is what an exact merge may still leave.
    """
    finite = np.isfinite(m)
    nonfinite = int((~finite).sum())
    X = np.stack([th - b for th in thetas], axis=1)
    d = np.where(finite, m - b, 0.0)
    if nonfinite:
        X = X[finite]
        d = d[finite]
    fit = sig.fit_stats(X, d)
    mf = m[finite] if nonfinite else m
    u = sig.ulp(mf, eps)
    noise = float((u ** 2).sum() / 12)  # variance of round-to-nearest at the merged dtype
    visible = np.abs(X).max(1) > sig.ulp(b[finite] if nonfinite else b, eps) if eps > sig.EPS32 else None
    trim = sig.trim_evidence(X, d, visible)
    step = max(1, len(d) // SUBSAMPLE)
    Xs, ds, ms = X[::step], d[::step], mf[::step]
    dense = fit["residual_fraction"] <= 1e-8 + 4 * noise / max(fit["dd"], 1e-300) and not trim["zero_entries"]
    if dense:  # θ_m − θ₀ = Σ λ_t τ_t here: the subset structure is "all models, coefficients λ"
        modes = [(lam, 1.0) for lam in fit["lambda"]]
    else:
        modes = [sig.ratio_mode(Xs[:, t], ds) for t in range(X.shape[1])]
    fallback = list(fallback) if fallback is not None else [None] * X.shape[1]
    coef = np.array([c if freq >= 0.01 else (fb if fb is not None else lam)
                     for (c, freq), lam, fb in zip(modes, fit["lambda"], fallback)]) if coef is None \
        else np.asarray(coef, dtype=np.float64)
    sub = {"explained_fraction": 1.0, "family": "sum", "kept_fraction": [1.0] * X.shape[1], "mixed_sign_subsets": 0,
           "l1_ratio": [1.0] * X.shape[1]} if dense else sig.subset_fit(Xs, ds, coef, ms, eps=eps)
    signs = np.sign(X * coef)
    mixed_entries = int(((signs > 0).any(1) & (signs < 0).any(1))[::step].sum())
    moved = np.any(X != 0, axis=1)
    return {
        "name": name, "group": group_of(name), "numel": int(b.size), "nonfinite": nonfinite,
        "lambda": fit["lambda"].tolist(), "residual_fraction": fit["residual_fraction"],
        "rounding_fraction": noise / fit["dd"] if fit["dd"] > 0 else 0.0,
        "gram": fit["gram"], "rhs": fit["rhs"], "dd": fit["dd"],
        "delta_norm": float(np.sqrt(fit["dd"])), "tau_norms": np.sqrt(np.diag(fit["gram"])).tolist(),
        "base_norm": float(np.linalg.norm(b)),
        "changed_where_no_task_changed": int(((d != 0) & ~moved).sum()),
        "zero_entries": trim["zero_entries"], "zero_fraction": trim["zero_fraction"],
        "trim_quantile": trim["quantile"], "trim_p_random": trim["p_random"],
        "coef": coef.tolist(), "coef_from_mode": [freq >= 0.01 for _, freq in modes],
        "single_model_fraction": [freq for _, freq in modes],
        "explained_fraction": sub["explained_fraction"], "family": sub["family"],
        "kept_fraction": sub["kept_fraction"], "mixed_sign_subsets": sub["mixed_sign_subsets"],
        "mixed_sign_entries": mixed_entries, "subsampled_every": step,
        "l1_ratio": sub["l1_ratio"],
    }


def check_merge(base, merged, finetunes: Sequence, *, scope: str = "all", progress: bool = True,
                names: Sequence[str] | None = None) -> dict:
    """Audit `merged` against `base` and `finetunes` (paths or Checkpoints; a list, or one path); return the
    report dict. Tasks are reported as `names`, a list or 'a,b,…' (default: the shortest path suffixes that
    tell the fine-tunes apart)."""
    from .retention_data import task_names

    finetunes = source_list(finetunes)
    labels = task_names([str(f.source if hasattr(f, "source") else f) for f in finetunes], names)
    refuse_duplicate_finetunes(finetunes, "a task listed twice cannot be told apart from itself in the fit")

    base = open_checkpoint(base)
    merged = open_checkpoint(merged)
    fts = [open_checkpoint(f) for f in finetunes]
    if not fts:
        raise TaskvecError("check-merge needs the fine-tuned models the merge was made from")
    al_m = align(base, merged)
    floats = [n for n in base.keys() if n not in align(base, base).excluded]  # buffers / integer tensors out
    names = resolve_scope(floats, scope)
    if merged.is_delta:
        raise TaskvecError(f"{merged.source} is a LoRA adapter; check the merged full model (merge_and_unload)")
    in_scope = set(names)
    al_fts = align_finetunes(base, fts, names, "Check")
    comparable = [n for n in names if n in al_m.pairs and n not in al_m.added_rows]
    rows, deferred = [], []
    for name in tqdm(comparable, desc="check-merge", unit="tensor", disable=not progress):
        b_t = check_finite(base, name, base.get(name))  # NaN in the merged model is a finding
        m_dtype = merged.dtype(al_m.pairs[name])  # as stored (get() may have widened it)
        b, m = b_t.double().numpy().ravel(), merged.get(al_m.pairs[name]).double().numpy().ravel()
        if _coarser(m_dtype, base.dtype(name)):  # e.g. a bf16 merge of an fp32 base: an entry left at θ₀ is bf16(θ₀)
            m = m - (b_t.to(m_dtype).double().numpy().ravel() - b)  # so that it compares equal to θ₀ exactly
        thetas = [_read(ft, al, name, b) for ft, al in zip(fts, al_fts)]
        eps = sig.MANTISSA_EPS.get(str(merged.dtype(al_m.pairs[name])).replace("torch.", ""), sig.EPS32)
        row = tensor_report(name, b, m, thetas, eps=eps)
        if row["numel"] <= DEFER_NUMEL and (not all(row["coef_from_mode"]) or row["explained_fraction"] < 0.95):
            deferred.append((len(rows), name, b, m, thetas, eps))  # small: redo with the other tensors' modes
        rows.append(row)
    if deferred:
        fallback = []
        for t in range(len(fts)):
            modes = [r["coef"][t] for r in rows if r["coef_from_mode"][t]]
            fallback.append(float(np.median(modes)) if modes else None)
        for i, name, b, m, thetas, eps in deferred:
            if not all(rows[i]["coef_from_mode"]):
                rows[i] = tensor_report(name, b, m, thetas, fallback, eps)
            elif None not in fallback:
                # a few hundred entries can show a spurious ratio mode; keep the other tensors' coefficients
                # when they explain this tensor better
                alt = tensor_report(name, b, m, thetas, fallback, eps, coef=fallback)
                if alt["explained_fraction"] > rows[i]["explained_fraction"]:
                    rows[i] = alt
    report = summarise(rows, labels)
    report["sources"] = [ft.source for ft in fts]
    report.update({
        "base": base.source, "merged": merged.source, "finetunes": [ft.source for ft in fts], "scope": scope,
        "missing_tensors": [n for n in al_m.missing if n in in_scope],
        "extra_tensors": al_m.extra,
        "finetune_extra_tensors": extra_tensors(fts, al_fts),
        "shape_mismatch": {k: [list(a), list(b)] for k, (a, b) in al_m.shape_mismatch.items()},
        "vocab_rows_added": {k: list(v) for k, v in al_m.added_rows.items()},
        "not_checked": {n: ("outside --scope" if n not in in_scope else "not comparable (missing or reshaped)")
                        for n in floats if n not in set(comparable)},
        "excluded_buffers": sorted(set(base.keys()) - set(floats)),
    })
    report["findings"] = findings(report)
    return report


def _coarser(a: torch.dtype, b: torch.dtype) -> bool:
    """Whether floating dtype `a` rounds more coarsely than `b`."""
    return a.is_floating_point and b.is_floating_point and torch.finfo(a).eps > torch.finfo(b).eps


def _solve(rows, T):
    G = sum((r["gram"] for r in rows), np.zeros((T, T)))
    r_ = sum((r["rhs"] for r in rows), np.zeros(T))
    dd = sum(r["dd"] for r in rows)
    lam = sig.least_squares(G, r_)
    rr = max(dd - 2 * lam @ r_ + lam @ G @ lam, 0.0)
    return lam, (rr / dd if dd > 0 else 0.0)


def _global_residuals(rows, lam):
    """Each tensor's residual fraction under one λ (relative to the larger of ‖d‖² and ‖Xλ‖²)."""
    out = []
    for r in rows:
        pred = float(lam @ r["gram"] @ lam)
        rr = max(r["dd"] - 2 * lam @ r["rhs"] + pred, 0.0)
        out.append(rr / max(r["dd"], pred) if max(r["dd"], pred) > 0 else 0.0)
    return out


def summarise(rows: list[dict], sources: list[str]) -> dict:
    """Global and per-layer λ fits and pooled signatures from the per-tensor rows.

    The global λ is robust to a few broken tensors: if most tensors fit θ₀ + Σ λ_t τ_t exactly under
    the median per-tensor λ (a dense merge), the global and per-layer λ are refitted on those inliers
    only, and the others are reported as not fitting. Tensors with no finite entry say nothing about the
    merge: they are listed under 'nonfinite' only. When NaN/Inf is all that departs from θ₀, λ is not
    determined (None) and there are no per-layer fits.
    """
    T = len(sources)
    nonfinite, n_checked = {r["name"]: r["nonfinite"] for r in rows if r["nonfinite"]}, len(rows)
    rows = [r for r in rows if r["nonfinite"] < r["numel"]]
    big = [r for r in rows if r["numel"] >= MIN_SUBSET_NUMEL] or rows
    lam_med = np.median([r["lambda"] for r in big], axis=0) if rows else np.zeros(T)
    res_med = _global_residuals(big, lam_med)
    dense = bool(rows) and sum(x < DENSE_TOL + 4 * r["rounding_fraction"]
                               for r, x in zip(big, res_med)) >= 0.5 * len(big)
    if dense:
        inl = [r for r, x in zip(rows, _global_residuals(rows, lam_med)) if x < 1e-3 + 4 * r["rounding_fraction"]]
    else:
        inl = rows
    lam_g, res_g = _solve(inl, T) if rows else (np.zeros(T), 0.0)
    _, res_all = _solve(rows, T) if rows else (None, 0.0)
    groups: dict[str, list] = {}
    for r in inl:
        groups.setdefault(r["group"], []).append(r)
    per_layer = {g: dict(zip(("lambda", "residual_fraction"), _solve(rs, T))) for g, rs in groups.items()}
    for r, x in zip(rows, _global_residuals(rows, lam_g)):
        r["residual_fraction_global"] = x
    numel = np.array([r["numel"] for r in rows], dtype=np.float64)
    explained = float(np.average([r["explained_fraction"] for r in rows], weights=numel)) if rows else 1.0
    explained_median = float(np.median([r["explained_fraction"] for r in big])) if rows else 1.0
    voters = [r for r in rows if r["zero_entries"] >= 20]
    trimmed = [r for r in voters if min(r["trim_p_random"]) < 1e-3]
    delta2 = sum(r["dd"] for r in rows)
    determined = delta2 > 0 or not nonfinite
    tau2 = [sum(r["tau_norms"][t] ** 2 for r in rows) for t in range(T)]
    sparse = [r for r in big if r["zero_entries"] > 0 and r["explained_fraction"] > 0.95]
    return {
        "tasks": sources, "dense_fit": dense,
        "lambda_global": lam_g.tolist() if determined else None, "residual_fraction_global": float(res_g),
        "residual_fraction_all_tensors": float(res_all), "n_inlier_tensors": len(inl),
        "per_layer": {g: {"lambda": v["lambda"].tolist(), "residual_fraction": float(v["residual_fraction"])}
                      for g, v in per_layer.items()} if determined else {},
        "explained_fraction": explained, "explained_fraction_median": explained_median,
        "family": _majority([r["family"] for r in rows], numel),
        "zero_fraction": float(sum(r["zero_entries"] for r in rows) / max(numel.sum(), 1)),
        "trim_votes": [len(trimmed), len(voters)],
        "mixed_sign_subsets": int(sum(r["mixed_sign_subsets"] for r in rows if r["explained_fraction"] > 0.95)),
        "mixed_sign_entries": int(sum(r["mixed_sign_entries"] for r in rows if r["explained_fraction"] > 0.95)),
        "kept_fraction": [float(np.median([r["kept_fraction"][t] for r in big])) if rows else 1.0
                          for t in range(T)],
        "coef_cv": _cv([r["coef"] for r in sparse]),
        "coef_over_l1_cv": _cv([np.divide(r["coef"], r["l1_ratio"]) for r in sparse]),
        "delta_norm": float(np.sqrt(delta2)), "tau_norms": [float(np.sqrt(x)) for x in tau2],
        "nonfinite": nonfinite,
        "changed_where_no_task_changed": {r["name"]: r["changed_where_no_task_changed"] for r in rows
                                          if r["changed_where_no_task_changed"]},
        "tensors": [{k: v for k, v in r.items() if k not in ("gram", "rhs", "dd")} for r in rows],
        "n_tensors_checked": n_checked,
    }


def _majority(labels, weights) -> str:
    tally: dict[str, float] = {}
    for lab, w in zip(labels, weights):
        tally[lab] = tally.get(lab, 0.0) + w
    return max(tally, key=tally.get) if tally else ""


def _cv(coefs) -> list[float] | None:
    """Per model: coefficient of variation of a per-tensor coefficient across tensors."""
    if len(coefs) < 2:
        return None
    a = np.abs(np.asarray(coefs, dtype=np.float64))
    return (a.std(0) / np.maximum(a.mean(0), 1e-300)).tolist()


def classify(rep: dict) -> str:
    """'undetermined' | 'unchanged' | 'task_arithmetic' | 'ties' | 'dare_linear' | 'dare_ties' | 'sign_election' |
    'unexplained'."""
    if rep["lambda_global"] is None:
        return "undetermined"
    if rep["delta_norm"] == 0:
        return "unchanged"
    if rep["dense_fit"]:
        return "task_arithmetic"
    if rep["explained_fraction_median"] < 0.95:
        return "unexplained"
    elected = rep["mixed_sign_subsets"] == 0 and rep["mixed_sign_entries"] >= 20
    n_trim, n_vote = rep["trim_votes"]
    if n_vote and n_trim > n_vote / 2:
        return "ties"
    if rep["zero_fraction"] > 0:
        return "dare_ties" if elected else "dare_linear"
    return "sign_election" if elected else "unexplained"


def findings(rep: dict) -> list[dict]:
    """One verdict line per finding, naming tensors (level: ok | info | warning | error)."""
    out = []
    finite_only = _on_finite_only(rep)

    def add(level, kind, message, tensors=()):
        message += finite_only if level == "ok" else ""  # every ok verdict rests on the finite values alone
        out.append({"level": level, "finding": kind, "message": message, "tensors": list(tensors)})

    kind = classify(rep)
    rep["classification"] = kind
    rows = rep["tensors"]
    if rep["missing_tensors"]:
        add("error", "missing_tensors", f"merged model lacks {len(rep['missing_tensors'])} base tensor(s): "
            f"{name_list(rep['missing_tensors'])}", rep["missing_tensors"])
    if rep["extra_tensors"]:
        add("warning", "extra_tensors", f"merged model has {len(rep['extra_tensors'])} tensor(s) the base lacks: "
            f"{name_list(rep['extra_tensors'])}", rep["extra_tensors"])
    if rep["shape_mismatch"] or rep["vocab_rows_added"]:
        bad = list(rep["shape_mismatch"]) + list(rep["vocab_rows_added"])
        add("error", "shape_mismatch", f"tensor shapes differ from the base (not checked): {name_list(bad)}", bad)
    if rep["nonfinite"]:
        add("error", "nonfinite", f"NaN/Inf in {len(rep['nonfinite'])} merged tensor(s): "
            f"{name_list(f'{k} ({v})' for k, v in rep['nonfinite'].items())}", rep["nonfinite"])
    if kind == "undetermined":
        what = ("the merged model's finite entries do not differ from the base; only its NaN/Inf entries do" if rows
                else "every checked entry of the merged model is NaN/Inf")
        add("info", "not_determined", f"method and λ not determined: {what}, so there is nothing to fit")
        return out
    if kind == "unchanged":
        add("error", "unchanged", "the merged model equals the base exactly in every checked tensor")
        return out
    tasks, lam = rep["tasks"], np.array(rep["lambda_global"])
    lam_txt = ", ".join(f"{x:.6g}" for x in lam)
    biggest_tau = max(rep["tau_norms"]) if rep["tau_norms"] else 0.0
    if kind == "unexplained":
        ratio = rep["delta_norm"] / max(biggest_tau, 1e-300)
        changed = rep["changed_where_no_task_changed"]
        big = [r for r in rows if r["numel"] >= MIN_SUBSET_NUMEL] or rows
        bad = [r["name"] for r in big if r["residual_fraction"] > 0.01 and r["explained_fraction"] < 0.95]
        if ratio > 3 or changed:
            add("error", "other_base",
                f"θ_m − θ₀ is not a combination of the task vectors in {len(bad)} of {len(big)} tensors (residual "
                f"fraction {rep['residual_fraction_global']:.3g}) and ‖θ_m − θ₀‖ is {ratio:.3g}× the largest ‖τ_t‖"
                + (f"; it changed {sum(changed.values())} entries no fine-tune changed" if changed else "")
                + ": the merge was probably built on a different base model",
                list(changed) or bad)
        else:
            add("error", "unexplained",
                f"θ_m − θ₀ is not explained by Σ λ_t τ_t (residual fraction {rep['residual_fraction_global']:.3g}) "
                f"nor by trimming/dropping of the given task vectors in {len(bad)} of {len(big)} tensors, yet it "
                f"is only {ratio:.3g}× the largest ‖τ_t‖: a fine-tune missing from the list, other fine-tunes, "
                f"or a different base model; tensors: {name_list(bad)}", bad)
    elif kind == "task_arithmetic":
        add("ok", "task_arithmetic", f"θ_m = θ₀ + Σ λ_t τ_t to the merged dtype's round-off (residual fraction "
            f"{rep['residual_fraction_global']:.2e}); λ = [{lam_txt}]"
            + (f" (sum {lam.sum():.6g}: a linear average)" if abs(lam.sum() - 1) < 1e-4 else ""))
    else:
        kept = ", ".join(f"{k:.3f}" for k in rep["kept_fraction"])
        zero = f"{rep['zero_fraction']:.3f} of entries are exactly θ₀ although some τ_t ≠ 0"
        if kind == "ties":
            add("ok", "trimming", f"magnitude trimming: {zero}, and zeros fall only on small |τ| "
                f"({rep['trim_votes'][0]}/{rep['trim_votes'][1]} tensors, p < 1e-3 against random zeros); "
                f"kept fraction per task [{kept}]")
        elif rep["zero_fraction"] > 0:
            conv = _rescale_convention(rep)
            add("ok", "dropping", f"random dropping (DARE): {zero}, at all magnitudes; every entry equals 0 "
                f"or a rescaled τ combination ({rep['explained_fraction']:.4f} of entries); kept fraction per "
                f"task [{kept}]; rescale: {conv}")
        elected = rep["mixed_sign_subsets"] == 0 and rep["mixed_sign_entries"] >= 20
        if elected:
            add("ok", "sign_election", f"sign election: at all {rep['mixed_sign_entries']} entries where the "
                "tasks disagree in sign, only one sign was merged")
        elif kind != "ties":
            add("info", "no_sign_election", f"no sign election: {rep['mixed_sign_subsets']} entries combine "
                "task vectors of opposite signs")
        fam = {"mean": "disjoint mean (equal weights)", "convex": "disjoint weighted mean", "sum": "sum (no normalize)",
               "single": "single-model entries only"}
        fam_txt = fam.get(rep.get("family", ""), rep.get("family", ""))
        add("info", "classification", f"consistent with a {kind} merge (entries combine as: {fam_txt}); "
            f"least-squares λ = [{lam_txt}] "
            f"(residual fraction {rep['residual_fraction_global']:.3g}, expected for sparsified merges)")
    # one task left out
    if len(lam) > 1 and kind != "unexplained":
        scale = np.abs(lam).max()
        low = [i for i, x in enumerate(lam) if abs(x) < 0.05 * scale]
        if kind != "task_arithmetic":
            low = sorted(set(low) | {i for i, k in enumerate(rep["kept_fraction"]) if k < 0.02})
        for i in low:
            add("error", "task_left_out", f"task {i} ({tasks[i]}) contributes nothing to the merge "
                f"(λ = {lam[i]:.3g}, kept fraction {rep['kept_fraction'][i]:.3f}): it was left out or given weight 0")
    # tensors that do not fit
    if kind == "task_arithmetic":
        score = {r["name"]: max(r["residual_fraction"], r["residual_fraction_global"]) - 4 * r["rounding_fraction"]
                 for r in rows}
        cut = max(1e-4, 100 * float(np.median(list(score.values()))))
    elif kind != "unexplained":
        score = {r["name"]: max(1 - r["explained_fraction"], r["residual_fraction_global"] if r["zero_fraction"] == 1
                                else 0.0) for r in rows if r["numel"] >= MIN_SUBSET_NUMEL}
        cut = max(0.05, 10 * float(np.median(list(score.values()))))
    else:
        score, cut = {}, np.inf
    misfit = sorted((n for n, s in score.items() if s > cut), key=lambda n: -score[n])
    if misfit:
        add("error", "tensors_do_not_fit", f"{len(misfit)} tensor(s) do not fit the rest of the merge "
            f"(misfit > {cut:.3g}): " + name_list(f"{n} ({score[n]:.3g})" for n in misfit), misfit)
    return out


def _on_finite_only(rep: dict) -> str:
    """'' when every checked tensor is finite, else which tensors (and entries) a verdict rests on."""
    if not rep["nonfinite"]:
        return ""
    n, partial = rep["n_tensors_checked"], sum(1 for r in rep["tensors"] if r["nonfinite"])
    return (f"; holds on the {n - len(rep['nonfinite'])} of {n} tensors that are finite"
            + (f" and on the finite entries of {partial} more" if partial else "") + " only")


def _rescale_convention(rep: dict) -> str:
    cv, cvl1 = rep.get("coef_cv"), rep.get("coef_over_l1_cv")
    if cv is None:
        return "undetermined (too few large tensors)"
    if max(cv) < 1e-4:
        return "1/density (DARE paper): the rescale factor is the same in every tensor"
    if cvl1 is not None and max(cvl1) < 1e-3:
        return "L1-preserving per tensor (mergekit)"
    return "per-tensor factor (consistent with mergekit's L1-preserving rescale)"


def write_check(report: dict, out_dir: str | Path, extra=None, *, overwrite: bool = False, inputs=()) -> Path:
    """Write out_dir/check.json and the per-layer λ / residual figure (PNG + PDF), all at once (atomic_dir);
    `extra(folder)` may add more files first. `overwrite` replaces an earlier report, never one of `inputs`.
    Returns check.json's path."""
    with atomic_dir(out_dir, overwrite=overwrite, inputs=inputs) as tmp:
        _figure(report, tmp)
        if extra is not None:
            extra(tmp)
        atomic_write_json(tmp / "check.json", report)
    return Path(out_dir) / "check.json"


def _layer_order(g: str):
    if g == "embeddings":
        return (0, 0)
    if g.startswith("layer."):
        return (1, int(g.split(".")[1]))
    return (2, 0 if g == "final" else 1)


def _figure(report: dict, out_dir: Path) -> None:
    import matplotlib.pyplot as plt

    from ..plotting import DOUBLE_COLUMN_IN, PALETTE, paper_style, save_figure

    groups = sorted(report["per_layer"], key=_layer_order)
    if not groups:
        return
    x = np.arange(len(groups))
    with paper_style():
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(DOUBLE_COLUMN_IN, 2.4))
        for t, name in enumerate(report["tasks"]):
            a1.plot(x, [report["per_layer"][g]["lambda"][t] for g in groups], marker="o", ms=3,
                    color=PALETTE[t % len(PALETTE)], label=f"task {t}: {Path(name).name}")
            a1.axhline(report["lambda_global"][t], color=PALETTE[t % len(PALETTE)], lw=0.8, ls="--")
        a1.set_ylabel("fitted λ_t (dashed: global)")
        a1.legend(frameon=False)
        res = [max(report["per_layer"][g]["residual_fraction"], 1e-17) for g in groups]
        a2.semilogy(x, res, marker="s", ms=3, color=PALETTE[3])
        a2.set_ylabel("residual fraction ‖d − Σλτ‖² / ‖d‖²")
        for a in (a1, a2):
            a.set_xticks(x)
            a.set_xticklabels(groups, rotation=60, ha="right")
        fig.suptitle(f"check-merge: {report.get('classification', '')}", fontsize=8)
        save_figure(fig, out_dir, "check_merge_layers")
