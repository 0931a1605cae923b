"""compute_kernel: the eNTK K = J Jᵀ of the pretrained model on a probe set, by one of four strategies.

| strategy   | how                                                                     | memory       |
|------------|-------------------------------------------------------------------------|--------------|
| exact      | per-example gradient row blocks (batched hooks, or vmap(grad)) stored in | n·m·p floats |
|            | RAM or a disk memmap; Gram accumulated in 64-row groups into float64;     | (÷ slices)   |
|            | above EXACT_SLICE_BYTES, in parameter slices K = Σ_s J_s J_sᵀ, one buffer |              |
| recompute  | a panel of rows kept, the remaining row blocks recomputed per panel      | panel·p      |
| sketch     | each row block sketched to k dims (CountSketch / Gaussian), K ≈ ΦΦᵀ;     | n·k          |
|            | the error against the exact within-block Gram is measured and reported   |              |
| lanczos    | matrix-free top-k eigenpairs of K/n (VJP then JVP per batch)             | O(p)         |

`strategy="auto"` picks the first that fits `memory_gb`: exact (RAM) → recompute (≤ 4 panels) →
sketch. Per-example gradients come from :class:`taskvec.ntk.jacobian.RowEngine` (``gradients=``).
Float32 Jacobian blocks are multiplied in float32 over column chunks of `GRAM_CHUNK` and the
chunk products accumulated in float64; float64 models multiply in float64 throughout.
Results are cached under `taskvec.io.cache_dir()/ntk/<content hash>`; an interrupted run leaves none.
"""

from __future__ import annotations

import hashlib
import math
import os
import resource
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import TaskvecError
from ..io import atomic_dir, atomic_save_npy, atomic_write_json, cache_dir, content_hash
from ..outputs import OutputFunction
from .jacobian import ProbeBatch, RowEngine, per_example_bytes
from .lanczos import KernelOperator, lanczos_topk
from .params import build_space
from .sketch import make_sketch, sketch_bound
from .spectrum import spectrum

STRATEGIES = ("auto", "exact", "recompute", "sketch", "lanczos")
GRAM_CHUNK = 1 << 16  # float32 products summed in float64 every 65536 columns
EXACT_SLICE_BYTES = 6 << 30  # exact: above this, J is computed in parameter slices (K = Σ_s J_s J_sᵀ) in one reused buffer
GRAM_GROUP = 64  # rows per Gram update: thin (16-row) updates are memory-bound, 64 rows reach ~2/3 of GEMM peak
# examples per gradient pass: blocks of many large rows spill caches and pad more (MiniLM n = 64, 43 MB rows:
# 16 per block → 2.7 s, 64 → 6.8 s); small models gain from long blocks (tiny Llama: 128 → 1.03 s, 16 → 1.37 s)
GRADIENT_BLOCK_BYTES = 3 << 28  # 768 MB of rows
GRADIENT_BLOCK_MAX = 128
GB = 1 << 30


def _size(nbytes: float) -> str:
    """A byte count for messages: '1.50 GB', '12.3 MB' or '1.0 kB'."""
    if nbytes >= GB:
        return f"{nbytes / GB:.2f} GB"
    return f"{nbytes / (1 << 20):.1f} MB" if nbytes >= 1 << 20 else f"{nbytes / (1 << 10):.1f} kB"


