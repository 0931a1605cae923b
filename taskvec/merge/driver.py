"""Streaming merge driver: one tensor of each model in memory at a time, output a real HF folder.

`merge_checkpoints(base, finetunes, method, params, out)` pairs every fine-tune with the base
(`checkpoints.align`), refuses what cannot be merged (shape or vocabulary mismatch, a missing tensor,
an output folder that already holds a model — with `overwrite`, one taskvec merged is replaced) before
computing anything, then streams tensors through the method's per-tensor `combine` in float32 and writes
sharded safetensors tensor by tensor, the base's config and tokenizer files and `taskvec_merge.json` into a
temporary folder renamed into place at the end.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..checkpoints import (Checkpoint, align, check_finite, extra_tensors, open_checkpoint, source_list,
                           write_safetensors)
from ..errors import TaskvecError
from ..io import atomic_dir, atomic_write_json, built_model, check_out_dir
from ..scope import resolve_scope
from . import get_method
from .base import (MergeMethod, MergeParams, TensorContext, align_finetunes, as_merge_params,
                   refuse_duplicate_finetunes, refuse_same_content,
                   warn_no_density)
from .ties import GlobalMagnitudeThreshold

MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json", "adapter_config.json", "taskvec_merge.json")
COPY_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
              "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
              "chat_template.json", "taskvec_head.safetensors")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_size(size: int | str) -> int:
    """'2GB' / '500MB' / '1GiB' / bytes → bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(size), re.IGNORECASE)
    if not m:
        raise TaskvecError(f"--max-shard-size {size!r}: give a size like 2GB, 500MB or a number of bytes")
    unit = m.group(2).upper().rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    nbytes = int(float(m.group(1)) * scale)
    if nbytes < 1:
        raise TaskvecError(f"--max-shard-size {size!r} is not positive; give a size like 2GB or 500MB "
                           "(0 would write one shard per tensor)")
    return nbytes


def refuse_existing_output(out: Path, inputs: Sequence[str] = (), overwrite: bool = False) -> None:
    """TaskvecError if `out` is an input or already holds anything `overwrite` may not replace (a model
    above all, unless taskvec built it and nothing was added since); touches nothing."""
    out = Path(out)
    for src in inputs:
        try:
            if Path(src).exists() and out.resolve() == Path(src).resolve():
                raise TaskvecError(f"--out {out} is one of the input models; choose a new folder")
        except OSError:
            pass
    if out.is_dir() and not overwrite and built_model(out):
        raise TaskvecError(f"--out {out} already holds a model taskvec built; pass --overwrite to replace it, "
                           "or choose another folder — nothing was changed")
    if out.is_dir() and not built_model(out):
        held = [p.name for p in out.iterdir() if p.name in MODEL_FILES or p.suffix == ".safetensors"]
        if held:
            raise TaskvecError(f"--out {out} already holds a model ({', '.join(sorted(held)[:3])}) that taskvec did "
                               "not build (no taskvec_merge.json); --overwrite only replaces taskvec's own models: "
                               "choose another folder or delete it yourself — nothing was changed")
    # a file, an input, a folder taskvec did not write, files added since it did
    check_out_dir(out, overwrite=overwrite, inputs=inputs, replaces_models=True)


def _base_folder(base: Checkpoint) -> Path | None:
    p = Path(base.source)
    if p.is_dir():
        return p
    if p.is_file():
        return p.parent
    return None


