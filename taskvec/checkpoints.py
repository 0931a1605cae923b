"""Lazy, read-only access to model checkpoints, one tensor at a time.

`open_checkpoint(source)` understands Hugging Face model folders, single and sharded safetensors
(`*.index.json`), `.bin`/`.pt` state dicts (loaded with ``weights_only=True``; never executes pickled
code), PEFT LoRA adapter folders (exposed as deltas ΔW = scaling·B·A on the *base* tensor names),
GGUF files (dequantised by transformers, cached as safetensors) and hub ids (only when allowed or
already in the local HF cache).  Safetensors are read with plain positioned reads into a fresh
buffer — no memory map — so a process never holds more than the tensors it asked for.

`align(base, other)` pairs a checkpoint's tensors with its base across naming prefixes, tied
heads, grown vocabularies and buffers; `match_parameter_names(keys, model)` maps checkpoint names
onto ``model.named_parameters()``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from .errors import TaskvecError, TaskvecWarning, counted, name_list  # noqa: F401  (re-exported)

__all__ = [
    "Checkpoint",
    "Alignment",
    "open_checkpoint",
    "align",
    "canonical_name",
    "match_parameter_names",
    "check_finite",
]

# ----------------------------------------------------------------------------- safetensors reading

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _ST_DTYPES[_name] = getattr(torch, _attr)
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")


@dataclass(frozen=True)
class _TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple
    begin: int  # absolute byte offset in the file
    nbytes: int


def _read_safetensors_header(path: Path) -> tuple[dict[str, _TensorInfo], dict]:
    """Parse a safetensors header and validate every offset against the file size."""
    size = path.stat().st_size
    fix = "re-download or re-save the file; it is truncated or not a safetensors file"
    if size < 8:
        raise TaskvecError(f"{path}: {size} bytes is too short for a safetensors file; {fix}")
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > size - 8 or n > 100 << 20:
            raise TaskvecError(f"{path}: header length {n} exceeds the file size {size}; {fix}")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TaskvecError(f"{path}: unreadable safetensors header ({exc}); {fix}") from None
    start = 8 + n
    meta = header.pop("__metadata__", None) or {}
    infos = {}
    for name, h in header.items():
        try:
            dtype = _ST_DTYPES[h["dtype"]]
            shape = tuple(int(s) for s in h["shape"])
            b, e = (int(x) for x in h["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise TaskvecError(f"{path}: tensor {name!r} has a malformed header entry {h!r}; {fix}") from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        if e - b != math.prod(shape) * itemsize:
            raise TaskvecError(f"{path}: tensor {name!r} byte range {b}..{e} does not match shape {shape}; {fix}")
        if start + e > size:
            raise TaskvecError(
                f"{path}: tensor {name!r} ends at byte {start + e} but the file has only {size} bytes: the "
                f"file is truncated; re-download or re-save it")
        infos[name] = _TensorInfo(path, dtype, shape, start + b, e - b)
    return infos, meta


def _read_tensor(info: _TensorInfo, buf: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor with a positioned read (no mmap: RSS = what we hold) into `buf` (a uint8
    tensor of at least info.nbytes, reused across calls to avoid page faults) or a fresh buffer."""
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.dtype)
    buf = torch.empty(info.nbytes, dtype=torch.uint8) if buf is None else buf[: info.nbytes]
    view = memoryview(buf.numpy())
    with open(info.file, "rb", buffering=0) as fh:
        fh.seek(info.begin)
        got = 0
        while got < info.nbytes:
            n = fh.readinto(view[got:])
            if not n:
                raise TaskvecError(f"{info.file}: unexpected end of file while reading a tensor (truncated); "
                                   "re-download or re-save the file")
            got += n
    return buf.view(info.dtype).reshape(info.shape)


# ----------------------------------------------------------------------------- the Checkpoint


