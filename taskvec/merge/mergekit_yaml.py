"""Read a mergekit YAML config (task_arithmetic, ties, dare_linear, dare_ties, linear) into a merge spec,
so a mergekit user can reproduce a merge with `taskvec merge --config merge.yml --out DIR`.

Supported: `models:` (each `model:` with optional `parameters: {weight, density}`), `base_model`,
`merge_method`, top-level `parameters` (normalize, lambda, rescale, int8_mask; weight/density as
defaults for every model), `dtype`, `out_dtype`, `random_seed`. Unsupported mergekit features
(`slices:`, per-layer parameter gradients, filters, `model+lora` syntax) raise a TaskvecError naming them.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import TaskvecError, TaskvecWarning
from .base import MergeParams

SUPPORTED = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "linear")
_GLOBAL_KEYS = {"normalize", "lambda", "rescale", "int8_mask", "weight", "density", "seed"}


@dataclass
class MergeSpec:
    """What to merge: base, fine-tunes, method, parameters, output dtype, and notes on ignored settings."""

    base: str
    models: list[str]
    method: str
    params: MergeParams
    out_dtype: str | None = None
    notes: list[str] = field(default_factory=list)


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "a list (a per-layer gradient)" if isinstance(value, list) else \
            "a filtered/per-tensor value" if isinstance(value, dict) else repr(value)
        raise TaskvecError(f"{where} is {kind}; taskvec supports one number per model for weight and density "
                           "(no per-layer gradients or filters)")
    if not math.isfinite(float(value)):
        raise TaskvecError(f"{where} is {value}; give a finite number")
    return float(value)


def _path(ref, cfg_dir: Path, where: str) -> str:
    if not isinstance(ref, str):
        raise TaskvecError(f"{where} must be a model path or hub id, got {ref!r}")
    if "+" in ref:
        raise TaskvecError(f"{where} {ref!r} uses mergekit's model+lora syntax; merge the LoRA into the model "
                           "first or pass the adapter folder itself as a fine-tune")
    p = Path(ref).expanduser()
    if not p.exists() and not p.is_absolute() and (cfg_dir / p).exists():
        return str(cfg_dir / p)
    return ref


def _yaml_error(path: Path, exc: yaml.YAMLError) -> str:
    """PyYAML's multi-line error as one line: file:line:column, what is wrong, how to fix it."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    what = " ".join(str(x) for x in (getattr(exc, "problem", None), getattr(exc, "context", None)) if x) \
        or str(exc)
    return (f"{where}: not valid YAML ({' '.join(what.split())}); fix the syntax there — check the indentation, "
            "a missing ':' after a key, or an unclosed quote or bracket")


def _warn_no_density(path: Path, method: str, refs: list[str], all_models: bool) -> None:
    """A TaskvecWarning when ties/dare_* get no density for some models: mergekit's default 1 keeps everything."""
    from . import get_method
    from .base import density_one_means

    m = get_method(method)
    if not m.uses_density:
        return
    what = density_one_means(m) if all_models else \
        f"none of {'its' if len(refs) == 1 else 'their'} entries is {'trimmed' if m.uses_trim else 'dropped'}"
    which = "any model" if all_models else ", ".join(repr(r) for r in refs)
    warnings.warn(f"{path}: {method} without a density for {which}: density defaults to 1 (as in mergekit), so "
                  f"{what}; set `density:` (e.g. 0.2-0.5) under parameters", TaskvecWarning, stacklevel=3)


