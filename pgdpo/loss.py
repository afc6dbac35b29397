"""Public API of the PG-DPO loss: ``pgdpo_loss`` (functional) and ``PGDPOLoss`` (module).

PG-DPO (arXiv 2511.19049, Eq. 7-9): for pairs of chosen (w) and rejected (l) samples,

    d_w = mean_S[(p_w-t_w)^2] - mean_S[(r_w-t_w)^2],   d_l likewise,   m = (d_w-d_l)/(d_l+eps)
    alpha = sigmoid(K1 m) (ARS),   gamma = sigmoid(-K2 m) (IPR),   z = -beta/2 (d_w - alpha d_l)
    L_b = gamma softplus(-z) + (1-gamma) L_ipr,   loss = reduce(sample_weight * L_b)

with ``L_ipr = mean_S[(p_w-r_w)^2]`` ("anchor") or ``d_w`` ("reward"). ``SPEC.md`` section 1 has
the element-wise variant and every option.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from . import ops
from .options import BACKENDS, STAT_NAMES, LossOptions
from .reference import pgdpo_loss_reference

_warned: set[str] = set()


def triton_unavailable_reason(device_type: str) -> str | None:
    """Why the Triton backend cannot run on ``device_type`` tensors, or None when it can."""
    if importlib.util.find_spec("triton") is None:
        return "the 'triton' package is not installed; install it with `pip install triton`"
    try:
        from .kernels import pgdpo_loss as triton_impl
    except ImportError as exc:  # e.g. a Triton too old for the kernels
        return f"the Triton kernels could not be imported ({exc})"
    if device_type == "cuda":
        return None if not triton_impl.INTERPRET else (
            "TRITON_INTERPRET=1 was set when pgdpo.kernels was imported: the kernels run in the "
            "interpreter, which needs CPU tensors")
    if device_type == "cpu":
        return None if triton_impl.INTERPRET else (
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
    """Map the ``backend`` argument to the backend that will run: "triton", "cpu" or "torch"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
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


