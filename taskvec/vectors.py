"""Task vectors τ = θ_ft − θ₀ over a scope: streaming extraction, arithmetic, save/load, apply_to.

Keys are the **base checkpoint's** tensor names. A tensor absent from a TaskVector is zero (a LoRA
adapter only touches the modules it adapts), so ``+``/``-`` take the union of keys and ``dot`` the
intersection. Extraction reads one tensor of base and fine-tune at a time, in float32 (float64 on
request) whatever the storage dtype.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from .checkpoints import (
    Checkpoint,
    SafetensorsCheckpoint,
    TASK_VECTOR_FORMAT,
    WEIGHT_SUFFIXES,
    _canonical_map,
    align,
    canonical_name,
    check_finite,
    open_checkpoint,
    write_safetensors,
)
from .errors import TaskvecError, TaskvecWarning
from .scalars import is_real_scalar
from .scope import resolve_scope

__all__ = ["TaskVector", "extract_pairs"]

def _is_zero(x) -> bool:
    return is_real_scalar(x) and x == 0


def _combined_meta(a: dict, b: dict) -> dict:
    """Provenance of a sum: the base and its fingerprint when both operands agree on them."""
    meta = {"op": "combine"}
    for key in ("base", "base_fingerprint", "scope"):
        if key in a and a.get(key) == b.get(key):
            meta[key] = a[key]
    return meta


def extract_pairs(base: Checkpoint, ft: Checkpoint, scope="body"):
    """Align `ft` to `base` and resolve `scope` over the comparable tensors.

    Returns (alignment, names in scope, floating base names left out of the scope)."""
    al = align(base, ft)
    comparable = [n for n in base.keys() if n not in al.excluded]
    in_scope = resolve_scope(comparable, scope)
    al.check(in_scope)
    sel = set(in_scope)
    out_of_scope = [n for n in comparable if n not in sel]
    return al, in_scope, out_of_scope


def _delta(base: Checkpoint, ft: Checkpoint, al, name: str, dtype: torch.dtype) -> torch.Tensor:
    """τ for one base tensor (shared rows only when the fine-tune grew the vocabulary)."""
    oname = al.pairs[name]
    if ft.is_delta:
        return check_finite(ft, oname, ft.get(oname, dtype))
    b = check_finite(base, name, base.get(name, dtype))
    f = check_finite(ft, oname, ft.get(oname, dtype))
    if name in al.added_rows:
        f = f[: al.added_rows[name][0]]
    return f.sub_(b) if f.is_contiguous() else f - b


_SIDECARS = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
             "tokenizer.model", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
             "taskvec_head.safetensors")


def _sidecar_files(src: Path) -> list[Path]:
    """Non-weight files to copy next to new weights: everything in a model folder except weights,
    indexes and READMEs; only the known HF sidecars when the source is a single file."""
    if src.is_file():
        return [src.parent / n for n in _SIDECARS if (src.parent / n).is_file()]
    if not src.is_dir():
        return []
    out = []
    for p in sorted(src.iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.name in ("README.md", "taskvec_applied.json"):
            continue
        if p.name.endswith(".index.json") or (p.suffix in WEIGHT_SUFFIXES and p.name not in _SIDECARS):
            continue
        out.append(p)
    return out


class TaskVector:
    """τ as an ordered dict of named floating-point tensors (base names), with arithmetic and
    (de)serialisation: ``a + b``, ``a - b``, ``-a``, ``0.5 * a`` (any real scalar, numpy's included),
    ``a / 2``, ``sum([a, b])``."""

    __array_ufunc__ = None  # numpy scalars on the left (np.float64(0.5) * τ) defer to __rmul__/__radd__

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict | None = None):
        for k, v in dict(tensors).items():
            if not isinstance(v, torch.Tensor):
                raise TaskvecError(f"tensor {k!r} is a {type(v).__name__}, not a torch.Tensor; build a TaskVector "
                                   "from tensors (torch.as_tensor(...)) or with TaskVector.from_checkpoints")
            if not v.is_floating_point():
                raise TaskvecError(f"tensor {k!r} has dtype {v.dtype}; a task vector holds floating-point "
                                   "differences (convert with .float())")
        self._t = dict(tensors)
        self.meta = dict(meta or {})

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoints(cls, base, ft, scope="body", dtype: torch.dtype = torch.float32,
                         progress: bool = True, allow_network: bool = False) -> "TaskVector":
        """τ = ft − base over `scope`, one tensor pair in memory at a time (plus the result).

        `base`/`ft`: paths, hub ids or open Checkpoints; `ft` may be a LoRA adapter (τ = scaling·B·A)."""
        if dtype not in (torch.float32, torch.float64):
            raise TaskvecError(f"dtype must be torch.float32 or torch.float64, not {dtype}")
        base = open_checkpoint(base, allow_network=allow_network)
        ft = open_checkpoint(ft, allow_network=allow_network)
        al, names, out_of_scope = extract_pairs(base, ft, scope)
        if ft.is_delta:
            names = [n for n in names if n in al.pairs]
            if not names:
                raise TaskvecError(f"{ft.source}: scope {scope!r} contains none of the tensors the LoRA adapter "
                                   f"adapts ({', '.join(list(al.pairs)[:3])}); widen the scope (e.g. --scope all)")
        tensors = {}
        missing = [n for n in names if n not in al.pairs]
        label = "/".join(Path(ft.source).parts[-2:])  # e.g. "movies/epoch-3": a collection's run and checkpoint
        for name in tqdm(names, desc=f"τ {label}", unit="tensor", disable=not progress, leave=False):
            if name in al.pairs:
                tensors[name] = _delta(base, ft, al, name, dtype)
        meta = {"base": base.source, "ft": ft.source, "scope": scope if isinstance(scope, str) else "list",
                "dtype": str(dtype).replace("torch.", ""), "base_fingerprint": base.fingerprint(),
                "ft_format": ft.format, "missing_in_ft": missing, "out_of_scope": out_of_scope,
                "alignment": al.to_dict()}
        return cls(tensors, meta)

    # ------------------------------------------------------------------ mapping protocol
    def keys(self) -> list[str]:
        """Tensor names (the base checkpoint's), in extraction order."""
        return list(self._t)

    def items(self):
        return self._t.items()

    def values(self):
        return self._t.values()

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._t[name]

    def __contains__(self, name: object) -> bool:
        return name in self._t

    def __iter__(self) -> Iterator[str]:
        return iter(self._t)

    def __len__(self) -> int:
        return len(self._t)

    def numel(self) -> int:
        """Number of entries over all tensors."""
        return sum(t.numel() for t in self._t.values())

    def __repr__(self) -> str:
        return f"<TaskVector {len(self)} tensors, {self.numel():,} params, ‖τ‖={self.norm():.4g}>"

    # ------------------------------------------------------------------ arithmetic
    def _copy(self) -> "TaskVector":
        return TaskVector({k: v.clone() for k, v in self._t.items()}, self.meta)

    def _combine(self, other: "TaskVector", sign: float) -> "TaskVector":
        """self + sign·other over the union of keys, each tensor in the wider of the two dtypes."""
        out = {k: v.clone() for k, v in self._t.items()}
        for k, v in other.items():
            if k in out:
                if out[k].shape != v.shape:
                    raise TaskvecError(f"tensor {k!r}: shapes {tuple(out[k].shape)} and {tuple(v.shape)} differ; "
                                       "the task vectors come from different bases")
                dt = torch.promote_types(out[k].dtype, v.dtype)  # bf16 + fp32 keeps the fp32 contribution
                out[k] = out[k].to(dt).add_(v.to(dt), alpha=sign)
            else:
                out[k] = v.clone() if sign > 0 else -v
        return TaskVector(out, _combined_meta(self.meta, other.meta))

    def __add__(self, other):
        if _is_zero(other):  # sum([...]) starts from 0
            return self._copy()
        if not isinstance(other, TaskVector):
            return NotImplemented
        return self._combine(other, 1.0)

    __radd__ = __add__

    def __sub__(self, other):
        if _is_zero(other):
            return self._copy()
        if not isinstance(other, TaskVector):
            return NotImplemented
        return self._combine(other, -1.0)

    def __rsub__(self, other):
        return -self if _is_zero(other) else NotImplemented

    def __neg__(self) -> "TaskVector":
        return TaskVector({k: -v for k, v in self._t.items()}, {**self.meta, "op": "neg"})

    def __mul__(self, alpha):
        if not is_real_scalar(alpha):
            return NotImplemented
        a = float(alpha)
        if not math.isfinite(a):
            raise TaskvecError(f"cannot scale a task vector by {a}; give a finite number")
        out = {k: v * a for k, v in self._t.items()}
        bad = next((k for k, v in out.items() if not bool(torch.isfinite(v).all())), None)
        if bad is not None:
            raise TaskvecError(f"scaling by {a:g} overflows tensor {bad!r} ({out[bad].dtype}); use a smaller factor")
        return TaskVector(out, {**self.meta, "op": f"scale {a:g}"})

    __rmul__ = __mul__

    def __truediv__(self, alpha):
        if not is_real_scalar(alpha):
            return NotImplemented
        a = float(alpha)
        if a == 0 or not math.isfinite(1.0 / a):
            raise TaskvecError(f"cannot divide a task vector by {a:g}; give a non-zero divisor whose inverse is "
                               "finite")
        return self * (1.0 / a)

    def to(self, dtype: torch.dtype) -> "TaskVector":
        """The same task vector with every tensor cast to `dtype`."""
        return TaskVector({k: v.to(dtype) for k, v in self._t.items()}, self.meta)

    # ------------------------------------------------------------------ geometry (float64 accumulation)
    def dot(self, other: "TaskVector") -> float:
        """⟨τ, σ⟩ over shared keys (absent tensors are zero)."""
        if not isinstance(other, TaskVector):
            raise TypeError(f"dot needs another TaskVector, not {type(other).__name__}")
        total = 0.0
        for k, v in self._t.items():
            if k in other:
                w = other[k]
                if w.shape != v.shape:
                    raise TaskvecError(f"tensor {k!r}: shapes {tuple(v.shape)} and {tuple(w.shape)} differ")
                total += float(torch.dot(v.reshape(-1).double(), w.reshape(-1).double()))
        return total

    def norms(self) -> dict[str, float]:
        """Per-tensor L2 norms."""
        return {k: float(torch.linalg.vector_norm(v.double())) for k, v in self._t.items()}

    def norm(self) -> float:
        """‖τ‖₂ over all tensors (float64 accumulation)."""
        return math.sqrt(sum(n * n for n in self.norms().values()))

    def cosine(self, other: "TaskVector") -> float:
        """cos(τ, σ); NaN if either is zero."""
        if not isinstance(other, TaskVector):
            raise TypeError(f"cosine needs another TaskVector, not {type(other).__name__}")
        d = self.norm() * other.norm()
        return self.dot(other) / d if d > 0 else float("nan")

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> Path:
        """Write as one safetensors file (metadata 'taskvec' = JSON meta), atomically."""
        if Path(path).is_dir():
            raise TaskvecError(f"{path} is a folder; give a file name, e.g. {Path(path) / 'tau.safetensors'}")
        specs = {k: (tuple(v.shape), v.dtype) for k, v in self._t.items()}
        meta = {"format": TASK_VECTOR_FORMAT, "taskvec": json.dumps(self.meta, default=str)}
        return write_safetensors(path, specs, lambda k: self._t[k], metadata=meta)

    @classmethod
    def load(cls, path) -> "TaskVector":
        """A task vector written by `save` (a safetensors file tagged format=taskvec-taskvector; model weights
        are refused: they are θ, not τ)."""
        path = Path(path)
        if not path.is_file():
            raise TaskvecError(f"{path}: no such task vector file; create one with TaskVector.save()")
        ck = SafetensorsCheckpoint(str(path), [path], None)
        if (ck.metadata or {}).get("format") != TASK_VECTOR_FORMAT:
            raise TaskvecError(f"{path} is not a task vector written by TaskVector.save (no format="
                               f"{TASK_VECTOR_FORMAT} metadata): model weights are θ, not τ; extract τ with "
                               "TaskVector.from_checkpoints(base, finetuned)")
        meta = json.loads(ck.metadata.get("taskvec", "{}"))
        return cls({k: ck.get(k, None) for k in ck.keys()}, meta)

    # ------------------------------------------------------------------ applying
    def apply_to(self, base, out_dir, alpha: float = 1.0, *, overwrite: bool = False, progress: bool = True,
                 allow_network: bool = False) -> Path:
        """Write θ₀ + α·τ as a loadable Hugging Face folder (config and tokenizer files copied from the base
        folder; tensors in the base's storage dtype; shard layout kept). Streams one tensor at a time."""
        from .io import atomic_dir, atomic_write_json

        if not is_real_scalar(alpha) or not math.isfinite(float(alpha)):
            raise TaskvecError(f"alpha={alpha!r}: give a finite number (the scale of τ added to the base)")
        base = open_checkpoint(base, allow_network=allow_network)
        if base.is_delta:
            raise TaskvecError(f"{base.source}: cannot apply a task vector to a LoRA adapter; pass its base model")
        fp = self.meta.get("base_fingerprint")
        if fp and fp != base.fingerprint():
            warnings.warn(f"{base.source} is not the base this task vector was extracted from "
                          f"({self.meta.get('base', 'unknown')}: other weights); θ₀ + α·τ of another model is "
                          "rarely meant", TaskvecWarning, stacklevel=2)
        bkeys = base.keys()
        bset = set(bkeys)
        bmap = _canonical_map(bkeys)
        where = {}
        for k in self._t:
            target = k if k in bset else bmap.get(canonical_name(k))
            if target is None:
                raise TaskvecError(f"{base.source}: has no tensor {k!r} of this task vector; apply it to the base "
                                   "it was extracted from")
            if tuple(base.shape(target)) != tuple(self._t[k].shape):
                raise TaskvecError(f"{base.source}: tensor {target!r} has shape {tuple(base.shape(target))} but the "
                                   f"task vector has {tuple(self._t[k].shape)}; apply it to the base it came from")
            where[target] = k
        # output shards follow the base's files
        if isinstance(base, SafetensorsCheckpoint) and len({base.tensor_file(k) for k in bkeys}) > 1:
            files = list(dict.fromkeys(Path(base.tensor_file(k)).name for k in bkeys))
            shard_of = {k: Path(base.tensor_file(k)).name for k in bkeys}
            n = len(files)
            rename = {f: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, f in enumerate(files)}
        else:
            rename = {"*": "model.safetensors"}
            shard_of = {k: "*" for k in bkeys}

        def produce(k):
            t = base.get(k, None)
            if k not in where:
                return t
            work = torch.float64 if t.dtype == torch.float64 else torch.float32
            new = (t.to(work) + float(alpha) * self._t[where[k]].to(work)).to(t.dtype)
            if not bool(torch.isfinite(new).all()):
                raise TaskvecError(f"tensor {k!r}: θ₀ + {alpha}·τ holds NaN/Inf (τ or θ₀ is not finite there, or it "
                                   f"overflows {t.dtype}); nothing was written")
            return new

        src = Path(base.source)
        with atomic_dir(out_dir, overwrite=overwrite, inputs=[base.source], replaces_models=True) as tmp:
            bar = tqdm(total=len(bkeys), desc="apply τ", unit="tensor", disable=not progress, leave=False)
            weight_map, total = {}, 0
            for f_in, f_out in rename.items():
                names = [k for k in bkeys if shard_of[k] == f_in]
                specs = {k: (tuple(base.shape(k)), base.dtype(k)) for k in names}
                write_safetensors(tmp / f_out, specs, produce, metadata={"format": "pt"}, progress=bar)
                weight_map.update({k: f_out for k in names})
                total += sum(base.nbytes(k) for k in names)
            bar.close()
            if len(rename) > 1:
                atomic_write_json(tmp / "model.safetensors.index.json",
                                  {"metadata": {"total_size": total}, "weight_map": weight_map})
            for p in _sidecar_files(src):
                shutil.copy2(p, tmp / p.name)
            if not (tmp / "config.json").exists() and base.config:
                atomic_write_json(tmp / "config.json", base.config)
            atomic_write_json(tmp / "taskvec_applied.json", {"base": base.source, "alpha": float(alpha),
                                                             "n_tensors_changed": len(where),
                                                             "task_vector": {k: v for k, v in self.meta.items()
                                                                             if k != "alignment"}})
        return Path(out_dir)


def default_task_names(sources: list[str]) -> list[str]:
    """Shortest path suffixes that tell the sources apart (…/movies/epoch-3 vs …/nyt/epoch-3)."""
    if not sources:
        return []
    parts = [Path(s.rstrip("/")).parts or (s,) for s in sources]
    for depth in range(1, max(len(p) for p in parts) + 1):
        tails = [p[-depth:] for p in parts]
        names = ["/".join(t) for t in tails]
        if len(set(names)) == len(names):
            if depth > 2 and all(len(t) == depth for t in tails):  # drop components shared by all
                same = {i for i in range(1, depth - 1) if len({t[i] for t in tails}) == 1}
                short = ["/".join(c for i, c in enumerate(t) if i not in same) for t in tails]
                if len(set(short)) == len(short):
                    return short
            return names
    return [f"{n}#{i}" for i, n in enumerate(names)]
