"""Atomic writes and content hashes. Every file taskvec writes goes through here."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _tmp_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file ordinary permissions
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    tmp = _tmp_beside(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def to_json(obj: Any) -> str:
    """JSON with numpy support; NaN/Inf become null so the file stays standard JSON."""
    return json.dumps(_nan_to_none(obj), indent=2, default=_json_default, allow_nan=False)


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _nan_to_none(obj.tolist())
    if isinstance(obj, np.generic):
        return _nan_to_none(obj.item())
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, to_json(obj) + "\n")


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.asarray(array))
    return Path(path)


OUTPUT_MARKER = ".taskvec-output"
# what folders written before the marker existed hold: a report's, a kernel's or a merged model's record
_EARLIER_OUTPUTS = ("results.json", "ntk.json", "vectors.json", "theory.json", "projection.json", "check.json",
                    "taskvec_merge.json", "taskvec_applied.json")


_MODEL_RECORDS = ("taskvec_merge.json", "taskvec_applied.json")  # models taskvec built (merge, apply_to)


def _holds_model(path: Path) -> str | None:
    """What irreplaceable thing a folder holds (a collection, a model or adapter checkpoint), else None."""
    if (path / "collection.json").is_file():
        return "a taskvec collection (collection.json)"
    weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin")) or any(path.glob("*.pt"))
    if weights and ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
        return "a model checkpoint (config + weights)"
    return None


def built_model(path: Path) -> bool:
    """Whether folder `path` is a model taskvec built (a merge or an apply_to output: it holds the record)."""
    return any((Path(path) / f).is_file() for f in _MODEL_RECORDS)


def _listing(root: Path) -> dict[str, list[int]]:
    """Every file under `root` (but the marker) → [size, mtime_ns]: what taskvec wrote, to compare later."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != OUTPUT_MARKER:
            st = p.stat()
            out[p.relative_to(root).as_posix()] = [st.st_size, st.st_mtime_ns]
    return out