def _as_full_batch(name: str, value) -> Tensor:
    """Accept ``[2B, *S]`` or a ``(chosen, rejected)`` pair of ``[B, *S]`` tensors."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        chosen, rejected = value
        for half, which in ((chosen, "chosen"), (rejected, "rejected")):
            if not isinstance(half, Tensor):
                raise TypeError(f"{name}: the {which} half must be a torch.Tensor, got {type(half).__name__}")
        if chosen.shape != rejected.shape:
            raise ValueError(f"{name}: chosen half has shape {tuple(chosen.shape)} but rejected half "
                             f"has shape {tuple(rejected.shape)}; they must match")
        if chosen.device != rejected.device:
            raise ValueError(f"{name}: chosen half is on {chosen.device}, rejected on {rejected.device}")
        if chosen.dim() == 0:
            raise ValueError(f"{name}: halves must have a batch dimension, got 0-d tensors")
        return torch.cat([chosen, rejected.to(chosen.dtype)], dim=0)
    raise TypeError(f"{name} must be a torch.Tensor of shape [2B, ...] or a (chosen, rejected) pair "
                    f"of tensors, got {type(value).__name__}")


def _validate(pred: Tensor, ref_pred: Tensor, target: Tensor, sample_weight) -> None:
    named = (("pred", pred), ("ref_pred", ref_pred), ("target", target))
    for name, t in named:
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor (float32, bfloat16, float16 or "
                            f"float64), got {t.dtype}")
    for name, t in named[1:]:
        if t.shape != pred.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but pred has shape "
                             f"{tuple(pred.shape)}; they must match")
        if t.device != pred.device:
            raise ValueError(f"{name} is on {t.device} but pred is on {pred.device}; move them to one device")
        if t.requires_grad:
            raise ValueError(f"{name} requires grad, but only pred receives a gradient in PG-DPO: "
                             f"pass {name}.detach() (the reference model runs under torch.no_grad())")
    if pred.dim() == 0 or pred.shape[0] == 0 or pred.shape[0] % 2:
        got = "a 0-d tensor" if pred.dim() == 0 else f"first dimension {pred.shape[0]}"
        raise ValueError(f"pred must have shape [2B, ...] with the B chosen samples first and the B "
                         f"rejected samples second (first dimension even and > 0), got {got}")
    if pred.numel() == 0:
        raise ValueError(f"pred is empty (shape {tuple(pred.shape)}): each sample needs at least one element")
    if sample_weight is not None:
        b = pred.shape[0] // 2
        if not isinstance(sample_weight, Tensor):
            raise TypeError(f"sample_weight must be a torch.Tensor of shape [{b}] or None, "
                            f"got {type(sample_weight).__name__}")
        if not sample_weight.is_floating_point():
            raise TypeError(f"sample_weight must be floating-point, got {sample_weight.dtype}")
        if sample_weight.shape != (b,):
            raise ValueError(f"sample_weight must have shape [{b}] (one weight per pair), got "
                             f"{tuple(sample_weight.shape)}")
        if sample_weight.device != pred.device:
            raise ValueError(f"sample_weight is on {sample_weight.device} but pred is on {pred.device}")
        if sample_weight.requires_grad:
            raise ValueError("sample_weight requires grad; weights are constants of the loss: pass "
                             "sample_weight.detach()")


def pgdpo_loss(
    pred,
    ref_pred,
    target,
    *,
    method: str = "pgdpo",
    beta: float = 100.0,
    k1: float = 10.0,
    k2: float = 10.0,
    eps: float = 1e-6,
    ipr_target: str = "anchor",
    weighting: str = "sample",
    detach_weights: bool = True,
    sample_weight: Tensor | None = None,
    reduction: str = "mean",
    backend: str = "auto",
    return_stats: bool = False,
):
    """PG-DPO loss of a batch of preference pairs (SPEC section 1; paper Eq. 7-9).

    Args:
        pred: policy prediction ``[2B, *S]`` (chosen half first), or a ``(pred_w, pred_l)`` pair of
            ``[B, *S]`` tensors. The only input that receives a gradient.
        ref_pred: frozen reference prediction on the same noisy inputs; same layout, no grad.
        target: regression target (noise, velocity or ``noise - x0``); same layout, no grad.
        method: ``"pgdpo"`` (ARS + IPR), ``"ars"``, ``"ipr"`` or ``"dpo"`` (Diffusion-DPO).
        beta, k1, k2, eps: temperature, ARS and IPR sharpness, denominator guard.
        ipr_target: ``"anchor"`` (``mean (p_w - r_w)^2``, appendix code) or ``"reward"`` (``d_w``, Eq. 9).
        weighting: ``"sample"`` (per-pair means, default) or ``"element"`` (appendix code, per element).
        detach_weights: treat alpha and gamma as constants in the backward (paper's analysis).
        sample_weight: optional ``[B]`` weights per pair (e.g. timestep-aware weighting).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``[B]`` per-pair losses).
        backend: ``"auto"``, ``"triton"``, ``"cpu"`` (fused C++) or ``"torch"`` (eager reference).
        return_stats: also return a dict of ``[B]`` statistics (``pgdpo.STAT_NAMES``), same pass.

    Returns:
        ``loss`` (fp32, or fp64 for fp64 inputs), or ``(loss, stats)`` when ``return_stats``.
    """
    options = LossOptions(method=method, beta=beta, k1=k1, k2=k2, eps=eps, ipr_target=ipr_target,
                          weighting=weighting, detach_weights=detach_weights, reduction=reduction)
    return loss_with_options(pred, ref_pred, target, options, sample_weight=sample_weight, backend=backend,
                             return_stats=return_stats)


def loss_with_options(pred, ref_pred, target, options: LossOptions, *, sample_weight: Tensor | None = None,
                      backend: str = "auto", return_stats: bool = False):
    """:func:`pgdpo_loss` with its options already resolved and validated (a :class:`LossOptions`):
    what :class:`PGDPOLoss` and ``pgdpo.step.PreferenceStep`` call, so the options go from the object
    to the kernels' flags without being unpacked into keywords and validated again."""
    pred = _as_full_batch("pred", pred)
    ref_pred = _as_full_batch("ref_pred", ref_pred)
    target = _as_full_batch("target", target)
    _validate(pred, ref_pred, target, sample_weight)
    chosen_backend = resolve_backend(backend, pred.device.type)

    common = torch.promote_types(torch.promote_types(pred.dtype, ref_pred.dtype), target.dtype)
    if common == torch.float16 and options.element:
        # Element weighting stores dloss/dpred (~1/(B N) in size) in the forward, before a loss scale
        # (GradScaler) multiplies it in the backward: in fp16 that is subnormal for large N. Storing it
        # in fp32 keeps full precision; the gradient is rounded to fp16 after the scale is applied.
        common = torch.float32
    pred, ref_pred, target = (x.to(common) for x in (pred, ref_pred, target))

    if chosen_backend == "torch":
        with torch.autocast(pred.device.type, enabled=False):
            loss, stats = pgdpo_loss_reference(pred, ref_pred, target, options, sample_weight)
        return (loss, stats) if return_stats else loss

    two_b = pred.shape[0]
    flat = [x.reshape(two_b, -1).contiguous() for x in (pred, ref_pred, target)]
    acc = torch.float64 if common == torch.float64 else torch.float32
    weight = None if sample_weight is None else sample_weight.to(acc).contiguous()
    need_grad = torch.is_grad_enabled() and pred.requires_grad
    flags = ops.pack_flags(options.ars, options.ipr, options.anchor, options.element,
                           options.detach_weights, need_grad, options.reduction_code)
    scalars = [float(options.beta), float(options.k1), float(options.k2), float(options.eps)]
    # torch.compile traces the custom op; eager mode skips its Python dispatch (same kernels).
    fused = ops.fused_loss if torch.compiler.is_compiling() else ops.FusedLossFunction.apply
    loss, stats, _ = fused(*flat, weight, scalars, flags, chosen_backend)
    if not return_stats:
        return loss
    return loss, dict(zip(STAT_NAMES, stats.detach().unbind(1)))