def read_mergekit_config(path: str | Path) -> MergeSpec:
    """Parse a mergekit YAML file into a MergeSpec (paths relative to the cwd, else to the YAML's folder)."""
    path = Path(path)
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TaskvecError(f"{path}: no such mergekit config file") from None
    except IsADirectoryError:
        raise TaskvecError(f"{path} is a folder; --config takes a mergekit YAML file") from None
    except UnicodeDecodeError as exc:
        raise TaskvecError(f"{path}: not UTF-8 text (byte {exc.start}); save the mergekit config as UTF-8 "
                           f"YAML") from None
    except yaml.YAMLError as exc:
        raise TaskvecError(_yaml_error(path, exc)) from None
    if not isinstance(cfg, dict):
        raise TaskvecError(f"{path}: expected a mapping with merge_method, models and base_model")
    if "slices" in cfg:
        raise TaskvecError(f"{path}: `slices:` (layer-range merges) is not supported; list whole models under `models:`")
    method = cfg.get("merge_method")
    if method not in SUPPORTED:
        raise TaskvecError(f"{path}: merge_method {method!r} is not supported; use one of {', '.join(SUPPORTED)}")
    cfg_dir = path.parent
    top = cfg.get("parameters") or {}
    unknown = set(top) - _GLOBAL_KEYS
    if unknown:
        raise TaskvecError(f"{path}: unknown or unsupported parameters {sorted(unknown)} for {method}")
    entries = cfg.get("models")
    if not isinstance(entries, list) or not entries:
        raise TaskvecError(f"{path}: `models:` must list the models to merge")
    base = cfg.get("base_model")
    base = _path(base, cfg_dir, f"{path}: base_model") if base is not None else None
    if base is None and method != "linear":
        raise TaskvecError(f"{path}: {method} needs a base_model")
    models, weights, densities, notes, no_density = [], [], [], [], []
    for i, e in enumerate(entries):
        e = {"model": e} if isinstance(e, str) else e
        if not isinstance(e, dict) or "model" not in e:
            raise TaskvecError(f"{path}: models[{i}] needs a `model:` entry")
        ref = _path(e["model"], cfg_dir, f"{path}: models[{i}].model")
        p = e.get("parameters") or {}
        bad = set(p) - {"weight", "density"}
        if bad:
            raise TaskvecError(f"{path}: models[{i}].parameters {sorted(bad)} not supported (weight, density)")
        if base is not None and method != "linear" and Path(ref).resolve() == Path(base).resolve():
            notes.append(f"models[{i}] is the base model; mergekit ignores it in {method}, so does taskvec")
            continue
        if "weight" in p:
            weights.append(_number(p["weight"], f"{path}: models[{i}].parameters.weight"))
        elif "weight" in top:
            weights.append(_number(top["weight"], f"{path}: parameters.weight"))
        else:
            raise TaskvecError(f"{path}: models[{i}] has no weight (mergekit requires one per model, or a "
                               "top-level parameters.weight)")
        dens = p.get("density", top.get("density", 1.0))
        if "density" not in p and "density" not in top:
            no_density.append(ref)
        densities.append(_number(dens, f"{path}: models[{i}].parameters.density"))
        models.append(ref)
    if method == "linear" and base is not None and all(Path(m).resolve() != Path(base).resolve() for m in models):
        if "weight" not in top:  # mergekit's linear averages base_model in as one more model
            raise TaskvecError(f"{path}: mergekit's linear merge averages base_model in too and needs a weight for "
                               "it; list it under models with a weight, or remove base_model")
        models.append(base)
        weights.append(_number(top["weight"], f"{path}: parameters.weight"))
        densities.append(1.0)
        notes.append("linear: base_model is averaged in with the top-level weight, as mergekit does")
    if base is None:
        base = models[0]
        notes.append("no base_model: the first model supplies config and tokenizer (linear merge)")
    if no_density:
        _warn_no_density(path, method, no_density, all_models=len(no_density) == len(models))
    rescale = top.get("rescale")
    if isinstance(rescale, bool):
        rescale = "l1" if rescale else "none"
    seed = cfg.get("random_seed", top.get("seed", 0))
    if cfg.get("dtype") not in (None, "float32"):
        notes.append(f"dtype {cfg['dtype']} is mergekit's compute dtype; taskvec always computes in float32")
    out_dtype = cfg.get("out_dtype") or cfg.get("dtype")
    params = MergeParams(weights=tuple(weights), densities=tuple(densities),
                         lambda_=_number(top.get("lambda", 1.0), f"{path}: parameters.lambda"),
                         normalize=top.get("normalize"), rescale=rescale, seed=int(seed))
    return MergeSpec(base=base, models=models, method=method, params=params, out_dtype=out_dtype, notes=notes)
