import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Small dense linear algebra is fastest single-threaded on these 2-core machines (and deterministic).
try:
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, "blas")
except ImportError:  # pragma: no cover
    pass
