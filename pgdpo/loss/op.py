"""The fused PG-DPO loss as one ``torch.library`` op with a kernel per device and one autograd formula.

Two ops, defined here (schema, fake kernel, autograd) and implemented per device:

``pgdpo::fused_loss(pred, ref_pred, target, sample_weight, scalars, flags) -> (loss, stats, saved)``
``pgdpo::fused_loss_backward(grad_loss, pred, ref_pred, target, saved, element, grad_dtype) -> grad_pred``

=======  ====================================================================================
device   kernel
=======  ====================================================================================
CPU      the C++ op of ``csrc/`` (``pgdpo_cpu_ops.cpp`` registers itself for the CPU key when
         :mod:`pgdpo.loss.cpu_op` loads it)
CUDA     the Triton kernels of ``kernels/pgdpo_loss.py`` (registered by :func:`register_triton`
         the first time the triton backend is resolved)
=======  ====================================================================================

Triton's interpreter (``TRITON_INTERPRET=1``, for tests) runs the Triton kernels on CPU tensors, where
the C++ op already is the kernel; that configuration gets its own instance of the same definition,
``pgdpo_interpret::fused_loss``, whose CPU kernel is the Triton one (:func:`op_for`).

Kernel contract (the schema; both implementations follow it):

- ``pred``, ``ref_pred``, ``target``: ``[2B, N]`` contiguous, one device; chosen rows ``0..B-1``,
  rejected rows ``B..2B-1``. Each is read in its own dtype, any mix of fp32 / bf16 / fp16 (no
  promotion copies), or all three fp64.
- ``sample_weight``: ``[B]`` contiguous in the accumulation dtype, or None (all ones).
- ``scalars = [beta, k1, k2, eps, eps_rel]``; ``flags`` from :func:`pack_flags` (the bits below and the
  reduction code 0 none, 1 mean, 2 sum). ``ABS_MARGIN``: ``m = (d_l - d_w) / (|d_l| + e)`` instead of
  ``(d_w - d_l) / (d_l + e)``; ``e = eps + eps_rel * MSE_ref,l`` (docs/margin.md). ``NO_STATS`` lets
  element weighting skip the statistics' accumulators; ``stats`` then holds only the per-pair loss
  (column ``loss``), the other columns are NaN.
- accumulation dtype ``acc``: float64 for float64 inputs, float32 otherwise. ``loss`` (``[B]`` for
  reduction none, ``[]`` otherwise) and ``stats`` (``[B, NUM_STATS]``, columns ``STAT_NAMES``) are in
  ``acc``.
- ``saved`` (what the backward needs), already including ``sample_weight`` and the ``1/B`` of mean:
  sample weighting: ``[2B, 2]`` in ``acc``: per row ``(c_t, c_r)`` with
  ``dloss/dpred[row] = c_t * (p - t) + c_r * (p - r)`` (``c_r`` is 0 on rejected rows);
  element weighting: ``[2B, N]`` in :func:`saved_dtype` holding ``dloss/dpred`` itself (forward and
  backward fused in one pass), or an empty tensor without ``NEED_GRAD``.
- backward: ``grad_loss`` is ``[]`` or ``[B]`` (reduction none); the per-row scale is ``grad_loss`` (or
  ``grad_loss[row % B]``) times the ``saved`` coefficients; the result is in ``grad_dtype`` (pred's).
- Results do not depend on launch configuration or thread count beyond a fixed reduction order: the
  same inputs give bitwise the same outputs.

The autograd formula is registered once per op instance, at the ``Autograd`` key, as the
:class:`torch.autograd.Function` built by :func:`_autograd_function`; ``torch.compile`` traces through
it (fake kernels below). A Python kernel at the ``Autograd`` key rather than ``register_autograd``
because the latter's generic wrapper costs ~75 us per forward + backward of Python dispatch, more than
the kernels take at GPU sizes (bench/NOTES.md, "Per-call overhead").
"""

from __future__ import annotations

import threading

import torch
from torch.autograd.function import once_differentiable

from .options import NUM_STATS

