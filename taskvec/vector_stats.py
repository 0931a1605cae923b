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

import contextlib
import ctypes
import ctypes.util
import functools
import math
import os
import queue
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoints import Checkpoint, check_finite, counted, name_list, name_sequence, open_checkpoint, source_list
from .errors import TaskvecError, TaskvecWarning
from .scope import group_of, layer_of
from .vectors import default_task_names, extract_pairs

__all__ = ["CollectionStats", "collection_stats", "collection_statistics", "effective_rank"]

SCHEMA = "taskvec.vectors/1"
_CHUNK = 1 << 17  # columns per cross-task block: cache-sized temporaries (1 << 18 was no faster, 20 MB more)
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
        """The vectors.json dictionary (JSON-ready; fields in docs/vectors_schema.md); not a copy."""
        return self.data

    @property
    def names(self) -> list[str]:
        """The task names, in the order of the fine-tunes (rows/columns of `cosine()`)."""
        return self.data["tasks"]

    def cosine(self) -> np.ndarray:
        """T×T matrix of cosines cos(τ_s, τ_t) over the scope (float; NaN where a τ is zero), ordered as `names`."""
        return np.array(self.data["cosine"], dtype=float)


class _Blocks:
    """One worker's small column blocks (float64 for the cross-task sums, the τ dtype for |τ| gathering)."""

    def __init__(self, T: int, dtype: torch.dtype):
        self.x = torch.empty((T, _CHUNK), dtype=torch.float64)    # τ block
        self.a = torch.empty((T, _CHUNK), dtype=torch.float64)    # sign / mask block
        self.code = torch.empty(_CHUNK, dtype=torch.float64)       # per-entry pattern codes
        self.icode = torch.empty(_CHUNK, dtype=torch.int64)
        self.b = torch.empty(_CHUNK, dtype=torch.float64)          # float64 block for sums of squares
        self.s = torch.empty(_CHUNK, dtype=dtype)                  # |τ| block


class _Buffers:
    """T+1 flat buffers of the largest in-scope tensor (θ₀, then the top-k workspace; one per task) and
    the workers: threads (torch and numpy release the GIL in their kernels), each with its own blocks."""

    def __init__(self, numel: int, T: int, dtype: torch.dtype, workers: int = 1):
        self.base = torch.empty(numel, dtype=dtype)
        self.tau = [torch.empty(numel, dtype=dtype) for _ in range(T)]
        self.blocks = [_Blocks(T, dtype) for _ in range(max(1, workers))]
        self.x, self.b = self.blocks[0].x, self.blocks[0].b  # the calling thread's blocks
        self._pool = ThreadPoolExecutor(len(self.blocks)) if len(self.blocks) > 1 else None
        self._free = queue.SimpleQueue()
        for blk in self.blocks:
            self._free.put(blk)

    def map(self, fn, items) -> list:
        """[fn(blocks, item) for item in items], spread over the workers (each call gets free blocks)."""
        items = list(items)
        if self._pool is None or len(items) < 2:
            return [fn(self.blocks[0], it) for it in items]

        def run(it):
            blk = self._free.get()
            try:
                return fn(blk, it)
            finally:
                self._free.put(blk)

        return list(self._pool.map(run, items))

    def __enter__(self) -> "_Buffers":
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown()


def collection_statistics(base, fts, names=None, scope="body", **kwargs) -> dict:
    """collection_stats(...).to_dict(): the vectors.json dictionary (used by the report pipeline).
    `fts` may be one path; `names` a list or 'a,b,…'."""
    return collection_stats(base, fts, names, scope, **kwargs).to_dict()


def _resolve_inputs(base, fts, names, scope, allow_network):
    base = open_checkpoint(base, allow_network=allow_network)
    fts = [open_checkpoint(f, allow_network=allow_network) for f in source_list(fts)]
    if not fts:
        raise TaskvecError("give at least one fine-tuned checkpoint")
    names = name_sequence(names)
    if names is None:
        names = default_task_names([f.source for f in fts])
    if len(names) != len(fts):
        raise TaskvecError(f"--names has {counted(len(names), 'name')} for {counted(len(fts), 'fine-tune')}; give one name per fine-tune")
    if any(not n for n in names):
        raise TaskvecError(f"task names must be non-empty (got {names}); pass --names a,b,… with one name per fine-tune")
    if len(set(names)) != len(names):
        raise TaskvecError(f"task names must be distinct (got {names}); pass --names a,b,…")
    seen = {}
    for f, name in zip(fts, names):
        first = seen.setdefault(tuple(sorted(Path(x).resolve() for x in f.files)), name)
        if first != name:
            warnings.warn(f"{f.source} is given twice (as {first} and {name}); their task vectors are identical "
                          "(cosine 1)", TaskvecWarning, stacklevel=3)
    aligned = [extract_pairs(base, f, scope) for f in fts]
    in_scope = aligned[0][1]
    out_of_scope = aligned[0][2]
    return base, fts, names, aligned, in_scope, out_of_scope


