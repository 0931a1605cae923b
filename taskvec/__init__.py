"""taskvec: task vectors of fine-tuned transformers seen through the pretrained model's eNTK.

The main objects are importable from the package itself (loaded on first use, so ``import taskvec``
stays cheap and the CLI starts fast)::

    import taskvec
    tau = taskvec.TaskVector.from_checkpoints("base", "ft")
    taskvec.merge_checkpoints("base", ["ft_a", "ft_b"], "ties", {"densities": 0.3}, out="merged")

Everything else lives in the submodules: ``taskvec.checkpoints``, ``taskvec.vectors``,
``taskvec.vector_stats``, ``taskvec.merge``, ``taskvec.ntk``, ``taskvec.theory``, ``taskvec.models``,
``taskvec.outputs``.
"""

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first attribute access, PEP 562)
_EXPORTS = {
    "TaskvecError": "taskvec.errors",
    "TaskvecWarning": "taskvec.errors",
    "open_checkpoint": "taskvec.checkpoints",
    "TaskVector": "taskvec.vectors",
    "collection_stats": "taskvec.vector_stats",
    "CollectionStats": "taskvec.vector_stats",
    "MergeParams": "taskvec.merge.base",
    "merge_checkpoints": "taskvec.merge.driver",
    "check_merge": "taskvec.merge.check",
    "load_model": "taskvec.models",
    "load_tokenizer": "taskvec.models",
    "make_output": "taskvec.outputs",
    "compute_kernel": "taskvec.ntk.kernel",
    "KernelResult": "taskvec.ntk.kernel",
    "project": "taskvec.ntk.projection",
    "analyse_spectrum": "taskvec.theory.summary",
    "fit_spectrum": "taskvec.theory.spectrum",
    "fit_decay": "taskvec.theory.spectrum",
    "critical_radius": "taskvec.theory.stopping",
    "early_stopping": "taskvec.theory.stopping",
    "translate_to_training": "taskvec.theory.stopping",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'taskvec' has no attribute {name!r}")
    from importlib import import_module  # here, not at the top: `import taskvec` stays as cheap as before

    value = getattr(import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
