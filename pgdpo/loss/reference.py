"""The PG-DPO loss in plain eager PyTorch: the test oracle and the ``"torch"`` backend.

Formulas are those of ``docs/loss.md`` and ``docs/margin.md`` (paper: "Beyond Reward Margin",
arXiv 2511.19049, Eq. 7-9 and appendix A.5.4). Inputs are ``[2B, *S]`` with the chosen half first.
Computation runs in float32, or float64 when an input is float64; gradients come from autograd, so
this file is independent of the hand-derived backward of the fused kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .options import STAT_NAMES, LossOptions


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32 (docs/loss.md: statistics and loss are fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def pgdpo_loss_reference(
    pred: torch.Tensor,
    ref_pred: torch.Tensor,
    target: torch.Tensor,
    options: LossOptions,
    sample_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eager PG-DPO loss. Returns ``(loss, stats)``; ``stats`` maps each of ``STAT_NAMES`` to ``[B]``.

    Shapes: ``pred``, ``ref_pred``, ``target``: ``[2B, *S]``; ``sample_weight``: ``[B]`` or None.
    Only ``pred`` is differentiated.
    """
    acc = accumulation_dtype(pred, ref_pred, target)
    two_b = pred.shape[0]
    b = two_b // 2
    p = pred.reshape(two_b, -1).to(acc)
    r = ref_pred.detach().reshape(two_b, -1).to(acc)
    t = target.detach().reshape(two_b, -1).to(acc)
    p_w, p_l, r_w, r_l, t_w, t_l = p[:b], p[b:], r[:b], r[b:], t[:b], t[b:]

    # Cancellation-free identity: (p-t)^2 - (r-t)^2 = (p-r)(p+r-2t).
    dw_el = (p_w - r_w) * (p_w + r_w - 2 * t_w)
    dl_el = (p_l - r_l) * (p_l + r_l - 2 * t_l)
    anchor_el = (p_w - r_w).square()

    beta, k1, k2, eps = options.beta, options.k1, options.k2, options.eps
    ref_l_el = (r_l - t_l).square()  # the reference's squared error on the rejected half
    if options.element:
        d_w, d_l, ref_l = dw_el, dl_el, ref_l_el
    else:
        d_w, d_l, ref_l = dw_el.mean(1), dl_el.mean(1), ref_l_el.mean(1)

    # The denominator guard e = eps + eps_rel * MSE_ref,l (docs/margin.md); eps_rel = 0 is the paper's.
    e = eps + options.eps_rel * ref_l if options.eps_rel else eps
    if options.abs_margin:
        # torch.abs has derivative 0 at 0, the convention for d|d_l|/dd_l there.
        m = (d_l - d_w) / (d_l.abs() + e)
    else:
        m = (d_w - d_l) / (d_l + e)
    m_w = m.detach() if options.detach_weights else m
    alpha = torch.sigmoid(k1 * m_w) if options.ars else torch.ones_like(m)
    gamma = torch.sigmoid(-k2 * m_w) if options.ipr else torch.ones_like(m)
    z = -0.5 * beta * (d_w - alpha * d_l)
    # softplus(-z) = -logsigmoid(z); F.softplus switches to its linear branch above 20, which costs
    # ~1e-9 in float64: logsigmoid is exact everywhere.
    loss_dpo = -F.logsigmoid(z)
    if options.anchor:
        loss_ipr = anchor_el if options.element else anchor_el.mean(1)
    else:
        loss_ipr = d_w
    per = gamma * loss_dpo + (1 - gamma) * loss_ipr

    def pair_mean(x):
        return x.mean(1) if options.element else x

    per_pair = pair_mean(per)
    weighted = per_pair if sample_weight is None else per_pair * sample_weight.detach().to(acc)
    if options.reduction == "mean":
        loss = weighted.mean()
    elif options.reduction == "sum":
        loss = weighted.sum()
    else:
        loss = weighted

    with torch.no_grad():
        dw_mean, dl_mean = pair_mean(d_w), pair_mean(d_l)
        stats = {
            "d_w": dw_mean,
            "d_l": dl_mean,
            "margin": pair_mean(m),
            "alpha": pair_mean(alpha),
            "gamma": pair_mean(gamma),
            "loss_dpo": pair_mean(loss_dpo),
            "loss_ipr": pair_mean(loss_ipr),
            "loss": per_pair,
            "mse_policy_chosen": (p_w - t_w).square().mean(1),
            "mse_policy_rejected": (p_l - t_l).square().mean(1),
            "mse_ref_chosen": (r_w - t_w).square().mean(1),
            "mse_ref_rejected": ref_l_el.mean(1),
            "reward_margin": -0.5 * beta * (dw_mean - dl_mean),
            "accuracy": (dw_mean < dl_mean).to(acc),
        }
        stats = {k: stats[k].detach() for k in STAT_NAMES}
    return loss, stats