def collection_stats(base, fts, names=None, scope="body", *, top_k_percent=(1.0, 10.0), spectra_max_dim: int = 1024,
                     n_singular: int = 8, dtype: torch.dtype = torch.float32, progress: bool = True,
                     allow_network: bool = False, threads: int | None = 1, workers: int | None = None,
                     basic: bool = False) -> CollectionStats:
    """Stream over base and fine-tunes tensor by tensor and compute the statistics in this module's docstring.

    base / fts: paths, hub ids or open Checkpoints (`fts` a list, or one path for a single fine-tune).
    names: one task name per fine-tune, a list or 'a,b,…' (default: the shortest path suffixes that tell
    the fine-tunes apart).

    spectra_max_dim: singular values only for 2-D tensors with min(shape) ≤ this (0 = none; SVD is the
    one super-linear cost here). threads: torch threads while streaming (default 1: the work is
    memory-bound block arithmetic, and multi-threaded small kernels stall badly on a busy machine;
    None keeps torch's setting); the spectra (GEMM/SVD-bound) use torch's full thread count when other
    processes leave half the cores idle, else one.
    workers: threads that share the per-entry statistics (tasks for top-k, column ranges for the
    cross-task sums; default: torch's thread count, at most 8 — each holds ≈ (16·T + 28)·256 KiB).
    basic: only norms, relative norms and cosines (one Gram pass; no top-k, sign, mask or spectral
    statistics — those fields are null)."""
    if basic:
        top_k_percent, spectra_max_dim = (), 0
    all_threads = torch.get_num_threads()
    with _num_threads(threads or all_threads):
        return _collection_stats(base, fts, names, scope, top_k_percent, spectra_max_dim, n_singular, dtype,
                                 progress, allow_network, not basic,
                                 _spectra_threads(all_threads) if spectra_max_dim > 0 else 1,
                                 int(workers or min(8, all_threads)))


def _spectra_threads(all_threads: int) -> int:
    """torch's thread count when other processes leave at least half the cores idle, else 1: multi-threaded
    LAPACK/BLAS spin-waits when the cores are busy (measured here: 1.6× faster with 2 threads idle, 3.5×
    slower under load)."""
    busy = _busy_cores()
    return all_threads if busy < 0.5 * (os.cpu_count() or 1) else 1


def _busy_cores(window: float = 0.1) -> float:
    """How many cores other processes keep busy: /proc/stat's busy time over `window` seconds while this
    process sleeps (the 1-minute load average would count this process's own streaming work), else the
    load average where /proc is missing."""
    try:
        first = _cpu_jiffies()
        time.sleep(window)
        busy, total = (b - a for a, b in zip(first, _cpu_jiffies()))
        return (os.cpu_count() or 1) * busy / total if total > 0 else 0.0
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except (AttributeError, OSError):  # no load average on this platform
            return 0.0


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of all cores from /proc/stat (idle and iowait count as not busy)."""
    with open("/proc/stat") as fh:
        f = [int(x) for x in fh.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    return sum(f) - f[3] - f[4], sum(f)


@contextlib.contextmanager
def _num_threads(k: int):
    """torch's intra-op thread count set to `k` for the block, restored after it."""
    prev = torch.get_num_threads()
    torch.set_num_threads(int(k))
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _prefetch(name: str, base: Checkpoint, fts: list[Checkpoint], aligned) -> None:
    base.prefetch(name)
    for ft, (al, _, _) in zip(fts, aligned):
        if name in al.pairs:
            ft.prefetch(al.pairs[name])


