"""Streaming statistics of a collection of task vectors τ_t = θ_t − θ₀ (one base, T fine-tunes).

For each tensor in scope: read θ₀ and every θ_t into T+1 reused flat buffers, form τ_t in place,
compute everything, move on — memory ≈ (T+1) × the largest tensor, never a full model. Accumulates
in float64.

Per tensor, per layer group and globally, for each task:
  norm ‖τ‖₂; base norm ‖θ₀‖₂; relative norm ‖τ‖/‖θ₀‖;
  top-k% mass: fraction of ‖τ‖² held by the ⌈k%·numel⌉ (rounded, ≥ 1) largest |τ| entries;
Per 2-D tensor and task: singular values (exact; float64 up to 4M entries, else float32) →
  effective rank exp(H(p)), p_i = σ_i/Σσ (Roy & Vetterli 2007), stable rank Σσ²/σ₁², top values.
Across tasks (T×T):
  cosine ⟨τ_s,τ_t⟩/(‖τ_s‖‖τ_t‖) (global, per layer group, per tensor);
  sign-conflict rate: among entries where both τ_s and τ_t are non-zero, the fraction with opposite
  signs; 'any' rate: among entries where ≥ 2 tasks are non-zero, the fraction where some pair
  disagrees (the conflicts TIES resolves);
  top-k% mask overlap: Jaccard |M_s ∩ M_t| / |M_s ∪ M_t| of the per-tensor masks M_t = {|τ_t| ≥ the
  k-th largest |τ_t|, τ_t ≠ 0} (ties at the threshold are kept, as TIES trimming does).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoints import Checkpoint, check_finite, open_checkpoint
from .errors import TaskvecError
from .scope import group_of, layer_of
from .vectors import extract_pairs

__all__ = ["CollectionStats", "collection_stats", "effective_rank"]

SCHEMA = "taskvec.vectors/1"
_CHUNK = 1 << 18  # columns per cross-task block: small enough to stay in cache-sized temporaries
_SVD_F64_MAX = 4 << 20


def effective_rank(s: np.ndarray) -> float:
    """exp(entropy of σ/Σσ) (Roy & Vetterli 2007); 0 for a zero matrix."""
    s = np.asarray(s, dtype=np.float64)
    s = s[s > 0]
    if s.size == 0:
        return 0.0
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def _pct_key(k: float) -> str:
    return f"{k:g}"


def n_top(numel: int, k_percent: float) -> int:
    """How many entries 'top k%' keeps: round(k/100 · numel), at least 1."""
    return max(1, min(numel, int(round(numel * k_percent / 100.0))))


@dataclass
class _Acc:
    """Additive T×T sums for one group of tensors."""

    T: int
    ks: tuple
    gram: np.ndarray = None           # Σ ⟨τ_s, τ_t⟩
    base_sq: float = 0.0               # Σ ‖θ₀‖²
    numel: int = 0
    both_nz: np.ndarray = None         # entries where τ_s ≠ 0 and τ_t ≠ 0
    conflict: np.ndarray = None        # … with opposite signs
    multi_nz: int = 0                  # entries with ≥ 2 tasks non-zero
    any_conflict: int = 0              # … where signs disagree
    top_sq: np.ndarray = None          # [k, t] Σ of top-k% squared entries
    inter: np.ndarray = None           # [k, s, t] |M_s ∩ M_t|

    def __post_init__(self):
        T, K = self.T, len(self.ks)
        self.gram = np.zeros((T, T))
        self.both_nz = np.zeros((T, T), dtype=np.int64)
        self.conflict = np.zeros((T, T), dtype=np.int64)
        self.top_sq = np.zeros((K, T))
        self.inter = np.zeros((K, T, T), dtype=np.int64)

    def add(self, o: "_Acc") -> None:
        self.gram += o.gram
        self.base_sq += o.base_sq
        self.numel += o.numel
        self.both_nz += o.both_nz
        self.conflict += o.conflict
        self.multi_nz += o.multi_nz
        self.any_conflict += o.any_conflict
        self.top_sq += o.top_sq
        self.inter += o.inter

    def summary(self, names: list[str]) -> dict:
        norms = np.sqrt(np.clip(np.diag(self.gram), 0, None))
        base_norm = math.sqrt(self.base_sq)
        with np.errstate(invalid="ignore", divide="ignore"):
            cos = self.gram / np.outer(norms, norms)
            conf = self.conflict / self.both_nz
            sizes = np.stack([np.diag(self.inter[i]) for i in range(len(self.ks))]) if self.ks else np.zeros((0, 0))
            tasks = {}
            for t, name in enumerate(names):
                tasks[name] = {
                    "norm": float(norms[t]),
                    "relative_norm": float(norms[t] / base_norm) if base_norm > 0 else float("nan"),
                    "top_mass": {_pct_key(k): float(self.top_sq[i, t] / self.gram[t, t]) if self.gram[t, t] > 0
                                 else float("nan") for i, k in enumerate(self.ks)},
                }
            overlap = {}
            for i, k in enumerate(self.ks):
                union = sizes[i][:, None] + sizes[i][None, :] - self.inter[i]
                overlap[_pct_key(k)] = (self.inter[i] / union).tolist()
        return {
            "numel": int(self.numel), "base_norm": base_norm, "tasks": tasks, "cosine": cos.tolist(),
            "sign_conflict": {"pairwise": conf.tolist(),
                              "any": (self.any_conflict / self.multi_nz) if self.multi_nz else float("nan"),
                              "n_entries_multi_nonzero": int(self.multi_nz)},
            "mask_overlap": overlap,
        }


@dataclass
class CollectionStats:
    """Everything `taskvec vectors` reports; `to_dict()` is vectors.json (see docs/vectors_schema.md)."""

    data: dict
    spectra: dict = field(default_factory=dict)  # task -> tensor -> singular values (np.ndarray)

    def to_dict(self) -> dict:
        return self.data

    @property
    def names(self) -> list[str]:
        return self.data["tasks"]

    def cosine(self) -> np.ndarray:
        return np.array(self.data["cosine"], dtype=float)


class _Buffers:
    """T+1 flat buffers of the largest in-scope tensor: base (reused as |τ| scratch) and one per task."""

    def __init__(self, numel: int, T: int, dtype: torch.dtype):
        self.base = torch.empty(numel, dtype=dtype)
        self.tau = [torch.empty(numel, dtype=dtype) for _ in range(T)]
        self.block = torch.empty((T, _CHUNK), dtype=torch.float64)


def _resolve_inputs(base, fts, names, scope, allow_network):
    base = open_checkpoint(base, allow_network=allow_network)
    fts = [open_checkpoint(f, allow_network=allow_network) for f in fts]
    if not fts:
        raise TaskvecError("give at least one fine-tuned checkpoint")
    if names is None:
        names = [Path(f.source.rstrip("/")).name or f"task{i}" for i, f in enumerate(fts)]
    names = list(names)
    if len(names) != len(fts):
        raise TaskvecError(f"--names has {len(names)} entries for {len(fts)} fine-tunes; give one name per fine-tune")
    if len(set(names)) != len(names):
        raise TaskvecError(f"task names must be distinct (got {names}); pass --names a,b,…")
    aligned = [extract_pairs(base, f, scope) for f in fts]
    in_scope = aligned[0][1]
    out_of_scope = aligned[0][2]
    return base, fts, names, aligned, in_scope, out_of_scope


def collection_stats(base, fts, names=None, scope="body", *, top_k_percent=(1.0, 10.0), spectra_max_dim: int = 1024,
                     n_singular: int = 8, dtype: torch.dtype = torch.float32, progress: bool = True,
                     allow_network: bool = False) -> CollectionStats:
    """Stream over base and fine-tunes tensor by tensor and compute the statistics in this module's docstring.

    spectra_max_dim: singular values only for 2-D tensors with min(shape) ≤ this (0 = none; SVD is the
    one super-linear cost here)."""
    t0 = time.perf_counter()
    if dtype not in (torch.float32, torch.float64):
        raise TaskvecError(f"dtype must be float32 or float64, not {dtype}")
    ks = tuple(float(k) for k in top_k_percent)
    if any(not (0 < k <= 100) for k in ks):
        raise TaskvecError(f"top-k percentages must lie in (0, 100], got {list(ks)}")
    base, fts, names, aligned, in_scope, out_of_scope = _resolve_inputs(base, fts, names, scope, allow_network)
    T = len(fts)
    skipped = {}
    work = []
    for n in in_scope:
        miss = [names[t] for t, (al, _, _) in enumerate(aligned) if n not in al.pairs and not fts[t].is_delta]
        if miss:
            skipped[n] = f"missing in {', '.join(miss)}"
        else:
            work.append(n)
    if not work:
        raise TaskvecError(f"no tensor in scope {scope!r} is present in every fine-tune; check --scope and the inputs")
    max_numel = 0
    total_bytes = 0
    for n in work:
        max_numel = max(max_numel, base.numel(n))
        total_bytes += base.nbytes(n)
        for t, (al, _, _) in enumerate(aligned):
            if n in al.pairs:
                on = al.pairs[n]
                max_numel = max(max_numel, fts[t].numel(on))
                total_bytes += fts[t].nbytes(on)
    buf = _Buffers(max_numel, T, dtype)

    tensors, groups, spectra = {}, {}, {name: {} for name in names}
    added = {name: {} for name in names}
    total = _Acc(T, ks)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="task vectors", disable=not progress)
    for n in work:
        acc = _Acc(T, ks)
        shape = tuple(base.shape(n))
        numel = math.prod(shape)
        b = base.read_into(n, buf.base).reshape(-1)
        check_finite(base, n, b)
        bar.update(base.nbytes(n))
        taus = []
        for t, (al, _, _) in enumerate(aligned):
            ft, dst = fts[t], buf.tau[t]
            if n not in al.pairs:  # LoRA leaves this tensor unchanged
                taus.append(dst[:numel].zero_())
                continue
            on = al.pairs[n]
            x = ft.read_into(on, dst).reshape(-1)
            bar.update(ft.nbytes(on))
            check_finite(ft, on, x)
            if ft.is_delta:
                taus.append(x)
                continue
            if n in al.added_rows:
                extra = x[numel:]
                added[names[t]][n] = {"base_rows": al.added_rows[n][0], "ft_rows": al.added_rows[n][1],
                                      "added_norm": float(torch.linalg.vector_norm(extra, dtype=torch.float64))}
                x = x[:numel]
            taus.append(x.sub_(b))
        _block_stats(acc, b, taus, buf)
        acc.numel = numel
        # per-task top-k% thresholds (buf.base is free now: reuse it for |τ|)
        thresholds = _top_k(acc, taus, buf.base, ks)
        if ks:
            _mask_overlap(acc, taus, thresholds, buf)
        spec = {}
        if len(shape) == 2 and 0 < min(shape) <= spectra_max_dim:
            for t, tau in enumerate(taus):
                if acc.gram[t, t] == 0:  # unchanged tensor (LoRA did not adapt it)
                    s = np.zeros(min(shape))
                else:
                    s = _singular_values(tau.view(shape))
                spectra[names[t]][n] = s
                spec[names[t]] = {"effective_rank": effective_rank(s),
                                  "stable_rank": float((s ** 2).sum() / s[0] ** 2) if s[0] > 0 else 0.0,
                                  "top_singular_values": s[:n_singular].tolist()}
        summ = acc.summary(names)
        for name, d in spec.items():
            summ["tasks"][name].update(d)
        g = group_of(n)
        tensors[n] = {"shape": list(shape), "group": g, "layer": layer_of(n), **summ}
        groups.setdefault(g, _Acc(T, ks)).add(acc)
        total.add(acc)
    bar.close()

    def _gorder(g):
        i = layer_of(g + ".")
        return (1, i, "") if i is not None else ((0, 0, g) if g == "embeddings" else (2, 0, g))

    layers = {g: groups[g].summary(names) for g in sorted(groups, key=_gorder)}
    glob = total.summary(names)
    inputs = {"base": {"source": base.source, "format": base.format, "fingerprint": base.fingerprint()},
              "tasks": {names[t]: {"source": f.source, "format": f.format, "is_delta": f.is_delta,
                                   "fingerprint": f.fingerprint()} for t, f in enumerate(fts)}}
    data = {
        "schema": SCHEMA,
        "tasks": names,
        "config": {"scope": scope if isinstance(scope, str) else "list", "dtype": str(dtype).replace("torch.", ""),
                   "top_k_percent": list(ks), "spectra_max_dim": spectra_max_dim, "n_singular": n_singular},
        "inputs": inputs,
        "scope": {"n_tensors": len(work), "n_params": int(total.numel), "out_of_scope": out_of_scope,
                  "skipped": skipped},
        "global": glob["tasks"],
        "base_norm": glob["base_norm"],
        "cosine": glob["cosine"],
        "sign_conflict": glob["sign_conflict"],
        "mask_overlap": glob["mask_overlap"],
        "layers": layers,
        "tensors": tensors,
        "alignment": {names[t]: al.to_dict() for t, (al, _, _) in enumerate(aligned)},
        "added_rows": added,
        "timing": {"seconds": time.perf_counter() - t0, "bytes_read": int(total_bytes),
                   "buffer_bytes": int((T + 1) * max_numel * torch.empty((), dtype=dtype).element_size())},
    }
    return CollectionStats(data, spectra)


def _block_stats(acc: _Acc, b: torch.Tensor, taus: list[torch.Tensor], buf: _Buffers) -> None:
    """Base norm, Gram of τ's and sign agreement, in float64 over column blocks of the T×numel stack."""
    T, numel = len(taus), b.numel()
    blk = buf.block
    base_sq = 0.0
    for s in range(0, numel, _CHUNK):
        e = min(numel, s + _CHUNK)
        c = e - s
        x = blk[0, :c]
        x.copy_(b[s:e])
        base_sq += float(torch.dot(x, x))
        X = blk[:, :c]
        for t in range(T):
            X[t].copy_(taus[t][s:e])
        acc.gram += (X @ X.T).numpy()
        S = torch.sign(X)
        A = S.abs()
        agree = (S @ S.T).numpy()       # Σ s_s s_t = (#same sign) − (#opposite)
        nz = (A @ A.T).numpy()          # #both non-zero
        acc.both_nz += np.rint(nz).astype(np.int64)
        acc.conflict += np.rint((nz - agree) / 2).astype(np.int64)
        if T >= 2:
            cnt = A.sum(0)
            multi = cnt >= 2
            acc.multi_nz += int(multi.sum())
            acc.any_conflict += int((multi & (S.amax(0) > 0) & (S.amin(0) < 0)).sum())
    acc.base_sq = base_sq


