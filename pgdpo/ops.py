"""The fused PG-DPO loss as a ``torch.library`` custom op, with autograd and fake (meta) kernels.

One op, ``pgdpo::fused_loss(pred, ref_pred, target, sample_weight, scalars=[beta, k1, k2, eps, eps_rel],
flags, impl)``, whose implementation is chosen by its ``impl`` argument:
``"triton"`` (``pgdpo.kernels.pgdpo_loss``: CUDA, or CPU tensors under ``TRITON_INTERPRET=1``) or
``"cpu"`` (the C++ op of ``csrc/``, built just in time by ``pgdpo.cpu_op``). Because it is a real
custom op with a fake kernel, ``torch.compile(fullgraph=True)`` traces through it.

Backend contract (both ``impl`` modules expose these two functions):

``forward(pred, ref_pred, target, sample_weight, beta, k1, k2, eps, ars, ipr, anchor, element,
detach, reduction, need_grad, abs_margin=False, eps_rel=0.0, need_stats=True) -> (loss, stats, saved)``

- ``pred``, ``ref_pred``, ``target``: ``[2B, N]`` contiguous, one device; chosen rows ``0..B-1``,
  rejected rows ``B..2B-1``. Each is read in its own dtype, any mix of fp32 / bf16 / fp16 (no
  promotion copies), or all three fp64.
- ``sample_weight``: ``[B]`` contiguous in the accumulation dtype, or None (all ones).
- ``reduction``: 0 none, 1 mean, 2 sum. ``loss``: ``[B]`` for none, ``[]`` otherwise.
- ``abs_margin``: ``m = (d_l - d_w) / (|d_l| + e)`` instead of ``(d_w - d_l) / (d_l + e)``; ``eps_rel``:
  ``e = eps + eps_rel * MSE_ref,l`` (per pair, or per element in element weighting); docs/margin.md.
- ``need_stats``: False lets element weighting skip the statistics' accumulators; ``stats`` then holds
  only the per-pair loss (column ``loss``), the other columns are NaN. Sample weighting ignores it.
- accumulation dtype ``acc``: float64 for float64 inputs, float32 otherwise. ``loss`` and ``stats``
  (``[B, NUM_STATS]``, columns ``options.STAT_NAMES``) are in ``acc``.
- ``saved`` (what the backward needs), already including ``sample_weight`` and the ``1/B`` of mean:
  sample weighting: ``[2B, 2]`` in ``acc``: per row ``(c_t, c_r)`` with
  ``dloss/dpred[row] = c_t * (p - t) + c_r * (p - r)`` (``c_r`` is 0 on rejected rows);
  element weighting: ``[2B, N]`` in ``saved_dtype(pred.dtype)`` (fp32 for bf16 / fp16 ``pred``, so
  that the gradient is rounded to ``pred``'s dtype once, after the upstream scale) holding
  ``dloss/dpred`` itself (forward and backward fused in one pass), or an empty tensor when
  ``need_grad`` is False.

``backward(grad_loss, pred, ref_pred, target, saved, element, grad_dtype) -> grad_pred`` (``[2B, N]``
in ``grad_dtype``, pred's dtype): ``grad_loss`` is ``[]`` or ``[B]`` (reduction none); the per-row
scale is ``grad_loss`` (or ``grad_loss[row % B]``) times the ``saved`` coefficients.

Results must not depend on launch configuration or thread count beyond a fixed reduction order: the
same inputs give bitwise the same outputs.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .options import NUM_STATS

_IMPL_MODULES = {"triton": "pgdpo.kernels.pgdpo_loss", "cpu": "pgdpo.cpu_op"}


def _impl(name: str):
    if name not in _IMPL_MODULES:
        raise ValueError(f"impl must be one of {sorted(_IMPL_MODULES)}, got {name!r}")
    return importlib.import_module(_IMPL_MODULES[name])


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def saved_dtype(pred_dtype: torch.dtype) -> torch.dtype:
    """dtype of the element-weighting saved gradient: pred's for fp32 / fp64, fp32 for bf16 / fp16.

    The saved ``dloss/dpred`` is multiplied by the upstream gradient in the backward. Stored in bf16
    it would be rounded twice (once here, once after the scale); stored in fp16 it is ~1/(B N) in
    size, before a loss scale (GradScaler) multiplies it, and goes subnormal for large N.
    """
    return pred_dtype if pred_dtype in (torch.float32, torch.float64) else torch.float32


# Flags of the op packed in one int: the dispatcher's per-call argument handling grows with the
# square of the argument count, and at GPU sizes (a few microseconds of kernel time) that overhead
# is what a caller sees.
ARS, IPR, ANCHOR, ELEMENT, DETACH, NEED_GRAD, ABS_MARGIN, NO_STATS = 1, 2, 4, 8, 16, 32, 64, 128
_REDUCTION_SHIFT = 8


def pack_flags(ars: bool, ipr: bool, anchor: bool, element: bool, detach: bool, need_grad: bool,
               reduction: int, abs_margin: bool = False, need_stats: bool = True) -> int:
    """Bitmask of the op's boolean options, with the reduction code (0 none, 1 mean, 2 sum) on top."""
    return (ARS * ars | IPR * ipr | ANCHOR * anchor | ELEMENT * element | DETACH * detach
            | NEED_GRAD * need_grad | ABS_MARGIN * abs_margin | NO_STATS * (not need_stats)
            | reduction << _REDUCTION_SHIFT)