def _collection_stats(base, fts, names, scope, top_k_percent, spectra_max_dim, n_singular, dtype, progress,
                      allow_network, signs, spectra_threads: int, workers: int) -> CollectionStats:
    t0 = time.perf_counter()
    if dtype not in (torch.float32, torch.float64):
        raise TaskvecError(f"dtype must be float32 or float64, not {dtype}")
    ks = tuple(dict.fromkeys(float(k) for k in top_k_percent))  # a percentage given twice counts once
    if any(not (0 < k <= 100) for k in ks):
        raise TaskvecError(f"top-k percentages must lie in (0, 100], got {list(ks)}")
    base, fts, names, aligned, in_scope, out_of_scope = _resolve_inputs(base, fts, names, scope, allow_network)
    T = len(fts)
    skipped = {}
    work = []
    gone = {name: [] for name in names}  # per task: the in-scope tensors it lacks
    for n in in_scope:
        miss = [names[t] for t, (al, _, _) in enumerate(aligned) if n not in al.pairs and not fts[t].is_delta]
        if miss:
            skipped[n] = f"missing in {', '.join(miss)}"
            for name in miss:
                gone[name].append(n)
        else:
            work.append(n)
    if not work:
        raise TaskvecError(f"no tensor in scope {scope!r} is present in every fine-tune; check --scope and the inputs")
    for t, name in enumerate(names):
        if gone[name]:
            warnings.warn(f"{counted(len(gone[name]), 'tensor')} in scope missing in {name} ({fts[t].source}): "
                          f"{name_list(gone[name])}; left out of every task's statistics (all listed in vectors.json "
                          "under scope.skipped; narrow --scope to leave them out on purpose)", TaskvecWarning,
                          stacklevel=3)
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
    with _Buffers(_CHUNK if not signs else max_numel, T, dtype, workers=workers if signs else 1) as buf:
        tensors, groups, spectra = {}, {}, {name: {} for name in names}
        added = {name: {} for name in names}
        total = _Acc(T, ks)
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="task vectors", disable=not progress)

        def record(n: str, shape: tuple, acc: _Acc, spec: dict) -> None:
            """File tensor n's sums (and per-task spectral statistics) under itself, its layer and the total."""
            summ = acc.summary(names)
            for name, d in spec.items():
                summ["tasks"][name].update(d)
            g = group_of(n)
            tensors[n] = {"shape": list(shape), "group": g, "layer": layer_of(n), **summ}
            groups.setdefault(g, _Acc(T, ks)).add(acc)
            total.add(acc)

        for i, n in enumerate(work):
            if i + 1 < len(work):  # the OS reads the next tensor of every checkpoint while this one is computed
                _prefetch(work[i + 1], base, fts, aligned)
            acc = _Acc(T, ks)
            shape = tuple(base.shape(n))
            numel = math.prod(shape)
            acc.numel = numel
            if not signs:
                _basic_stream(acc, base, fts, aligned, n, names, buf, added)
                bar.update(base.nbytes(n) + sum(f.nbytes(a[0].pairs[n]) for f, a in zip(fts, aligned)
                                                if n in a[0].pairs))
                record(n, shape, acc, {})
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
            # per-task top-k% thresholds and masses (θ₀ is no longer needed: its buffer is their workspace)
            thresholds = _top_k(acc, taus, buf, ks)
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
                        with _num_threads(spectra_threads):  # GEMM/SVD-bound: every core helps here
                            s = _singular_values(tau.view(shape), work=buf.base)
                    spectra[names[t]][n] = s
                    spec[names[t]] = {"effective_rank": effective_rank(s),
                                      "stable_rank": float((s ** 2).sum() / s[0] ** 2) if s[0] > 0 else 0.0,
                                      "top_singular_values": s[:n_singular].tolist()}
            if spec:
                _trim_heap()
            record(n, shape, acc, spec)
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


def _top_k(acc: _Acc, taus: list[torch.Tensor], buf: _Buffers, ks: tuple) -> np.ndarray:
    """Per task: the m-th largest |τ| for each k and the squared mass of the m largest entries.

    Tasks run on the workers, each through its own block buffers, gathering its candidates into its
    share of θ₀'s (now free) buffer; a task whose sampled bracket misses (ties, a zero τ) is redone
    afterwards by a partition of the whole |τ| in that buffer."""
    thr = np.zeros((len(ks), len(taus)))
    if not ks:
        return thr
    numel = taus[0].numel()
    ms = [n_top(numel, k) for k in ks]
    room = buf.base.numel() // len(taus)  # θ₀'s buffer is free now: each task gathers into its share
    tops = buf.map(lambda blk, t: _top_values(taus[t], ms, blk, room=buf.base[t * room:(t + 1) * room]),
                   range(len(taus)))
    for t, top in enumerate(tops):
        if top is None:
            top = _top_values(taus[t], ms, buf.blocks[0], room=buf.base[:0], scratch=buf.base)
        for i, (th, mass) in enumerate(top):
            thr[i, t], acc.top_sq[i, t] = th, mass
    return thr


_SAMPLE = 1 << 16


