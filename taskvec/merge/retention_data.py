"""Per-task retention of a merge on real task data: the kernel prediction next to the measurement.

For each task A (one JSONL evaluation set per fine-tune) and the λ's `check_merge` fitted:
- predicted change of A's outputs:  Σ_t λ_t J_A τ_t          (J_A τ_t by forward-mode AD at θ₀)
- measured change:                  f_A(θ_m) − f_A(θ₀)      (real forward pass at θ₀ + (θ_m − θ₀))
- fine-tune A alone:                J_A τ_A (predicted) and f_A(θ_A) − f_A(θ₀) (measured)
and `predicted_retention` turns them into retention / interference numbers. With labels, the task
metric (MSE for regression, accuracy for logits / two-class margin, mean log-prob for logprob kinds)
is given for θ₀, the fine-tune and the merge, each predicted (linearised) and measured.
f and J·τ come from `report.evaluate.Evaluator` (one per task and output column).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..checkpoints import counted
from ..errors import TaskvecError
from .retention import predicted_retention

MERGED = "__merged__"  # Evaluator key of the direction θ_m − θ₀
POOR_FIT = 0.3          # relative error of the predicted change above which the verdict is a warning


def read_task_data(paths: Sequence, kind: str) -> list[list[dict]]:
    """Read one JSONL evaluation set per task and check the fields `kind` needs (errors give file:line)."""
    from ..jsonl import read_jsonl

    sets = []
    for path in paths:
        rows = read_jsonl(path)
        for i, ex in enumerate(rows, 1):
            if kind in ("logprob", "logprob-mean"):
                if not {"prompt", "target"} <= ex.keys():
                    raise TaskvecError(f"{path}:{i}: output {kind!r} needs fields 'prompt' and 'target'; "
                                       f"got {sorted(ex)}")
            elif "text" not in ex and "prompt" not in ex:
                raise TaskvecError(f"{path}:{i}: output {kind!r} needs a 'text' field; got {sorted(ex)}")
        sets.append(rows)
    return sets


class _Column:
    """Output column j of an OutputFunction as an m = 1 output (the Evaluator reads column 0)."""

    m = 1

    def __init__(self, output, j: int):
        self._output, self._j = output, j

    def __getattr__(self, name):
        return getattr(self._output, name)

    def __call__(self, params, batch):
        return self._output(params, batch)[:, self._j:self._j + 1]


def _encode_labels(output, examples, path) -> np.ndarray:
    """Labels as the output function parses them; its 'example i' errors become 'path:line'."""
    try:
        return output.encode(examples)["label"].numpy()
    except TaskvecError as exc:
        msg = re.sub(r"^example (\d+):", lambda m_: f"{path}:{int(m_.group(1)) + 1}:", str(exc))
        raise TaskvecError(msg if msg != str(exc) else f"{path}: {exc}") from None


def task_metric(kind: str, outputs: np.ndarray, labels: np.ndarray, n_classes: int | None) -> tuple[str, float] | None:
    """(name, value) of the task metric for outputs [n, m], or None when the labels do not allow one."""
    outputs = np.asarray(outputs, dtype=np.float64)
    if kind in ("logprob", "logprob-mean"):
        return "mean_logprob", float(outputs.mean())
    if not np.all(np.isfinite(labels)) or (kind != "regression" and np.any(labels < 0)):
        return None
    if kind == "regression":
        return ("mse", float(np.mean((outputs[:, 0] - labels) ** 2))) if outputs.shape[1] == 1 else None
    if kind == "logits":
        return "accuracy", float(np.mean(outputs.argmax(1) == labels))
    if kind == "margin" and n_classes == 2:
        return "accuracy", float(np.mean((outputs[:, 0] > 0) == (labels == 1)))
    return None


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    nb = float(np.linalg.norm(b))
    return float(np.linalg.norm(a - b) / nb) if nb > 0 else float("nan")


def agreement(pred: np.ndarray, meas: np.ndarray) -> dict:
    """Slope of measured on predicted (1 = right size) and Spearman ρ over all outputs (DESIGN: never a
    prediction alone)."""
    from scipy.stats import spearmanr

    p, m = np.ravel(pred), np.ravel(meas)
    pp = float(p @ p)
    rho = float(spearmanr(p, m).statistic) if p.size >= 3 and np.ptp(p) > 0 and np.ptp(m) > 0 else float("nan")
    return {"slope": float(p @ m) / pp if pp > 0 else float("nan"), "spearman": rho}


def merge_retention(model, outputs: Sequence, sets: Sequence[Sequence[Mapping]], vectors: Sequence[Mapping],
                    merged_direction: Mapping, lambdas: Sequence[float], *, tasks: Sequence[str],
                    data_paths: Sequence | None = None, batch_size: int = 32, progress: bool = False) -> dict:
    """Predicted and measured per-task change of a merge.

    model: the base model θ₀; outputs[A]: task A's output function; sets[A]: its examples; vectors[t]:
    τ_t (tensor dicts); merged_direction: θ_m − θ₀; lambdas: fitted λ_t; tasks: one name per task.
    Returns {"tasks": {name: {...}}, "lambdas": [...]}; every prediction sits beside its measurement.
    """
    from tqdm.auto import tqdm

    from ..report.evaluate import Evaluator

    T = len(tasks)
    if not (len(outputs) == len(sets) == len(vectors) == T == len(lambdas)):
        raise TaskvecError(f"need one output function, example set, task vector and λ per task; got "
                           f"{len(outputs)}, {len(sets)}, {len(vectors)}, {len(lambdas)} for {T} tasks")
    data_paths = list(data_paths) if data_paths is not None else [f"task {a}" for a in range(T)]
    lam = np.asarray(lambdas, dtype=np.float64)
    vecs = {t: dict(v) for t, v in zip(tasks, vectors)}
    vecs[MERGED] = dict(merged_direction)
    out = {}
    for a, name in enumerate(tqdm(tasks, desc="retention (f, J·τ per task)", unit="task", disable=not progress)):
        output, examples = outputs[a], list(sets[a])
        labels = _encode_labels(output, examples, data_paths[a])
        cols = [output] if output.m == 1 else [_Column(output, j) for j in range(output.m)]
        evs = [Evaluator(model, c, {name: examples}, vecs, batch_size=batch_size) for c in cols]
        stack = lambda fn: np.stack([fn(ev) for ev in evs], axis=1)  # noqa: E731  columns → [n, m]
        f0 = stack(lambda ev: ev.f(name))
        jtau = np.stack([stack(lambda ev, t=t: ev.jtau(name, t)) for t in tasks])  # [T, n, m]
        meas = stack(lambda ev: ev.f(name, {MERGED: 1.0})) - f0
        own_meas = stack(lambda ev: ev.f(name, {name: 1.0})) - f0
        rec = predicted_retention({name: jtau}, lam, tasks=tasks, measured={name: meas})[name]
        pred, own = rec["predicted_change"], jtau[a]
        rest = meas - lam[a] * own_meas
        rec.update({
            "data": str(data_paths[a]), "n_examples": len(examples), "m": int(output.m),
            "measured_change": meas, "own_predicted_change": own, "own_measured_change": own_meas,
            "own_relative_error": _rel(own, own_meas),
            "measured_retention_vs_finetune": float((meas * own_meas).sum() / (own_meas ** 2).sum())
            if (own_meas ** 2).sum() > 0 else float("nan"),
            "measured_interference": float(np.linalg.norm(rest) / max(np.linalg.norm(own_meas), 1e-300)),
            "jtau_norms": [float(np.linalg.norm(j)) for j in jtau],
            **agreement(pred, meas),
        })
        metric = {}
        for key, value in (("base", f0), ("finetune_predicted", f0 + own), ("finetune_measured", f0 + own_meas),
                           ("merged_predicted", f0 + pred), ("merged_measured", f0 + meas)):
            got = task_metric(output.kind, value, labels, output.n_classes)
            if got is None:
                break
            metric["name"], metric[key] = got
        rec["metric"] = metric or None
        if not metric and output.kind not in ("logprob", "logprob-mean"):
            unlabeled = int(np.sum(~np.isfinite(labels) | ((labels < 0) if output.kind != "regression" else False)))
            rec["metric_missing"] = (f"{unlabeled} of {len(labels)} examples in {data_paths[a]} have no label"
                                     if unlabeled else f"no metric for output {output.kind!r} with these labels")
        out[name] = rec
    return {"lambdas": lam.tolist(), "tasks": out}


def retention_outputs(base, finetunes: Sequence, *, output: str, head=None,
                      label_words: Sequence[str] | None = None, max_length: int | None = None) -> list:
    """One output function per fine-tune on the base model (loaded once); building them checks the
    output options (head, label words, max length), so a caller can fail fast before a long pass.

    The head of task A (encoders): `head` when given, else the one saved beside fine-tune A, else the
    one beside the base. `label_words`: the classes of logits / margin (as `make_output` takes them).
    `finetunes`: a list, or one path."""
    import torch

    from ..checkpoints import source_list
    from ..models import load_model, load_tokenizer
    from ..outputs import LinearHead, make_output, read_head_beside

    finetunes = source_list(finetunes)
    model = load_model(base, dtype=torch.float32)
    tok = load_tokenizer(base)
    fixed = LinearHead.load(head) if head is not None else None
    base_head = read_head_beside(base)
    outputs = []
    for ft in finetunes:
        own = fixed if fixed is not None else read_head_beside(ft)
        outputs.append(make_output(output, model, tok, head=own if own is not None else base_head,
                                   label_words=label_words, max_length=max_length))
    return outputs


def retention_from_paths(base, merged, finetunes: Sequence, data: Sequence, lambdas: Sequence[float], *,
                         output: str, head=None, label_words: Sequence[str] | None = None,
                         max_length: int | None = None, scope: str = "all",
                         batch_size: int = 32, progress: bool = True, names: Sequence[str] | None = None,
                         outputs: Sequence | None = None) -> dict:
    """`merge_retention` from model folders and JSONL files (what `taskvec check-merge --data` runs).
    Tasks are called `names` (default: the shortest path suffixes that tell the fine-tunes apart).

    `outputs`: from `retention_outputs` (built here from output/head/label_words/max_length when not
    given). τ_t and θ_m − θ₀ are taken over `scope` (the check's), so with the default 'all' the
    measured change is that of the merged model itself. `finetunes` and `data` may each be one path
    (a single task); `names` a list or 'a,b,…'.
    """
    from ..checkpoints import match_parameter_names, source_list
    from ..io import sha256_file
    from ..vectors import TaskVector

    finetunes, data = source_list(finetunes), source_list(data, "--data files")
    if len(data) != len(finetunes):
        raise TaskvecError(f"--data gives {len(data)} JSONL file(s) but there are {len(finetunes)} fine-tunes; "
                           "give one evaluation set per fine-tune, in the same order")
    sets = read_task_data(data, output)
    if outputs is None:
        outputs = retention_outputs(base, finetunes, output=output, head=head, label_words=label_words,
                                    max_length=max_length)
    model = outputs[0].model
    vectors = [TaskVector.from_checkpoints(base, ft, scope=scope, progress=progress) for ft in finetunes]
    delta = TaskVector.from_checkpoints(base, merged, scope=scope, progress=progress)
    # tensors f does not use (e.g. a BERT pooler: f mean-pools the last hidden state) are left out
    all_keys = set(delta.keys()).union(*(v.keys() for v in vectors))
    keep = match_parameter_names(all_keys, model, strict=False)
    vectors, delta = ([{k: v for k, v in tv.items() if k in keep} for tv in vectors],
                      {k: v for k, v in delta.items() if k in keep})
    names = task_names(finetunes, names)
    res = merge_retention(model, outputs, sets, vectors, delta, lambdas, tasks=names, data_paths=data,
                          batch_size=batch_size, progress=progress)
    res.update({"output": outputs[0].describe(), "scope": scope,
                "tensors_not_in_model": sorted(all_keys - set(keep)),
                "data": [{"path": str(p), "sha256": sha256_file(p)} for p in data],
                "heads": [o.describe().get("head_sha") for o in outputs]})
    return res


def task_names(finetunes: Sequence, names: Sequence[str] | None = None) -> list[str]:
    """`names` (a list or 'a,b,…') checked against the fine-tunes, or the shortest distinct path suffixes of them."""
    from ..checkpoints import name_sequence, source_list
    from ..vectors import default_task_names

    finetunes = source_list(finetunes)
    names = name_sequence(names)
    if names is None:
        return default_task_names([str(f) for f in finetunes])
    if len(names) != len(finetunes):
        raise TaskvecError(f"--names has {counted(len(names), 'name')} for {counted(len(finetunes), 'fine-tune')}; give one name per "
                           "fine-tune, in the same order")
    if len(set(names)) != len(names) or not all(names):
        raise TaskvecError(f"task names must be distinct and non-empty (got {names})")
    return names


def verdicts(retention: dict) -> list[dict]:
    """One verdict line per task: predicted vs measured retention, interference and metric."""
    out = []
    for name, r in retention["tasks"].items():
        level, msg = _comparison(r)
        m = r.get("metric")
        if m:
            msg += (f"; {m['name']} base {m['base']:.4g}, merged predicted {m['merged_predicted']:.4g} / "
                    f"measured {m['merged_measured']:.4g}, fine-tune {m['finetune_measured']:.4g}")
        elif r.get("metric_missing"):
            msg += f"; no task metric: {r['metric_missing']}"
        if level == "warning":
            msg += " — the kernel (linear) prediction does not hold for this merge"
        out.append({"level": level, "finding": "retention", "task": name, "message": f"{name}: {msg}"})
    return out


def _comparison(r: dict) -> tuple[str, str]:
    """(level, text) of one task's predicted change next to its measured one; in words where either is zero
    (retention, error, cosine and slope are then ratios of zeros)."""
    pred, meas = r["predicted_change_norm"], r["measured_change_norm"]
    if pred == 0 and meas == 0:
        return "info", "no change to compare: the merge moves none of this task's outputs, predicted or measured"
    if pred == 0 or meas == 0:
        return "warning", f"predicted change of norm {pred:.4g} but measured change of norm {meas:.4g}"
    err = r["relative_error"]
    fit = f"predicted change off by {100 * err:.3g}% (cosine {r['cosine']:.4f}, slope {r['slope']:.3g})"
    level = "ok" if err <= POOR_FIT else "warning"
    own_pred = r["own_change_norm"]  # ‖J_A τ_A‖, from predicted_retention
    own_meas = float(np.linalg.norm(r["own_measured_change"]))
    if own_pred == 0 or own_meas == 0:  # retention and interference are ratios to the fine-tune's own change
        return level, ("retention and interference not defined: the fine-tune alone moves none of this task's "
                       f"outputs (its own change has norm {own_pred:.4g} predicted, {own_meas:.4g} measured); {fit}")
    return level, (
        f"retention predicted {r['predicted_retention']:.4g} / measured {r['measured_retention']:.4g} "
        f"(vs fine-tune alone {r['measured_retention_vs_finetune']:.4g}); interference predicted "
        f"{r['predicted_interference']:.4g} / measured {r['measured_interference']:.4g}; {fit}")


def retention_figure(retention: dict, out_dir) -> list[Path]:
    """Predicted vs measured change of every output, one panel per task (PNG + PDF)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from ..plotting import DOUBLE_COLUMN_IN, PALETTE, SINGLE_COLUMN_IN, paper_style, save_figure

    tasks = list(retention["tasks"])
    with paper_style():
        width = min(DOUBLE_COLUMN_IN, SINGLE_COLUMN_IN * 0.75 * len(tasks))
        fig, axes = plt.subplots(1, len(tasks), figsize=(width, 2.4), squeeze=False)
        # one power of ten for every panel, written in the axis labels (matplotlib's offset text collides
        # with the x label, and the y label is on the first panel only)
        peak = max((float(np.max(np.abs(np.ravel(r[k])))) for r in retention["tasks"].values()
                    for k in ("measured_change", "predicted_change") if np.size(r[k])), default=0.0)
        e = int(np.floor(np.log10(peak))) if np.isfinite(peak) and peak > 0 and not 1e-2 <= peak < 1e3 else 0
        unit = f" (×1e{e})" if e else ""
        for k, (ax, name) in enumerate(zip(axes[0], tasks)):
            r = retention["tasks"][name]
            x, y = np.ravel(r["measured_change"]) / 10.0 ** e, np.ravel(r["predicted_change"]) / 10.0 ** e
            lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
            ax.plot([lo, hi], [lo, hi], color="0.6", lw=0.8, ls="--")
            ax.scatter(x, y, s=6, color=PALETTE[k % len(PALETTE)])
            ax.set_title(f"{name}\nretention pred. {_fmt(r['predicted_retention'])} / "
                         f"meas. {_fmt(r['measured_retention'])}")
            ax.xaxis.set_major_locator(MaxNLocator(4))
            ax.set_xlabel(f"measured f(θ_m) − f(θ₀){unit}")
            if k == 0:
                ax.set_ylabel(f"predicted Σλ_t Jτ_t{unit}")
        fig.tight_layout()
        return save_figure(fig, out_dir, "check_merge_retention")


def _fmt(x: float) -> str:
    """A ratio for a figure title: 3 significant digits, 'n/a' where it is undefined (a zero own change)."""
    return f"{x:.3g}" if np.isfinite(x) else "n/a"