# Flags of the op packed in one int: the dispatcher's per-call argument handling grows with the
# square of the argument count, and at GPU sizes (a few microseconds of kernel time) that overhead
# is what a caller sees. Mirrored in csrc/pgdpo_cpu.h (tests/test_cpu_op.py checks the two agree).
ARS, IPR, ANCHOR, ELEMENT, DETACH, NEED_GRAD, ABS_MARGIN, NO_STATS = 1, 2, 4, 8, 16, 32, 64, 128
REDUCTION_SHIFT = 8
NUM_SCALARS = 5  # beta, k1, k2, eps, eps_rel

FORWARD_SCHEMA = ("fused_loss(Tensor pred, Tensor ref_pred, Tensor target, Tensor? sample_weight, "
                  "float[] scalars, int flags) -> (Tensor, Tensor, Tensor)")
BACKWARD_SCHEMA = ("fused_loss_backward(Tensor grad_loss, Tensor pred, Tensor ref_pred, Tensor target, "
                   "Tensor saved, bool element, ScalarType grad_dtype) -> Tensor")

#: The namespace of the production op and of the interpreter instance (see the module docstring).
NAMESPACE, INTERPRET_NAMESPACE = "pgdpo", "pgdpo_interpret"


def pack_flags(ars: bool, ipr: bool, anchor: bool, element: bool, detach: bool, need_grad: bool,
               reduction: int, abs_margin: bool = False, need_stats: bool = True) -> int:
    """Bitmask of the op's boolean options, with the reduction code (0 none, 1 mean, 2 sum) on top."""
    return (ARS * ars | IPR * ipr | ANCHOR * anchor | ELEMENT * element | DETACH * detach
            | NEED_GRAD * need_grad | ABS_MARGIN * abs_margin | NO_STATS * (not need_stats)
            | reduction << REDUCTION_SHIFT)


def unpack_flags(flags: int) -> dict:
    """The options in ``flags`` by name (what a kernel's host code reads)."""
    return dict(ars=bool(flags & ARS), ipr=bool(flags & IPR), anchor=bool(flags & ANCHOR),
                element=bool(flags & ELEMENT), detach=bool(flags & DETACH), need_grad=bool(flags & NEED_GRAD),
                abs_margin=bool(flags & ABS_MARGIN), need_stats=not flags & NO_STATS,
                reduction=flags >> REDUCTION_SHIFT)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the fused kernels for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def saved_dtype(pred_dtype: torch.dtype) -> torch.dtype:
    """dtype of the element-weighting saved gradient: pred's for fp32 / fp64, fp32 for bf16 / fp16.

    The saved ``dloss/dpred`` is multiplied by the upstream gradient in the backward. Stored in bf16
    it would be rounded twice (once here, once after the scale); stored in fp16 it is ~1/(B N) in
    size, before a loss scale (GradScaler) multiplies it, and goes subnormal for large N.
    """
    return pred_dtype if pred_dtype in (torch.float32, torch.float64) else torch.float32


