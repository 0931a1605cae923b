"""Write a safetensors file one tensor at a time: the header is known from the plan (names, dtypes,
shapes), so only the tensor being written is ever in memory — the merge stays one tensor per model."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Sequence

import torch

ST_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
            torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
            torch.bool: "BOOL"}


class SafetensorsWriter:
    """`with SafetensorsWriter(path, [(name, dtype, shape), ...]) as w: w.write(name, tensor)` in plan order."""

    def __init__(self, path: str | Path, plan: Sequence[tuple[str, torch.dtype, tuple]], metadata: dict | None = None):
        self.path = Path(path)
        self.plan = [(n, dt, tuple(int(s) for s in shape)) for n, dt, shape in plan]
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for name, dt, shape in self.plan:
            if dt not in ST_NAMES:
                raise ValueError(f"{name}: dtype {dt} cannot be stored in safetensors by taskvec")
            nbytes = math.prod(shape) * torch.empty((), dtype=dt).element_size()
            header[name] = {"dtype": ST_NAMES[dt], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._fh = open(self.path, "wb")
        self._fh.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want, dt, shape = self.plan[self._next]
        if name != want or tensor.dtype != dt or tuple(tensor.shape) != shape:
            raise ValueError(f"expected {want} {dt} {shape}, got {name} {tensor.dtype} {tuple(tensor.shape)}")
        if tensor.numel():
            self._fh.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self._next += 1

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()
            if self._next != len(self.plan):
                raise ValueError(f"{self.path}: only {self._next} of {len(self.plan)} tensors were written")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *rest):
        if exc_type is not None:
            self._fh.close()
            return False
        self.close()
        return False