class Checkpoint:
    """A lazy, read-only view of one checkpoint's tensors.

    ``get(name)`` reads and returns one tensor (float32 by default; ``dtype=None`` keeps the storage
    dtype).  For a LoRA adapter ``is_delta`` is True and ``get(name)`` returns ΔW = scaling·B·A for
    the base tensor ``name``.  ``skipped`` maps names present in the files but not exposed to why.
    """

    format: str = "?"
    is_delta: bool = False

    def __init__(self, source: str, files: list[Path], config: dict | None):
        self.source = str(source)
        self.files = list(files)
        self.config = config
        self.skipped: dict[str, str] = {}
        self._fingerprint: str | None = None

    # -- to implement
    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple:
        raise NotImplementedError

    def dtype(self, name: str) -> torch.dtype:
        raise NotImplementedError

    def _get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    # -- shared
    def get(self, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """Read tensor `name` (converted to `dtype`; None keeps the storage dtype)."""
        if name not in self:
            raise TaskvecError(f"{self.source}: no tensor named {name!r} "
                               f"({len(self)} tensors; e.g. {', '.join(self.keys()[:3])})")
        t = self._get(name)
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        return t

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Read tensor `name` into the flat buffer `out` (converted to out.dtype) and return
        ``out[:numel].view(shape)``. Reusing one buffer per role keeps memory flat and avoids the
        page faults of a fresh allocation for every tensor."""
        n = self.numel(name)
        if out.numel() < n:
            raise ValueError(f"buffer of {out.numel()} elements is too small for {name} ({n})")
        dst = out[:n]
        dst.copy_(self.get(name, out.dtype).reshape(-1))
        return dst.view(self.shape(name))

    def read_range(self, name: str, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor `name` into out[:stop-start] (out's dtype).
        Formats without random access materialise the tensor once and serve slices of it."""
        cached = getattr(self, "_range_cache", None)
        if cached is None or cached[0] != name:
            self._range_cache = cached = (name, self.get(name, out.dtype).reshape(-1))
        dst = out[: stop - start]
        dst.copy_(cached[1][start:stop])
        return dst

    def numel(self, name: str) -> int:
        return math.prod(self.shape(name))

    def nbytes(self, name: str) -> int:
        return self.numel(name) * torch.empty((), dtype=self.dtype(name)).element_size()

    def __contains__(self, name: object) -> bool:
        return name in self._key_set()

    def _key_set(self) -> set:
        ks = getattr(self, "_keys_cache", None)
        if ks is None:
            ks = self._keys_cache = set(self.keys())
        return ks

    def __len__(self) -> int:
        return len(self.keys())

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def tensor_file(self, name: str) -> str:
        """The file a tensor lives in (for error messages)."""
        return self.source

    def prefetch(self, name: str) -> None:
        """Hint the OS to start reading tensor `name` now (asynchronously), so a later read of it
        overlaps the work on the current tensor. Costs no process memory; a no-op where the format
        has no byte range per tensor."""

    def fingerprint(self) -> str:
        """Content hash of the checkpoint's files (sha256 of each, memoised by size and mtime)."""
        if self._fingerprint is None:
            parts = [self.format] + [[p.name, _file_sha256(p)] for p in sorted(self.files)]
            self._fingerprint = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]
        return self._fingerprint

    def identity(self) -> str:
        """Cheap identity of the files (names, sizes, modification times) — no content read; use
        fingerprint() where a cache must notice an in-place edit that keeps size and mtime."""
        parts = [self.format]
        for p in sorted(self.files):
            st = p.stat()
            parts.append([p.name, st.st_size, st.st_mtime_ns])
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]

    @property
    def model_type(self) -> str | None:
        return (self.config or {}).get("model_type")

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"<Checkpoint {self.format} {self.source!r}: {len(self)} tensors{' (delta)' if self.is_delta else ''}>"


_SHA_MEMO: dict[tuple, str] = {}


def _file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        from .io import sha256_file

        _SHA_MEMO[key] = sha256_file(path)
    return _SHA_MEMO[key]


