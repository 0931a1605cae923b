"""Shared by the theory/arithmetic tests: one BLAS thread per test. These tests use small matrices;
on a busy 2-core machine a 2-thread OpenBLAS measured up to 100× slower on them."""

import pytest
from threadpoolctl import threadpool_limits


@pytest.fixture(autouse=True)
def one_blas_thread():
    with threadpool_limits(1):
        yield