class PGDPOLoss(nn.Module):
    """``nn.Module`` form of :func:`pgdpo_loss`: ``PGDPOLoss(method="pgdpo", beta=100.0, ...)``.

    Called as ``crit(pred, ref_pred, target, sample_weight=None)``; keywords as in :func:`pgdpo_loss`.
    Options are validated at construction.
    """

    def __init__(self, method: str = "pgdpo", beta: float = 100.0, k1: float = 10.0, k2: float = 10.0,
                 eps: float = 1e-6, ipr_target: str = "anchor", weighting: str = "sample",
                 detach_weights: bool = True, reduction: str = "mean", backend: str = "auto",
                 return_stats: bool = False):
        super().__init__()
        self.options = LossOptions(method=method, beta=beta, k1=k1, k2=k2, eps=eps,
                                   ipr_target=ipr_target, weighting=weighting,
                                   detach_weights=detach_weights, reduction=reduction)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
        self.backend = backend
        self.return_stats = return_stats

    def forward(self, pred, ref_pred, target, sample_weight: Tensor | None = None):
        return loss_with_options(pred, ref_pred, target, self.options, sample_weight=sample_weight,
                                 backend=self.backend, return_stats=self.return_stats)

    def extra_repr(self) -> str:
        o = self.options
        return (f"method={o.method!r}, beta={o.beta}, k1={o.k1}, k2={o.k2}, eps={o.eps}, "
                f"ipr_target={o.ipr_target!r}, weighting={o.weighting!r}, "
                f"detach_weights={o.detach_weights}, reduction={o.reduction!r}, backend={self.backend!r}")
