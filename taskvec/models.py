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


def check_device(device) -> torch.device:
    """The torch device named by `device`, refused with a clear message where torch here cannot use it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise TaskvecError(f"unknown device {str(device)!r}; use --device cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise TaskvecError(f"--device {device}: torch here has no CUDA (a CPU-only build, torch "
                               f"{torch.__version__}); use --device cpu or install a CUDA build of torch")
        if not torch.cuda.is_available():
            raise TaskvecError(f"--device {device}: no CUDA device is visible (torch.cuda.is_available() is False); "
                               f"use --device cpu or check the driver / CUDA_VISIBLE_DEVICES")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise TaskvecError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible "
                               f"(cuda:0..cuda:{torch.cuda.device_count() - 1}); pick one of those")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise TaskvecError(f"--device {device}: torch here has no usable MPS (Apple GPU) backend; use --device cpu")
    elif dev.type == "meta":
        raise TaskvecError("--device meta holds no weights; use --device cpu or cuda")
    elif dev.type != "cpu":
        try:
            torch.empty(1, device=dev)
        except (RuntimeError, AssertionError) as exc:
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
            raise TaskvecError(f"--device {device}: torch here cannot use it ({first}); use --device cpu") from None
    return dev


def _check_checkpoint_files(source: str) -> None:
    """Read the weight files' headers with taskvec's reader first, so truncated or corrupt files give its
    clear message instead of a reader traceback deep inside transformers."""
    from .checkpoints import open_checkpoint

    if not os.path.isdir(source) and not source.endswith((".safetensors", ".index.json")):
        return
    ckpt = open_checkpoint(source)
    ckpt.close()


def _describe_keys(keys) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    return ", ".join(repr(k) for k in keys[:3]) + more


def _is_tied_or_buffer(name: str, buffers: set, params: dict, missing: set) -> bool:
    """Whether missing key `name` is a buffer or a parameter sharing storage with a loaded one (tied)."""
    if name in buffers:
        return True
    p = params.get(name)
    if p is None:
        return False
    ptr = p.data_ptr()
    return any(q.data_ptr() == ptr for n, q in params.items() if n != name and n not in missing)


def _is_foreign(model: nn.Module, key: str, buffers: set) -> bool:
    """Whether an unexpected checkpoint key belongs to a part this model deliberately lacks (a pooler or task
    head dropped when loading a body) or is a buffer, rather than to one of its own modules."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix and key.startswith(prefix + ".") and not hasattr(model, prefix):
        key = key[len(prefix) + 1:]
    if key in buffers:
        return True
    top = key.split(".", 1)[0]
    return not hasattr(model, top) or not isinstance(getattr(model, top), nn.Module)


def check_loading_info(model: nn.Module, info: dict, source: str) -> None:
    """Refuse a model whose weights did not all come from the checkpoint (missing weights are randomly
    initialised, so every result would change from run to run) or whose checkpoint disagrees with its config."""
    missing = set(info.get("missing_keys") or ())
    buffers = {n for n, _ in model.named_buffers()}
    params = dict(model.named_parameters(remove_duplicate=False))
    real = sorted(k for k in missing if not _is_tied_or_buffer(k, buffers, params, missing))
    gguf = _is_gguf(source)
    cfg = "the GGUF file's metadata" if gguf else "config.json"
    fix = "re-export the GGUF file from the complete model" if gguf else "fix config.json or re-save the model"
    if real:
        raise TaskvecError(f"{source}: the checkpoint lacks {len(real)} weight(s) the model needs "
                           f"({_describe_keys(real)}); transformers would initialise them randomly — " +
                           (fix if gguf else "re-save the complete model with save_pretrained, or check --kind and "
                                             "config.json"))
    mism = [tuple(m) for m in info.get("mismatched_keys") or ()]
    if mism:
        name, shape_ckpt, shape_model = (list(mism[0]) + [None, None])[:3]
        more = f" (and {len(mism) - 1} more)" if len(mism) > 1 else ""
        raise TaskvecError(f"{source}: weight {name!r} has shape {tuple(shape_ckpt or ())} in the checkpoint but "
                           f"{tuple(shape_model or ())} in the model built from {cfg}{more}; {cfg} "
                           f"and the weights disagree — {fix}")
    extra = sorted(k for k in info.get("unexpected_keys") or () if not _is_foreign(model, k, buffers))
    if extra:
        raise TaskvecError(f"{source}: the checkpoint holds {len(extra)} weight(s) the model built from {cfg} "
                           f"has no place for ({_describe_keys(extra)}); {cfg} and the weights disagree "
                           f"(e.g. the layer count) — {fix}")