class SafetensorsCheckpoint(Checkpoint):
    """One or more safetensors files (a sharded index or a folder of shards)."""

    format = "safetensors"

    def __init__(self, source: str, files: list[Path], config: dict | None, fmt: str = "safetensors"):
        super().__init__(source, files, config)
        self.format = fmt
        self._info: dict[str, _TensorInfo] = {}
        self.metadata: dict = {}
        for f in files:
            infos, meta = _read_safetensors_header(f)
            self.metadata.update(meta)
            for name, info in infos.items():
                if name in self._info:
                    raise TaskvecError(f"{source}: tensor {name!r} appears in both {self._info[name].file.name} "
                                       f"and {f.name}; keep one copy (or point at the *.index.json)")
                self._info[name] = info

    def keys(self) -> list[str]:
        return list(self._info)

    def shape(self, name: str) -> tuple:
        return self._info[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self._info[name].dtype

    def tensor_file(self, name: str) -> str:
        return str(self._info[name].file)

    def _get(self, name: str) -> torch.Tensor:
        return _read_tensor(self._info[name])

    def prefetch(self, name: str) -> None:
        info = self._info.get(name)
        if info is None or not info.nbytes or not hasattr(os, "posix_fadvise"):
            return
        try:
            fd = os.open(info.file, os.O_RDONLY)
        except OSError:
            return  # the read itself will report the problem
        try:
            os.posix_fadvise(fd, info.begin, info.nbytes, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        info = self._info[name]
        n = math.prod(info.shape)
        if out.numel() < n:
            raise ValueError(f"buffer of {out.numel()} elements is too small for {name} ({n})")
        dst = out[:n]
        if info.dtype == out.dtype:
            if n:
                _read_tensor(info, dst.view(torch.uint8))
        else:
            dst.copy_(_read_tensor(info, _scratch(info.nbytes)).reshape(-1))
        return dst.view(info.shape)


    def read_range(self, name: str, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Positioned read of elements [start, stop) — no other part of the tensor is touched."""
        info = self._info[name]
        item = torch.empty((), dtype=info.dtype).element_size()
        sub = _TensorInfo(info.file, info.dtype, (stop - start,), info.begin + start * item, (stop - start) * item)
        dst = out[: stop - start]
        if stop <= start:
            return dst
        if info.dtype == out.dtype:
            _read_tensor(sub, dst.view(torch.uint8))
        else:
            dst.copy_(_read_tensor(sub, _scratch(sub.nbytes)))
        return dst


_SCRATCH: list[torch.Tensor] = []


def _scratch(nbytes: int) -> torch.Tensor:
    """A reusable uint8 buffer for reads that need a dtype conversion (single-threaded use)."""
    if not _SCRATCH or _SCRATCH[0].numel() < nbytes:
        _SCRATCH[:] = [torch.empty(nbytes, dtype=torch.uint8)]
    return _SCRATCH[0][:nbytes]


def release_scratch() -> None:
    """Free the conversion scratch buffer."""
    _SCRATCH.clear()


def _extract_state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model_state_dict", "model", "module"):
            if isinstance(obj.get(key), dict):
                return _extract_state_dict(obj[key], path)
    if not isinstance(obj, dict):
        raise TaskvecError(f"{path}: expected a state dict (name → tensor), found {type(obj).__name__}; "
                           "save it with torch.save(model.state_dict(), path)")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    import pickle

    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(exc) and "zip" not in str(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise TaskvecError(f"{path}: refused to unpickle ({str(exc).splitlines()[0]}); taskvec only loads "
                           "plain tensors (weights_only=True). Re-save it as safetensors.") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise TaskvecError(f"{path}: not a readable PyTorch checkpoint ({str(exc).splitlines()[0]}); "
                           "it may be truncated — re-download or re-save it") from None
    return _extract_state_dict(obj, path)


class TorchCheckpoint(Checkpoint):
    """`.bin`/`.pt` state dicts (one or a sharded index); one file loaded (memory-mapped) at a time."""

    format = "torch"

    def __init__(self, source: str, files: list[Path], config: dict | None):
        super().__init__(source, files, config)
        self._loaded: tuple[Path, dict] | None = None
        self._where: dict[str, Path] = {}
        self._meta: dict[str, tuple[tuple, torch.dtype]] = {}
        for f in files:  # shapes are only known after unpickling: index each (memory-mapped) file once
            sd = self._load(f)
            for name, t in sd.items():
                if name in self._where:
                    raise TaskvecError(f"{source}: tensor {name!r} appears in {self._where[name].name} and {f.name}")
                self._where[name] = f
                self._meta[name] = (tuple(t.shape), t.dtype)

    def _load(self, f: Path) -> dict:
        if self._loaded is None or self._loaded[0] != f:
            self._loaded = None
            self._loaded = (f, _torch_load(f))
        return self._loaded[1]

    def keys(self) -> list[str]:
        return list(self._meta)

    def shape(self, name: str) -> tuple:
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][1]

    def tensor_file(self, name: str) -> str:
        return str(self._where[name])

    def _get(self, name: str) -> torch.Tensor:
        return self._load(self._where[name])[name].clone()

    def close(self) -> None:
        self._loaded = None


class MemoryCheckpoint(Checkpoint):
    """A state dict already in memory (GGUF dequantised by transformers, or built in code)."""

    format = "memory"

    def __init__(self, source: str, state_dict: dict[str, torch.Tensor], config: dict | None = None,
                 files: list[Path] | None = None, fmt: str = "memory"):
        super().__init__(source, files or [], config)
        self.format = fmt
        self._sd = dict(state_dict)

    def keys(self) -> list[str]:
        return list(self._sd)

    def shape(self, name: str) -> tuple:
        return tuple(self._sd[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._sd[name].dtype

    def _get(self, name: str) -> torch.Tensor:
        return self._sd[name].detach().clone()

    def fingerprint(self) -> str:
        if self.files:
            return super().fingerprint()
        h = hashlib.sha256()
        for k in sorted(self._sd):
            t = self._sd[k].detach().contiguous().cpu()
            h.update(k.encode())
            h.update(str(t.dtype).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- PEFT LoRA


_LORA_RE = re.compile(r"^(?P<mod>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                      r"(?:\.(?P<adapter>(?!(?:weight|bias)$)[^.]+))?(?:\.(?P<param>weight|bias))?$")


def _peft_pattern_value(patterns: dict, module: str, default):
    """PEFT's rule (peft.utils.other.get_pattern_key): first pattern p with module matching (.*\\.)?(p)$."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class LoraCheckpoint(Checkpoint):
    """A PEFT LoRA adapter folder exposed as deltas: get(base_name) = scaling · B·A (ΔW materialised).

    Names are the adapted *base* tensors (``base_model.model.`` stripped, ``.weight`` appended), so
    the checkpoint aligns with its base like a full fine-tune whose other tensors are unchanged.
    scaling = lora_alpha / r (or / √r with use_rslora), per-module r and alpha from rank_pattern and
    alpha_pattern; ``fan_in_fan_out`` transposes ΔW (GPT-2 Conv1D); embeddings give (B·A)ᵀ.
    """

    format = "peft-lora"
    is_delta = True

    def __init__(self, folder: Path, weights: Checkpoint, adapter_config: dict, config: dict | None):
        super().__init__(str(folder), weights.files + [folder / "adapter_config.json"], config)
        self.adapter_config = adapter_config
        self._w = weights
        cfg = adapter_config
        peft_type = str(cfg.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise TaskvecError(f"{folder}: PEFT adapter type {peft_type} is not supported (only LoRA); merge it "
                               "into the base with peft's merge_and_unload() and pass the merged folder")
        if cfg.get("use_dora"):
            raise TaskvecError(f"{folder}: DoRA adapters are not supported (ΔW is not scaling·B·A); merge it with "
                               "peft's merge_and_unload() and pass the merged folder")
        self.base_model = cfg.get("base_model_name_or_path")
        self._mods: dict[str, dict] = {}  # base tensor name -> entry
        groups: dict[str, dict[str, str]] = {}
        for key in weights.keys():
            m = _LORA_RE.match(key)
            if not m:
                if "lora_magnitude_vector" in key:
                    raise TaskvecError(f"{folder}: tensor {key} is a DoRA magnitude; DoRA is not supported")
                self.skipped[_strip_peft_prefix(key)] = ("modules_to_save / trainable-token weights are not a LoRA "
                                                         "delta; merge the adapter to include them")
                continue
            mod = _strip_peft_prefix(m["mod"])
            groups.setdefault(mod, {})[m["kind"] + ("." + m["param"] if m["param"] else "")] = key
        if not groups:
            held = f"only {_first(weights.keys())}" if len(weights) else "no tensors"
            raise TaskvecError(f"{folder}: the adapter holds no LoRA A/B weights (its file has {held}); re-save it "
                               "with peft's save_pretrained, or pass the adapter folder you mean")
        default_r, default_alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
        for mod, parts in groups.items():
            embedding = "lora_embedding_A" in parts
            a_key = parts.get("lora_embedding_A" if embedding else "lora_A.weight")
            b_key = parts.get("lora_embedding_B" if embedding else "lora_B.weight")
            if a_key is None or b_key is None:
                raise TaskvecError(f"{folder}: module {mod} has only one of lora_A/lora_B; the adapter file is "
                                   "incomplete — re-save it with peft")
            a_shape, b_shape = weights.shape(a_key), weights.shape(b_key)
            if len(a_shape) != 2 or len(b_shape) != 2:
                raise TaskvecError(f"{folder}: module {mod} has LoRA factors of shapes {a_shape}, {b_shape}; only "
                                   "Linear/Conv1D/Embedding LoRA is supported — merge the adapter instead")
            r = int(_peft_pattern_value(cfg.get("rank_pattern"), mod, default_r))
            alpha = float(_peft_pattern_value(cfg.get("alpha_pattern"), mod, default_alpha))
            rank = a_shape[0] if not embedding else a_shape[0]
            if rank != r:
                raise TaskvecError(f"{folder}: module {mod} has rank {rank} in the file but {r} in adapter_config "
                                   "(r / rank_pattern); the config does not belong to these weights")
            scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            if embedding:
                shape = (a_shape[1], b_shape[0])  # (num_embeddings, dim) = (B·A)ᵀ
                transpose = True
            else:
                transpose = bool(cfg.get("fan_in_fan_out"))
                shape = (a_shape[1], b_shape[0]) if transpose else (b_shape[0], a_shape[1])
            self._mods[mod + ".weight"] = dict(a=a_key, b=b_key, scaling=scaling, transpose=transpose, shape=shape,
                                               r=r, alpha=alpha)
            if "lora_B.bias" in parts:
                bias_key = parts["lora_B.bias"]
                self._mods[mod + ".bias"] = dict(bias=bias_key, scaling=scaling, shape=weights.shape(bias_key))

    def keys(self) -> list[str]:
        return list(self._mods)

    def shape(self, name: str) -> tuple:
        return tuple(self._mods[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        e = self._mods[name]
        return self._w.dtype(e.get("a", e.get("bias")))

    def tensor_file(self, name: str) -> str:
        e = self._mods[name]
        return self._w.tensor_file(e.get("a", e.get("bias")))

    def prefetch(self, name: str) -> None:
        e = self._mods.get(name, {})
        for part in ("a", "b", "bias"):
            if part in e:
                self._w.prefetch(e[part])

    def lora_info(self, name: str) -> dict:
        """r, alpha, scaling, transpose of the module adapting base tensor `name`."""
        return {k: v for k, v in self._mods[name].items() if k not in ("a", "b", "bias")}

    def _get(self, name: str) -> torch.Tensor:
        e = self._mods[name]
        if "bias" in e:
            return self._w.get(e["bias"], torch.float32) * e["scaling"]
        a = self._w.get(e["a"], torch.float32)
        b = self._w.get(e["b"], torch.float32)
        delta = (b @ a) * e["scaling"]
        return delta.T.contiguous() if e["transpose"] else delta

    def get(self, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        t = super().get(name, None)  # ΔW is materialised in float32 (float64 if asked)
        if dtype is torch.float64:
            e = self._mods[name]
            if "bias" in e:
                return self._w.get(e["bias"], torch.float64) * e["scaling"]
            d = (self._w.get(e["b"], torch.float64) @ self._w.get(e["a"], torch.float64)) * e["scaling"]
            return d.T.contiguous() if e["transpose"] else d
        return t if dtype is None else t.to(dtype)


def _strip_peft_prefix(name: str) -> str:
    for p in ("base_model.model.", "base_model."):
        if name.startswith(p):
            return name[len(p):]
    return name


# ----------------------------------------------------------------------------- opening


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TaskvecError(f"{path}: unreadable JSON ({exc}); re-download or fix the file") from None


def _folder_config(folder: Path) -> dict | None:
    cfg = folder / "config.json"
    return _read_json(cfg) if cfg.is_file() else None


def _open_index(index: Path, config: dict | None, source: str) -> Checkpoint:
    data = _read_json(index)
    wmap = data.get("weight_map")
    if not isinstance(wmap, dict) or not wmap:
        raise TaskvecError(f"{index}: no 'weight_map' in the shard index; re-save the checkpoint")
    files = []
    for fname in dict.fromkeys(wmap.values()):
        f = index.parent / fname
        if not f.is_file():
            raise TaskvecError(f"{index}: shard {fname} listed in the index is missing; re-download the checkpoint")
        files.append(f)
    if all(f.suffix == ".safetensors" for f in files):
        ck = SafetensorsCheckpoint(source, files, config, fmt="safetensors-sharded")
    else:
        ck = TorchCheckpoint(source, files, config)
        ck.format = "torch-sharded"
    missing = [k for k in wmap if k not in ck]
    if missing:
        raise TaskvecError(f"{index}: {len(missing)} tensors listed in the index are not in their shard "
                           f"(e.g. {missing[0]!r}); a shard is stale or truncated — re-download it")
    ck.files.append(index)
    return ck


def _open_gguf(path: Path, config_dir: Path | None = None) -> Checkpoint:
    """Dequantise a GGUF file through transformers once; cache it as safetensors for lazy re-opens."""
    from .io import atomic_dir, cache_dir

    digest = _file_sha256(path)[:16]
    cached = cache_dir() / "gguf" / digest
    if not (cached / "model.safetensors").is_file():
        try:
            from transformers import AutoModelForCausalLM
        except ImportError as exc:  # pragma: no cover
            raise TaskvecError(f"{path}: reading GGUF needs transformers ({exc})") from None
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                         dtype=torch.float32, low_cpu_mem_usage=True)
        except ImportError as exc:
            raise TaskvecError(f"{path}: reading GGUF needs the 'gguf' and 'accelerate' packages "
                               f"(pip install gguf accelerate): {exc}") from None
        except Exception as exc:  # transformers raises many types for unsupported GGUF variants
            raise TaskvecError(f"{path}: transformers could not read this GGUF file ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}); convert it to safetensors") from None
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        seen, sd = set(), {}
        for k, v in model.state_dict().items():
            ptr = v.untyped_storage().data_ptr()
            if ptr in seen:  # tied copy (lm_head = embeddings): saved once, as HF does
                continue
            seen.add(ptr)
            sd[k] = v.detach().contiguous()
        del model
        from safetensors.torch import save_file

        from .io import atomic_write_json

        cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_dir(cached, overwrite=True, internal=True) as tmp:
                save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt", "source": path.name})
                atomic_write_json(tmp / "config.json", cfg)
        except OSError:  # cache not writable: serve from memory
            return MemoryCheckpoint(str(path), sd, cfg, files=[path], fmt="gguf")
    ck = SafetensorsCheckpoint(str(path), [cached / "model.safetensors"], _read_json(cached / "config.json"),
                               fmt="gguf")
    ck.files = [path]  # fingerprint = the GGUF file
    return ck


def open_checkpoint(source, *, allow_network: bool = False) -> Checkpoint:
    """Open `source` lazily: a folder, a .safetensors / *.index.json / .bin / .pt / .gguf file, a PEFT
    LoRA adapter folder, or a hub id (local HF cache always; download only with allow_network).

    A task-vector file written by `TaskVector.save` is refused: it holds τ, not model weights (read it
    with `TaskVector.load`)."""
    if isinstance(source, Checkpoint):
        return _refuse_task_vector(source)
    path = Path(os.path.expanduser(str(source)))
    if path.is_dir():
        return _refuse_task_vector(_open_folder(path))
    if path.is_file():
        return _refuse_task_vector(_open_file(path))
    return _refuse_task_vector(_open_hub(str(source), allow_network))


TASK_VECTOR_FORMAT = "taskvec-taskvector"  # safetensors metadata 'format' of a TaskVector.save file


def _refuse_task_vector(ck: Checkpoint) -> Checkpoint:
    """`ck`, unless it is a task vector saved by taskvec: used as a base or fine-tune, τ would be read as
    weights (τ of a τ, a merge of differences) and give silent garbage."""
    if getattr(ck, "metadata", {}).get("format") == TASK_VECTOR_FORMAT:
        raise TaskvecError(f"{ck.source}: a taskvec task vector (TaskVector.save) holds τ = θ_ft − θ₀, not model "
                           "weights; load it with TaskVector.load(path) and write a model with "
                           ".apply_to(base, out_dir), then pass that folder")
    return ck


def _open_file(path: Path, config: dict | None = None) -> Checkpoint:
    if config is None:
        config = _folder_config(path.parent)
    name = path.name
    if name.endswith(".index.json"):
        return _open_index(path, config, str(path))
    if name.endswith(".safetensors"):
        return SafetensorsCheckpoint(str(path), [path], config)
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        return TorchCheckpoint(str(path), [path], config)
    if path.suffix == ".gguf":
        return _open_gguf(path)
    raise TaskvecError(f"{path}: unknown checkpoint format; expected a folder, .safetensors, *.index.json, "
                       ".bin/.pt or .gguf")


def _open_folder(folder: Path) -> Checkpoint:
    config = _folder_config(folder)
    if (folder / "adapter_config.json").is_file():
        acfg = _read_json(folder / "adapter_config.json")
        for fname in ("adapter_model.safetensors", "adapter_model.bin"):
            if (folder / fname).is_file():
                return LoraCheckpoint(folder, _open_file(folder / fname, config), acfg, config)
        raise TaskvecError(f"{folder}: has adapter_config.json but no adapter_model.safetensors/.bin; the adapter "
                           "was not saved completely — re-save it with peft's save_pretrained")
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            ck = _open_index(folder / index, config, str(folder))
            return ck
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            ck = _open_file(folder / single, config)
            ck.source = str(folder)
            return ck
    shards = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith(("taskvec_head", ".")))
    if shards:
        return SafetensorsCheckpoint(str(folder), shards, config)
    others = sorted(p for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf") and p.is_file())
    if len(others) == 1:
        ck = _open_file(others[0], config)
        ck.source = str(folder)
        return ck
    if len(others) > 1:
        raise TaskvecError(f"{folder}: several weight files ({', '.join(p.name for p in others)}) and no index; "
                           "pass the file you mean")
    raise TaskvecError(f"{folder}: no model weights found (expected model.safetensors, a *.index.json, "
                       "pytorch_model.bin, a .gguf file or a PEFT adapter); " + _where_the_weights_are(folder))


def _where_the_weights_are(folder: Path) -> str:
    """A hint for a folder that holds no weights itself: the checkpoints inside a taskvec collection, or
    model folders one level down."""
    ckpts = folder / "checkpoints" if (folder / "checkpoints").is_dir() else folder
    if (folder / "collection.json").is_file() or (folder / "runs").is_dir():
        return (f"this is a taskvec collection: its checkpoints are {folder / 'runs'}/<task>/checkpoints/"
                "<epoch-N> (or run 'taskvec analyze' on the collection itself)")
    epochs = sorted(p.name for p in ckpts.glob("epoch-*") if p.is_dir())
    if epochs:
        return f"its checkpoints are the folders {ckpts}/{{{','.join(epochs)}}}; pass one of them"
    subs = sorted(p.name for p in folder.iterdir() if p.is_dir() and any(
        (p / f).exists() for f in ("config.json", "model.safetensors", "adapter_config.json")))
    if subs:
        return f"the model folders are one level down ({name_list(subs)}); pass one of them"
    return "is this the right folder?"


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def _open_hub(repo_id: str, allow_network: bool) -> Checkpoint:
    if not _HUB_ID.match(repo_id) or "/" not in repo_id:
        raise TaskvecError(f"{repo_id}: no such file or folder (and not a hub id of the form owner/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover
        raise TaskvecError(f"{repo_id}: not a local path, and huggingface_hub is not installed") from None
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
    try:
        folder = snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
    except Exception:
        folder = None
    if folder is None or not any(Path(folder).glob("*.safetensors")):
        where = f"{repo_id}: not a local path and not in the local Hugging Face cache"
        if not allow_network:
            raise TaskvecError(f"{where}; pass a local folder, or download it into the cache first "
                               f"(`hf download {repo_id}`)")
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise TaskvecError(f"{where}, and HF_HUB_OFFLINE=1 forbids downloading it; unset HF_HUB_OFFLINE or pass "
                               "a local folder")
        try:
            folder = snapshot_download(repo_id, allow_patterns=patterns)
        except Exception as exc:
            raise TaskvecError(f"{repo_id}: download failed ({type(exc).__name__}: {exc}); check the id and network") \
                from None
    ck = _open_folder(Path(folder))
    ck.source = repo_id
    return ck


def check_finite(ckpt: Checkpoint, name: str, t: torch.Tensor) -> torch.Tensor:
    """Raise TaskvecError if `t` (tensor `name` of `ckpt`) holds NaN or Inf; return it otherwise."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise TaskvecError(f"{ckpt.tensor_file(name)}: tensor {name!r} contains {bad} NaN/Inf values; the checkpoint "
                           "is corrupt or overflowed — re-export it, or leave this tensor out with --scope REGEX")
    return t


# ----------------------------------------------------------------------------- alignment

# Prefixes wrappers put in front of the same architecture's names (task heads, PEFT, DDP, compile).
PREFIXES = ("base_model.model.", "module.", "_orig_mod.", "model.", "bert.", "roberta.", "distilbert.",
            "transformer.", "gpt_neox.", "backbone.", "base_model.")

# Non-trainable buffers that sometimes land in state dicts.
_BUFFER_RE = re.compile(r"(^|\.)(position_ids|token_type_ids|inv_freq|original_inv_freq|num_batches_tracked|"
                        r"masked_bias|_float_tensor)$|(^|\.)attn\.bias$|(^|\.)attention\.(bias|masked_bias)$|"
                        r"rotary_emb\.")
_WORD_EMB_RE = re.compile(r"(^|\.)(wte|word_embeddings|embed_tokens|embed_in|tok_embeddings|shared)\.weight$")
_HEAD_RE = re.compile(r"(^|\.)(lm_head|embed_out|output)\.weight$")


# Names that differ between files and modules of one architecture (GPT-NeoX files say embed_out,
# transformers 5 modules say lm_head).
ALIASES = {"embed_out.weight": "lm_head.weight"}


def canonical_name(name: str) -> str:
    """`name` with wrapper prefixes removed (model., base_model.model., bert., transformer., …) and
    file/module aliases unified (embed_out → lm_head)."""
    changed = True
    while changed:
        changed = False
        for p in PREFIXES:
            if name.startswith(p) and len(name) > len(p):
                name = name[len(p):]
                changed = True
    return ALIASES.get(name, name)


def _canonical_map(names: Iterable[str]) -> dict[str, str]:
    """canonical → original; names whose canonical form collides keep their full name."""
    out: dict[str, list[str]] = {}
    for n in names:
        out.setdefault(canonical_name(n), []).append(n)
    result = {}
    for c, ns in out.items():
        if len(ns) == 1:
            result[c] = ns[0]
        else:
            for n in ns:
                result[n] = n
    return result


def buffer_reason(ckpt: Checkpoint, name: str) -> str | None:
    dt = ckpt.dtype(name)
    if not (dt.is_floating_point or dt.is_complex):
        return f"integer/bool tensor ({str(dt).replace('torch.', '')})"
    if _BUFFER_RE.search(name):
        return "buffer (not a trained parameter)"
    return None


def _tied(config: dict | None) -> bool:
    """Whether a config ties the output head to the input embeddings (transformers' default: yes)."""
    if not config:
        return True
    return bool(config.get("tie_word_embeddings", config.get("model_type") != "gpt_neox"))


@dataclass
class Alignment:
    """How `other`'s tensors pair with `base`'s (names are base names unless said otherwise).

    pairs: base name → other name for every shared floating tensor whose shape matches, or whose
    rows grew (added vocabulary: compare ``other[:base_rows]``, see ``added_rows``).
    """

    base: str
    other: str
    pairs: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)         # base tensors the other lacks
    extra: list[str] = field(default_factory=list)           # other tensors (other names) not in the base
    shape_mismatch: dict[str, tuple] = field(default_factory=dict)   # base name -> (base shape, other shape)
    added_rows: dict[str, tuple] = field(default_factory=dict)       # base name -> (base rows, other rows)
    tied: dict[str, str] = field(default_factory=dict)               # name -> what it is tied to / paired with
    excluded: dict[str, str] = field(default_factory=dict)           # name -> reason (buffers, ints)
    is_delta: bool = False

    def check(self, names: Iterable[str] | None = None) -> "Alignment":
        """Raise TaskvecError if any tensor in `names` (default: all) has a shape that cannot be compared."""
        names = set(self.shape_mismatch) if names is None else set(names) & set(self.shape_mismatch)
        if names:
            n = sorted(names)[0]
            bs, os_ = self.shape_mismatch[n]
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            raise TaskvecError(
                f"{self.other}: tensor {n!r} has shape {tuple(os_)} but the base {self.base} has {tuple(bs)}{more}; "
                "the fine-tune was not made from this base — pass the right base, or leave the tensor out "
                "with --scope REGEX")
        return self

    def to_dict(self) -> dict:
        return {
            "base": self.base, "other": self.other, "n_pairs": len(self.pairs), "missing": self.missing,
            "extra": self.extra,
            "shape_mismatch": {k: [list(a), list(b)] for k, (a, b) in self.shape_mismatch.items()},
            "added_rows": {k: list(v) for k, v in self.added_rows.items()}, "tied": self.tied,
            "excluded": self.excluded, "is_delta": self.is_delta,
        }


def align(base: Checkpoint, other: Checkpoint) -> Alignment:
    """Pair `other`'s tensors with `base`'s; report everything that does not pair (see Alignment)."""
    if base.is_delta:
        raise TaskvecError(f"{base.source}: a LoRA adapter cannot be the base; pass the model it was trained on")
    bt, ot = base.model_type, other.model_type
    if bt and ot and bt != ot and not other.is_delta:
        raise TaskvecError(f"{other.source} is a {ot} model but the base {base.source} is a {bt} model; a task "
                           "vector needs a fine-tune of the same architecture as its base")
    al = Alignment(base=base.source, other=other.source, is_delta=other.is_delta)
    base_keys, other_keys = [], []
    for k in base.keys():
        reason = buffer_reason(base, k)
        (al.excluded.__setitem__(k, reason) if reason else base_keys.append(k))
    bmap = _canonical_map(base_keys)
    for k in other.keys():
        reason = buffer_reason(other, k)
        if reason and not other.is_delta:
            twin = bmap.get(canonical_name(k))
            if twin is not None and not other.dtype(k).is_floating_point:  # a weight saved as integers
                raise TaskvecError(f"{other.source}: tensor {k!r} is stored as {other.dtype(k)} but the base "
                                   f"{base.source} holds it as {base.dtype(twin)}; a fine-tune keeps its base's "
                                   "floating-point weights — re-save it in a floating dtype (e.g. float32)")
            al.excluded.setdefault(k, reason)
        else:
            other_keys.append(k)
    omap = _canonical_map(other_keys)
    used_other = set()
    for c, bname in bmap.items():
        oname = omap.get(c)
        if oname is None:
            continue
        used_other.add(oname)
        bs, os_ = tuple(base.shape(bname)), tuple(other.shape(oname))
        if bs == os_:
            al.pairs[bname] = oname
        elif (len(bs) == len(os_) >= 1 and bs[1:] == os_[1:] and os_[0] > bs[0]
              and (_WORD_EMB_RE.search(bname) or _HEAD_RE.search(bname))):
            al.pairs[bname] = oname
            al.added_rows[bname] = (bs[0], os_[0])
        else:
            al.shape_mismatch[bname] = (bs, os_)
    # tied heads: lm_head stored on one side only
    b_head = next((c for c in bmap if _HEAD_RE.search(c)), None)
    o_head = next((c for c in omap if _HEAD_RE.search(c)), None)
    b_emb = next((c for c in bmap if _WORD_EMB_RE.search(c)), None)
    o_emb = next((c for c in omap if _WORD_EMB_RE.search(c)), None)
    if b_head and not o_head and o_emb and not other.is_delta:
        # other ties its head to its embeddings: its lm_head is its embedding matrix
        if _tied(other.config) and bmap[b_head] not in al.pairs:
            bname, oname = bmap[b_head], omap[o_emb]
            if tuple(base.shape(bname)) == tuple(other.shape(oname)):
                al.pairs[bname] = oname
                al.tied[bname] = f"{oname} (tied in {other.source})"
    if o_head and not b_head and b_emb and omap[o_head] not in used_other:
        oname = omap[o_head]
        used_other.add(oname)
        if _tied(other.config):
            al.tied[oname] = f"{bmap[b_emb]} (duplicate of the tied embeddings; counted once)"
        else:
            al.tied[oname] = (f"{bmap[b_emb]} (the fine-tune untied its head from the embeddings; the base has "
                              "no separate head, so this change is reported, not compared)")
    al.extra = [o for o in other_keys if o not in used_other and o not in al.tied]
    if not other.is_delta:
        al.missing = [b for b in base_keys if b not in al.pairs and b not in al.shape_mismatch]
    if other.is_delta:
        _refuse_misfit_adapter(base, other, al)
    elif not al.pairs or (len(al.pairs) < 0.5 * len(base_keys)
                          and len(al.shape_mismatch) + len(al.missing) > 0.5 * len(base_keys)):
        _refuse_other_model(base, other, al, base_keys, other_keys)
    return al


def _first(names: list[str]) -> str:
    """The first name quoted, and how many more there are."""
    return repr(names[0]) + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")


def _of(k: int, n: int) -> str:
    """'all n' or 'k of n'."""
    return f"all {n}" if k == n else f"{k} of {n}"


def _refuse_other_model(base: Checkpoint, other: Checkpoint, al: Alignment, base_keys: list[str],
                        other_keys: list[str]) -> None:
    """Refuse a fine-tune most of whose tensors do not pair with `base`'s, saying how they differ."""
    for ck, keys in ((base, base_keys), (other, other_keys)):
        if not keys:
            raise TaskvecError(f"{ck.source} holds no floating-point tensors, so there is nothing to compare; is it "
                               "the right file?")
    if not al.pairs and not al.shape_mismatch:
        raise TaskvecError(f"{other.source} shares no tensor names with the base {base.source} (e.g. "
                           f"{', '.join(other_keys[:2])} vs {', '.join(base_keys[:2])}); they are different "
                           "architectures — pass the fine-tune's own base model")
    if len(al.shape_mismatch) > len(al.missing):
        named = len(al.pairs) + len(al.shape_mismatch)
        n, (bs, os_) = next(iter(al.shape_mismatch.items()))
        raise TaskvecError(f"{other.source}: {_of(named, len(base_keys))} tensor names match the base {base.source} "
                           f"but {_of(len(al.shape_mismatch), named)} have other shapes (first: {n!r}, {tuple(bs)} in "
                           f"the base vs {tuple(os_)}): a different model size of the same architecture — pass the "
                           "fine-tune's own base")
    raise TaskvecError(f"{other.source} matches only {len(al.pairs)} of the base's {len(base_keys)} tensors "
                       f"({base.source}); they look like different architectures — pass the fine-tune's own base")


def _refuse_misfit_adapter(base: Checkpoint, adapter: Checkpoint, al: Alignment) -> None:
    """Refuse a LoRA adapter that adapts tensors `base` lacks, or gives them other shapes."""
    if al.extra:
        what = f"adapts {_first(al.extra)}, which the base {base.source} does not have"
    elif al.shape_mismatch:
        n, (bs, os_) = next(iter(al.shape_mismatch.items()))
        what = f"gives {n!r} the shape {tuple(os_)} but the base {base.source} has {tuple(bs)}"
    else:
        return
    said = getattr(adapter, "base_model", None)
    raise TaskvecError(f"{adapter.source}: the LoRA adapter {what}; the adapter was trained on a different base "
                       "model" + (f" (adapter_config says {said!r})" if said else ""))


def match_parameter_names(keys: Iterable[str], model, *, strict: bool = True) -> dict[str, str]:
    """Map checkpoint tensor names (e.g. a TaskVector's keys) onto ``model.named_parameters()`` names."""
    keys = list(keys)
    params = [n for n, _ in model.named_parameters()]
    pmap = _canonical_map(params)
    pset = set(params)
    out, unmatched = {}, []
    for k in keys:
        if k in pset:
            out[k] = k
            continue
        target = pmap.get(canonical_name(k))
        if target is None:
            unmatched.append(k)
        else:
            out[k] = target
    if unmatched and strict:
        raise TaskvecError(f"{len(unmatched)} tensor(s) have no parameter in the {type(model).__name__} model "
                           f"(e.g. {unmatched[0]!r}); load the model class the checkpoint was saved from, or narrow "
                           "the scope")
    return out


# ----------------------------------------------------------------------------- streaming writing


def write_safetensors(path, specs: dict[str, tuple[tuple, torch.dtype]], produce, metadata: dict | None = None,
                      progress=None) -> Path:
    """Write a safetensors file tensor by tensor: `specs` gives name → (shape, dtype) up front (the
    header comes first), `produce(name)` returns each tensor when its turn comes. Atomic; memory =
    one tensor. `progress` (a tqdm bar or None) is advanced once per tensor."""
    from .io import atomic_path

    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, (shape, dtype) in specs.items():
        if dtype not in _ST_NAMES:
            raise TaskvecError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)))
            fh.write(raw)
            for name, (shape, dtype) in specs.items():
                t = produce(name)
                if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                    raise TaskvecError(f"tensor {name!r}: produced {tuple(t.shape)} {t.dtype}, expected {shape} {dtype}")
                t = t.detach().contiguous().cpu()
                if t.numel():
                    fh.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
                del t  # one tensor in memory: drop it before the next is produced
                if progress is not None:
                    progress.update(1)
    return path


def extra_tensors(finetunes: Sequence, alignments: Sequence) -> dict[str, list[str]]:
    """Per fine-tune (by source), the tensors it holds beyond the base (an added head, extra layers), if any."""
    return {ft.source: al.extra for ft, al in zip(finetunes, alignments) if al.extra}


def warn_extra_tensors(extra: dict[str, list[str]], fate: str, listed: str) -> None:
    """One TaskvecWarning per fine-tune of `extra_tensors`: what befell them (`fate`) and where they are `listed`."""
    for src, names in ((s, n) for s, n in extra.items() if n):
        warnings.warn(f"{src} holds {len(names)} tensor(s) the base lacks ({name_list(names, 3)}), {fate}: an "
                      f"added head or a different architecture? (all listed in {listed})", TaskvecWarning, stacklevel=2)


def source_list(sources, what: str = "fine-tunes") -> list:
    """`sources` as a list: a single path, hub id or Checkpoint becomes a one-element list (a string is never
    iterated character by character); other iterables are listed as they are."""
    if isinstance(sources, (str, bytes, os.PathLike, Checkpoint)):
        return [os.fsdecode(sources) if isinstance(sources, bytes) else sources]
    if sources is None:
        raise TaskvecError(f"no {what} given; pass a list of paths (or one path)")
    try:
        return list(sources)
    except TypeError:
        raise TaskvecError(f"{what}: expected a path or a list of paths, got {type(sources).__name__}") from None


def name_sequence(names) -> list[str] | None:
    """Task names as a list: None stays None (default names), a string is comma-separated ('a,b'), as on
    the command line's --names; other iterables are listed as strings."""
    if names is None:
        return None
    if isinstance(names, str):
        return [n.strip() for n in names.split(",")]
    try:
        return [str(n) for n in names]
    except TypeError:
        raise TaskvecError(f"names: expected a list of task names or 'a,b,…', got {type(names).__name__}") from None
