"""Turn results.json into the report folder's figures, index.html and headline tables."""

from __future__ import annotations

from pathlib import Path

from ..html import table, write_index
from .figures import FIGURES, metric_label, render_figures


def _rel(pred, meas):
    if pred is None or meas is None or meas == 0:
        return None
    return (pred - meas) / abs(meas)


def headline_rows(results: dict) -> list[dict]:
    """Per task: each prediction beside its measurement."""
    rows = []
    th = results.get("theory") or {}
    proj = results.get("projection") or {}
    M = metric_label(results)
    for t in results.get("tasks", []):
        r = th.get(t, {})
        p = proj.get(t, {})
        tv, ctrl = p.get("task_vector", {}), p.get("control", {})
        rows.append({
            "task": t,
            f"θ₀ test {M}": r.get("pretrained", {}).get("test"),
            f"fine-tune test {M}": r.get("finetune", {}).get("best_epoch_test_mse"),
            f"kernel GD @T̂ test {M}": r.get("kernel_gd", {}).get("test_mse_at_T_hat"),
            f"kernel ridge test {M}": r.get("kernel_ridge", {}).get("test_mse_gcv"),
            "T̂ → epochs (pred.)": r.get("predicted_epochs"),
            "best epoch (meas.)": r.get("measured_best_epoch"),
            "decay β": ((r.get("spectrum_fit") or {}).get("power") or {}).get("rate"),
            "top-10 energy τ": _top(tv, 10),
            "top-10 energy control": _top(ctrl, 10),
            "top-10 energy τ, constant out": _top(tv.get("without_constant") or {}, 10),
            "top-10 energy control, constant out": _top(ctrl.get("without_constant") or {}, 10),
        })
    return rows


def _top(proj: dict, k: int):
    cum = proj.get("cumulative")
    if cum is None or len(cum) == 0:
        return None
    return float(cum[min(k, len(cum)) - 1])


def rate_rows(results: dict) -> list[dict]:
    r = results.get("rates")
    if not r:
        return []
    fit = r.get("predicted_from_fit") or {}
    return [{"error ∝ n^slope": r["task"],
             "measured (fine-tunes)": r["measured"]["slope"],
             "kernel GD on eNTK": r["kernel_gd"]["slope"],
             "predicted: ε̂_n² of nested spectra": r["nonparametric"]["slope"],
             "predicted: −β/(β+1) from fit": fit.get("exponent"),
             "fit note": fit.get("note", fit.get("formula"))}]


def arithmetic_rows(results: dict) -> list[dict]:
    ar = results.get("arithmetic")
    if not ar:
        return []
    rows = []
    M = metric_label(results)
    for r in ar["addition"]:
        for t in r["tasks"]:
            x = r["test"][t]
            rows.append({"merge": "+".join(r["tasks"]), "task": t, "α (chosen on val.)": r["alpha_measured"],
                         "α (linearised choice)": r["alpha_predicted"], f"test {M} measured": x["measured"],
                         f"test {M} predicted": x["predicted"], "rel. error": _rel(x["predicted"], x["measured"]),
                         "single-task fine-tune (same examples)": x["single_task_finetune"]})
    return rows


def negation_rows(results: dict) -> list[dict]:
    """θ₀ − α τ_t on every task: the negated task should get worse, the others barely move."""
    ar = results.get("arithmetic") or {}
    M = metric_label(results)
    rows = []
    for t, neg in (ar.get("negation") or {}).items():
        for r in neg["rows"]:
            rows.append({"negated": t, "task": r["task"], "α": r["alpha"], f"base {M}": r.get("base_metric"),
                         f"{M} predicted": r.get("predicted_metric"), f"{M} measured": r.get("measured_metric"),
                         "rel. error": _rel(r.get("predicted_metric"), r.get("measured_metric"))})
    return rows


def summary_rows(results: dict) -> list[dict]:
    ar = results.get("arithmetic") or {}
    rows = []
    if ar:
        rows.append({"statistic": f"Spearman ρ, interference Δ{metric_label(results)} predicted vs measured",
                     "value": (ar["interference"].get("spearman_delta") or {}).get("rho")})
        rows.append({"statistic": "Spearman ρ, disentanglement ξ(α) predicted vs measured",
                     "value": (ar.get("disentanglement_spearman") or {}).get("rho")})
    for t, v in (results.get("linearisation") or {}).items():
        for row in v["rows"]:
            if row["alpha"] == 1.0:
                rows.append({"statistic": f"linearisation error at α = 1 ({t})", "value": row["relative_error"]})
    return rows