def check_finite_weights(model: nn.Module, source: str) -> None:
    """Refuse NaN/Inf parameters, naming the first such tensor: any one makes f(x; θ) and the kernel non-finite."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            bad = int((~torch.isfinite(p)).sum())
            raise TaskvecError(f"{source}: tensor {name!r} contains {bad} NaN/Inf values; the checkpoint is corrupt "
                               f"or overflowed — re-export it")


def _checked(loaded, source: str) -> nn.Module:
    """The model of a `from_pretrained(..., output_loading_info=True)` result, once its loading info and
    weights pass :func:`check_loading_info` and :func:`check_finite_weights`."""
    model, info = loaded
    check_loading_info(model, info, source)
    check_finite_weights(model, source)
    return model


def load_model(source, *, kind: str = "auto", dtype: torch.dtype = torch.float32, device: str = "cpu",
               cache: bool = True) -> nn.Module:
    """Load a causal LM or an encoder body ready for kernels.

    source: a model object (just prepared), a Hugging Face folder, a `.gguf` file (dequantised by
    transformers, then cached as safetensors so the next load is fast) or a hub id.
    kind='encoder' loads the bare body (`AutoModel`) without the pooler; 'causal-lm' loads
    `AutoModelForCausalLM`. Always eager attention, eval mode, dropout off. Weights missing from the
    checkpoint (other than tied ones and buffers), weights of the wrong shape and NaN/Inf weights are refused.
    """
    if kind not in KINDS:
        raise TaskvecError(f"unknown model kind {kind!r}; choose one of {KINDS}")
    check_device(device)
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
    if os.path.exists(source):
        _check_checkpoint_files(source)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError) as exc:
        raise TaskvecError(f"{source}: cannot read the model config ({exc}); only architectures built into "
                           f"transformers load (remote code is never run)") from exc
    if kind == "auto":
        kind = detect_kind(config.to_dict())
    config._attn_implementation = "eager"
    common = dict(config=config, dtype=dtype, attn_implementation="eager", output_loading_info=True,
                  ignore_mismatched_sizes=True)
    try:
        if kind == "causal-lm":
            loaded = AutoModelForCausalLM.from_pretrained(source, **common)
        else:
            loaded = AutoModel.from_pretrained(source, **common, **_no_pooler_kwargs(config))
    except (OSError, ValueError) as exc:
        raise TaskvecError(f"{source}: cannot load as {kind} ({exc})") from exc
    return prepare_model(_checked(loaded, source).to(device))


def _gguf_cache_folder(path: Path) -> Path:
    return cache_dir() / "gguf" / f"{path.stem}-{sha256_file(path)[:16]}"


def _load_gguf(path: Path, *, dtype, device, cache: bool) -> nn.Module:
    """Dequantise a GGUF causal LM via transformers (with load_model's weight checks); cache it as a
    safetensors folder."""
    from transformers import AutoModelForCausalLM

    if not path.is_file():
        raise TaskvecError(f"{path}: GGUF file not found")
    common = dict(attn_implementation="eager", output_loading_info=True, ignore_mismatched_sizes=True)
    folder = _gguf_cache_folder(path) if cache else None
    if folder is not None and (folder / "config.json").is_file():
        model = _checked(AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **common), str(path))
        return prepare_model(model.to(device))
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                      **common)
    except ImportError as exc:
        raise TaskvecError(f"{path}: loading GGUF needs the `gguf` and `accelerate` packages "
                           f"(pip install 'taskvec[demo]')") from exc
    except (OSError, ValueError, KeyError) as exc:
        raise TaskvecError(f"{path}: transformers cannot read this GGUF file ({exc})") from exc
    model = _checked(loaded, str(path))
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


# files that hold a tokenizer's vocabulary (tokenizer.json, vocab.json / vocab.txt, merges.txt, sentencepiece
# *.model, tiktoken files); with tokenizer_config.json, the files a tokenizer folder holds
VOCAB_FILES = ("tokenizer.json", "vocab*", "merges.txt", "*.model", "*.tiktoken")
TOKENIZER_FILES = ("tokenizer_config.json", *VOCAB_FILES)
# tokenizer files that are plain JSON (tokenizer.json is checked by parsing it with `tokenizers`)
_JSON_TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json")
_COPY_TOKENIZER = ("copy the base model's tokenizer files into it, or save them there with "
                   "tokenizer.save_pretrained")


def _has_any(folder: Path, patterns) -> bool:
    return any(any(folder.glob(pattern)) for pattern in patterns)


def _check_tokenizer_files(folder: Path) -> None:
    """Refuse a model folder without tokenizer files: transformers would quietly build an empty default one."""
    if not _has_any(folder, TOKENIZER_FILES):
        raise TaskvecError(f"{folder}: no tokenizer files in this model folder (tokenizer.json, tokenizer_config.json, "
                           f"vocab.*, merges.txt, *.model); {_COPY_TOKENIZER}")


def _check_tokenizer_not_empty(tok, source: str) -> None:
    """Refuse a tokenizer with no tokens besides its special ones, or one that tokenises plain text to nothing."""
    ordinary = len(tok) - len(set(tok.all_special_ids))
    if ordinary <= 0 or not tok("hello world", add_special_tokens=False)["input_ids"]:
        raise TaskvecError(f"{source}: the tokenizer is empty ({len(tok)} token(s), {max(ordinary, 0)} besides the "
                           f"special ones); {_COPY_TOKENIZER}")


def _first_line(exc: BaseException) -> str:
    """The first non-blank line of an exception's message, without a trailing colon (its type name if blank)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0].rstrip(":").strip() if lines else type(exc).__name__


def _broken_tokenizer_file(folder: Path) -> tuple[Path, str] | None:
    """The first tokenizer file in `folder` that does not parse, with the parser's reason; None if all do."""
    from tokenizers import Tokenizer

    readers = {"tokenizer.json": lambda path: Tokenizer.from_file(str(path))}
    readers.update((name, lambda path: json.loads(path.read_text(encoding="utf-8"))) for name in _JSON_TOKENIZER_FILES)
    for name, read in readers.items():
        path = folder / name
        if path.is_file():
            try:
                read(path)
            except Exception as exc:  # tokenizers raises bare Exception; json / decoding raise ValueError
                return path, _first_line(exc)
    return None


def _tokenizer_error(source: str, exc: BaseException) -> TaskvecError:
    """One line for a tokenizer that does not load: the broken file, the missing vocabulary, or the first line of
    transformers' reason."""
    folder = Path(source)
    if folder.is_dir():
        broken = _broken_tokenizer_file(folder)
        if broken is not None:
            return TaskvecError(f"{broken[0]}: the tokenizer file is broken or incomplete ({broken[1]}); "
                                f"{_COPY_TOKENIZER}")
        if not _has_any(folder, VOCAB_FILES):
            return TaskvecError(f"{source}: tokenizer_config.json but no vocabulary file (tokenizer.json, vocab.*, "
                                f"merges.txt, *.model or *.tiktoken); {_COPY_TOKENIZER}")
    return TaskvecError(f"{source}: cannot load a tokenizer ({_first_line(exc)}); save one beside the model "
                        f"(tokenizer.save_pretrained)")


def _auto_tokenizer(source: str):
    """AutoTokenizer for a model folder, hub id or GGUF file (the GGUF's cached folder if it has a tokenizer)."""
    from transformers import AutoTokenizer

    if not _is_gguf(source):
        return AutoTokenizer.from_pretrained(source)
    path = Path(source)
    folder = _gguf_cache_folder(path)
    if (folder / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(folder)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def load_tokenizer(source):
    """The tokenizer beside a model folder / GGUF file / hub id, with a pad token (EOS if none).
    A folder without tokenizer files, a broken and an empty tokenizer are refused in one line."""
    source = str(source)
    if not _is_gguf(source):
        _check_local_files(source)
        if os.path.isdir(source):
            _check_tokenizer_files(Path(source))
    try:
        tok = _auto_tokenizer(source)
    except Exception as exc:  # transformers / tokenizers raise many types (and bare Exception) for bad files
        raise _tokenizer_error(source, exc) from exc
    _check_tokenizer_not_empty(tok, source)
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
