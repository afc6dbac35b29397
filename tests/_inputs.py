"""Shared input makers for the loss tests."""

import torch


def make_inputs(shape, dtype=torch.float64, seed=0, device="cpu"):
    """Random (pred, ref_pred, target) with margins spread across pairs, so alpha/gamma are not saturated.

    target ~ N(0,1); the reference is off by 0.3 N(0,1); the policy differs from the reference by a
    per-sample scale in [0.02, 0.4], so d_w and d_l (and the margin m) vary from pair to pair.
    """
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(shape, generator=g, dtype=torch.float64)
    ref = target + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
    scale = 0.02 + 0.38 * torch.rand((shape[0],) + (1,) * (len(shape) - 1), generator=g, dtype=torch.float64)
    pred = ref + scale * torch.randn(shape, generator=g, dtype=torch.float64)
    return tuple(x.to(device=device, dtype=dtype) for x in (pred, ref, target))


# ------------------------------------------------------------------------------------------------
# The (backend, device) cases every loss test runs over.
#
# On a machine without CUDA: the eager reference, the C++ op, and the Triton kernels in Triton's
# interpreter, all on CPU tensors (conftest.py sets TRITON_INTERPRET=1). On a CUDA machine the
# interpreter is off (it would take CUDA tensors away from the compiled kernels), so the Triton case is
# the compiled kernels on CUDA tensors, and the eager reference runs on CUDA tensors as well.
# `python -m pytest -m "not large" tests/test_loss.py tests/test_triton_kernels.py tests/test_spec_oracle.py`
# on a GPU machine runs the CUDA part (docs/testing.md).


class LossCase(tuple):
    """``(backend, device)``: the ``backend`` argument of ``pgdpo_loss`` and where the inputs live."""

    __slots__ = ()

    def __new__(cls, backend: str, device: str):
        return super().__new__(cls, (backend, device))

    backend = property(lambda self: self[0])
    device = property(lambda self: self[1])
    fused = property(lambda self: self[0] != "torch")
    id = property(lambda self: f"{self[0]}-{self[1]}")


CUDA = torch.cuda.is_available()
LOSS_CASES = [LossCase("torch", "cpu"), LossCase("cpu", "cpu")]
LOSS_CASES += [LossCase("torch", "cuda"), LossCase("triton", "cuda")] if CUDA else [LossCase("triton", "cpu")]
FUSED_CASES = [c for c in LOSS_CASES if c.fused]
# Where a repeated call can legitimately differ (parallel reductions): CUDA, and the C++ op's threads.
# The interpreter runs programs one after another and eager CPU code is sequential: deterministic by
# construction, so testing them would prove nothing.
PARALLEL_CASES = [c for c in LOSS_CASES if c.device == "cuda" or c.backend == "cpu"]


def case_unavailable_reason(case: LossCase) -> str | None:
    """Why ``case`` cannot run here (None when it can)."""
    from pgdpo.loss import cpu_unavailable_reason, triton_unavailable_reason

    if case.backend == "triton":
        return triton_unavailable_reason(case.device)
    if case.backend == "cpu":
        return cpu_unavailable_reason(case.device)
    return None