@dataclass
class KernelResult:
    """K (n×n float64, unnormalised; None for Lanczos), eigenpairs of K/n (descending) and run info."""

    K: np.ndarray | None
    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    info: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        """The number of probe examples (from `info`); K/n is the normalised kernel whose eigenvalues are kept."""
        return int(self.info["n"])

    def save(self, folder) -> Path:
        """kernel.npy (if any), eigenvalues.npy, eigenvectors.npy, ntk.json — each written atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.K is not None:
            atomic_save_npy(folder / "kernel.npy", self.K)
        atomic_save_npy(folder / "eigenvalues.npy", self.eigenvalues)
        atomic_save_npy(folder / "eigenvectors.npy", self.eigenvectors)
        atomic_write_json(folder / "ntk.json", self.info)
        return folder

    @classmethod
    def load(cls, folder) -> "KernelResult":
        """Read a kernel folder written by `save` or `taskvec ntk` (kernel.npy is optional: Lanczos writes none)."""
        import json

        folder = Path(folder)
        if not (folder / "ntk.json").is_file():
            raise TaskvecError(f"{folder}: no ntk.json; run `taskvec ntk` to compute a kernel there")
        K = np.load(folder / "kernel.npy") if (folder / "kernel.npy").is_file() else None
        return cls(K, np.load(folder / "eigenvalues.npy"), np.load(folder / "eigenvectors.npy"),
                   json.loads((folder / "ntk.json").read_text()))


# ----------------------------------------------------------------------------------- helpers
def gram(A: torch.Tensor, B: torch.Tensor, chunk: int = GRAM_CHUNK) -> torch.Tensor:
    """A Bᵀ in float64: float64 inputs multiply directly; lower precision in column chunks summed in float64."""
    if A.dtype == torch.float64 and B.dtype == torch.float64:
        return A @ B.T
    out = torch.zeros(A.shape[0], B.shape[0], dtype=torch.float64, device=A.device)
    for c in range(0, A.shape[1], chunk):
        out += (A[:, c:c + chunk] @ B[:, c:c + chunk].T).double()
    return out


def model_digest(model: nn.Module) -> str:
    """Content hash of every parameter and buffer (so a cache entry belongs to these exact weights)."""
    h = hashlib.sha256(type(model).__name__.encode())
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def default_memory_gb() -> float:
    """Half of the memory available now (Linux /proc/meminfo; 8 GB if unknown)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / GB / 2
    except OSError:
        pass
    return 8.0


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def _model_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@dataclass
class Plan:
    strategy: str
    block: int          # examples per gradient block
    panel: int = 0      # examples per stored panel (recompute)
    group: int = 0      # examples per recomputed group buffer (recompute)
    storage: str = "ram"
    slices: int = 1     # exact: parameter slices computed one after another into one buffer
    sketch_dim: int = 0
    notes: list = field(default_factory=list)


