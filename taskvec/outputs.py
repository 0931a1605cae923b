"""Output functions f(x; θ) ∈ R^m: the quantity whose Jacobian defines the eNTK.

Kinds (DESIGN §2):
- ``logprob`` / ``logprob-mean``: causal LM, log-probability of the target continuation given the
  prompt, summed / averaged over target tokens (prompt tokens masked out).
- ``logits``: class logits (m = C), from a frozen :class:`LinearHead` on an encoder's mean-pooled
  states, or from a causal LM's next-token logits of label words after the prompt.
- ``margin``: m = 1; z₁ − z₀ for two classes, z_y − logsumexp_{c≠y} z_c for more (uses the label).
- ``regression``: encoder, mean-pool → frozen linear head (m = head outputs).

Tokenisation at the prompt/target boundary: prompt and target are tokenised **separately** and
concatenated (prompt with the tokenizer's special tokens, e.g. BOS; target without). The target
tokens are therefore exactly ``tokenizer(target, add_special_tokens=False)`` — no BPE merge can cross
the boundary, and a target that needs a leading space must carry it (``" 7"``). Fine-tuning uses the
same :func:`encode_prompt_target`, so the kernel is taken of the function that was optimised.

Everything is evaluated with :func:`torch.func.functional_call` on a dict of parameters, so the same
object serves forward-mode JVPs, per-example gradients under ``vmap`` (via a 4-D additive attention
mask, which transformers passes through untouched) and plain training.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from .errors import TaskvecError, TaskvecWarning
from .io import atomic_path

OUTPUT_KINDS = ("logprob", "logprob-mean", "logits", "margin", "regression")
LABEL_WORD_KINDS = ("logits", "margin")  # the outputs whose classes --label-words names
HEAD_FILE = "taskvec_head.safetensors"


# --------------------------------------------------------------------------------------- heads
def _describe(ex: Mapping) -> str:
    """The start of an example's text, to find it in the data file."""
    text = str(ex.get("prompt", "")) + str(ex.get("target", "")) if "prompt" in ex else str(ex.get("text", ""))
    return repr(text[:40] + ("…" if len(text) > 40 else ""))


