"""Probe sets as JSONL: one JSON object per line, ``{"prompt", "target"}`` or ``{"text", "label"}``."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .errors import TaskvecError

FIELD_SETS = ({"prompt", "target"}, {"text"})


def read_jsonl(path, *, limit: int | None = None) -> list[dict]:
    """Read a JSONL probe set. Blank or malformed lines are errors naming the line number."""
    path = Path(path)
    if path.is_dir():
        raise TaskvecError(f"{path}: is a folder; a probe set is one .jsonl file (one JSON object per line) — "
                           f"pass that file")
    if not path.is_file():
        raise TaskvecError(f"{path}: probe-set file not found")
    rows: list[dict] = []
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise TaskvecError(f"{path}:{line}: not valid UTF-8 (byte {exc.start}); save the file as UTF-8") from None
    lines = text.splitlines(keepends=True)
    while lines and not lines[-1].strip():  # blank lines at the end of the file are harmless
        lines.pop()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            raise TaskvecError(f"{path}:{lineno}: empty line; every line must hold one JSON object "
                               f"(remove blank lines)")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskvecError(f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise TaskvecError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        if not any(fields <= obj.keys() for fields in FIELD_SETS):
            raise TaskvecError(f"{path}:{lineno}: needs fields 'prompt'+'target' or 'text' (+'label'); "
                               f"got {sorted(obj)}")
        for key in ("prompt", "target", "text"):
            if key in obj and not isinstance(obj[key], str):
                raise TaskvecError(f"{path}:{lineno}: field {key!r} must be a string")
        label = obj.get("label")
        if isinstance(label, bool) or (isinstance(label, float) and not math.isfinite(label)):
            raise TaskvecError(f"{path}:{lineno}: label {label!r} is not usable; give a finite number (regression) "
                               f"or a class index / label string")
        rows.append(obj)
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise TaskvecError(f"{path}: no examples (the file is empty)")
    return rows
