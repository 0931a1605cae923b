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

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run fastest (and reproducibly) on one intra-op thread — for module fixtures too."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