def _plan(base: Checkpoint, names: list[str], out_dtypes: dict[str, torch.dtype], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for n in names:
        b = base.numel(n) * torch.empty((), dtype=out_dtypes[n]).element_size()
        if shards[-1] and size + b > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += b
    return shards


def _read_ft(base_t: torch.Tensor, ft: Checkpoint, al, name: str) -> torch.Tensor:
    """θ_t for tensor `name` in float32 (a LoRA adapter gives θ₀ + ΔW; an unadapted tensor gives θ₀).
    NaN/Inf is refused here, as it is read, so no merged tensor is ever computed from it."""
    if ft.is_delta:
        return base_t + check_finite(ft, al.pairs[name], ft.get(al.pairs[name])) if name in al.pairs else base_t
    return check_finite(ft, al.pairs[name], ft.get(al.pairs[name]))


def _read_base(base: Checkpoint, name: str, merged: bool) -> torch.Tensor:
    """Base tensor `name` (float32 if it is merged, its own dtype if copied), refused if it holds NaN/Inf
    (merged or copied, it would land in the output)."""
    t = base.get(name) if merged else base.get(name, dtype=None)
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise TaskvecError(f"{base.tensor_file(name)}: tensor {name!r} of the base contains "
                           f"{int((~torch.isfinite(t)).sum())} NaN/Inf values and would end up in the merge; the base "
                           "checkpoint is corrupt or overflowed — re-export it (nothing was written)")
    return t


def merge_checkpoints(base, finetunes: Sequence, method: str | MergeMethod,
                      params: MergeParams | Mapping | None = None, out: str | Path | None = None, *,
                      out_dtype: str | None = None, scope: str = "all", max_shard_size: int | str = "5GB",
                      progress: bool = True, extra_record: dict | None = None, overwrite: bool = False) -> Path:
    """Merge `finetunes` onto `base` with `method` and write a Hugging Face folder `out`; return its path.

    base / finetunes: paths, hub ids or open Checkpoints (`finetunes` a list, or one path for a single
    fine-tune). method: a mergekit name ("task_arithmetic", "ties", "dare_linear", "dare_ties", "linear").
    params: MergeParams, or a dict of its fields (e.g. {"weights": 0.5, "densities": 0.3}); None: weight 1
    each. out: the folder to write (required; nothing is written to a default place).
    out_dtype: "float32" | "bfloat16" | "float16" | None (keep each tensor's base dtype). scope: which
    tensors are merged (others are copied from the base and listed in the record). The default here is
    "all" — every floating tensor, embeddings and heads included, as mergekit merges — whereas
    `TaskVector.from_checkpoints` and `collection_stats` default to "body" (word embeddings, output head and
    pooler/classifier heads left out); pass scope="body" to merge exactly the τ those describe. Arithmetic is fp32.
    overwrite: replace `out` if taskvec wrote it (an earlier merge or another taskvec output), never an input.
    """
    if out is None:
        raise TaskvecError("merge_checkpoints: no output folder; pass out=\"path/to/merged\" (a new folder, or "
                           "one taskvec merged with overwrite=True)")
    out = Path(out)
    finetunes = source_list(finetunes)
    params = as_merge_params(params)
    method = get_method(method) if isinstance(method, str) else method
    if out_dtype is not None and out_dtype not in DTYPES:
        raise TaskvecError(f"--dtype {out_dtype!r}: choose one of {sorted(DTYPES)}")
    max_bytes = parse_size(max_shard_size)
    given = params
    params = method.resolve(params, len(finetunes), finetunes)
    refuse_duplicate_finetunes(finetunes, "give it a larger --weight to count it more")
    srcs = [str(getattr(s, "source", s)) for s in [base, *finetunes]]
    refuse_existing_output(out, srcs, overwrite)

    t_start = time.perf_counter()
    base = open_checkpoint(base)
    fts = [open_checkpoint(f) for f in finetunes]
    if base.is_delta:
        raise TaskvecError(f"{base.source}: a LoRA adapter cannot be the base; pass the model it was trained on")
    refuse_same_content(base, fts)  # the record needs these content hashes anyway
    names = base.keys()
    excluded = align(base, base).excluded  # buffers and integer tensors: copied, never merged
    floats = [n for n in names if n not in excluded]
    merged_names = resolve_scope(floats, scope)
    alignments = align_finetunes(base, fts, merged_names, "Merge")
    warn_no_density(method, given)
    in_scope = set(merged_names)
    out_dtypes = {n: (DTYPES[out_dtype] if out_dtype and base.dtype(n).is_floating_point else base.dtype(n))
                  for n in names}
    shards = _plan(base, names, out_dtypes, max_bytes)

    thresholds = None
    if method.uses_trim and params.trim == "global":
        thresholds = _global_thresholds(base, fts, alignments, merged_names, params, progress)

    def tensors(name):
        b = _read_base(base, name, merged=True)
        return b, [_read_ft(b, ft, al, name) for ft, al in zip(fts, alignments)]

    n_shards = len(shards)
    weight_map, total = {}, 0
    with atomic_dir(out, overwrite=overwrite, inputs=srcs, replaces_models=True) as tmp:
        bar = tqdm(total=len(names), desc=f"merge ({method.name})", unit="tensor", disable=not progress)
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if n_shards == 1 else f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"

            def produce(name, fname=fname):
                nonlocal total
                if name in in_scope:
                    b, ft_ts = tensors(name)
                    t = method.combine(b, ft_ts, params, TensorContext(name=name, thresholds=thresholds))
                    del b, ft_ts
                else:
                    t = _read_base(base, name, merged=False)
                t = _cast(t, out_dtypes[name], name, name in in_scope)
                weight_map[name] = fname
                total += t.numel() * t.element_size()
                return t

            write_safetensors(tmp / fname, {n: (tuple(base.shape(n)), out_dtypes[n]) for n in shard}, produce,
                              metadata={"format": "pt"}, progress=bar)
        bar.close()
        if n_shards > 1:
            atomic_write_json(tmp / "model.safetensors.index.json",
                              {"metadata": {"total_size": total}, "weight_map": weight_map})
        copied = _copy_side_files(base, tmp, out_dtype)
        record = {
            "taskvec_version": __version__,
            **method.record(params),
            "base": {"source": base.source, "fingerprint": base.fingerprint()},
            "models": [{"source": ft.source, "fingerprint": ft.fingerprint(), "weight": w,
                        **({"density": d} if method.uses_density else {}),
                        **({"lora_adapter": True} if ft.is_delta else {})}
                       for ft, w, d in zip(fts, params.weights, params.densities)],
            "output_dtype": out_dtype or "as base (per tensor)",
            "scope": scope,
            "n_tensors": len(names),
            "merged_tensors": len(merged_names),
            "copied_from_base": [n for n in names if n not in in_scope],
            "extra_tensors_ignored": extra_tensors(fts, alignments),
            "global_trim_thresholds": list(thresholds) if thresholds else None,
            "files_copied_from_base": copied,
            "shards": n_shards,
            "seconds": round(time.perf_counter() - t_start, 3),
            **(extra_record or {}),
        }
        atomic_write_json(tmp / "taskvec_merge.json", record)
    return out


def _cast(t: torch.Tensor, dtype: torch.dtype, name: str, merged: bool) -> torch.Tensor:
    """`t` in the output dtype; a merged tensor that overflows (in the float32 arithmetic, or on the way to
    a narrower output dtype) is refused — the inputs were checked finite, so the merge made the Inf."""
    out = t.to(dtype)
    if merged and out.is_floating_point() and not bool(torch.isfinite(out).all()):
        bad = ~torch.isfinite(t)
        if bool(bad.any()):  # Inf (or Inf - Inf = NaN) from the float32 arithmetic itself: no largest value
            raise TaskvecError(f"merged tensor {name!r} overflows float32 in the merge arithmetic ({int(bad.sum())} "
                               f"of {t.numel()} values NaN/Inf); lower --lambda/--weight")
        wider = "write it with --dtype float32 or bfloat16, or " if torch.finfo(dtype).max < 1e38 else ""
        raise TaskvecError(f"merged tensor {name!r} overflows {str(dtype).replace('torch.', '')} (largest |value| "
                           f"{float(t.abs().max()):.4g}); {wider}lower --lambda/--weight")
    return out


def _global_thresholds(base, fts, alignments, names, params: MergeParams, progress: bool) -> tuple[float, ...]:
    """Two streaming passes computing each model's exact global magnitude threshold."""
    g = GlobalMagnitudeThreshold(params.densities)
    for phase, add in (("coarse", g.add_coarse), ("fine", g.add_fine)):
        for name in tqdm(names, desc=f"global trim ({phase} pass)", unit="tensor", disable=not progress):
            b = _read_base(base, name, merged=True)
            for t, (ft, al) in enumerate(zip(fts, alignments)):
                add(t, (_read_ft(b, ft, al, name) - b).abs())
        if phase == "coarse":
            g.split()
    return g.thresholds()


def _copy_side_files(base: Checkpoint, dest: Path, out_dtype: str | None) -> list[str]:
    """Copy config/tokenizer files from the base folder (config's dtype updated); return their names."""
    folder = _base_folder(base)
    copied = []
    if folder is not None:
        for name in COPY_FILES:
            src = folder / name
            if src.is_file() and name != "config.json":
                shutil.copy2(src, dest / name)
                copied.append(name)
    config = dict(base.config) if base.config else None
    if config is not None:
        if out_dtype:
            for key in ("dtype", "torch_dtype"):
                if key in config or key == "dtype":
                    config[key] = out_dtype
        (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copied.append("config.json")
    return copied