def _fake_forward(pred, ref_pred, target, sample_weight, scalars, flags):
    two_b, n = pred.shape
    acc = acc_dtype(pred.dtype)
    loss = pred.new_empty((two_b // 2,) if flags >> REDUCTION_SHIFT == 0 else (), dtype=acc)
    stats = pred.new_empty((two_b // 2, NUM_STATS), dtype=acc)
    if flags & ELEMENT:
        saved = pred.new_empty((two_b, n) if flags & NEED_GRAD else (0,), dtype=saved_dtype(pred.dtype))
    else:
        saved = pred.new_empty((two_b, 2), dtype=acc)
    return loss, stats, saved


def _fake_backward(grad_loss, pred, ref_pred, target, saved, element, grad_dtype):
    return torch.empty_like(saved if element else pred, dtype=grad_dtype)


def _autograd_function(forward_op, backward_op) -> type[torch.autograd.Function]:
    """The autograd formula of a ``fused_loss`` instance: the forward runs the device kernel below
    autograd; the backward calls ``fused_loss_backward`` with what the forward saved."""

    class FusedLoss(torch.autograd.Function):
        @staticmethod
        def forward(ctx, pred, ref_pred, target, sample_weight, scalars, flags):
            with torch._C._AutoDispatchBelowAutograd():
                output = forward_op(pred, ref_pred, target, sample_weight, scalars, flags)
            ctx.element, ctx.grad_dtype = bool(flags & ELEMENT), pred.dtype
            saved = output[2]
            if ctx.element:  # the gradient is already in `saved`: keep no input alive
                ctx.save_for_backward(saved)
            else:
                ctx.save_for_backward(pred, ref_pred, target, saved)
            ctx.mark_non_differentiable(output[1], output[2])
            # The stats and saved outputs get no gradient: without this autograd would allocate zeros of
            # their shape for the backward, a full [2B, N] tensor for element weighting's saved gradient.
            ctx.set_materialize_grads(False)
            return output

        @staticmethod
        @once_differentiable  # the fused backward is not itself differentiable: say so, don't return zeros
        def backward(ctx, grad_loss, grad_stats, grad_saved):
            if grad_loss is None:  # not materialised: nothing flowed into the loss
                return (None,) * 6
            if ctx.element:
                (saved,) = ctx.saved_tensors
                pred = ref_pred = target = saved
            else:
                pred, ref_pred, target, saved = ctx.saved_tensors
            if saved.numel() == 0:
                raise RuntimeError("pgdpo: backward through a fused loss computed with need_grad=False")
            grad_pred = backward_op(grad_loss.contiguous(), pred, ref_pred, target, saved, ctx.element,
                                    ctx.grad_dtype)
            return (grad_pred,) + (None,) * 5

    return FusedLoss


_libraries: dict[str, torch.library.Library] = {}
_lock = threading.Lock()


def _define(namespace: str) -> torch.library.Library:
    """Define ``<namespace>::fused_loss`` / ``fused_loss_backward``: schema, fake kernels, autograd.
    The device kernels are registered by their backends."""
    with _lock:
        if namespace in _libraries:
            return _libraries[namespace]
        lib = torch.library.Library(namespace, "FRAGMENT")
        lib.define(FORWARD_SCHEMA)
        lib.define(BACKWARD_SCHEMA)
        torch.library.register_fake(f"{namespace}::fused_loss", _fake_forward, lib=lib)
        torch.library.register_fake(f"{namespace}::fused_loss_backward", _fake_backward, lib=lib)
        ops = getattr(torch.ops, namespace)
        function = _autograd_function(ops.fused_loss.default, ops.fused_loss_backward.default)
        lib.impl("fused_loss", function.apply, "Autograd")
        _libraries[namespace] = lib
        return lib


_define(NAMESPACE)
_triton_registered: set[str] = set()


def register_triton(interpret: bool) -> None:
    """Register the Triton kernels (imports Triton): for CUDA on ``pgdpo::``, or for CPU tensors under
    the interpreter on ``pgdpo_interpret::``. Idempotent."""
    namespace, key = (INTERPRET_NAMESPACE, "CPU") if interpret else (NAMESPACE, "CUDA")
    with _lock:
        if namespace in _triton_registered:
            return
    lib = _define(namespace)
    from ..kernels import pgdpo_loss as triton_kernels

    with _lock:
        if namespace not in _triton_registered:
            lib.impl("fused_loss", triton_kernels.forward, key)
            lib.impl("fused_loss_backward", triton_kernels.backward, key)
            _triton_registered.add(namespace)


def op_for(backend: str, device_type: str) -> torch._ops.OpOverload:
    """The ``fused_loss`` op that runs ``backend`` ("triton" / "cpu" / "meta", already resolved) on
    ``device_type`` tensors: ``pgdpo::`` (on meta tensors its fake kernels), or ``pgdpo_interpret::`` for
    Triton on CPU tensors."""
    if backend == "triton" and device_type == "cpu":
        return torch.ops.pgdpo_interpret.fused_loss.default
    return fused_loss


fused_loss = torch.ops.pgdpo.fused_loss.default
fused_loss_backward = torch.ops.pgdpo.fused_loss_backward.default