SECTIONS = [
    ("Task vectors", "What each fine-tune changed.", ["cosine"], None),
    ("eNTK spectrum and projections", "Where the task vectors live relative to the pretrained model's eNTK.",
     ["spectra", "energy"], headline_rows),
    ("Early stopping and kernel predictors", "How many epochs the theory says suffice, next to the best epoch "
     "measured on validation; and the linearised fine-tune's test error next to the real one's.",
     ["stopping", "predictors", "linearisation"], None),
    ("Rates in n", "Slope of test error against sample size: measured, kernel GD, and predicted.", ["rates"], rate_rows),
    ("Task arithmetic", "Addition, interference and disentanglement: merged models measured, linearised model "
     "predicted, on the first eval_size test examples of each task (config.eval_size in results.json) — so θ₀'s "
     "metric here can differ from the headline's, which uses the whole test split.",
     ["addition", "interference", "disentanglement"], arithmetic_rows),
    ("Task negation", "θ₀ − α τ_t on every task: forgetting t (its metric should worsen) while the other tasks "
     "barely move; measured on the negated model, predicted by the linearised one, on the same eval_size test "
     "examples as the arithmetic above (the 'base' column is θ₀ there, not the headline's whole test split).",
     [], negation_rows),
    ("Agreement statistics", "", [], summary_rows),
]


def caveats(results: dict) -> dict[str, str]:
    """Section title → a warning the numbers need (read off the results, never assumed)."""
    notes: dict[str, list[str]] = {}
    stopping, arithmetic = "Early stopping and kernel predictors", "Task arithmetic"
    if results.get("metric") == "nll":
        notes.setdefault(stopping, []).append(
            "The kernel columns score the linearised model f₀ + J(θ − θ₀) fitted by squared loss toward "
            "log-probability 0: a linear 'log-probability' is not normalised and can approach 0 freely, so a "
            "kernel NLL below the fine-tune's says the kernel regime fits the targets, not that it is a better "
            "language model.")
    off = []
    for t, th in (results.get("theory") or {}).items():
        pred, meas = th.get("predicted_epochs"), th.get("measured_best_epoch")
        if pred and meas and (pred / meas > 10 or pred / meas < 0.1):
            off.append(f"{t} (T̂ → {pred:.3g} epochs vs {meas:g} measured; σ̂ = {th.get('sigma', float('nan')):.3g})")
    if off:
        notes.setdefault(stopping, []).append(
            "The stopping rule is off by more than 10× for " + "; ".join(off) + ": T̂ scales with 1/σ̂², so a "
            "noise estimate near 0 (the residuals look smooth to the kernel) sends it far out; `taskvec theory` "
            "takes a given --sigma or other estimators (docs/theory.md).")
    far = sorted(t for t, v in (results.get("linearisation") or {}).items()
                 for row in v["rows"] if row["alpha"] == 1.0 and row["relative_error"] > 1.0)
    if far:
        notes.setdefault(arithmetic, []).append(
            f"The linearisation error at α = 1 exceeds 1 for {', '.join(far)}: these fine-tunes left the "
            "kernel regime, so the linearised predictions below are not expected to hold.")
    return {title: " ".join(parts) for title, parts in notes.items()}


def render_report(results: dict, out_dir, formats=("png", "pdf"), style: str = "paper") -> list[dict]:
    out_dir = Path(out_dir)
    figs = {f["name"]: f for f in render_figures(results, out_dir, formats, style)}
    sections = []
    warn = caveats(results)
    for title, text, names, rows_fn in SECTIONS:
        rows = rows_fn(results) if rows_fn else []
        if title in warn:
            text = f"{text} {warn[title]}".strip()
        sections.append({"title": title, "text": text, "tables": [table(rows)] if rows else [],
                         "figures": [figs[n] for n in names if n in figs]})
    write_index(out_dir, results, sections)
    return list(figs.values())


def markdown_table(rows: list[dict]) -> str:
    """GitHub markdown for README tables (regenerated by scripts/readme_tables.py)."""
    from ..html import fmt_number

    if not rows:
        return ""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt_number(r.get(c)).replace("|", "/") for c in cols) + " |")
    return "\n".join(lines)


__all__ = ["render_report", "caveats", "headline_rows", "rate_rows", "arithmetic_rows", "negation_rows", "summary_rows", "markdown_table", "FIGURES"]