@torch.library.custom_op("pgdpo::fused_loss", mutates_args=())
def fused_loss(
    pred: Tensor,
    ref_pred: Tensor,
    target: Tensor,
    sample_weight: Tensor | None,
    scalars: list[float],
    flags: int,
    impl: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """``scalars = [beta, k1, k2, eps(, eps_rel)]``; ``flags`` from :func:`pack_flags`;
    ``impl`` "triton" | "cpu"."""
    return _run_forward(pred, ref_pred, target, sample_weight, scalars, flags, impl)


def _run_forward(pred, ref_pred, target, sample_weight, scalars, flags, impl):
    beta, k1, k2, eps = scalars[:4]
    eps_rel = scalars[4] if len(scalars) > 4 else 0.0
    return _impl(impl).forward(
        pred, ref_pred, target, sample_weight, beta, k1, k2, eps,
        bool(flags & ARS), bool(flags & IPR), bool(flags & ANCHOR), bool(flags & ELEMENT),
        bool(flags & DETACH), flags >> _REDUCTION_SHIFT, bool(flags & NEED_GRAD),
        bool(flags & ABS_MARGIN), eps_rel, not flags & NO_STATS,
    )


@fused_loss.register_fake
def _(pred, ref_pred, target, sample_weight, scalars, flags, impl):
    two_b, n = pred.shape
    acc = _acc_dtype(pred.dtype)
    loss = pred.new_empty((two_b // 2,) if flags >> _REDUCTION_SHIFT == 0 else (), dtype=acc)
    stats = pred.new_empty((two_b // 2, NUM_STATS), dtype=acc)
    if flags & ELEMENT:
        saved = pred.new_empty((two_b, n) if flags & NEED_GRAD else (0,), dtype=saved_dtype(pred.dtype))
    else:
        saved = pred.new_empty((two_b, 2), dtype=acc)
    return loss, stats, saved


@torch.library.custom_op("pgdpo::fused_loss_backward", mutates_args=())
def fused_loss_backward(
    grad_loss: Tensor, pred: Tensor, ref_pred: Tensor, target: Tensor, saved: Tensor,
    element: bool, grad_dtype: torch.dtype, impl: str,
) -> Tensor:
    return _impl(impl).backward(grad_loss, pred, ref_pred, target, saved, element, grad_dtype)


@fused_loss_backward.register_fake
def _(grad_loss, pred, ref_pred, target, saved, element, grad_dtype, impl):
    return torch.empty_like(saved if element else pred, dtype=grad_dtype)


def _setup_context(ctx, inputs, output):
    pred, ref_pred, target, _, _, flags, impl = inputs
    ctx.element, ctx.impl, ctx.grad_dtype = bool(flags & ELEMENT), impl, pred.dtype
    saved = output[2]
    if ctx.element:  # the gradient is already in `saved`: keep no input alive
        ctx.save_for_backward(saved)
    else:
        ctx.save_for_backward(pred, ref_pred, target, saved)


def _saved_for_backward(ctx):
    if ctx.element:
        (saved,) = ctx.saved_tensors
        pred = ref_pred = target = saved
    else:
        pred, ref_pred, target, saved = ctx.saved_tensors
    if saved.numel() == 0:
        raise RuntimeError("pgdpo: backward through a fused loss computed with need_grad=False")
    return pred, ref_pred, target, saved


def _backward(ctx, grad_loss, grad_stats, grad_saved):
    pred, ref_pred, target, saved = _saved_for_backward(ctx)
    grad_pred = fused_loss_backward(grad_loss.contiguous(), pred, ref_pred, target, saved,
                                    ctx.element, ctx.grad_dtype, ctx.impl)
    return (grad_pred,) + (None,) * 6


fused_loss.register_autograd(_backward, setup_context=_setup_context)


class FusedLossFunction(torch.autograd.Function):
    """Eager-mode autograd of the same op, calling the backend directly.

    Going through the custom op costs ~100 us of Python dispatch per forward + backward (argument
    normalisation, the autograd wrapper, a redispatch), which is more than the kernels take at GPU
    sizes; ``pgdpo_loss`` uses this in eager mode and the custom op under ``torch.compile``. The two
    paths share the forward, the saved tensors and the backward.
    """

    @staticmethod
    def forward(ctx, pred, ref_pred, target, sample_weight, scalars, flags, impl):
        output = _run_forward(pred, ref_pred, target, sample_weight, scalars, flags, impl)
        _setup_context(ctx, (pred, ref_pred, target, sample_weight, scalars, flags, impl), output)
        ctx.mark_non_differentiable(output[1], output[2])
        # The stats and saved outputs get no gradient: without this autograd would allocate zeros of
        # their shape for the backward, a full [2B, N] tensor for element weighting's saved gradient.
        ctx.set_materialize_grads(False)
        return output

    @staticmethod
    @once_differentiable  # the fused backward is not itself differentiable: say so, don't return zeros
    def backward(ctx, grad_loss, grad_stats, grad_saved):
        if grad_loss is None:  # not materialised: nothing flowed into the loss
            return (None,) * 7
        pred, ref_pred, target, saved = _saved_for_backward(ctx)
        grad_pred = _impl(ctx.impl).backward(grad_loss.contiguous(), pred, ref_pred, target, saved,
                                             ctx.element, ctx.grad_dtype)
        return (grad_pred,) + (None,) * 6
