"""Model-side evaluation for a report: f on a task's examples at θ₀ + Σ α_t τ_t (measured) and the
linearised outputs f(θ₀) + Σ α_t J τ_t (predicted), memoised so each combination runs once."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from ..ntk.jvp import jvp, outputs_at


def mse(pred: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((np.asarray(pred, float).ravel() - np.asarray(y, float).ravel()) ** 2))


# output kind → (metric name in taskvec.arithmetic.METRICS, what the kernel-regime regression target is)
REPORT_METRICS = {"regression": "mse", "logprob": "nll", "logprob-mean": "nll"}


def report_metric(kind: str) -> str:
    """The metric a report scores an output kind with (the fine-tune's own primary metric)."""
    if kind not in REPORT_METRICS:
        from ..errors import TaskvecError

        raise TaskvecError(f"`taskvec analyze` handles regression and causal-LM (target log-probability) outputs, "
                           f"not {kind!r}; use `taskvec ntk`, `project` and `theory` on such a collection")
    return REPORT_METRICS[kind]


def metric_fn(name: str):
    from ..arithmetic import METRICS

    return METRICS[name][0]


def targets(kind: str, examples: Sequence[Mapping]) -> np.ndarray:
    """Regression targets y of the squared-loss theory: the label; for a target log-probability, 0
    (probability 1 — the minimiser the fine-tune's NLL shares with the squared-loss surrogate (f − 0)²)."""
    if kind == "regression":
        return np.array([float(e["label"]) for e in examples])
    return np.zeros(len(examples))


def combine(vectors: Mapping[str, Mapping[str, torch.Tensor]], coeffs: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """Σ_t α_t τ_t as one dict of tensors (tensors absent from a τ count as zero)."""
    out: dict[str, torch.Tensor] = {}
    for t, a in coeffs.items():
        if a == 0:
            continue
        for k, v in vectors[t].items():
            out[k] = out[k] + a * v if k in out else a * v
    return out


class Evaluator:
    """Outputs of one model on named example sets, at θ₀ + Σ α_t τ_t, and J·τ_t, memoised.

    `sets` maps a set name (e.g. "movies/test") to its examples; `vectors` maps task → τ.
    """

    def __init__(self, model, output, sets: Mapping[str, Sequence[Mapping]],
                 vectors: Mapping[str, Mapping[str, torch.Tensor]], *, batch_size: int = 32):
        self.model, self.output, self.sets, self.vectors = model, output, dict(sets), dict(vectors)
        self.batch_size = batch_size
        self._f: dict = {}
        self._j: dict = {}

    def labels(self, name: str) -> np.ndarray:
        """Targets of set `name` (see :func:`targets`)."""
        return targets(self.output.kind, self.sets[name])

    def f(self, name: str, coeffs: Mapping[str, float] | None = None) -> np.ndarray:
        """Measured f(x; θ₀ + Σ α_t τ_t) on set `name`: [n] (first output column)."""
        key = (name, tuple(sorted((t, float(a)) for t, a in (coeffs or {}).items() if a != 0)))
        if key not in self._f:
            direction = combine(self.vectors, dict(key[1])) if key[1] else None
            out = outputs_at(self.model, self.output, self.sets[name], direction, 1.0, batch_size=self.batch_size)
            self._f[key] = out[:, 0].numpy()
        return self._f[key]

    def jtau(self, name: str, task: str) -> np.ndarray:
        """J τ_task on set `name` by forward-mode AD: [n]."""
        key = (name, task)
        if key not in self._j:
            self._j[key] = jvp(self.model, self.output, self.sets[name], self.vectors[task],
                               batch_size=self.batch_size)[:, 0].numpy()
        return self._j[key]

    def linear(self, name: str, coeffs: Mapping[str, float]) -> np.ndarray:
        """Predicted f(θ₀) + Σ α_t J τ_t on set `name`."""
        out = self.f(name).copy()
        for t, a in coeffs.items():
            if a != 0:
                out = out + a * self.jtau(name, t)
        return out
