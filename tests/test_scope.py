"""Scope presets across GPT-2, BERT, Llama and GPT-NeoX naming, checked against hand-written lists."""

from __future__ import annotations

import pytest

from taskvec.errors import TaskvecError
from taskvec.scope import PRESETS, describe_scopes, group_of, layer_of, resolve_scope
from tiny import ARCHS, tiny_model




def _names(arch):
    return [k for k, _ in tiny_model(arch).named_parameters()]


# per-layer module names each preset must select (layer 0), and global tensors
EXPECTED = {
    "gpt2": {
        "qkv": {"attn.c_attn.weight", "attn.c_attn.bias"},
        "attention": {"attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight", "attn.c_proj.bias"},
        "mlp": {"mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"},
        "norms": {"ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias"},
        "embeddings_global": {"transformer.wte.weight", "transformer.wpe.weight"},
        "not_body": {"transformer.wte.weight"},
        "prefix": "transformer.h.0.",
    },
    "bert": {
        "qkv": {f"attention.self.{m}.{p}" for m in ("query", "key", "value") for p in ("weight", "bias")},
        "attention": {f"attention.self.{m}.{p}" for m in ("query", "key", "value") for p in ("weight", "bias")}
        | {"attention.output.dense.weight", "attention.output.dense.bias"},
        "mlp": {"intermediate.dense.weight", "intermediate.dense.bias", "output.dense.weight", "output.dense.bias"},
        "norms": {"attention.output.LayerNorm.weight", "attention.output.LayerNorm.bias",
                  "output.LayerNorm.weight", "output.LayerNorm.bias"},
        "embeddings_global": {"embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
                              "embeddings.token_type_embeddings.weight"},
        "not_body": {"embeddings.word_embeddings.weight"},
        "prefix": "encoder.layer.0.",
    },
    "llama": {
        "qkv": {"self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"},
        "attention": {"self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                      "self_attn.o_proj.weight"},
        "mlp": {"mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"},
        "norms": {"input_layernorm.weight", "post_attention_layernorm.weight"},
        "embeddings_global": {"model.embed_tokens.weight"},
        "not_body": {"model.embed_tokens.weight"},
        "prefix": "model.layers.0.",
    },
    "gpt_neox": {
        "qkv": {"attention.query_key_value.weight", "attention.query_key_value.bias"},
        "attention": {"attention.query_key_value.weight", "attention.query_key_value.bias",
                      "attention.dense.weight", "attention.dense.bias"},
        "mlp": {"mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias", "mlp.dense_4h_to_h.weight",
                "mlp.dense_4h_to_h.bias"},
        "norms": {"input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight",
                  "post_attention_layernorm.bias"},
        "embeddings_global": {"gpt_neox.embed_in.weight", "lm_head.weight"},
        "not_body": {"gpt_neox.embed_in.weight", "lm_head.weight"},
        "prefix": "gpt_neox.layers.0.",
    },
}


@pytest.mark.parametrize("arch", ARCHS)
def test_presets_select_the_right_modules(arch):
    names = _names(arch)
    exp = EXPECTED[arch]
    layer0 = exp["prefix"]
    for preset in ("qkv", "attention", "mlp", "norms"):
        sel = {n[len(layer0):] for n in resolve_scope(names, preset) if n.startswith(layer0)}
        assert sel == exp[preset], (arch, preset, sel ^ exp[preset])
    emb = set(resolve_scope(names, "embeddings"))
    assert emb == exp["embeddings_global"]
    body = set(resolve_scope(names, "body"))
    assert body == set(names) - exp["not_body"]
    assert resolve_scope(names, "all") == names
    # presets partition the layer: qkv ⊂ attention, attention ∩ mlp = ∅, norms disjoint from both
    att, mlp, nor = (set(resolve_scope(names, p)) for p in ("attention", "mlp", "norms"))
    assert set(resolve_scope(names, "qkv")) <= att and not (att & mlp) and not (nor & (att | mlp))
    assert set(resolve_scope(names, "attention+mlp")) == att | mlp


def test_regex_lists_and_errors():
    names = _names("llama")
    assert resolve_scope(names, r"layers\.1\..*proj") == [n for n in names if ".layers.1." in n and "proj" in n]
    assert resolve_scope(names, [names[3], names[1]]) == [names[1], names[3]]
    with pytest.raises(TaskvecError, match="neither a preset"):
        resolve_scope(names, "mlp[")
    with pytest.raises(TaskvecError, match="selects none"):
        resolve_scope(names, "c_attn")
    with pytest.raises(TaskvecError, match="'nonsense' is not a preset"):
        resolve_scope(names, "qkv+nonsense")
    with pytest.raises(TaskvecError, match="lacks"):
        resolve_scope(names, ["nope.weight"])


def test_layers_groups_and_describe():
    assert layer_of("transformer.h.11.mlp.c_fc.weight") == 11
    assert layer_of("encoder.layer.3.output.dense.bias") == 3
    assert layer_of("model.layers.0.self_attn.q_proj.weight") == 0
    assert layer_of("transformer.wte.weight") is None
    assert group_of("transformer.wpe.weight") == "embeddings"
    assert group_of("transformer.ln_f.weight") == "final"
    assert group_of("gpt_neox.layers.1.mlp.dense_h_to_4h.bias") == "layer.1"
    m = tiny_model("gpt2")
    d = describe_scopes({k: tuple(v.shape) for k, v in m.named_parameters()})
    assert set(d) == set(PRESETS)
    assert d["all"]["n_params"] == sum(p.numel() for p in m.parameters())
    assert d["qkv"]["n_params"] == 2 * (32 * 96 + 96)