class LinearHead(nn.Module):
    """Frozen linear map pooled-hidden → R^m, stored as ``taskvec_head.safetensors`` (weight [m, hidden], bias [m])."""

    def __init__(self, hidden: int, m: int = 1, *, seed: int | None = 0, dtype=torch.float32):
        super().__init__()
        self.linear = nn.Linear(hidden, m, dtype=dtype)
        if seed is not None:
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                self.linear.weight.copy_(torch.randn(m, hidden, generator=g, dtype=dtype) / hidden ** 0.5)
                self.linear.bias.zero_()

    @property
    def m(self) -> int:
        return self.linear.out_features

    @property
    def hidden(self) -> int:
        return self.linear.in_features

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.linear(pooled)

    def save(self, folder) -> Path:
        """Write ``folder/taskvec_head.safetensors`` atomically (metadata pooling=mean)."""
        from safetensors.torch import save_file

        path = Path(folder) / HEAD_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"weight": self.linear.weight.detach().contiguous().cpu(),
                   "bias": self.linear.bias.detach().contiguous().cpu()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"pooling": "mean", "format": "taskvec-head-v1"})
        return path

    @classmethod
    def load(cls, folder, dtype=torch.float32) -> "LinearHead":
        """Read ``taskvec_head.safetensors`` from a folder (or the file itself)."""
        from safetensors import safe_open

        path = Path(folder)
        if path.is_dir():
            path = path / HEAD_FILE
        if not path.is_file():
            raise TaskvecError(f"{path}: no regression/classification head; train one with `taskvec finetune` "
                               f"or save a LinearHead there (weight [m, hidden], bias [m])")
        try:
            with safe_open(str(path), "pt") as fh:
                meta = fh.metadata() or {}
                keys = set(fh.keys())
                if not {"weight", "bias"} <= keys:
                    raise TaskvecError(f"{path}: needs tensors 'weight' [m, hidden] and 'bias' [m], has {sorted(keys)}")
                weight, bias = fh.get_tensor("weight"), fh.get_tensor("bias")
        except TaskvecError:
            raise
        except Exception as exc:
            raise TaskvecError(f"{path}: not a readable safetensors file ({exc})") from exc
        if meta.get("pooling", "mean") != "mean":
            raise TaskvecError(f"{path}: pooling={meta['pooling']!r} is not supported; taskvec heads mean-pool")
        if weight.ndim != 2 or bias.shape != (weight.shape[0],):
            raise TaskvecError(f"{path}: weight must be [m, hidden] and bias [m]; got {tuple(weight.shape)} "
                               f"and {tuple(bias.shape)}")
        head = cls(weight.shape[1], weight.shape[0], seed=None, dtype=dtype)
        with torch.no_grad():
            head.linear.weight.copy_(weight)
            head.linear.bias.copy_(bias)
        return head.requires_grad_(False)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of token states over the attention mask: [b, L, d], [b, L] → [b, d]."""
    w = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * w).sum(1) / w.sum(1).clamp_min(1.0)


def additive_mask(attention_mask: torch.Tensor, *, causal: bool, dtype: torch.dtype) -> torch.Tensor:
    """[b, L] 0/1 mask → [b, 1, L, L] additive mask (0 keep, finfo.min drop); vmap-safe (no control flow)."""
    L = attention_mask.shape[-1]
    keep = attention_mask[:, None, None, :].to(torch.bool)
    if causal:
        tri = torch.ones(L, L, dtype=torch.bool, device=attention_mask.device).tril()
        keep = keep & tri[None, None]
    else:
        keep = keep.expand(-1, 1, L, L)
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    low = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=attention_mask.device)
    return torch.where(keep, zero, low)


class EncoderRegressor(nn.Module):
    """Encoder body → mean pool over the attention mask → frozen :class:`LinearHead`.

    The module fine-tuning trains (only the body's parameters receive gradients) and the exact
    function :func:`make_output` takes the kernel of (kinds 'regression' / 'logits' / 'margin').
    """

    def __init__(self, body: nn.Module, head: LinearHead):
        super().__init__()
        self.body = body
        self.head = head.requires_grad_(False)

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        dtype = next(self.body.parameters()).dtype
        kwargs = {"input_ids": input_ids, "attention_mask": additive_mask(attention_mask, causal=False, dtype=dtype)}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.body(**kwargs).last_hidden_state
        return self.head(mean_pool(hidden, attention_mask))


# --------------------------------------------------------------------------------- tokenising
def encode_prompt_target(tokenizer, prompt: str, target: str) -> tuple[list[int], int]:
    """Token ids of prompt ‖ target and the number of prompt tokens (see module docstring)."""
    p_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    t_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    eos = getattr(tokenizer, "eos_token_id", None)
    sep = getattr(tokenizer, "sep_token_id", None)
    # encoder-style templates append [SEP]/EOS to the prompt: keep it out of the middle
    while p_ids and p_ids[-1] in {eos, sep} - {None} and len(p_ids) > 1:
        p_ids = p_ids[:-1]
    return list(p_ids) + list(t_ids), len(p_ids)


def pad_token_ids(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into (ids, attention mask); shared with fine-tuning's Batcher."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


# ------------------------------------------------------------------------------ output function
class OutputFunction:
    """f(x; θ) for one output kind; call as ``f(params, batch)`` → [b, m] with params a (partial) dict
    of ``model.named_parameters()`` tensors (the rest come from the model)."""

    def __init__(self, kind: str, model: nn.Module, tokenizer, *, head: LinearHead | None = None,
                 label_words: Sequence[str] | None = None, max_length: int | None = None,
                 truncate_text: bool = False, source: str | None = None):
        from .models import context_length

        if kind not in OUTPUT_KINDS:
            raise TaskvecError(f"unknown output kind {kind!r}; choose one of {OUTPUT_KINDS}")
        if label_words and kind not in LABEL_WORD_KINDS:
            raise TaskvecError(f"output {kind!r} takes no label words (got --label-words {','.join(label_words)}); "
                               f"they name the classes of {' and '.join(map(repr, LABEL_WORD_KINDS))} — "
                               f"leave --label-words out")
        if max_length is not None and max_length < 1:
            raise TaskvecError(f"--max-length must be a positive number of tokens (got {max_length}); "
                               f"leave it out to use the model's context length")
        _refuse_mask_derived(model)
        self.source = str(source) if source else None  # the JSONL file the examples are the lines of
        self.kind, self.model, self.tokenizer, self.head = kind, model, tokenizer, head
        self.truncate_text = bool(truncate_text)  # right-truncate texts to max_length (as fine-tuning did)
        self.causal = _is_causal(model)
        ctx = context_length(model)
        self.max_length = min(x for x in (max_length, ctx) if x) if (max_length or ctx) else None
        self._length_source = ("--max-length" if max_length and (not ctx or max_length <= ctx)
                               else "the model's context length")
        self.label_words = list(label_words) if label_words else None
        self.label_ids: torch.Tensor | None = None
        if kind in ("logprob", "logprob-mean") and not self.causal:
            raise TaskvecError(f"output {kind!r} needs a causal LM; this model is an encoder "
                               f"(use 'regression', 'logits' or 'margin' with a head)")
        if kind == "regression" or (kind in ("logits", "margin") and not self.causal):
            if self.causal:
                raise TaskvecError("output 'regression' needs an encoder body (mean-pooled); this is a causal LM")
            if head is None:
                raise TaskvecError(f"output {kind!r} on an encoder needs a head: save a LinearHead as "
                                   f"{HEAD_FILE} beside the model or pass --head")
            hidden = getattr(model.config, "hidden_size", head.hidden)
            if head.hidden != hidden:
                raise TaskvecError(f"head expects hidden size {head.hidden} but the model has {hidden}")
            self.head = head.to(next(model.parameters()).dtype).requires_grad_(False)
            self.m = head.m if kind != "margin" else 1
            if kind == "margin" and head.m < 2:
                raise TaskvecError("output 'margin' needs a head with ≥ 2 classes")
            if self.label_words and len(self.label_words) != head.m:
                raise TaskvecError(f"{len(self.label_words)} label words {self.label_words} for a head with {head.m} "
                                   f"classes; give one word per class, in the head's class order")
        elif kind in ("logits", "margin"):
            if not self.label_words or len(self.label_words) < 2:
                raise TaskvecError(f"output {kind!r} on a causal LM needs ≥ 2 label words (--label-words)")
            ids = [_label_token(tokenizer, w) for w in self.label_words]
            if len(set(ids)) < len(ids):
                raise TaskvecError(f"label words {self.label_words} share their first token; choose distinct words")
            self.label_ids = torch.tensor(ids, dtype=torch.long)
            self.m = len(ids) if kind == "logits" else 1
        else:
            self.m = 1

    @property
    def n_classes(self) -> int | None:
        if self.kind not in ("logits", "margin"):
            return None
        return len(self.label_ids) if self.label_ids is not None else self.head.m

    def describe(self) -> dict:
        """Settings that define f (for caches and reports)."""
        d = {"kind": self.kind, "m": self.m, "max_length": self.max_length, "label_words": self.label_words}
        if self.head is not None:
            d["head_sha"] = _tensor_digest([self.head.linear.weight, self.head.linear.bias])
        return d

    # ---------------------------------------------------------------------------- encoding
    def encode(self, examples: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        """Tokenise examples into a right-padded batch; errors name the example index."""
        if len(examples) == 0:
            raise TaskvecError("no examples to encode (empty probe set)")
        seqs, extra = [], {"start": [], "stop": [], "label": []}
        for i, ex in enumerate(examples):
            ids, start, stop, label = self._encode_one(i, ex)
            if self.max_length and len(ids) > self.max_length:
                fix = ("shorten it or raise --max-length" if self._length_source == "--max-length"
                       else "shorten it (the model cannot read longer sequences)")
                where = self._where(i) if self.source else f"example {i} of the probe set"
                raise TaskvecError(f"{where} ({_describe(ex)}): {len(ids)} tokens exceed "
                                   f"{self._length_source} ({self.max_length}); {fix}")
            seqs.append(ids)
            extra["start"].append(start)
            extra["stop"].append(stop)
            extra["label"].append(label)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids, mask = pad_token_ids(seqs, pad)
        batch = {"input_ids": ids, "attention_mask": mask,
                 "label": torch.tensor(extra["label"], dtype=torch.float64)}
        L = ids.shape[1]
        pos = torch.arange(L)
        start = torch.tensor(extra["start"])[:, None]
        stop = torch.tensor(extra["stop"])[:, None]
        if self.kind in ("logprob", "logprob-mean"):
            batch["target_mask"] = ((pos >= start) & (pos < stop)).long()
        elif self.causal:  # label-word logits read at the last prompt token
            batch["target_mask"] = (pos == stop - 1).long()
        return batch

    def _where(self, i: int) -> str:
        """Where example i came from: FILE:LINE when the examples are the lines of a JSONL file."""
        return f"{self.source}:{i + 1}" if self.source else f"example {i}"

    def _encode_one(self, i: int, ex: Mapping):
        if self.kind in ("logprob", "logprob-mean"):
            if "prompt" not in ex or "target" not in ex:
                raise TaskvecError(f"{self._where(i)}: output {self.kind!r} needs 'prompt' and 'target' fields, "
                                   f"got {sorted(ex)}")
            ids, n_prompt = encode_prompt_target(self.tokenizer, str(ex["prompt"]), str(ex["target"]))
            if len(ids) == n_prompt:
                raise TaskvecError(f"{self._where(i)}: target {ex['target']!r} tokenises to nothing; "
                                   f"give a non-empty target")
            if n_prompt == 0:
                raise TaskvecError(f"{self._where(i)}: empty prompt and no BOS token; the first target token "
                                   f"has nothing to condition on — give a prompt")
            return ids, n_prompt, len(ids), 0.0
        text = ex.get("text", ex.get("prompt"))
        if text is None:
            raise TaskvecError(f"{self._where(i)}: needs a 'text' field, got {sorted(ex)}")
        cut = {"truncation": True, "max_length": self.max_length} if self.truncate_text and self.max_length else {}
        ids = self.tokenizer(str(text), add_special_tokens=True, **cut)["input_ids"]
        if not ids:
            raise TaskvecError(f"{self._where(i)}: text tokenises to nothing")
        return ids, 0, len(ids), self._label(i, ex)

    def _label(self, i: int, ex: Mapping) -> float:
        y = ex.get("label")
        if self.kind == "regression":
            try:
                return float(y) if y is not None else float("nan")
            except (TypeError, ValueError):
                raise TaskvecError(f"{self._where(i)}: regression label {y!r} is not a number") from None
        if y is None:
            if self.kind == "margin" and self.n_classes > 2:
                raise TaskvecError(f"{self._where(i)}: output 'margin' with {self.n_classes} classes needs a label")
            return -1.0
        if isinstance(y, str) and self.label_words and y in self.label_words:
            return float(self.label_words.index(y))
        try:
            k = int(y)
        except (TypeError, ValueError):
            raise TaskvecError(f"{self._where(i)}: class label {y!r} is neither an index nor one of the label "
                               f"words {self.label_words}") from None
        if not 0 <= k < self.n_classes:
            raise TaskvecError(f"{self._where(i)}: class label {k} outside 0..{self.n_classes - 1}")
        return float(k)

    # ---------------------------------------------------------------------------- evaluation
    def __call__(self, params: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """f for a batch: [b, m]. Works under vmap/grad/jvp (no data-dependent control flow)."""
        mask = batch["attention_mask"]
        dtype = _param_dtype(self.model, params)
        kwargs = {"input_ids": batch["input_ids"],
                  "attention_mask": additive_mask(mask, causal=self.causal, dtype=dtype)}
        if "token_type_ids" in batch:
            kwargs["token_type_ids"] = batch["token_type_ids"]
        out = functional_call(self.model, dict(params), args=(), kwargs=kwargs, strict=False)
        if not self.causal:
            z = self.head(mean_pool(out.last_hidden_state, mask))
            return self._classes(z, batch) if self.kind == "margin" else z
        logits = out.logits
        tm = batch["target_mask"].to(logits.dtype)
        if self.kind in ("logprob", "logprob-mean"):
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            tok = torch.gather(logp, -1, batch["input_ids"][:, 1:, None]).squeeze(-1)
            s = (tok * tm[:, 1:]).sum(-1, keepdim=True)
            return s / tm[:, 1:].sum(-1, keepdim=True) if self.kind == "logprob-mean" else s
        last = (logits * tm[..., None]).sum(1)  # logits at the last prompt token
        z = last[:, self.label_ids.to(last.device)]
        return self._classes(z, batch) if self.kind == "margin" else z

    def _classes(self, z: torch.Tensor, batch) -> torch.Tensor:
        """Margin: z1 − z0 (two classes) or z_y − logsumexp_{c≠y} z_c."""
        if z.shape[-1] == 2:
            return z[:, 1:2] - z[:, 0:1]
        y = batch["label"].long().clamp_min(0)
        onehot = torch.nn.functional.one_hot(y, z.shape[-1]).to(torch.bool)
        zy = (z * onehot).sum(-1, keepdim=True)
        rest = torch.logsumexp(z.masked_fill(onehot, float("-inf")), dim=-1, keepdim=True)
        return zy - rest

    def single(self, params, example: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """f for one example given without its batch dimension → [m] (for vmap over examples)."""
        return self(params, {k: v[None] for k, v in example.items()})[0]


def make_output(kind: str, model: nn.Module, tokenizer, *, head: LinearHead | None = None,
                label_words: Sequence[str] | None = None, max_length: int | None = None,
                truncate_text: bool = False, source: str | None = None) -> OutputFunction:
    """Build the output function f(x; θ) of `kind` for `model` (see module docstring).

    truncate_text: right-truncate text inputs to max_length (the tokenizer keeps its closing special
    token) instead of refusing them — what fine-tuning does, so the kernel is of the trained f.
    source: the JSONL file whose lines the examples are, so errors name FILE:LINE."""
    return OutputFunction(kind, model, tokenizer, head=head, label_words=label_words, max_length=max_length,
                          truncate_text=truncate_text, source=source)


def _label_token(tokenizer, word: str) -> int:
    """The token whose logit stands for label `word` (its first token, with a warning when there are more);
    refused if the tokenizer does not know the word, since the unknown token's logit would stand for it."""
    t = tokenizer(word, add_special_tokens=False)["input_ids"]
    if not t:
        raise TaskvecError(f"label word {word!r} tokenises to nothing; choose another word")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and t[0] == unk:
        raise TaskvecError(f"label word {word!r} is not in the tokenizer's vocabulary (it maps to the unknown token "
                           f"{tokenizer.unk_token!r}); choose a word the tokenizer knows (check with "
                           f"tokenizer.tokenize)")
    if len(t) > 1:
        pieces = tokenizer.convert_ids_to_tokens(t)
        warnings.warn(f"label word {word!r} is {len(t)} tokens {pieces}; the logit of its first token {pieces[0]!r} "
                      f"stands for it (a word that is one token is exact; check with tokenizer.tokenize)",
                      TaskvecWarning, stacklevel=2)
    return t[0]


# model types that build positions or ALiBi biases from the 2-D attention mask, which f cannot pass
# (it passes a 4-D additive mask so that the same f works under vmap, jvp and the batched hooks)
_MASK_DERIVED = {"opt": "position ids from the mask's cumulative sum", "bloom": "ALiBi biases from the mask",
                 "mpt": "ALiBi biases from the mask"}


def _refuse_mask_derived(model: nn.Module) -> None:
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    why = _MASK_DERIVED.get(kind)
    if kind == "falcon" and getattr(cfg, "alibi", False):
        why = "ALiBi biases from the mask"
    if why:
        raise TaskvecError(f"model type {kind!r} is not supported yet: it derives {why}, and taskvec's output "
                           f"functions pass a 4-D additive attention mask; use a model with rotary or learned "
                           f"absolute positions (GPT-2, BERT, Llama, Qwen2, Mistral, Phi, GPT-NeoX, Falcon without ALiBi)")


def _is_causal(model: nn.Module) -> bool:
    """A causal LM with an LM head (…ForCausalLM / …LMHeadModel); anything else is treated as an encoder body."""
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def _param_dtype(model: nn.Module, params: Mapping[str, torch.Tensor]) -> torch.dtype:
    for v in params.values():
        if v.is_floating_point():
            return v.dtype
    return next(model.parameters()).dtype


def _tensor_digest(tensors) -> str:
    import hashlib

    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def read_head_beside(source) -> LinearHead | None:
    """The head saved beside a model folder, if any."""
    path = Path(str(source))
    if path.is_dir() and (path / HEAD_FILE).is_file():
        return LinearHead.load(path)
    return None

