"""Tiny *real* transformers models and a real tokenizer, built from code in seconds (no hub).

Shared by every test module: `tiny_model(arch)`, `tiny_tokenizer()`, `save_hf(model, dir)`, `save_gguf(llama, file, tok)`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

ARCHS = ("gpt2", "bert", "llama", "gpt_neox")
CORPUS = [
    "the movie was wonderful and the acting superb",
    "a dull , boring film with terrible pacing",
    "what is 3 plus 4 ? 7",
    "what is 12 minus 5 ? 7",
    "the market rose sharply after the news",
    "i love this phone , battery lasts forever",
    "worst purchase ever , broke in two days",
    "calculate 6 times 7 . 42",
] * 4
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[BOS]", "[EOS]"]


def tiny_tokenizer(vocab_size: int = 128, kind: str = "causal") -> PreTrainedTokenizerFast:
    """A BPE tokenizer trained on a small corpus. kind='causal' prepends [BOS]; 'encoder' wraps in [CLS] … [SEP]."""
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS))
    if kind == "encoder":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
        )
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                       cls_token="[CLS]", sep_token="[SEP]", model_max_length=64)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="[BOS]", eos_token="[EOS]", model_max_length=64)


def tiny_config(arch: str, vocab_size: int = 128, hidden: int = 32, layers: int = 2):
    common = dict(vocab_size=vocab_size)
    if arch == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=64, resid_pdrop=0.0,
                          embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=4, eos_token_id=5, **common)
    if arch == "bert":
        return BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                          intermediate_size=2 * hidden, max_position_embeddings=64, pad_token_id=0,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common)
    if arch == "llama":
        return LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=64,
                           tie_word_embeddings=True, bos_token_id=4, eos_token_id=5, pad_token_id=0, **common)
    if arch == "gpt_neox":
        return GPTNeoXConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                             intermediate_size=2 * hidden, max_position_embeddings=64, rotary_pct=0.5,
                             bos_token_id=4, eos_token_id=5, pad_token_id=0, **common)
    raise ValueError(f"unknown arch {arch!r}; one of {ARCHS}")


_CLASSES = {"gpt2": GPT2LMHeadModel, "bert": BertModel, "llama": LlamaForCausalLM, "gpt_neox": GPTNeoXForCausalLM}


def tiny_model(arch: str, seed: int = 0, **config_kw):
    """A randomly initialised tiny model of `arch` with eager attention, in eval mode."""
    torch.manual_seed(seed)
    config = tiny_config(arch, **config_kw)
    config._attn_implementation = "eager"
    kwargs = {"add_pooling_layer": False} if arch == "bert" else {}
    model = _CLASSES[arch](config, **kwargs)
    return model.eval()


def perturbed(model, scale: float = 1e-2, seed: int = 1):
    """A copy of `model` with every floating parameter nudged: a stand-in 'fine-tune' with real files."""
    import copy

    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return out


def save_hf(model, path: str | Path, tokenizer=None, **kw) -> Path:
    """save_pretrained (+ tokenizer) into `path`; kw passes through (max_shard_size, safe_serialization)."""
    path = Path(path)
    model.save_pretrained(path, **kw)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def base_and_finetunes(root: str | Path, arch: str, seeds, scale: float = 1e-2) -> tuple[Path, list[Path]]:
    """A tiny `arch` base (seed 0, with tokenizer) saved in root/base and one perturbed fine-tune per seed in
    root/ft<seed>: a small real collection on disk."""
    root = Path(root)
    base = tiny_model(arch, seed=0)
    save_hf(base, root / "base", tiny_tokenizer())
    return root / "base", [save_hf(perturbed(base, scale=scale, seed=s), root / f"ft{s}") for s in seeds]


# prompt/target probes for causal-LM outputs (logprob): short, varied, all in the tiny tokenizer's corpus
PROBE_PAIRS = [{"prompt": "what is 3 plus 4 ?", "target": " 7"},
               {"prompt": "the", "target": " movie was wonderful"},
               {"prompt": "calculate 6 times 7 .", "target": " 42"},
               {"prompt": "i love this phone", "target": " , battery lasts forever"},
               {"prompt": "worst", "target": " purchase ever"},
               {"prompt": "the market rose", "target": " sharply after the news"},
               {"prompt": "a dull , boring", "target": " film"},
               {"prompt": "what is 12 minus 5 ?", "target": " 7"}]


def edited(src: str | Path, dst: str | Path, edit) -> Path:
    """Copy an HF folder to `dst`, applying `edit(state_dict)` to its model.safetensors (a hand-broken model)."""
    import shutil

    from safetensors.torch import load_file, save_file

    dst = Path(dst)
    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    edit(sd)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _gguf_permute(w, n_head: int):
    """llama.cpp's row order for q/k projections (transformers undoes it when reading GGUF)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def save_gguf(model, path: str | Path, tokenizer, edit=None) -> Path:
    """Write a tiny llama `model` and its BPE `tokenizer` as an F32 GGUF file, the layout llama.cpp's converter
    writes; `edit(state_dict)` first changes the tensors (a hand-broken GGUF). Needs the `gguf` package."""
    import json

    import gguf

    cfg, path = model.config, Path(path)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in tokenizer.all_special_tokens else 1 for t in tokens])
    w.add_token_merges([" ".join(m) for m in json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]])
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    sd = {k: v.detach().float().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    if edit is not None:
        edit(sd)
    heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
    for name, tensor in sd.items():
        n_head = next((h for proj, h in heads.items() if f".{proj}." in name), None)
        array = tensor.numpy() if n_head is None else _gguf_permute(tensor.numpy(), n_head)
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
