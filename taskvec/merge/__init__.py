"""Model merging (task arithmetic, TIES, DARE, linear) and the merge sanity check.

Every method is a per-tensor function behind one registry, so the streaming driver
(`taskvec.merge.driver.merge_checkpoints`) and the tests share the exact same math.
Conventions follow DESIGN.md §2 "Merges": mergekit's by default, the papers' where they
differ, always labelled in the merge record.

    from taskvec.merge import METHODS, MergeParams, get_method, merge_checkpoints, check_merge
"""

from __future__ import annotations

from .base import MergeMethod, MergeParams, TensorContext  # noqa: F401
from . import dare, linear, task_arithmetic, ties

METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Add a method to the registry (name must be new)."""
    if method.name in METHODS:
        raise ValueError(f"merge method {method.name!r} registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    """Look up a method by its mergekit name; a TaskvecError lists the known ones."""
    from ..errors import TaskvecError

    try:
        return METHODS[name]
    except KeyError:
        raise TaskvecError(f"unknown merge method {name!r}; choose one of {sorted(METHODS)}") from None


for _module in (task_arithmetic, ties, dare, linear):
    for _m in _module.METHODS:
        register(_m)


def __getattr__(name: str):  # lazy: the driver and the checker import checkpoints/plotting
    if name in ("merge_checkpoints",):
        from .driver import merge_checkpoints

        return merge_checkpoints
    if name in ("check_merge", "predicted_retention"):
        from . import check

        return getattr(check, name)
    if name in ("read_mergekit_config",):
        from .mergekit_yaml import read_mergekit_config

        return read_mergekit_config
    raise AttributeError(name)