def _top_k(acc: _Acc, taus: list[torch.Tensor], scratch: torch.Tensor, ks: tuple) -> np.ndarray:
    """Per task: k-th largest |τ| for each k (in-place partition on the scratch buffer) and the top mass."""
    thr = np.zeros((len(ks), len(taus)))
    if not ks:
        return thr
    numel = taus[0].numel()
    for t, tau in enumerate(taus):
        a = torch.abs(tau, out=scratch[:numel]).numpy()
        pos = sorted({numel - n_top(numel, k) for k in ks})
        a.partition(pos)
        for i, k in enumerate(ks):
            p = numel - n_top(numel, k)
            thr[i, t] = a[p]
            top = torch.from_numpy(a[p:])
            acc.top_sq[i, t] = float(torch.dot(top.double(), top.double())) if top.numel() <= _CHUNK else \
                sum(float(torch.dot(c.double(), c.double())) for c in top.split(_CHUNK))
    return thr


def _mask_overlap(acc: _Acc, taus: list[torch.Tensor], thr: np.ndarray, buf: _Buffers) -> None:
    numel = taus[0].numel()
    blk = buf.block
    for s in range(0, numel, _CHUNK):
        e = min(numel, s + _CHUNK)
        c = e - s
        X = blk[:, :c]
        for t in range(len(taus)):
            X[t].copy_(taus[t][s:e]).abs_()
        for i in range(len(thr)):
            th = torch.from_numpy(thr[i]).to(torch.float64)[:, None]
            M = ((X >= th) & (X > 0)).to(torch.float64)
            acc.inter[i] += np.rint((M @ M.T).numpy()).astype(np.int64)


def _singular_values(m: torch.Tensor) -> np.ndarray:
    """All singular values, descending (float64 up to 4M entries, float32 above to bound memory)."""
    x = m.double() if m.numel() <= _SVD_F64_MAX else m
    return torch.linalg.svdvals(x).double().numpy()
