"""Load a model for kernels and JVPs: eager attention, eval mode, dropout off, no pooler, GGUF ok.

Forward-mode AD (JVPs) only works with eager attention, and every function a kernel is taken of must
be deterministic, so every model taskvec builds goes through :func:`prepare_model`.
`trust_remote_code` is never passed: only architectures that ship with transformers load.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import torch
from torch import nn

from .errors import TaskvecError
from .io import atomic_dir, cache_dir, sha256_file

KINDS = ("auto", "causal-lm", "encoder")
# model_type values whose bare body is an encoder (mean-pooled by taskvec's heads)
ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "mpnet", "deberta", "deberta-v2",
                 "albert", "camembert", "modernbert", "nomic_bert", "ernie"}


def prepare_model(model: nn.Module) -> nn.Module:
    """Eval mode and every dropout probability set to 0, so f(x; θ) is a deterministic function."""
    model.eval()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    if config is not None:
        for key in ("attention_dropout", "attention_probs_dropout_prob", "attn_pdrop", "hidden_dropout",
                    "hidden_dropout_prob", "resid_pdrop", "embd_pdrop", "dropout"):
            if isinstance(getattr(config, key, None), float):
                setattr(config, key, 0.0)
        if getattr(config, "_attn_implementation", "eager") != "eager":
            try:
                config._attn_implementation = "eager"
            except Exception:  # pragma: no cover - read-only on exotic configs
                pass
    return model


def _is_gguf(source: str) -> bool:
    return str(source).lower().endswith(".gguf")


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise TaskvecError(f"{folder}: no config.json; point at a Hugging Face model folder, a .gguf file "
                           f"or a hub id")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TaskvecError(f"{path}: not valid JSON ({exc}); re-save the model with save_pretrained") from exc


def detect_kind(config: dict) -> str:
    """'causal-lm' or 'encoder' from a config dict (architectures, then model_type)."""
    archs = config.get("architectures") or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal-lm"
    if config.get("model_type") in ENCODER_TYPES:
        return "encoder"
    if config.get("is_decoder") or config.get("model_type") in {"gpt2", "llama", "gpt_neox", "mistral", "qwen2",
                                                                 "phi", "gemma", "opt", "falcon", "gptj"}:
        return "causal-lm"
    raise TaskvecError(f"cannot tell whether model_type={config.get('model_type')!r} "
                       f"(architectures={archs}) is a causal LM or an encoder; pass kind='causal-lm' or 'encoder'")


def _no_pooler_kwargs(config_obj) -> dict:
    """`add_pooling_layer=False` for bodies whose class accepts it (BERT-style); else nothing."""
    from transformers import AutoModel

    try:
        cls = AutoModel._model_mapping[type(config_obj)]
    except KeyError:
        return {}
    return {"add_pooling_layer": False} if "add_pooling_layer" in inspect.signature(cls.__init__).parameters else {}


def _check_local_files(source: str) -> None:
    if os.path.exists(source) or _is_gguf(source):
        return
    if os.environ.get("HF_HUB_OFFLINE") == "1" or source.startswith((".", "/", "~")):
        raise TaskvecError(f"{source}: no such file or folder (and hub downloads are off); "
                           f"check the path or pass a local model folder")


def load_model(source, *, kind: str = "auto", dtype: torch.dtype = torch.float32, device: str = "cpu",
               cache: bool = True) -> nn.Module:
    """Load a causal LM or an encoder body ready for kernels.

    source: a model object (just prepared), a Hugging Face folder, a `.gguf` file (dequantised by
    transformers, then cached as safetensors so the next load is fast) or a hub id.
    kind='encoder' loads the bare body (`AutoModel`) without the pooler; 'causal-lm' loads
    `AutoModelForCausalLM`. Always eager attention, eval mode, dropout off.
    """
    if kind not in KINDS:
        raise TaskvecError(f"unknown model kind {kind!r}; choose one of {KINDS}")
    if isinstance(source, nn.Module):
        return prepare_model(source.to(device=device, dtype=dtype))
    source = str(source)
    _check_local_files(source)
    if _is_gguf(source):
        if kind == "encoder":
            raise TaskvecError(f"{source}: GGUF files hold causal LMs here; use kind='causal-lm'")
        return _load_gguf(Path(source), dtype=dtype, device=device, cache=cache)
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    if os.path.isdir(source):
        cfg = _read_config(Path(source))
        if kind == "auto":
            kind = detect_kind(cfg)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError) as exc:
        raise TaskvecError(f"{source}: cannot read the model config ({exc}); only architectures built into "
                           f"transformers load (remote code is never run)") from exc
    if kind == "auto":
        kind = detect_kind(config.to_dict())
    config._attn_implementation = "eager"
    try:
        if kind == "causal-lm":
            model = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=dtype,
                                                         attn_implementation="eager")
        else:
            model = AutoModel.from_pretrained(source, config=config, dtype=dtype, attn_implementation="eager",
                                              **_no_pooler_kwargs(config))
    except (OSError, ValueError) as exc:
        raise TaskvecError(f"{source}: cannot load as {kind} ({exc})") from exc
    return prepare_model(model.to(device))


def _gguf_cache_folder(path: Path) -> Path:
    return cache_dir() / "gguf" / f"{path.stem}-{sha256_file(path)[:16]}"


def _load_gguf(path: Path, *, dtype, device, cache: bool) -> nn.Module:
    """Dequantise a GGUF causal LM via transformers; cache it as a safetensors folder."""
    from transformers import AutoModelForCausalLM

    if not path.is_file():
        raise TaskvecError(f"{path}: GGUF file not found")
    folder = _gguf_cache_folder(path) if cache else None
    if folder is not None and (folder / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager")
        return prepare_model(model.to(device))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                     attn_implementation="eager")
    except ImportError as exc:
        raise TaskvecError(f"{path}: loading GGUF needs the `gguf` and `accelerate` packages "
                           f"(pip install 'taskvec[demo]')") from exc
    except (OSError, ValueError, KeyError) as exc:
        raise TaskvecError(f"{path}: transformers cannot read this GGUF file ({exc})") from exc
    # The dequantised weights are plain float tensors; drop the GGUF quantizer marker so that
    # save_pretrained writes an ordinary safetensors folder that reloads in a fraction of a second.
    model.hf_quantizer = None
    for obj in (model, model.config):
        if hasattr(obj, "quantization_config"):
            try:
                delattr(obj, "quantization_config")
            except AttributeError:
                pass
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    if folder is not None:
        with atomic_dir(folder, overwrite=True, internal=True) as tmp:
            model.save_pretrained(tmp)
            try:
                load_tokenizer(str(path)).save_pretrained(tmp)
            except TaskvecError:
                pass
    return prepare_model(model.to(device=device, dtype=dtype))


def load_tokenizer(source):
    """The tokenizer beside a model folder / GGUF file / hub id, with a pad token (EOS if none)."""
    from transformers import AutoTokenizer

    source = str(source)
    try:
        if _is_gguf(source):
            path = Path(source)
            folder = _gguf_cache_folder(path)
            if (folder / "tokenizer_config.json").is_file():
                tok = AutoTokenizer.from_pretrained(folder)
            else:
                tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        else:
            _check_local_files(source)
            tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError) as exc:
        raise TaskvecError(f"{source}: cannot load a tokenizer ({exc}); save one beside the model "
                           f"(tokenizer.save_pretrained)") from exc
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise TaskvecError(f"{source}: tokenizer has neither a pad nor an EOS token; add a pad token")
        tok.pad_token = tok.eos_token
    return tok


def context_length(model: nn.Module) -> int | None:
    """Longest sequence the model accepts (positions), or None if unbounded/unknown."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