def _top_values(x: torch.Tensor, ms: list[int], blk: "_Blocks", room: torch.Tensor | None = None,
                scratch: torch.Tensor | None = None):
    """For each m: (m-th largest |x|, Σ of the squares of the m largest |x|, in float64). Exact.

    Fast path: a strided sample brackets the smallest threshold from below; only the entries above
    that bracket (≈ max(m)/n of them plus a margin) are gathered, block by block through `blk`, into
    `room` (default: a temporary of 2·max(m) + a block), and partitioned there — no full-size |x|.
    Otherwise (small tensor, ties at the bracket, or no room) |x| is formed in `scratch` (a small
    tensor gets a temporary) and partitioned in place; a large tensor without a scratch returns None,
    so the caller can redo it where the scratch lives."""
    n = x.numel()
    m_max = max(ms)
    room = torch.empty(min(n, 2 * m_max + _CHUNK), dtype=x.dtype) if room is None else room
    if n > 8 * _SAMPLE and m_max < 0.5 * n and room.numel() >= m_max:
        stride = n // _SAMPLE
        sample = np.abs(x[::stride].numpy())
        S = sample.size
        # sample index whose value is (with ~6σ confidence) below the true m_max-th largest
        f = m_max / n
        j = int(S * (1 - f) - 6 * math.sqrt(S * f * (1 - f)) - 8)
        if j > 0:
            sel = _select_abs_ge(x, np.partition(sample, j)[j], blk.s, room.numpy())
            if sel is not None and sel.size >= m_max:
                return _largest(sel, ms, blk.b)
        if scratch is None:
            return None
    a = np.abs(x.numpy()) if scratch is None else torch.abs(x, out=scratch[:n]).numpy()
    return _largest(a, ms, blk.b)


def _largest(a: np.ndarray, ms: list[int], blk: torch.Tensor) -> list:
    """(m-th largest, Σ squares of the m largest) of `a` for each m, by one in-place partition."""
    k = a.size
    a.partition(sorted({k - m for m in ms}))
    return [(a[k - m], _sum_sq(torch.from_numpy(a[k - m:]), blk)) for m in ms]


def _select_abs_ge(x: torch.Tensor, lo, blk: torch.Tensor, room: np.ndarray) -> np.ndarray | None:
    """|x|[|x| >= lo] gathered block by block (through the block buffer `blk`) into `room`; None when
    more entries qualify than it holds (ties at the bracket, e.g. a zero tensor)."""
    got = 0
    for s in range(0, x.numel(), _CHUNK):
        e = min(x.numel(), s + _CHUNK)
        a = torch.abs(x[s:e], out=blk[: e - s]).numpy()
        v = a[a >= lo]
        if got + v.size > room.size:
            return None
        room[got:got + v.size] = v
        got += v.size
    return room[:got]


_HIST_BINS = 1 << 16  # most bins of one pattern histogram (one bincount per block)


