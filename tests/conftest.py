import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; the flag must be set
# before the kernels are defined (imported), so it is set here, before any test imports pgdpo.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Inductor's on-disk cache, one folder per instruction set and thread count (and inherited by the tests'
# subprocesses): .ci/run runs the numerics files again under other ATEN_CPU_CAPABILITY settings, and a cache
# filled under one setting serves wrong kernels under another (pgdpo.train.models.switches).
from pgdpo.train.models.switches import inductor_cache_for_this_cpu  # noqa: E402

inductor_cache_for_this_cpu()


# The loss backends on CPU tensors, for the test files that take a backend name (tests/_parity.py);
# tests/test_loss.py has its own (backend, device) cases; its `fused` overrides the one here.
import pytest  # noqa: E402

from ._parity import ALL, FUSED, require  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the module (``pytestmark = pytest.mark.usefixtures("one_thread")``): the
    training tests' models are tiny, and OpenMP spin-waits cost more than they give on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=ALL)
def backend(request):
    """Every backend on CPU tensors (skipped, with the reason, where one is unavailable)."""
    return require(request.param)


@pytest.fixture(params=FUSED)
def fused(request):
    """The fused backends on CPU tensors."""
    return require(request.param)
