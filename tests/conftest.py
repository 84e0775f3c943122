"""Session-wide test setup.

One persistent compilation cache for the whole test session, shared with the subprocesses it starts:
several test files compile the same tiny train step and sampler (in process and through the CLIs);
with the cache each is compiled once per session instead of once per process.
"""

import os
import tempfile

import pytest

from mlmjax import runtime

os.environ.setdefault(runtime.CACHE_ENV, os.path.join(tempfile.gettempdir(), "mlmjax-test-compilation-cache"))
runtime.enable_compilation_cache(os.environ[runtime.CACHE_ENV])


@pytest.fixture(scope="module")
def single_threaded_torch():
    """PyTorch's intra-op threads slow tiny models down by 10-30x on a busy 2-core machine; modules
    that compare against torch use this (``pytestmark = pytest.mark.usefixtures(...)``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
