"""Which backend runs the fused loss: what each needs, why it is unavailable, and the choice for "auto".

``"triton"``: the Triton kernels (CUDA; CPU tensors under ``TRITON_INTERPRET=1``). ``"cpu"``: the C++ op
of ``csrc/`` (built just in time). ``"torch"``: the eager reference (:mod:`pgdpo.loss.reference`).
``"auto"`` takes the fused backend of the tensors' device and falls back to ``"torch"`` with one warning
per device when it cannot run. Resolving a fused backend also registers its kernels with the op
(:mod:`pgdpo.loss.op`).
"""

from __future__ import annotations

import importlib.util
import warnings

import torch

from . import op
from .options import BACKENDS

_warned: set[str] = set()


def triton_unavailable_reason(device_type: str) -> str | None:
    """Why the Triton backend cannot run on ``device_type`` tensors, or None when it can."""
    if importlib.util.find_spec("triton") is None:
        return "the 'triton' package is not installed; install it with `pip install triton`"
    try:
        from ..kernels import pgdpo_loss as triton_impl
    except ImportError as exc:  # e.g. a Triton too old for the kernels
        return f"the Triton kernels could not be imported ({exc})"
    if device_type == "cuda":
        if not triton_impl.INTERPRET:
            op.register_triton(interpret=False)
            return None
        return (
            "TRITON_INTERPRET=1 was set when pgdpo.kernels was imported: the kernels run in the "
            "interpreter, which needs CPU tensors")
    if device_type == "cpu":
        if triton_impl.INTERPRET:
            op.register_triton(interpret=True)
            return None
        return (
            "the Triton kernels need CUDA tensors; for CPU tensors set TRITON_INTERPRET=1 in the "
            "environment before pgdpo is imported (slow: for tests)")
    return f"the Triton kernels do not support {device_type!r} tensors"


def cpu_unavailable_reason(device_type: str) -> str | None:
    """Why the fused C++ CPU op cannot run on ``device_type`` tensors, or None when it can."""
    if device_type != "cpu":
        return f"the fused C++ op runs on CPU tensors only, got {device_type!r} tensors"
    try:
        from . import cpu_op
    except ImportError as exc:
        return f"the fused C++ op could not be loaded ({exc})"
    return cpu_op.unavailable_reason()


@torch.compiler.assume_constant_result
def resolve_backend(backend: str, device_type: str) -> str:
    """Map the ``backend`` argument to the backend that will run: "triton", "cpu" or "torch"; "meta" for
    meta tensors (the op's fake kernels: shapes and dtypes only)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if device_type == "meta":
        # Shape inference (a model built on the meta device, a planner, FakeTensor tracing): every backend
        # computes the same outputs, and the op's fake kernels give their shapes and dtypes, and through
        # its autograd formula the gradient's. No kernel runs, so none has to be available.
        return "meta"
    if backend == "torch":
        return "torch"
    if backend in ("triton", "cpu"):
        check = triton_unavailable_reason if backend == "triton" else cpu_unavailable_reason
        reason = check(device_type)
        if reason is not None:
            raise ValueError(f"backend={backend!r} is not available: {reason}")
        return backend
    fused = "triton" if device_type == "cuda" else "cpu"
    check = triton_unavailable_reason if fused == "triton" else cpu_unavailable_reason
    reason = check(device_type)
    if reason is None:
        return fused
    if (fused, device_type) not in _warned:
        _warned.add((fused, device_type))
        warnings.warn(
            f"pgdpo: backend='auto' falls back to the eager 'torch' backend on {device_type}: {reason}",
            RuntimeWarning, stacklevel=3)
    return "torch"


