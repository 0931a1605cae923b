"""Output functions against hand computations with the plain transformers forward."""

import pytest
import torch

from taskvec.errors import TaskvecError, TaskvecWarning
from taskvec.models import load_model
from taskvec.outputs import HEAD_FILE, EncoderRegressor, LinearHead, encode_prompt_target, make_output, mean_pool
from tiny import tiny_model, tiny_tokenizer



PAIRS = [{"prompt": "what is 3 plus 4 ?", "target": " 7"},
         {"prompt": "the", "target": " movie was wonderful"},
         {"prompt": "calculate 6 times 7 .", "target": " 42"}]
TEXTS = [{"text": "the movie was wonderful", "label": 1},
         {"text": "dull", "label": 0},
         {"text": "what is 3 plus 4 ? 7 and more", "label": 1}]


def _params(model):
    return {k: v.detach() for k, v in model.named_parameters()}


def test_boundary_tokenisation_is_prompt_then_target():
    tok = tiny_tokenizer()
    ids, n_prompt = encode_prompt_target(tok, "what is 3 plus", " 4 ? 7")
    assert ids[:n_prompt] == tok("what is 3 plus")["input_ids"]
    assert ids[n_prompt:] == tok(" 4 ? 7", add_special_tokens=False)["input_ids"]
    # a word split across the boundary is not merged: "wonder"+"ful" stays two pieces
    ids2, n2 = encode_prompt_target(tok, "the movie was wonder", "ful")
    assert ids2[n2:] == tok("ful", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
def test_logprob_matches_manual_sum(arch):
    model = load_model(tiny_model(arch, seed=1))
    tok = tiny_tokenizer()
    f_sum, f_mean = make_output("logprob", model, tok), make_output("logprob-mean", model, tok)
    batch = f_sum.encode(PAIRS)
    got_sum, got_mean = f_sum(_params(model), batch)[:, 0], f_mean(_params(model), batch)[:, 0]
    for i, ex in enumerate(PAIRS):
        ids, n_prompt = encode_prompt_target(tok, ex["prompt"], ex["target"])
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
        terms = [logp[t - 1, ids[t]] for t in range(n_prompt, len(ids))]
        assert torch.allclose(got_sum[i], sum(terms), atol=1e-5)
        assert torch.allclose(got_mean[i], sum(terms) / len(terms), atol=1e-5)


def test_padding_does_not_change_outputs():
    model = load_model(tiny_model("llama", seed=2))
    f = make_output("logprob", model, tiny_tokenizer())
    together = f(_params(model), f.encode(PAIRS))
    alone = torch.cat([f(_params(model), f.encode([ex])) for ex in PAIRS])
    assert torch.allclose(together, alone, atol=1e-6)


def test_label_word_logits_and_margin():
    model = load_model(tiny_model("gpt2", seed=4))
    tok = tiny_tokenizer()
    words = [" dull", " wonderful", " boring"]
    f = make_output("logits", model, tok, label_words=words)
    fm = make_output("margin", model, tok, label_words=words)
    f2 = make_output("margin", model, tok, label_words=words[:2])
    batch = f.encode(TEXTS)
    z = f(_params(model), batch)
    first = [tok(w, add_special_tokens=False)["input_ids"][0] for w in words]
    for i, ex in enumerate(TEXTS):
        ids = tok(ex["text"])["input_ids"]
        with torch.no_grad():
            last = model(torch.tensor([ids])).logits[0, -1]
        assert torch.allclose(z[i], last[first], atol=1e-5)
        y = ex["label"]
        others = torch.cat([z[i, :y], z[i, y + 1:]])
        assert torch.allclose(fm(_params(model), batch)[i, 0], z[i, y] - torch.logsumexp(others, 0), atol=1e-5)
    assert torch.allclose(f2(_params(model), f2.encode(TEXTS))[:, 0], z[:, 1] - z[:, 0], atol=1e-5)


def test_regression_head_matches_hf_mask_and_module(tmp_path):
    body = load_model(tiny_model("bert", seed=5))
    tok = tiny_tokenizer(kind="encoder")
    head = LinearHead(32, 1, seed=7)
    head.save(tmp_path)
    loaded = LinearHead.load(tmp_path)
    assert torch.equal(loaded.linear.weight, head.linear.weight)
    from safetensors import safe_open

    with safe_open(str(tmp_path / HEAD_FILE), "pt") as fh:
        assert fh.metadata()["pooling"] == "mean" and fh.get_tensor("weight").shape == (1, 32)
    f = make_output("regression", body, tok, head=loaded)
    batch = f.encode(TEXTS)
    got = f(_params(body), batch)
    with torch.no_grad():  # transformers' own 2-D mask path
        hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        ref = head(mean_pool(hidden, batch["attention_mask"]))
        module = EncoderRegressor(body, loaded)(batch["input_ids"], batch["attention_mask"])
    assert torch.allclose(got, ref, atol=1e-5) and torch.allclose(got, module, atol=1e-6)
    reg = EncoderRegressor(body, loaded)
    assert all(not p.requires_grad for p in reg.head.parameters())


def test_bad_inputs(tmp_path):
    causal, tok = load_model(tiny_model("gpt2")), tiny_tokenizer()
    f = make_output("logprob", causal, tok)
    with pytest.raises(TaskvecError, match="example 1: target '' tokenises to nothing"):
        f.encode([PAIRS[0], {"prompt": "the", "target": ""}])
    with pytest.raises(TaskvecError, match=r"example 0 of the probe set \('the the .*exceed the model's context "
                                           r"length \(64\); shorten it"):
        f.encode([{"prompt": "the " * 70, "target": " 7"}])
    short = make_output("logprob", causal, tok, max_length=8)
    with pytest.raises(TaskvecError, match=r"exceed --max-length \(8\); shorten it or raise --max-length"):
        short.encode([{"prompt": "the " * 9, "target": " 7"}])
    with pytest.raises(TaskvecError, match="needs 'prompt' and 'target'"):
        f.encode([{"text": "hello"}])
    with pytest.raises(TaskvecError, match="unknown output kind"):
        make_output("probability", causal, tok)
    with pytest.raises(TaskvecError, match="label words"):
        make_output("logits", causal, tok)
    enc, etok = load_model(tiny_model("bert")), tiny_tokenizer(kind="encoder")
    with pytest.raises(TaskvecError, match="needs a causal LM"):
        make_output("logprob", enc, etok)
    with pytest.raises(TaskvecError, match="needs a head"):
        make_output("regression", enc, etok)
    with pytest.raises(TaskvecError, match="no regression/classification head"):
        LinearHead.load(tmp_path)
    with pytest.raises(TaskvecError, match="hidden size"):
        make_output("regression", enc, etok, head=LinearHead(16, 1))
    fl = make_output("logits", enc, etok, head=LinearHead(32, 3))
    with pytest.raises(TaskvecError, match="class label 5 outside"):
        fl.encode([{"text": "dull", "label": 5}])
    with pytest.raises(TaskvecError, match=r"2 label words \['bad', 'good'\] for a head with 3 classes; give one "
                                           "word per class"):
        make_output("margin", enc, etok, head=LinearHead(32, 3), label_words=["bad", "good"])
    assert make_output("margin", enc, etok, head=LinearHead(32, 3), label_words=["bad", "so-so", "good"]).m == 1


def test_unknown_label_words_and_bad_max_length_are_refused():
    model, tok = load_model(tiny_model("gpt2", seed=4)), tiny_tokenizer()
    assert tok("zzzz", add_special_tokens=False)["input_ids"][0] == tok.unk_token_id  # really unknown here
    with pytest.raises(TaskvecError, match="label word 'zzzz' is not in the tokenizer's vocabulary .*'\\[UNK\\]'"):
        make_output("margin", model, tok, label_words=[" dull", "zzzz"])
    assert make_output("margin", model, tok, label_words=[" dull", " wonderful"]).label_ids.tolist() == [
        tok(w, add_special_tokens=False)["input_ids"][0] for w in (" dull", " wonderful")]
    for bad in (0, -1):
        with pytest.raises(TaskvecError, match=f"--max-length must be a positive number of tokens \\(got {bad}\\)"):
            make_output("logprob", model, tok, max_length=bad)


@pytest.mark.parametrize("kind", ["logprob", "logprob-mean", "regression"])
def test_label_words_are_refused_for_outputs_without_classes(kind):
    """They would be stored with the kernel and make `project --kernel` refuse it later."""
    model, tok = load_model(tiny_model("gpt2", seed=4)), tiny_tokenizer()
    with pytest.raises(TaskvecError, match=rf"output '{kind}' takes no label words \(got --label-words bad,great\); "
                                           r"they name the classes of 'logits' and 'margin' — leave --label-words out"):
        make_output(kind, model, tok, label_words=["bad", "great"])


def test_a_label_word_of_several_tokens_warns_and_uses_its_first_token(capsys):
    import warnings

    from taskvec.cli import _one_line_warnings

    model, tok = load_model(tiny_model("gpt2", seed=4)), tiny_tokenizer()
    assert tok.tokenize(" dull") == ["dul", "l"] and tok.tokenize(" wonderful") == ["wonderful"]
    with pytest.warns(TaskvecWarning, match=r"label word ' dull' is 2 tokens \['dul', 'l'\]; the logit of its "
                                            r"first token 'dul' stands for it"):
        f = make_output("margin", model, tok, label_words=[" dull", " wonderful"])
    assert f.label_ids.tolist() == [tok.convert_tokens_to_ids("dul"), tok.convert_tokens_to_ids("wonderful")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one-token words: no warning at all
        make_output("margin", model, tok, label_words=[" wonderful", " plus"])
    # the CLI prints taskvec's warnings as one line, without Python's file:line prefix
    with warnings.catch_warnings(), _one_line_warnings("ntk"):
        warnings.simplefilter("always")
        make_output("margin", model, tok, label_words=[" dull", " wonderful"])
    err = capsys.readouterr().err
    assert err.startswith("taskvec ntk: warning: label word ' dull' is 2 tokens") and "outputs.py" not in err


def test_errors_name_file_and_line_when_the_examples_come_from_a_file():
    model, tok = load_model(tiny_model("gpt2", seed=4)), tiny_tokenizer()
    f = make_output("logprob", model, tok, source="probes.jsonl")
    with pytest.raises(TaskvecError, match=r"^probes.jsonl:3: output 'logprob' needs 'prompt' and 'target'"):
        f.encode([PAIRS[0], PAIRS[1], {"text": "hello"}])
    with pytest.raises(TaskvecError, match=r"^probes.jsonl:1 \('the the .*exceed the model's context length"):
        f.encode([{"prompt": "the " * 70, "target": " 7"}])