def _cross_stats(acc: _Acc, taus: list[torch.Tensor], thr: np.ndarray, buf: _Buffers, signs: bool = True) -> None:
    """Gram matrix, sign agreement and top-k mask intersections over column blocks of the T τ's.

    Dots in float64. Sign and mask statistics come from histograms of per-entry membership codes
    (sign digit: base 3, digit t = sign(τ_t) + 1; mask k: bit t = |τ_t| in its top-k%), the digits
    packed into as few histograms as fit `_HIST_BINS` (one for T = 3 and two top-k levels), so all
    pairwise counts cost one bincount per block; counts are exact integers. The column range is split
    between the workers, each with its own block buffers and partial sums."""
    T, numel = len(taus), taus[0].numel()
    digits = ([3 ** T] if signs else []) + [1 << T] * len(thr)
    groups = _pack(digits)
    thr_pos = torch.from_numpy(np.maximum(thr, np.finfo(np.float64).tiny))  # |τ| ≥ thr and τ ≠ 0
    W = len(buf.blocks)
    cuts = [numel * w // W for w in range(W + 1)]
    parts = buf.map(lambda blk, r: _cross_range(taus, thr_pos, signs, digits, groups, blk, *r),
                    [(cuts[w], cuts[w + 1]) for w in range(W) if cuts[w + 1] > cuts[w]])
    hists = [np.zeros(d, dtype=np.int64) for d in digits]
    for gram, part in parts:
        acc.gram += gram
        for h, p in zip(hists, part):
            h += p
    _counts_from_histograms(acc, T, hists[0] if signs else np.zeros(3 ** T, dtype=np.int64),
                            np.stack(hists[int(signs):]) if len(thr) else np.zeros((0, 1 << T), dtype=np.int64))


def _pack(sizes: list[int]) -> list[list[int]]:
    """Consecutive digit indices grouped so that each group's product of sizes is ≤ _HIST_BINS."""
    groups, cur, prod = [], [], 1
    for i, s in enumerate(sizes):
        if cur and prod * s > _HIST_BINS:
            groups.append(cur)
            cur, prod = [], 1
        cur.append(i)
        prod *= s
    return groups + ([cur] if cur else [])


def _cross_range(taus, thr_pos, signs: bool, sizes: list[int], groups, blk: "_Blocks", start: int, stop: int):
    """Gram and per-digit pattern histograms (digit sizes `sizes`, packed as `groups`) of columns
    [start, stop) (one worker's share)."""
    T = len(taus)
    gram = np.zeros((T, T))
    w3 = torch.tensor([3.0 ** t for t in range(T)], dtype=torch.float64)
    w2 = torch.tensor([2.0 ** t for t in range(T)], dtype=torch.float64)
    hists = [torch.zeros(math.prod(sizes[d] for d in g), dtype=torch.int64) for g in groups]
    for s in range(start, stop, _CHUNK):
        e = min(stop, s + _CHUNK)
        c = e - s
        X, A, code, icode = blk.x[:, :c], blk.a[:, :c], blk.code[:c], blk.icode[:c]
        for t in range(T):
            X[t].copy_(taus[t][s:e])
        gram += _block_gram(X)
        for g, h in zip(groups, hists):
            code.zero_()
            scale = 1.0
            for d in g:  # digits in order: the sign (if any) first, then X becomes |X| for the masks
                if signs and d == 0:
                    torch.sign(X, out=A).add_(1.0)
                    torch.addmv(code, A.T, w3 * scale, out=code)
                else:
                    if d == int(signs):
                        torch.abs(X, out=X)
                    torch.ge(X, thr_pos[d - int(signs)][:, None], out=A)
                    torch.addmv(code, A.T, w2 * scale, out=code)
                scale *= sizes[d]
            icode.copy_(code)
            h += torch.bincount(icode, minlength=h.numel())
    per_digit = []
    for g, h in zip(groups, hists):  # marginal histogram of each digit (the first digit varies fastest)
        arr = h.numpy().reshape([sizes[d] for d in reversed(g)])
        for pos, d in enumerate(reversed(g)):
            per_digit.append((d, arr.sum(axis=tuple(a for a in range(arr.ndim) if a != pos))))
    return gram, [p for _, p in sorted(per_digit, key=lambda dp: dp[0])]


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


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere). The spectra's
    megabyte-sized float64 temporaries raise glibc's dynamic mmap threshold, after which freed blocks of
    that size stay resident and add ≈ 100 MB to the peak RSS (measured on the bench collection)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _singular_values(m: torch.Tensor, exact_max_numel: int | None = None,
                     work: torch.Tensor | None = None) -> np.ndarray:
    """All singular values, descending, in float64.

    Up to `exact_max_numel` entries: svdvals of a float64 copy. Larger: eigenvalues of the float64 Gram
    matrix of the smaller side, accumulated over column blocks — memory min(m,n)² instead of a copy of
    the tensor; σ_i is then accurate to ≈ 1e-16·σ₁²/σ_i (noise below ~1e-8·σ₁). The float64 copy, or
    the Gram matrix and its block, live in `work` (a free flat buffer, e.g. θ₀'s) when it is big enough."""
    limit = _SVD_EXACT_MAX if exact_max_numel is None else exact_max_numel
    if m.numel() <= limit:
        return torch.linalg.svdvals(_f64(work, m.numel()).view(m.shape).copy_(m)).numpy()
    a = m if m.shape[0] <= m.shape[1] else m.T  # a: small × large
    k, n = a.shape
    step = max(1, _CHUNK // k)
    ws = _f64(work, k * k + k * step)
    g = ws[: k * k].view(k, k).zero_()
    blk = ws[k * k:].view(k, step)
    for s in range(0, n, step):
        e = min(n, s + step)
        x = blk[:, : e - s]
        x.copy_(a[:, s:e])
        g.addmm_(x, x.T)
    ev = torch.linalg.eigvalsh(g).numpy()[::-1].clip(min=0)
    return np.sqrt(ev)


def _f64(work: torch.Tensor | None, numel: int) -> torch.Tensor:
    """`numel` float64 slots: the front of the contiguous flat buffer `work` (its bytes, whatever its dtype)
    when it holds that many, else a new tensor."""
    if work is not None and work.numel() * work.element_size() >= 8 * numel and work.data_ptr() % 8 == 0:
        return work.view(torch.uint8)[: 8 * numel].view(torch.float64)
    return torch.empty(numel, dtype=torch.float64)