def plan(strategy: str, *, n: int, rows_per_ex: int, P: int, itemsize: int, ex_bytes: int, model_bytes: int,
         budget: int, sketch_dim: int | None, top_k: int | None) -> Plan:
    """Choose strategy, block and panel sizes that fit `budget` bytes (raises if nothing fits)."""
    free = budget - model_bytes
    row_bytes = rows_per_ex * P * itemsize  # one example's stored Jacobian rows
    if free < ex_bytes:
        raise TaskvecError(
            f"memory budget {_size(budget)} is too small for any strategy: the model takes "
            f"{_size(model_bytes)} and one example's gradient pass about {_size(ex_bytes)}; "
            f"raise --memory-gb or narrow --scope")
    def blocks_of(room: float) -> int:  # examples per gradient block
        return int(max(1, min(n, GRADIENT_BLOCK_MAX, GRADIENT_BLOCK_BYTES // row_bytes, room // ex_bytes)))

    k = int(sketch_dim or min(16384, max(1024, 8 * n * rows_per_ex)))
    stored = n * row_bytes + (n * rows_per_ex) ** 2 * 8
    if strategy == "auto":
        if stored + ex_bytes <= free:
            strategy = "exact"
        elif free - ex_bytes >= row_bytes * max(1, math.ceil(n / 4)):
            strategy = "recompute"
        else:
            strategy = "sketch"
    block = blocks_of(min(free - stored, free * 0.25) if strategy == "exact" and stored + ex_bytes <= free
                      else free * 0.25)
    if strategy == "exact":
        storage = "ram" if stored + block * ex_bytes <= free else "disk"
        notes = [] if storage == "ram" else [f"J ({_size(n * row_bytes)}) exceeds the budget: stored on disk (memmap)"]
        slices = max(1, math.ceil(n * row_bytes / EXACT_SLICE_BYTES)) if storage == "ram" else 1
        return Plan("exact", block, storage=storage, slices=slices, notes=notes)
    if strategy == "recompute":
        room = free - block * ex_bytes - (n * rows_per_ex) ** 2 * 8
        slots = int(room // row_bytes)  # examples' rows that fit: the panel plus the recomputed-group buffer
        if slots < 2:
            raise TaskvecError(f"memory budget {_size(budget)} cannot hold two Jacobian rows "
                               f"({_size(row_bytes)} each) beside the model; use --strategy sketch or lanczos")
        group = max(1, min(GRAM_GROUP // rows_per_ex, slots // 4))
        panel = min(n, slots - group)
        block = min(block, panel, group)
        return Plan("recompute", block, panel=panel, group=group)
    if strategy == "sketch":
        return Plan("sketch", block, sketch_dim=k)
    if strategy == "lanczos":
        return Plan("lanczos", block)
    raise TaskvecError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")


def _unpermute(K_sorted: np.ndarray, row_order: np.ndarray) -> np.ndarray:
    K = np.empty_like(K_sorted)
    K[np.ix_(row_order, row_order)] = K_sorted
    return K


def _row_order(order: torch.Tensor, rows_per_ex: int) -> np.ndarray:
    o = order.numpy()
    return (o[:, None] * rows_per_ex + np.arange(rows_per_ex)[None, :]).reshape(-1)


# ---------------------------------------------------------------------------------- strategies
class _Runner:
    def __init__(self, output, space, base, probe, mode, dtype, progress, gradients="auto"):
        self.output, self.space, self.base, self.probe = output, space, base, probe
        self.engine = RowEngine(output, space, gradients)
        self.mode, self.dtype, self.progress = mode, dtype, progress
        self.r = output.m if mode == "block" else 1
        self.P = space.p * (output.m if mode == "trace" else 1)
        self.N = probe.n * self.r
        self.examples_computed = 0

    def rows(self, batch, out: torch.Tensor | None = None) -> torch.Tensor:
        self.examples_computed += batch["input_ids"].shape[0]
        return self.engine(self.base, batch, mode=self.mode, dtype=self.dtype, out=out)

    def sorted_blocks(self, size: int, lo: int = 0, hi: int | None = None):
        """(row start in sorted order, batch) for examples [lo, hi) of the sorted order."""
        hi = self.probe.n if hi is None else hi
        for s in range(lo, hi, size):
            idx = self.probe.order[s:min(s + size, hi)]
            yield s * self.r, self.probe.block(idx)

    def bar(self, total, desc):
        return tqdm(total=total, desc=desc, unit="ex", disable=not self.progress)

    def _fill(self, K: torch.Tensor, A: torch.Tensor, a0: int, B: torch.Tensor, b0: int) -> None:
        """K[a, b] = A Bᵀ and its mirror, for rows A starting at a0 and B at b0 (sorted order)."""
        blk = gram(A, B)
        K[a0:a0 + A.shape[0], b0:b0 + B.shape[0]] = blk
        K[b0:b0 + B.shape[0], a0:a0 + A.shape[0]] = blk.T

    def _stored_rows(self, J: torch.Tensor, K: torch.Tensor, a0: int, lo: int, hi: int, p: Plan, bar,
                     direct: bool = True) -> None:
        """Rows of examples [lo, hi) into J (J[0] is row a0); Gram of each finished group of
        `GRAM_GROUP` rows against all rows before it, so BLAS sees tall operands, not thin blocks."""
        g0 = 0
        for r0, batch in self.sorted_blocks(p.block, lo, hi):
            i0, nb = r0 - a0, batch["input_ids"].shape[0]
            i1 = i0 + nb * self.r
            if direct:
                self.rows(batch, out=J[i0:i1])
            else:
                J[i0:i1] = self.rows(batch).to(J.dtype)
            if i1 - g0 >= GRAM_GROUP or r0 // self.r + nb == hi:
                self._fill(K, J[g0:i1], a0 + g0, J[:i1], a0)
                g0 = i1
            bar.update(nb)

    # exact: J stored (RAM or memmap), Gram filled group by group
    def exact(self, p: Plan, buffer: torch.Tensor | None = None, desc: str = "eNTK exact") -> np.ndarray:
        """K = J Jᵀ (sorted order). `buffer`: a flat tensor of ≥ N·P elements to hold J (reused across
        parameter slices, so its memory is touched once)."""
        tmpdir = None
        if buffer is not None:
            J = buffer[:self.N * self.P].view(self.N, self.P)
        elif p.storage == "disk":
            tmpdir = tempfile.TemporaryDirectory(prefix="taskvec-J-", dir=_scratch())
            np_dtype = np.float64 if self.dtype == torch.float64 else np.float32
            mm = np.memmap(os.path.join(tmpdir.name, "J.bin"), mode="w+", dtype=np_dtype, shape=(self.N, self.P))
            J = torch.from_numpy(mm)
        else:
            J = torch.empty(self.N, self.P, dtype=self.dtype)
        try:
            K = torch.zeros(self.N, self.N, dtype=torch.float64)
            with self.bar(self.probe.n, desc) as bar:
                self._stored_rows(J, K, 0, 0, self.probe.n, p, bar, direct=p.storage == "ram")
            return K.numpy()
        finally:
            del J
            if tmpdir is not None:
                tmpdir.cleanup()

    # recompute: a panel of rows kept, later rows recomputed for each panel into a reused group buffer
    def recompute(self, p: Plan) -> np.ndarray:
        n, K = self.probe.n, torch.zeros(self.N, self.N, dtype=torch.float64)
        panels = list(range(0, n, p.panel))
        total = sum(n - s for s in panels)
        Jp = torch.empty(min(p.panel, n) * self.r, self.P, dtype=self.dtype)  # allocated (and faulted in) once
        group = max(1, min(p.group or GRAM_GROUP // self.r, n - min(p.panel, n)))  # examples per recomputed group
        buf = torch.empty(group * self.r, self.P, dtype=self.dtype) if len(panels) > 1 else None
        with self.bar(total, f"eNTK recompute ({len(panels)} panels)") as bar:
            for s in panels:
                e = min(s + p.panel, n)
                a0, rows = s * self.r, (e - s) * self.r
                self._stored_rows(Jp, K, a0, s, e, p, bar)
                for g in range(e, n, group):
                    h = min(g + group, n)
                    for r0, batch in self.sorted_blocks(p.block, g, h):
                        i0 = r0 - g * self.r
                        self.rows(batch, out=buf[i0:i0 + batch["input_ids"].shape[0] * self.r])
                        bar.update(batch["input_ids"].shape[0])
                    self._fill(K, Jp[:rows], a0, buf[:(h - g) * self.r], g * self.r)
        return K.numpy()

    # sketch: Φ = J S, K ≈ ΦΦᵀ; the error is measured on the exact Gram of each of the first blocks
    def sketch(self, p: Plan, kind: str, seed: int, check: int) -> tuple[np.ndarray, dict]:
        """Rows are computed into one reused block buffer and sketched; no exact rows are kept.

        The measured error uses the entries inside each gradient block among the first `check`
        examples (diagonal included): their exact values are one small Gram of rows already in the
        buffer, so the check costs no memory. The bound is the same Markov bound restricted to those
        entries: E Σ err² ≤ (2/k) Σ_blocks (tr K_bb)².
        """
        sk = make_sketch(kind, self.P, p.sketch_dim, seed)
        Phi = torch.empty(self.N, p.sketch_dim, dtype=torch.float64)
        exact_blocks: list[tuple[int, np.ndarray]] = []
        with self.bar(self.probe.n, f"eNTK sketch ({kind}, k={p.sketch_dim})") as bar:
            buf = torch.empty(p.block * self.r, self.P, dtype=self.dtype)  # reused: no page faults per block
            for r0, batch in self.sorted_blocks(p.block):
                R = self.rows(batch, out=buf[:batch["input_ids"].shape[0] * self.r]).cpu()
                if r0 < check * self.r:
                    exact_blocks.append((r0, gram(R, R).numpy()))
                Phi[r0:r0 + R.shape[0]] = sk(R).double()
                bar.update(batch["input_ids"].shape[0])
        K = (Phi @ Phi.T).numpy()
        info = {"sketch": kind, "sketch_dim": p.sketch_dim, "seed": seed,
                "sketch_bound": "||K_sketch - K||_F <= sqrt(2/(k*delta)) tr K with probability >= 1 - delta"}
        if not exact_blocks:
            return K, info
        err2 = ref2 = tr2 = 0.0
        for r0, Kb in exact_blocks:
            Ks = K[r0:r0 + len(Kb), r0:r0 + len(Kb)]
            err2 += float(np.sum((Ks - Kb) ** 2))
            ref2 += float(np.sum(Kb ** 2))
            tr2 += float(np.trace(Kb)) ** 2
        bound = sketch_bound(math.sqrt(tr2), p.sketch_dim)
        info.update({"check_rows": int(sum(len(Kb) for _, Kb in exact_blocks)),
                     "check_entries": "within each gradient block of the first check_rows rows",
                     "sketch_rel_error_on_check": math.sqrt(err2 / ref2),
                     "sketch_rel_bound_on_check_delta_0.05": bound / math.sqrt(ref2)})
        return K, info


def param_slices(space, k: int) -> list[list[str]]:
    """`space.names` cut into ≤ k contiguous groups of about equal coordinate count (a tensor is never split)."""
    sizes = [space.size(n) for n in space.names]
    total, groups, cur, acc = sum(sizes), [], [], 0
    for name, size in zip(space.names, sizes):
        if cur and acc + size / 2 > total * (len(groups) + 1) / k and len(groups) < k - 1:
            groups.append(cur)
            cur = []
        cur.append(name)
        acc += size
    return groups + [cur]


def _sliced_exact(model, space, probe, pl: Plan, runner: "_Runner") -> tuple[np.ndarray, "_Runner"]:
    """Exact K = Σ_s J_s J_sᵀ over parameter slices s, each J_s computed into one reused buffer.

    J's memory shrinks by the number of slices and is touched once; the price is one forward/backward
    pass per slice (the per-example weight gradients are still formed once per coordinate)."""
    groups = param_slices(space, pl.slices)
    pl.slices = len(groups)
    subs = [build_space(model, g, token_ids=probe.batch["input_ids"]) for g in groups]
    width = max(s.p for s in subs) * (runner.output.m if runner.mode == "trace" else 1)
    buffer = torch.empty(runner.N * width, dtype=runner.dtype)
    K, computed, notes = None, 0, []
    for i, sub in enumerate(subs):
        r = _Runner(runner.output, sub, sub.base(model), probe, runner.mode, runner.dtype, runner.progress,
                    runner.engine.method)
        Ks = r.exact(pl, buffer=buffer, desc=f"eNTK exact (slice {i + 1}/{len(subs)})")
        K = Ks if K is None else K + Ks
        computed += r.examples_computed
        if r.engine.note:
            notes.append(f"slice {i + 1}: {r.engine.note}")
    r.examples_computed, r.engine.note = computed, "; ".join(notes) or None
    return K, r


def _check_finite_kernel(K: np.ndarray, dtype: torch.dtype) -> None:
    """Refuse a kernel with NaN/Inf entries before the eigendecomposition (which would fail obscurely)."""
    bad = ~np.isfinite(K)
    if bad.any():
        i = int(np.argwhere(bad)[0][0])
        fix = "use --dtype float64 or " if dtype != torch.float64 else ""
        raise TaskvecError(f"the eNTK has {int(bad.sum())} NaN/Inf entries (first in row {i}): the output's gradients "
                           f"on the probe set overflow or are undefined; {fix}check the model's weights and the "
                           f"probe examples")


def _scratch() -> str:
    d = cache_dir() / "tmp"
    d.mkdir(parents=True, exist_ok=True)
    return str(d)


def _examples_hash(examples: Sequence[Mapping]) -> str:
    return content_hash([dict(e) for e in examples])


def compute_kernel(model: nn.Module, output: OutputFunction, examples: Sequence[Mapping], *, scope="body",
                   strategy: str = "auto", memory_gb: float | None = None, sketch_dim: int | None = None,
                   sketch: str = "countsketch", seed: int = 0, top_k: int | None = None, mode: str = "trace",
                   cache: bool = True, progress: bool = True, check: int = 64,
                   block_size: int | None = None, panel_size: int | None = None,
                   gradients: str = "auto") -> KernelResult:
    """The eNTK of `output` (built on `model`) on `examples` restricted to `scope`.

    mode: 'trace' (n×n, Σ_o ∇f_o·∇f_o; the scalar kernel when m = 1) or 'block' (nm × nm).
    top_k: eigenpairs to keep (required for 'lanczos'; default all). block_size / panel_size override the
    planned examples per block / per stored panel (recompute). gradients: how per-example gradients are
    formed — 'auto' (batched hooks where they cover the model, else vmap), 'hooks' or 'vmap'. Returns a :class:`KernelResult`
    whose `info` records strategy, timings, peak memory, clipped negatives and the sketch error.
    """
    if strategy not in STRATEGIES:
        raise TaskvecError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    if top_k is not None and top_k < 1:
        raise TaskvecError(f"--top-k must be ≥ 1 eigenpairs (got {top_k}); leave it out to keep all of them "
                           f"(not possible with strategy 'lanczos')")
    if sketch_dim is not None and sketch_dim < 1:
        raise TaskvecError(f"--sketch-dim must be a positive integer (got {sketch_dim})")
    if mode not in ("trace", "block"):
        raise TaskvecError(f"unknown kernel mode {mode!r}; choose 'trace' or 'block'")
    if output.model is not model:
        raise TaskvecError("the output function was built for a different model object; build it on this model")
    if len(examples) == 0:
        raise TaskvecError("the probe set is empty; give at least one example")
    t0 = time.perf_counter()
    probe = ProbeBatch(output, examples)
    space = build_space(model, scope, token_ids=probe.batch["input_ids"])
    base = space.base(model)
    dtype = next(iter(base.values())).dtype
    itemsize = torch.empty((), dtype=dtype).element_size()
    n, m = probe.n, output.m
    rows_per_ex = m if mode == "block" else 1
    P = space.p * (m if mode == "trace" else 1)
    budget = int((memory_gb if memory_gb is not None else default_memory_gb()) * GB)
    if memory_gb is not None and memory_gb <= 0:
        raise TaskvecError(f"--memory-gb must be positive (got {memory_gb})")
    pl = plan(strategy, n=n, rows_per_ex=rows_per_ex, P=P, itemsize=itemsize,
              ex_bytes=per_example_bytes(output, space, probe, itemsize), model_bytes=_model_bytes(model),
              budget=budget, sketch_dim=sketch_dim, top_k=top_k)
    if block_size:
        pl.block = int(block_size)
    if panel_size and pl.strategy == "recompute":
        pl.panel = int(panel_size)
        pl.block = min(pl.block, pl.panel)
    if pl.strategy == "lanczos" and not top_k:
        raise TaskvecError("strategy 'lanczos' computes only the top eigenpairs: give --top-k")
    settings = {"model": model_digest(model), "scope": space.describe(), "output": output.describe(),
                "examples": _examples_hash(examples), "strategy": pl.strategy, "mode": mode,
                "sketch": sketch if pl.strategy == "sketch" else None,
                "sketch_dim": pl.sketch_dim or None, "seed": seed, "top_k": top_k, "dtype": str(dtype),
                "storage": pl.storage, "gradients": gradients}
    key = content_hash(settings)
    folder = cache_dir() / "ntk" / key
    if cache and (folder / "ntk.json").is_file():
        res = KernelResult.load(folder)
        res.info["cache_hit"] = True
        return res

    runner = _Runner(output, space, base, probe, mode, dtype, progress, gradients)
    t1 = time.perf_counter()
    extra: dict = {}
    if pl.strategy == "lanczos":
        op = KernelOperator(output, space, base, probe, mode=mode, block_size=pl.block)
        vals, vecs, extra = lanczos_topk(op, top_k, n_norm=n, seed=seed, progress=progress)
        K = None
        spec_info = {"n_clipped_negative": 0, "most_negative": 0.0}
    else:
        if pl.strategy == "exact" and pl.slices > 1:
            K, runner = _sliced_exact(model, space, probe, pl, runner)
        elif pl.strategy == "exact":
            K = runner.exact(pl)
        elif pl.strategy == "recompute":
            K = runner.recompute(pl)
        else:
            K, extra = runner.sketch(pl, sketch, seed, check)
        K = _unpermute(K, _row_order(probe.order, rows_per_ex))
        K = 0.5 * (K + K.T)  # float32 row blocks are symmetric only to round-off; make K exactly symmetric
        _check_finite_kernel(K, dtype)
        vals, vecs, spec_info = spectrum(K, n)
        if top_k:
            vals, vecs = vals[:top_k], vecs[:, :top_k]
    t2 = time.perf_counter()
    info = dict(settings)
    info.update({
        "n": n, "m": m, "rows": n * rows_per_ex, "n_params": space.p, "n_tokens": probe.n_tokens,
        "block_size": pl.block, "panel": pl.panel or None, "parameter_slices": pl.slices, "memory_budget_gb": budget / GB,
        "notes": pl.notes + ([runner.engine.note] if runner.engine.note else []), "cache_key": key, "cache_hit": False,
        "seconds": {"setup": t1 - t0, "kernel": t2 - t1, "total": t2 - t0},
        "examples_computed": runner.examples_computed, "peak_rss_gb": peak_rss_gb(),
        "per_example_gradients": runner.engine.used if pl.strategy != "lanczos" else "jvp/vjp",
        "spectrum": spec_info, "normalisation": "eigenvalues are of K/n, n = number of examples",
        "gram_accumulation": "float64" if dtype == torch.float64 else f"{dtype} products over {GRAM_CHUNK}-column "
                                                                      f"chunks, summed in float64",
    })
    info.update(extra)
    result = KernelResult(K, vals, vecs, info)
    if cache:
        with atomic_dir(folder, overwrite=True, internal=True) as tmp:
            result.save(tmp)
    return result

