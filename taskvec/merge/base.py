"""What every merge method shares: parameters, validation, per-tensor context, the method record."""

from __future__ import annotations

import hashlib
import math
import numbers
import re
import warnings
from pathlib import Path
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Mapping, Sequence

import torch

from ..checkpoints import Checkpoint, align, counted
from ..errors import TaskvecError, TaskvecWarning
from ..scalars import is_real_scalar
from ..scope import resolve_scope

RESCALES = {
    "l1": "mergekit: kept entries scaled so the tensor's L1 norm is preserved",
    "paper": "DARE paper: kept entries scaled by 1/density",
    "none": "no rescale after dropping",
}
TRIMS = {
    "tensor": "per tensor and per model: keep the top floor(density*numel) |tau| entries (mergekit, TIES paper)",
    "global": "global per model: keep |tau| >= the model's floor(density*P)-th largest |tau| over all merged tensors",
}


@dataclass(frozen=True)
class MergeParams:
    """Plain merge parameters, named as mergekit names them.

    weights / densities: one value per fine-tune, or a single value (a number or a 1-tuple) broadcast to all
    by `resolve`; stored as tuples of floats. densities None: not given — mergekit's default 1 (nothing
    trimmed or dropped), with a warning for ties and dare_*.
    lambda_: global scale of the merged task vector. normalize / rescale: None = method default.
    trim: TIES trimming scope ("tensor" or "global"). seed: DARE drop seed.
    """

    weights: tuple[float, ...] = (1.0,)
    densities: tuple[float, ...] | None = None
    lambda_: float = 1.0
    normalize: bool | None = None
    rescale: str | None = None
    trim: str = "tensor"
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "weights", _float_tuple(self.weights, "weights"))
        if self.densities is not None:
            object.__setattr__(self, "densities", _float_tuple(self.densities, "densities"))
        if not is_real_scalar(self.lambda_):
            raise TaskvecError(f"MergeParams lambda_={self.lambda_!r}: give a number")
        object.__setattr__(self, "lambda_", float(self.lambda_))
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise TaskvecError(f"MergeParams normalize={self.normalize!r}: give True, False or None (the method's "
                               "default)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise TaskvecError(f"MergeParams seed={self.seed!r}: give an integer")
        object.__setattr__(self, "seed", int(self.seed))


def _float_tuple(values, what: str) -> tuple[float, ...]:
    """A number → (x,); a sequence of numbers → a tuple of floats; anything else → TaskvecError."""
    example = "0.5" if what == "weights" else "0.3"
    if isinstance(values, (str, bytes)) or values is None:
        raise TaskvecError(f"MergeParams {what}={values!r}: give a number (broadcast to every fine-tune) or one "
                           f"number per fine-tune, e.g. {what}={example} or {what}=({example}, {example})")
    if is_real_scalar(values):
        values = (values,)
    try:
        if not all(is_real_scalar(v) for v in values):
            raise TypeError
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise TaskvecError(f"MergeParams {what}={values!r}: give a number (broadcast to every fine-tune) or one "
                           f"number per fine-tune, e.g. {what}={example} or {what}=({example}, {example})") from None
    if not out:
        raise TaskvecError(f"MergeParams {what}=(): give at least one value (one is broadcast to every fine-tune)")
    return out


_PARAM_ALIASES = {"lambda": "lambda_", "weight": "weights", "density": "densities"}


def as_merge_params(params) -> MergeParams:
    """`params` as MergeParams: None → the defaults; a dict (mapping) of MergeParams fields → MergeParams(**d)
    ('lambda', 'weight', 'density' accepted for lambda_, weights, densities); unknown keys or another type →
    TaskvecError."""
    if params is None:
        return MergeParams()
    if isinstance(params, MergeParams):
        return params
    if isinstance(params, Mapping):
        valid = [f.name for f in fields(MergeParams)]
        kw, given_as = {}, {}
        for key, value in params.items():
            name = _PARAM_ALIASES.get(key, key)
            if name not in valid:
                raise TaskvecError(f"merge params: unknown key {key!r}; valid keys are {', '.join(valid)}")
            if name in kw:
                raise TaskvecError(f"merge params: {name} is given twice (as {given_as[name]!r} and {key!r}); "
                                   "keep one")
            kw[name], given_as[name] = value, key
        return MergeParams(**kw)
    raise TaskvecError(f"merge params: expected MergeParams or a dict of its fields, got {type(params).__name__}; "
                       "e.g. MergeParams(weights=0.5, densities=0.3)")


@dataclass(frozen=True)
class TensorContext:
    """Where a tensor sits in the merge: its name (seeds DARE) and, for global trimming, per-model thresholds."""

    name: str = ""
    thresholds: tuple[float, ...] | None = None


def _broadcast(values: Sequence[float], n: int, what: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise TaskvecError(f"got {len(values)} --{what} values for {counted(n, 'fine-tune')}; give one value or "
                           "one per fine-tune")
    return values


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: `combine(base, finetunes, params, ctx)` maps fp32 tensors to the merged fp32 tensor."""

    name: str
    description: str
    combine: Callable[..., torch.Tensor]
    uses_density: bool = False
    uses_seed: bool = False
    uses_trim: bool = False
    uses_lambda: bool = True
    default_normalize: bool = False
    default_rescale: str | None = None
    conventions: dict = field(default_factory=dict)

    def resolve(self, params: MergeParams, n_models: int, sources: Sequence = ()) -> MergeParams:
        """Broadcast per-model values, fill method defaults, and reject out-of-range parameters.
        `sources`: the fine-tunes (paths, hub ids or Checkpoints), to name them in errors."""
        if n_models < 1:
            raise TaskvecError(f"{self.name} needs at least one fine-tuned model")
        names = [repr(str(getattr(s, "source", s))) for s in sources]

        def label(i: int) -> str:
            return f"fine-tune {names[i]}" if i < len(names) else f"fine-tune #{i + 1}"

        weights = _broadcast(params.weights, n_models, "weight")
        densities = _broadcast(params.densities or (1.0,), n_models, "density")
        for i, w in enumerate(weights):
            if not math.isfinite(w):
                raise TaskvecError(f"--weight {w} for {label(i)}: weights must be finite numbers")
        for i, d in enumerate(densities):
            if not (0.0 < d <= 1.0):
                raise TaskvecError(f"--density {d} for {label(i)}: density must lie in (0, 1] (the fraction of "
                                   "entries kept)")
        if not math.isfinite(params.lambda_):
            raise TaskvecError(f"--lambda is {params.lambda_}; it must be a finite number")
        if not self.uses_density and any(d != 1.0 for d in densities):
            raise TaskvecError(f"{self.name} takes no --density; use ties, dare_linear or dare_ties to sparsify")
        if not self.uses_lambda and params.lambda_ != 1.0:
            raise TaskvecError(f"{self.name} takes no --lambda (it averages fine-tuned weights); use task_arithmetic")
        if params.trim not in TRIMS:
            raise TaskvecError(f"--trim {params.trim!r}: choose one of {sorted(TRIMS)}")
        if params.trim != "tensor" and not self.uses_trim:
            raise TaskvecError(f"{self.name} does no magnitude trimming; --trim global applies to ties only")
        rescale = params.rescale if params.rescale is not None else self.default_rescale
        if self.default_rescale is None and params.rescale not in (None, "none"):
            raise TaskvecError(f"{self.name} does no random dropping; --rescale applies to dare_linear / dare_ties")
        if rescale is not None and rescale not in RESCALES:
            raise TaskvecError(f"--rescale {rescale!r}: choose one of {sorted(RESCALES)}")
        if not isinstance(params.seed, int) or params.seed < 0:
            raise TaskvecError(f"--seed {params.seed!r}: must be a non-negative integer")
        normalize = self.default_normalize if params.normalize is None else bool(params.normalize)
        if normalize and self.name not in ("ties", "dare_ties") and abs(sum(weights)) < 1e-8:
            raise TaskvecError(f"weights {list(weights)} sum to 0, so normalize=true would divide by zero; "
                               "change a weight or pass --no-normalize")
        return replace(params, weights=weights, densities=densities, normalize=normalize, rescale=rescale)

    def record(self, params: MergeParams) -> dict:
        """The merge record's description of what was computed (parameters and conventions, labelled)."""
        rec = {"method": self.name, "description": self.description, "weights": list(params.weights),
               "normalize": params.normalize}
        if self.uses_lambda:
            rec["lambda"] = params.lambda_
        if self.uses_density:
            rec["densities"] = list(params.densities)
        if self.uses_trim:
            rec["trim"] = {"scope": params.trim, "meaning": TRIMS[params.trim]}
        if self.uses_seed:
            rec["seed"] = params.seed
            rec["rescale"] = {"convention": params.rescale, "meaning": RESCALES[params.rescale]}
        rec["conventions"] = dict(self.conventions)
        rec["arithmetic_dtype"] = "float32"
        return rec


def warn_no_density(method: MergeMethod, params: MergeParams) -> None:
    """Say that ties / dare_* given no density keep mergekit's default 1 (nothing trimmed or dropped); called
    once the inputs are known good, so that advice never precedes an error."""
    if params.densities is None and method.uses_density:
        warnings.warn(f"{method.name} without --density: density defaults to 1 (as in mergekit), so "
                      f"{density_one_means(method)}; pass --density (e.g. 0.2-0.5)", TaskvecWarning, stacklevel=3)


def density_one_means(method: MergeMethod) -> str:
    """What a trimming/dropping method does at density 1, for the warning when no density is given."""
    if method.uses_trim:
        return f"nothing is trimmed and {method.name} is sign election only"
    left = "sign election only" if "sign_election" in method.conventions else "plain task arithmetic"
    return f"nothing is dropped and {method.name} is {left}"


def refuse_duplicate_finetunes(sources: Sequence, hint: str) -> None:
    """TaskvecError if one fine-tune (same resolved path, or same hub id) is listed twice: it would count
    double in a merge, and make the tasks indistinguishable in a check. `hint` ends the message."""
    seen: dict[str, str] = {}
    for src in sources:
        src = str(getattr(src, "source", src))
        p = Path(src).expanduser()
        key = str(p.resolve()) if p.exists() else src
        if key in seen:
            first = seen[key]
            also = f" (as {first!r} and {src!r})" if first != src else ""
            raise TaskvecError(f"fine-tune {first!r} is given twice{also}; list each fine-tune once ({hint})")
        seen[key] = src


def refuse_same_content(base, finetunes: Sequence) -> None:
    """TaskvecError if a fine-tune's files are byte-identical to the base's or to another fine-tune's (a
    copy under another path): its τ is zero, or it would count double."""
    seen = {base.fingerprint(): f"the base {str(base.source)!r}"}
    for ft in finetunes:
        fp = ft.fingerprint()
        if fp in seen:
            raise TaskvecError(f"fine-tune {str(ft.source)!r} has the same content as {seen[fp]}; list each "
                               f"distinct fine-tune once (a copy of the base has τ = 0)")
        seen[fp] = f"fine-tune {str(ft.source)!r}"


_VOCAB_RE = re.compile(r"(^|\.)(wte|word_embeddings|embed_tokens|embed_in|tok_embeddings|shared|lm_head|embed_out|"
                       r"output)\.weight$")


def align_finetunes(base: Checkpoint, fts: Sequence[Checkpoint], scope_names: Sequence[str], verb: str) -> list:
    """Alignment of each fine-tune to the base; one clear error for whatever leaves an in-scope tensor
    without a partner (other vocabulary size, other shape, missing). `verb` ('Merge', 'Check') starts the
    advice."""
    in_scope = set(scope_names)
    alignments = []
    for ft in fts:
        al = align(base, ft)
        vocab = {n: rows for n, rows in al.added_rows.items() if n in in_scope}
        vocab.update({n: (tuple(bs), tuple(os_)) for n, (bs, os_) in al.shape_mismatch.items()
                      if n in in_scope and _VOCAB_RE.search(n)})
        if vocab:
            name, (b_rows, f_rows) = next(iter(vocab.items()))
            raise TaskvecError(
                f"{ft.source}: tensor {name!r} has {f_rows} {'vocabulary rows' if isinstance(f_rows, int) else 'shape'} "
                f"but the base {base.source} has {b_rows}; the models have different vocabulary sizes. {verb} with "
                "--scope body (vocabulary matrices left out) or resize the embeddings to the base vocabulary first")
        al.check(in_scope)
        missing = [n for n in al.missing if n in in_scope]
        if missing and not ft.is_delta:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            fix = "restrict --scope to the tensors it has"
            if _outside_body(missing):
                fix = f"{verb.lower()} with --scope body (it lacks only head/embedding tensors, which it leaves out)"
            raise TaskvecError(f"{ft.source} lacks tensor {missing[0]!r}{more} that the base {base.source} has; "
                               f"pass the complete fine-tune, or {fix}")
        alignments.append(al)
    return alignments


def _outside_body(names: Sequence[str]) -> bool:
    """Whether none of `names` is in the `body` scope preset (all are word embeddings, output or pooler heads)."""
    try:
        return not resolve_scope(names, "body")
    except TaskvecError:  # resolve_scope refuses a scope that selects nothing
        return True


def tensor_seed(seed: int, name: str, model_index: int) -> int:
    """A 63-bit seed for one (tensor, model) pair: reproducible whatever order tensors stream in."""
    digest = hashlib.sha256(f"{seed}\0{model_index}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def weight_column(weights: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Weights as a [T, 1, ..., 1] tensor that broadcasts against a stack of T tensors like `like`."""
    w = torch.tensor(list(weights), dtype=like.dtype, device=like.device)
    return w.reshape((-1,) + (1,) * (like.dim() - 1))