def _changed_since_written(path: Path) -> list[str] | None:
    """Files added or changed in a taskvec output since it was written (per its marker's listing); None when
    the marker holds no listing (written by an older taskvec)."""
    try:
        recorded = json.loads((path / OUTPUT_MARKER).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(recorded, dict):
        return None
    return [name for name, stamp in _listing(path).items() if recorded.get(name) != stamp]


def _nested_model(path: Path) -> str | None:
    """A model checkpoint or collection in a subfolder of `path` (e.g. a trainer's checkpoint-*/), else None."""
    for sub in sorted(p for p in path.rglob("*") if p.is_dir()):
        if _holds_model(sub):
            return sub.relative_to(path).as_posix()
    return None


def check_out_dir(path: str | os.PathLike, *, overwrite: bool = False, inputs=(), internal: bool = False,
                  replaces_models: bool = False) -> None:
    """Raise unless `atomic_dir(path, overwrite=…)` may write there (call it before long work).

    With `overwrite`, a folder is replaced only if taskvec wrote it as an output (marker or record
    file) or it is a derived cache entry — never when it is, or contains, one of `inputs`, nor when it
    holds a collection or a model checkpoint, nor when files were added to or changed in it since taskvec
    wrote it (its marker lists them). `replaces_models`: the caller builds models (merge, apply_to) and may
    replace a model folder taskvec built; report writers never do. `internal`: the caller rebuilds a cache
    entry it owns.
    """
    from .errors import TaskvecError, name_list

    if not str(path).strip():
        raise TaskvecError("--out is empty; give the name of a new folder (e.g. --out results)")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise TaskvecError(f"{path} is a file, not a folder; choose another --out")
    if not internal:
        _check_apart_from_inputs(path, inputs)
    if not path.exists():
        _check_creatable(path)
        return
    if not any(path.iterdir()):
        return
    if not overwrite:
        raise TaskvecError(f"{path} already exists and is not empty; choose another --out, remove it, or pass "
                           f"--overwrite if taskvec wrote it")
    if internal:
        return
    resolved = path.resolve()
    changed = _changed_since_written(path)
    if changed:
        raise TaskvecError(f"{path} holds files added or changed since taskvec wrote it ({name_list(changed, 3)}); "
                           "--overwrite never loses those: move them out, or choose another --out")
    held = _holds_model(path)
    if held:
        why = _why_model_stays(path, changed, replaces_models)
        if why:
            raise TaskvecError(f"{path} holds {held}; {why}: choose another --out or remove it yourself")
    nested = _nested_model(path) if changed is None else None  # a listing already vouches for every file
    if nested:
        raise TaskvecError(f"{path} holds a model or collection in {nested}; --overwrite never replaces those: "
                           "move it out, or choose another --out")
    cache = cache_dir().resolve()
    if any(d in resolved.parents for d in (cache / "ntk", cache / "reports")):  # taskvec's own cache entries
        return
    ours = any((path / f).is_file() for f in (OUTPUT_MARKER,) + _EARLIER_OUTPUTS)
    if not ours:
        raise TaskvecError(f"{path} was not written by taskvec (no {OUTPUT_MARKER}): --overwrite only replaces "
                           f"taskvec's own output folders; choose another --out or remove it yourself")
    foreign = _foreign_files(path) if changed is None else []  # no listing: judge the files by their kind
    if foreign:
        raise TaskvecError(f"{path} holds files taskvec does not write ({name_list(foreign, 3)}); --overwrite never "
                           "loses those: move them out, or choose another --out")


# what a taskvec output folder holds: records, tables, arrays, figures, weights and tokenizer/config files
_OUTPUT_SUFFIXES = {".json", ".jsonl", ".npy", ".npz", ".png", ".pdf", ".svg", ".html", ".safetensors", ".txt",
                    ".model", ".jinja"}


def _foreign_files(path: Path) -> list[str]:
    """Files under `path` of kinds taskvec never writes (a user's notes, sources, data), for a folder whose
    marker holds no listing (written by an older taskvec, or only a record file names it taskvec's)."""
    return [p.relative_to(path).as_posix() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != OUTPUT_MARKER and p.suffix.lower() not in _OUTPUT_SUFFIXES]


def _why_model_stays(path: Path, changed: list[str] | None, replaces_models: bool) -> str | None:
    """Why --overwrite may not replace the model in `path`, or None when it may (taskvec built it, its
    listing vouches for every file, and the caller builds models)."""
    if not built_model(path):
        return "--overwrite never replaces those"
    if changed is None:
        return (f"it lacks taskvec's listing of what it wrote ({OUTPUT_MARKER}), so it may not be (only) "
                "taskvec's; --overwrite never replaces it")
    if not replaces_models:
        return "only `taskvec merge` and TaskVector.apply_to replace a model taskvec built"
    return None


def _check_apart_from_inputs(path: Path, inputs) -> None:
    """Raise if --out is an input, holds one, or lies inside an input folder (inputs are never modified)."""
    from .errors import TaskvecError

    resolved = path.resolve()
    for inp in inputs:
        r = Path(str(inp)).expanduser()
        if not r.exists():
            continue
        r = r.resolve()
        if r == resolved or resolved in r.parents:
            raise TaskvecError(f"--out {path} is (or contains) the input {inp}; --overwrite never replaces an "
                               f"input: choose another --out")
        if r.is_dir() and r in resolved.parents:
            raise TaskvecError(f"--out {path} lies inside the input folder {inp}; taskvec never writes into its "
                               f"inputs: choose an --out outside it")


def _check_creatable(path: Path) -> None:
    """Raise unless the folder `path` can be made: its nearest existing ancestor is a writable folder."""
    from .errors import TaskvecError

    up = path.absolute().parent
    while not up.exists():
        up = up.parent
    if not up.is_dir():
        raise TaskvecError(f"cannot create {path}: {up} is a file, not a folder; choose another --out")
    if not os.access(up, os.W_OK | os.X_OK):
        raise TaskvecError(f"cannot create {path}: {up} is not writable; choose another --out")


PARTIAL_OWNER = ".taskvec-partial-pid"  # inside a `.NAME.partial-*` folder while it is being built


def _sweep_partials(path: Path) -> None:
    """Remove `.NAME.partial-*` folders left beside `path` by a killed run (its recorded pid is gone)."""
    for old in path.parent.glob(f".{path.name}.partial-*"):
        try:
            pid = int((old / PARTIAL_OWNER).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # not ours to judge (no owner record)
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie — killed, not yet reaped by its parent — does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] != "Z"
    except (OSError, ValueError, IndexError):  # no /proc here: trust kill(0)
        return True


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False, inputs=(), internal: bool = False,
               replaces_models: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name and rename it into place when complete.

    An interrupted run removes its temporary folder; a killed one (SIGKILL, power loss) leaves only a
    hidden `.NAME.partial-*` folder, never a folder that looks done, and the next write of `path`
    removes it once its recorded process is gone.
    `overwrite` replaces only what :func:`check_out_dir` allows: never a file, an input, a model folder,
    a collection or anything else a user could lose.
    """
    from .errors import TaskvecError

    check_out_dir(path, overwrite=overwrite, inputs=inputs, internal=internal, replaces_models=replaces_models)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _sweep_partials(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    except OSError as exc:
        raise TaskvecError(f"cannot create {path}: {exc.strerror or exc}; choose another --out") from None
    os.chmod(tmp, 0o777 & ~_umask())
    (tmp / PARTIAL_OWNER).write_text(f"{os.getpid()}\n")  # a later run removes this folder if we are killed
    try:
        yield tmp
        (tmp / PARTIAL_OWNER).unlink(missing_ok=True)
        (tmp / OUTPUT_MARKER).write_text(json.dumps(  # what was written, so --overwrite can tell what was added
            {"written_by": "taskvec; --overwrite may replace this folder while these files are unchanged",
             "files": _listing(tmp)}, indent=1) + "\n")
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def content_hash(*parts: Any) -> str:
    """Stable short hash of JSON-able parts (config dicts, file checksums, strings)."""
    h = hashlib.sha256(json.dumps(_nan_to_none(list(parts)), sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    """Where cached kernels and collections live: $TASKVEC_CACHE or ~/.cache/taskvec."""
    root = os.environ.get("TASKVEC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "taskvec")
    return Path(root)
