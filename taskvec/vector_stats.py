"""Streaming statistics of a collection of task vectors τ_t = θ_t − θ₀ (one base, T fine-tunes).

For each tensor in scope: read θ₀ and every θ_t into T+1 reused flat buffers, form τ_t in place,
compute everything, move on — memory ≈ (T+1) × the largest tensor, never a full model. Accumulates
in float64.

Per tensor, per layer group and globally, for each task:
  norm ‖τ‖₂; base norm ‖θ₀‖₂; relative norm ‖τ‖/‖θ₀‖;
  top-k% mass: fraction of ‖τ‖² held by the ⌈k%·numel⌉ (rounded, ≥ 1) largest |τ| entries;
Per 2-D tensor and task: singular values (float64; svdvals up to 1M entries, else eigenvalues of the
  smaller float64 Gram matrix, so memory stays min(m,n)²) →
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
from .vectors import default_task_names, extract_pairs

__all__ = ["CollectionStats", "collection_stats", "collection_statistics", "effective_rank"]

SCHEMA = "taskvec.vectors/1"
_CHUNK = 1 << 18  # columns per cross-task block: small enough to stay in cache-sized temporaries
_SVD_EXACT_MAX = 1 << 20  # above this many entries, singular values come from the smaller Gram matrix


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
    """T+1 flat buffers of the largest in-scope tensor (base, reused as |τ| scratch; one per task) and
    small float64 column blocks for the cross-task sums."""

    def __init__(self, numel: int, T: int, dtype: torch.dtype):
        self.base = torch.empty(numel, dtype=dtype)
        self.tau = [torch.empty(numel, dtype=dtype) for _ in range(T)]
        self.x = torch.empty((T, _CHUNK), dtype=torch.float64)    # τ block
        self.a = torch.empty((T, _CHUNK), dtype=torch.float64)    # sign / mask block
        self.code = torch.empty(_CHUNK, dtype=torch.float64)       # per-entry pattern codes
        self.icode = torch.empty(_CHUNK, dtype=torch.int64)
        self.b = torch.empty(_CHUNK, dtype=torch.float64)          # base block


def collection_statistics(base, fts, names=None, scope="body", **kwargs) -> dict:
    """collection_stats(...).to_dict(): the vectors.json dictionary (used by the report pipeline)."""
    return collection_stats(base, fts, names, scope, **kwargs).to_dict()


def _resolve_inputs(base, fts, names, scope, allow_network):
    base = open_checkpoint(base, allow_network=allow_network)
    fts = [open_checkpoint(f, allow_network=allow_network) for f in fts]
    if not fts:
        raise TaskvecError("give at least one fine-tuned checkpoint")
    if names is None:
        names = default_task_names([f.source for f in fts])
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
                     allow_network: bool = False, threads: int | None = 1, basic: bool = False) -> CollectionStats:
    """Stream over base and fine-tunes tensor by tensor and compute the statistics in this module's docstring.

    spectra_max_dim: singular values only for 2-D tensors with min(shape) ≤ this (0 = none; SVD is the
    one super-linear cost here). threads: torch threads while streaming (default 1: the work is
    memory-bound block arithmetic, and multi-threaded small kernels stall badly on a busy machine;
    None keeps torch's setting). basic: only norms, relative norms and cosines (one Gram pass; no
    top-k, sign, mask or spectral statistics — those fields are null)."""
    if basic:
        top_k_percent, spectra_max_dim = (), 0
    prev = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        return _collection_stats(base, fts, names, scope, top_k_percent, spectra_max_dim, n_singular, dtype,
                                 progress, allow_network, not basic)
    finally:
        torch.set_num_threads(prev)


def _prefetch(name: str, base: Checkpoint, fts: list[Checkpoint], aligned) -> None:
    base.prefetch(name)
    for ft, (al, _, _) in zip(fts, aligned):
        if name in al.pairs:
            ft.prefetch(al.pairs[name])


def _collection_stats(base, fts, names, scope, top_k_percent, spectra_max_dim, n_singular, dtype, progress,
                      allow_network, signs) -> CollectionStats:
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
    # basic statistics stream each tensor in column blocks (memory: a few blocks); the full set needs
    # whole tensors for the exact top-k thresholds and the spectra
    buf = _Buffers(_CHUNK if not signs else max_numel, T, dtype)

    tensors, groups, spectra = {}, {}, {name: {} for name in names}
    added = {name: {} for name in names}
    total = _Acc(T, ks)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="task vectors", disable=not progress)
    for i, n in enumerate(work):
        if i + 1 < len(work):  # the OS reads the next tensor of every checkpoint while this one is computed
            _prefetch(work[i + 1], base, fts, aligned)
        acc = _Acc(T, ks)
        shape = tuple(base.shape(n))
        numel = math.prod(shape)
        if not signs:
            _basic_stream(acc, base, fts, aligned, n, names, buf, added)
            bar.update(base.nbytes(n) + sum(f.nbytes(a[0].pairs[n]) for f, a in zip(fts, aligned) if n in a[0].pairs))
            acc.numel = numel
            summ = acc.summary(names)
            g = group_of(n)
            tensors[n] = {"shape": list(shape), "group": g, "layer": layer_of(n), **summ}
            groups.setdefault(g, _Acc(T, ks)).add(acc)
            total.add(acc)
            continue
        b = base.read_into(n, buf.base).reshape(-1)
        bar.update(base.nbytes(n))
        acc.base_sq = _sum_sq(b, buf.b)
        if not math.isfinite(acc.base_sq):
            check_finite(base, n, b)
        taus = []
        for t, (al, _, _) in enumerate(aligned):
            ft, dst = fts[t], buf.tau[t]
            if n not in al.pairs:  # LoRA leaves this tensor unchanged
                taus.append(dst[:numel].zero_())
                continue
            on = al.pairs[n]
            x = ft.read_into(on, dst).reshape(-1)
            bar.update(ft.nbytes(on))
            if ft.is_delta:
                taus.append(x)
                continue
            if n in al.added_rows:
                extra = x[numel:]
                added_sq = _sum_sq(extra, buf.b)
                if not math.isfinite(added_sq):
                    check_finite(ft, on, extra)
                added[names[t]][n] = {"base_rows": al.added_rows[n][0], "ft_rows": al.added_rows[n][1],
                                      "added_norm": math.sqrt(added_sq)}
                x = x[:numel]
            taus.append(x.sub_(b))
        acc.numel = numel
        # per-task top-k% thresholds and masses (θ₀ is no longer needed: its buffer holds |τ|)
        thresholds = _top_k(acc, taus, buf.base, ks, buf.b)
        _cross_stats(acc, taus, thresholds, buf, signs)
        for t in range(T):
            if not math.isfinite(acc.gram[t, t]):  # θ₀ is finite, so θ_t holds the NaN/Inf
                on = aligned[t][0].pairs[n]
                check_finite(fts[t], on, fts[t].get(on))
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
    # identity = hash of file names, sizes and mtimes: a content hash would cost one more full read
    inputs = {"base": {"source": base.source, "format": base.format, "identity": base.identity()},
              "tasks": {names[t]: {"source": f.source, "format": f.format, "is_delta": f.is_delta,
                                   "identity": f.identity()} for t, f in enumerate(fts)}}
    data = {
        "schema": SCHEMA,
        "tasks": names,
        "config": {"scope": scope if isinstance(scope, str) else "list", "dtype": str(dtype).replace("torch.", ""),
                   "statistics": "full" if signs else "basic",
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


def _basic_stream(acc: _Acc, base: Checkpoint, fts: list, aligned: list, n: str, names: list, buf: _Buffers,
                  added: dict) -> None:
    """Base norm and Gram matrix of tensor `n`, reading base and fine-tunes block by block (positioned reads)."""
    numel = base.numel(n)
    X = buf.x
    for s in range(0, numel, _CHUNK):
        e = min(numel, s + _CHUNK)
        c = e - s
        b = base.read_range(n, s, e, buf.base)
        xb = buf.b[:c]
        xb.copy_(b)
        acc.base_sq += float(torch.dot(xb, xb))
        for t, (al, _, _) in enumerate(aligned):
            if n not in al.pairs:
                X[t, :c].zero_()
                continue
            x = fts[t].read_range(al.pairs[n], s, e, buf.tau[t])
            if not fts[t].is_delta:
                x.sub_(b)
            X[t, :c].copy_(x)
        acc.gram += _block_gram(X[:, :c])
    if not math.isfinite(acc.base_sq):
        check_finite(base, n, base.get(n))
    for t, (al, _, _) in enumerate(aligned):
        if n not in al.pairs:
            continue
        on = al.pairs[n]
        if not math.isfinite(acc.gram[t, t]):
            check_finite(fts[t], on, fts[t].get(on))
        if n in al.added_rows:
            extra_sq = 0.0
            total = fts[t].numel(on)
            for s in range(numel, total, _CHUNK):
                e = min(total, s + _CHUNK)
                y = buf.b[: e - s]
                y.copy_(fts[t].read_range(on, s, e, buf.tau[t]))
                extra_sq += float(torch.dot(y, y))
            if not math.isfinite(extra_sq):
                check_finite(fts[t], on, fts[t].get(on))
            added[names[t]][n] = {"base_rows": al.added_rows[n][0], "ft_rows": al.added_rows[n][1],
                                  "added_norm": math.sqrt(extra_sq)}


def _block_gram(X: torch.Tensor) -> np.ndarray:
    """X Xᵀ of a float64 [T, c] block: one GEMM reads each τ block once (T(T+1)/2 dots read it T times)."""
    return (X @ X.T).numpy()


def _sum_sq(x: torch.Tensor, blk: torch.Tensor) -> float:
    """Σ x² in float64, block by block (NaN/Inf propagate, so this doubles as the finiteness check)."""
    total = 0.0
    for s in range(0, x.numel(), _CHUNK):
        e = min(x.numel(), s + _CHUNK)
        y = blk[: e - s]
        y.copy_(x[s:e])
        total += float(torch.dot(y, y))
    return total


def _top_k(acc: _Acc, taus: list[torch.Tensor], scratch: torch.Tensor, ks: tuple, blk: torch.Tensor) -> np.ndarray:
    """Per task: the m-th largest |τ| for each k and the squared mass of the m largest entries."""
    thr = np.zeros((len(ks), len(taus)))
    if not ks:
        return thr
    numel = taus[0].numel()
    ms = [n_top(numel, k) for k in ks]
    for t, tau in enumerate(taus):
        a = torch.abs(tau, out=scratch[:numel]).numpy()
        for i, (th, top) in enumerate(_top_values(a, ms)):
            thr[i, t] = th
            acc.top_sq[i, t] = _sum_sq(torch.from_numpy(top), blk)
    return thr


_SAMPLE = 1 << 16


def _top_values(a: np.ndarray, ms: list[int]):
    """For each m: (m-th largest value of `a`, the m largest values). Exact.

    Fast path: a strided sample brackets the smallest threshold from below; only the entries above
    that bracket (≈ max(m)/n of the array plus a margin) are selected and partitioned. Falls back to
    an in-place partition of the whole array when the bracket misses (never changes the result)."""
    n = a.size
    m_max = max(ms)
    if n > 8 * _SAMPLE and m_max < 0.5 * n:
        stride = n // _SAMPLE
        sample = np.array(a[::stride], dtype=a.dtype)
        S = sample.size
        # sample index whose value is (with ~6σ confidence) below the true m_max-th largest
        f = m_max / n
        j = int(S * (1 - f) - 6 * math.sqrt(S * f * (1 - f)) - 8)
        if j > 0:
            lo = np.partition(sample, j)[j]
            sel = _select_ge(a, lo)
            if sel.size >= m_max:
                k = sel.size
                sel.partition(sorted({k - m for m in ms}))
                return [(sel[k - m], sel[k - m:]) for m in ms]
    a.partition(sorted({n - m for m in ms}))
    return [(a[n - m], a[n - m:]) for m in ms]


def _select_ge(a: np.ndarray, lo) -> np.ndarray:
    """a[a >= lo] without a full-size boolean temporary: count per block, then fill."""
    blocks = [(s, min(a.size, s + _CHUNK)) for s in range(0, a.size, _CHUNK)]
    counts = [int(np.count_nonzero(a[s:e] >= lo)) for s, e in blocks]
    out = np.empty(sum(counts), dtype=a.dtype)
    pos = 0
    for (s, e), c in zip(blocks, counts):
        if c:
            out[pos:pos + c] = a[s:e][a[s:e] >= lo]
            pos += c
    return out


def _cross_stats(acc: _Acc, taus: list[torch.Tensor], thr: np.ndarray, buf: _Buffers, signs: bool = True) -> None:
    """Gram matrix, sign agreement and top-k mask intersections over column blocks of the T τ's.

    Dots in float64. Sign and mask statistics come from a histogram of per-entry membership codes
    (base-3 digit t = sign(τ_t) + 1; bit t of the mask code = |τ_t| in its top-k%), so all pairwise
    counts cost a few passes for all pairs together; counts are exact integers."""
    T, numel = len(taus), taus[0].numel()
    n_sign = 3 ** T
    sign_hist = torch.zeros(n_sign, dtype=torch.int64)
    mask_hist = torch.zeros((len(thr), 1 << T), dtype=torch.int64)
    w3 = torch.tensor([3.0 ** t for t in range(T)], dtype=torch.float64)
    w2 = torch.tensor([2.0 ** t for t in range(T)], dtype=torch.float64)
    thr_pos = torch.from_numpy(np.maximum(thr, np.finfo(np.float64).tiny))  # |τ| ≥ thr and τ ≠ 0
    for s in range(0, numel, _CHUNK):
        e = min(numel, s + _CHUNK)
        c = e - s
        X, A, code, icode = buf.x[:, :c], buf.a[:, :c], buf.code[:c], buf.icode[:c]
        for t in range(T):
            X[t].copy_(taus[t][s:e])
        acc.gram += _block_gram(X)
        if signs:
            torch.sign(X, out=A).add_(1.0)
            torch.mv(A.T, w3, out=code)
            icode.copy_(code)
            sign_hist += torch.bincount(icode, minlength=n_sign)
        if len(thr):
            torch.abs(X, out=X)
            for i in range(len(thr)):
                torch.ge(X, thr_pos[i][:, None], out=A)
                torch.mv(A.T, w2, out=code)
                icode.copy_(code)
                mask_hist[i] += torch.bincount(icode, minlength=1 << T)
    _counts_from_histograms(acc, T, sign_hist.numpy(), mask_hist.numpy())


def _counts_from_histograms(acc: _Acc, T: int, sign_hist: np.ndarray, mask_hist: np.ndarray) -> None:
    """Pairwise counts from the pattern histograms (sign code: base-3 digits 0 = −, 1 = 0, 2 = +)."""
    codes = np.arange(sign_hist.size)
    digits = np.stack([(codes // 3 ** t) % 3 for t in range(T)])  # T × 3^T
    pos, neg = digits == 2, digits == 0
    nz = pos | neg
    for i in range(T):
        for j in range(T):
            acc.both_nz[i, j] += int(sign_hist[nz[i] & nz[j]].sum())
            acc.conflict[i, j] += int(sign_hist[(pos[i] & neg[j]) | (neg[i] & pos[j])].sum())
    acc.multi_nz += int(sign_hist[nz.sum(0) >= 2].sum())
    acc.any_conflict += int(sign_hist[pos.any(0) & neg.any(0)].sum())
    mcodes = np.arange(mask_hist.shape[1]) if len(mask_hist) else np.zeros(0, dtype=int)
    bits = [(mcodes >> t) & 1 == 1 for t in range(T)]
    for k in range(len(mask_hist)):
        for i in range(T):
            for j in range(T):
                acc.inter[k, i, j] += int(mask_hist[k][bits[i] & bits[j]].sum())


def _singular_values(m: torch.Tensor, exact_max_numel: int | None = None) -> np.ndarray:
    """All singular values, descending, in float64.

    Up to `exact_max_numel` entries: svdvals of a float64 copy. Larger: eigenvalues of the float64 Gram
    matrix of the smaller side, accumulated over column blocks — memory min(m,n)² instead of a copy of
    the tensor; σ_i is then accurate to ≈ 1e-16·σ₁²/σ_i (noise below ~1e-8·σ₁)."""
    limit = _SVD_EXACT_MAX if exact_max_numel is None else exact_max_numel
    if m.numel() <= limit:
        return torch.linalg.svdvals(m.double()).numpy()
    a = m if m.shape[0] <= m.shape[1] else m.T  # a: small × large
    k, n = a.shape
    g = torch.zeros((k, k), dtype=torch.float64)
    step = max(1, _CHUNK // k)
    blk = torch.empty((k, step), dtype=torch.float64)
    for s in range(0, n, step):
        e = min(n, s + step)
        x = blk[:, : e - s]
        x.copy_(a[:, s:e])
        g.addmm_(x, x.T)
    ev = torch.linalg.eigvalsh(g).numpy()[::-1].clip(min=0)
    return np.sqrt(ev)
