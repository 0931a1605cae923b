"""Parameter scopes: which named tensors a task vector / kernel is restricted to.

Presets work across GPT-2 (c_attn, c_proj, c_fc, wte, wpe, ln_*), BERT (query/key/value,
attention.output.dense, intermediate/output.dense, LayerNorm), Llama (q/k/v/o_proj, gate/up/down_proj,
*_layernorm, norm) and GPT-NeoX (query_key_value, dense, dense_h_to_4h/4h_to_h, embed_in/out) naming;
any other string is a regular expression searched in each name.
"""

from __future__ import annotations

import re
from typing import Iterable

from .errors import TaskvecError

__all__ = ["PRESETS", "resolve_scope", "layer_of", "group_of", "describe_scopes"]

_B = r"(?:^|\.)"  # start of a name component

_WORD_EMB = _B + r"(?:wte|word_embeddings|embed_tokens|embed_in|tok_embeddings|shared)\.weight$"
_POS_EMB = _B + r"(?:wpe|position_embeddings|token_type_embeddings|embed_positions)\.weight$"
_HEADS = _B + r"(?:lm_head|embed_out|pooler|classifier|score|qa_outputs|cls|output_layer)\."
_QKV = (_B + r"(?:c_attn|q_proj|k_proj|v_proj|qkv_proj|query_key_value|Wqkv|query|key|value|q_lin|k_lin|v_lin)"
        r"\.(?:weight|bias)$")
_ATT_OUT = (_B + r"(?:attn\.c_proj|self_attn\.o_proj|attention\.output\.dense|attention\.dense|attn\.out_proj|"
            r"self_attn\.out_proj|attention\.out_lin|attn\.o_proj)\.(?:weight|bias)$")
_MLP = (_B + r"(?:mlp\.c_fc|mlp\.c_proj|mlp\.gate_proj|mlp\.up_proj|mlp\.down_proj|mlp\.dense_h_to_4h|"
        r"mlp\.dense_4h_to_h|intermediate\.dense|mlp\.fc1|mlp\.fc2|fc1|fc2|ffn\.lin1|ffn\.lin2|"
        r"feed_forward\.w[123])\.(?:weight|bias)$|" + _B + r"(?:layer|layers)\.\d+\.output\.dense\.(?:weight|bias)$")
_NORM = (_B + r"(?:ln_\d|ln_f|ln_1|ln_2|LayerNorm|layernorm|layer_norm|input_layernorm|post_attention_layernorm|"
         r"final_layer_norm|norm|norm_f|rmsnorm|sa_layer_norm|output_layer_norm)\.(?:weight|bias)$")

PRESETS = {
    "all": "every floating tensor",
    "body": "all but word embeddings, output head (lm_head/embed_out) and pooler/classifier heads",
    "attention": "query/key/value and attention output projections (weights and biases)",
    "qkv": "query/key/value projections only",
    "mlp": "feed-forward (MLP) weights and biases",
    "embeddings": "word, position and token-type embeddings and the output head (vocabulary matrices)",
    "norms": "LayerNorm / RMSNorm weights and biases",
}


def _in_preset(name: str, preset: str) -> bool:
    if preset == "all":
        return True
    if preset == "body":
        return not (re.search(_WORD_EMB, name) or re.search(_HEADS, name))
    if preset == "qkv":
        return bool(re.search(_QKV, name))
    if preset == "attention":
        return bool(re.search(_QKV, name) or re.search(_ATT_OUT, name))
    if preset == "mlp":
        return bool(re.search(_MLP, name)) and not re.search(_ATT_OUT, name)
    if preset == "embeddings":
        return bool(re.search(_WORD_EMB, name) or re.search(_POS_EMB, name)
                    or re.search(_B + r"(?:lm_head|embed_out)\.weight$", name))
    if preset == "norms":
        return bool(re.search(_NORM, name))
    raise KeyError(preset)


def resolve_scope(names: Iterable[str], scope: str | Iterable[str] | None = "body") -> list[str]:
    """The names (in their given order) selected by `scope`: a preset (see PRESETS), several presets
    joined by '+' (e.g. 'attention+mlp'), a regular expression searched in each name, or a list of names."""
    names = list(names)
    if scope is None:
        scope = "body"
    if not isinstance(scope, str):
        wanted = list(scope)
        unknown = [n for n in wanted if n not in set(names)]
        if unknown:
            raise TaskvecError(f"scope lists {len(unknown)} tensor(s) the checkpoint lacks (e.g. {unknown[0]!r})")
        keep = set(wanted)
        return [n for n in names if n in keep]
    parts = scope.split("+")
    if all(p in PRESETS for p in parts):
        out = [n for n in names if any(_in_preset(n, p) for p in parts)]
    else:
        try:
            rx = re.compile(scope)
        except re.error as exc:
            raise TaskvecError(f"scope {scope!r} is neither a preset ({', '.join(PRESETS)}) nor a valid regular "
                               f"expression ({exc})") from None
        out = [n for n in names if rx.search(n)]
    if not out:
        ex = ", ".join(names[:3])
        known = [p for p in parts if p in PRESETS]
        if len(parts) > 1 and known:
            unknown = [p for p in parts if p not in PRESETS]
            raise TaskvecError(f"scope {scope!r}: {', '.join(repr(u) for u in unknown)} is not a preset; join "
                               f"presets ({', '.join(PRESETS)}) with '+', or give one regular expression")
        raise TaskvecError(f"scope {scope!r} selects none of the {len(names)} tensors (e.g. {ex}); use one of "
                           f"{', '.join(PRESETS)} or a regular expression matching these names")
    return out


_LAYER_RE = re.compile(r"(?:^|\.)(?:h|layers|layer|blocks|block|decoder\.layers|encoder\.layer)\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """Transformer block index of a tensor name (h.3., layers.3., layer.3., blocks.3.), else None."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def group_of(name: str) -> str:
    """Per-layer grouping label: 'layer.<i>' for block tensors, else 'embeddings', 'head' or 'final'."""
    i = layer_of(name)
    if i is not None:
        return f"layer.{i}"
    if re.search(_WORD_EMB, name) or re.search(_POS_EMB, name) or re.search(r"(?:^|\.)embeddings\.", name):
        return "embeddings"
    if re.search(_HEADS, name):
        return "head"
    return "final"


def describe_scopes(shapes: dict[str, tuple]) -> dict[str, dict]:
    """For each preset: the selected tensor names and their total parameter count."""
    import math

    out = {}
    for p in PRESETS:
        sel = [n for n in shapes if _in_preset(n, p)]
        out[p] = {"description": PRESETS[p], "tensors": sel, "n_tensors": len(sel),
                  "n_params": int(sum(math.prod(shapes[n]) for n in sel))}
    return out
