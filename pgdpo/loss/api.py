"""Public API of the PG-DPO loss: ``pgdpo_loss`` (functional) and ``PGDPOLoss`` (module).

PG-DPO (arXiv 2511.19049, Eq. 7-9): for pairs of chosen (w) and rejected (l) samples,

    d_w = mean_S[(p_w-t_w)^2] - mean_S[(r_w-t_w)^2],   d_l likewise,   m = (d_w-d_l)/(d_l+eps)
    (``margin="abs"``: m = (d_l-d_w)/(|d_l|+eps); docs/margin.md)
    alpha = sigmoid(K1 m) (ARS),   gamma = sigmoid(-K2 m) (IPR),   z = -beta/2 (d_w - alpha d_l)
    L_b = gamma softplus(-z) + (1-gamma) L_ipr,   loss = reduce(sample_weight * L_b)

with ``L_ipr = mean_S[(p_w-r_w)^2]`` ("anchor") or ``d_w`` ("reward"). ``docs/loss.md`` has
the element-wise variant and every option. Options are validated by :mod:`.options`, tensors by
:mod:`.inputs`, the backend chosen by :mod:`.backends`; the fused backends run the op of :mod:`.op`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import op
from .backends import resolve_backend
from .inputs import as_full_batch, validate_inputs
from .options import BACKENDS, STAT_NAMES, LossOptions
from .reference import pgdpo_loss_reference


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
    margin: str = "signed",
    eps_rel: float = 0.0,
    detach_weights: bool = True,
    sample_weight: Tensor | None = None,
    reduction: str = "mean",
    backend: str = "auto",
    return_stats: bool = False,
):
    """PG-DPO loss of a batch of preference pairs (``docs/loss.md``; paper Eq. 7-9).

    Args:
        pred: policy prediction ``[2B, *S]`` (chosen half first), or a ``(pred_w, pred_l)`` pair of
            ``[B, *S]`` tensors. The only input that receives a gradient.
        ref_pred: frozen reference prediction on the same noisy inputs; same layout, no grad.
        target: regression target (noise, velocity or ``noise - x0``); same layout, no grad.
        method: ``"pgdpo"`` (ARS + IPR), ``"ars"``, ``"ipr"`` or ``"dpo"`` (Diffusion-DPO).
        beta, k1, k2, eps: temperature, ARS and IPR sharpness, denominator guard.
        ipr_target: ``"anchor"`` (``mean (p_w - r_w)^2``, appendix code) or ``"reward"`` (``d_w``, Eq. 9).
        weighting: ``"sample"`` (per-pair means, default) or ``"element"`` (appendix code, per element).
        margin: ``"signed"`` (the paper's printed Eq. 7, ``m = (d_w - d_l)/(d_l + e)``, default) or
            ``"abs"`` (``m = (d_l - d_w)/(|d_l| + e)``: the sign of the reward margin); docs/margin.md.
        eps_rel: noise guard of the margin's denominator, ``e = eps + eps_rel * MSE_ref,l`` (the
            reference's squared error on the rejected half: per pair, or per element for "element");
            0 (default) is the paper's absolute ``eps``. docs/margin.md.
        detach_weights: treat alpha and gamma as constants in the backward (paper's analysis).
        sample_weight: optional ``[B]`` weights per pair (e.g. timestep-aware weighting).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``[B]`` per-pair losses).
        backend: ``"auto"``, ``"triton"``, ``"cpu"`` (fused C++) or ``"torch"`` (eager reference).
        return_stats: also return a dict of ``[B]`` statistics (``pgdpo.STAT_NAMES``), same pass.

    Returns:
        ``loss`` (fp32, or fp64 for fp64 inputs), or ``(loss, stats)`` when ``return_stats``.
    """
    options = LossOptions(method=method, beta=beta, k1=k1, k2=k2, eps=eps, ipr_target=ipr_target,
                          weighting=weighting, margin=margin, eps_rel=eps_rel, detach_weights=detach_weights,
                          reduction=reduction)
    return loss_with_options(pred, ref_pred, target, options, sample_weight=sample_weight, backend=backend,
                             return_stats=return_stats)


def loss_with_options(pred, ref_pred, target, options: LossOptions, *, sample_weight: Tensor | None = None,
                      backend: str = "auto", return_stats: bool = False):
    """:func:`pgdpo_loss` with its options already resolved and validated (a :class:`LossOptions`):
    what :class:`PGDPOLoss` and ``pgdpo.train.step.PreferenceStep`` call, so the options go from the object
    to the kernels' flags without being unpacked into keywords and validated again."""
    pred = as_full_batch("pred", pred)
    ref_pred = as_full_batch("ref_pred", ref_pred)
    target = as_full_batch("target", target)
    validate_inputs(pred, ref_pred, target, sample_weight)
    chosen_backend = resolve_backend(backend, pred.device.type)

    if chosen_backend == "torch":
        with torch.autocast(pred.device.type, enabled=False):
            loss, stats = pgdpo_loss_reference(pred, ref_pred, target, options, sample_weight)
        return (loss, stats) if return_stats else loss

    # The fused kernels read each input in its own dtype (fp32 / bf16 / fp16, accumulating in fp32):
    # no promotion copies. Only float64 is all-or-nothing; a mix with float64 computes in float64.
    if torch.float64 in (pred.dtype, ref_pred.dtype, target.dtype):
        pred, ref_pred, target = (x.to(torch.float64) for x in (pred, ref_pred, target))
    two_b = pred.shape[0]
    flat = [x.reshape(two_b, -1).contiguous() for x in (pred, ref_pred, target)]
    acc = op.acc_dtype(pred.dtype)
    weight = None if sample_weight is None else sample_weight.to(acc).contiguous()
    need_grad = torch.is_grad_enabled() and pred.requires_grad
    flags = op.pack_flags(options.ars, options.ipr, options.anchor, options.element,
                          options.detach_weights, need_grad, options.reduction_code, options.abs_margin,
                          need_stats=return_stats)
    scalars = [float(options.beta), float(options.k1), float(options.k2), float(options.eps),
               float(options.eps_rel)]
    loss, stats, _ = op.op_for(chosen_backend, pred.device.type)(*flat, weight, scalars, flags)
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
                 margin: str = "signed", eps_rel: float = 0.0, detach_weights: bool = True,
                 reduction: str = "mean", backend: str = "auto", return_stats: bool = False):
        super().__init__()
        self.options = LossOptions(method=method, beta=beta, k1=k1, k2=k2, eps=eps,
                                   ipr_target=ipr_target, weighting=weighting, margin=margin,
                                   eps_rel=eps_rel, detach_weights=detach_weights, reduction=reduction)
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
                f"ipr_target={o.ipr_target!r}, weighting={o.weighting!r}, margin={o.margin!r}, "
                f"eps_rel={o.eps_rel}, "
                f"detach_weights={o.detach_weights}, reduction={o.reduction!r}, backend={self.backend!r}")
