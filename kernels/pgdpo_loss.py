"""Fused Triton kernels of the PG-DPO loss (arXiv 2511.19049, sec. 3.3 Eq. 7-9, appendix A.5.4).

Inputs are ``[2B, N]`` (chosen rows ``0..B-1``, rejected rows ``B..2B-1``; ``N = prod(S)``)::

    d_w = mean_N[(p_w-t_w)^2 - (r_w-t_w)^2] = mean_N[(p_w-r_w)(p_w+r_w-2t_w)]    (d_l likewise)
    m = (d_w - d_l) / (d_l + eps)
    alpha = sigmoid(k1 m) if ars else 1,          gamma = sigmoid(-k2 m) if ipr else 1
    z = -beta/2 (d_w - alpha d_l),                L_dpo = softplus(-z)
    L_ipr = mean_N[(p_w-r_w)^2] (anchor) or d_w (reward)
    L_b = gamma L_dpo + (1-gamma) L_ipr,          loss = reduce_b(sample_weight_b L_b)

"element" weighting applies the same formulas per element (no mean in d_w, d_l, L_ipr) and takes
``L_b = mean_N[gamma L_dpo + (1-gamma) L_ipr]``. This module implements the backend contract of
``pgdpo.loss.op`` (``forward`` / ``backward``); the public entry point is ``pgdpo.pgdpo_loss``.

Gradients (``g_b = sample_weight_b`` times ``1/B`` for mean; ``dd_w/dp_w = 2(p_w-t_w)/N``,
``dA/dp_w = 2(p_w-r_w)/N`` for the anchor ``A``)::

    dL/dd_w = gamma beta/2 sigmoid(-z) + (1-gamma) [reward]
    dL/dd_l = -gamma beta/2 alpha sigmoid(-z)
    dL/dA   = (1-gamma) [anchor]
    detach_weights=False adds dL/dm dm/dd_w and dL/dm dm/dd_l, with dm/dd_w = 1/(d_l+eps),
    dm/dd_l = -(d_w+eps)/(d_l+eps)^2 and
    dL/dm = -(L_dpo - L_ipr) k2 gamma (1-gamma) [ipr] - gamma sigmoid(-z) beta/2 d_l k1 alpha (1-alpha) [ars]

Kernels and launches:

- sample weighting, forward: ``_sample_partial_kernel`` on a grid ``(P, 2B)``: program ``(s, row)``
  reduces a contiguous chunk of ``row`` to 4 partial sums (sum of ``(p-r)(p+r-2t)``, ``(p-t)^2``,
  ``(r-t)^2``, ``(p-r)^2``) written to ``partials[4, 2B, P]``; then ``_sample_epilogue_kernel`` (one
  program) reduces the partials in a fixed order and writes loss, stats and the per-row backward
  coefficients ``saved[2B, 2] = (c_t, c_r)``. Backward: ``_sample_backward_kernel``,
  ``grad = g_row (c_t (p-t) + c_r (p-r))``, one element-wise pass that skips ``ref_pred`` where ``c_r == 0``.
- element weighting, forward: ``_element_fused_kernel`` on a grid ``(P, B)`` reads the chosen and
  rejected rows of pair ``b`` at the same positions, writes ``dloss/dpred`` into ``saved[2B, N]``
  (when ``need_grad``) and 12 partial sums of the statistics to ``partials[12, B, P]``; then
  ``_element_epilogue_kernel``. Backward: ``_scale_rows_kernel``, ``grad = g_row saved``.

No float atomics: every reduction has a fixed order given the launch configuration, and the
configuration depends only on the shape and the device, so the same inputs give bitwise the same
outputs. Accumulation is fp32 (fp64 for fp64 inputs); offsets are int64.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import struct

import torch
import triton
import triton.language as tl

from pgdpo.loss.op import saved_dtype, unpack_flags
from pgdpo.loss.options import NUM_STATS

#: True when ``TRITON_INTERPRET=1`` was set when this module was imported: the kernels then run in
#: Triton's interpreter on CPU tensors (slow; for tests), otherwise they need CUDA tensors.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET") == "1"

_LOW_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NUM_SAMPLE_PARTIALS = 4
_NUM_ELEMENT_PARTIALS = 12
_MAX_GRID_Y = 65535  # CUDA's limit on grid dimension 1, which carries the rows (2B) or pairs
_ELEMENT_WARPS = 8  # warps of the element forward (its FOLD depends on them)

# Launch-configuration override for tests (``launch_config``); empty in normal use.
_OVERRIDE: dict = {}
# FMA contraction pinned on (Triton's historical default, which 3.10 flips): same numerics on every
# supported Triton, and no warning at each compile on 3.9.
_COMPILE = {"enable_fp_fusion": True}


# --------------------------------------------------------------------------------------------------
# Shared device helpers
# --------------------------------------------------------------------------------------------------


@triton.jit
def _sigmoid_pair(x):
    """(sigmoid(x), sigmoid(-x)) from one exp and one reciprocal, each accurate in relative terms."""
    # exp of a non-positive argument only: no overflow for large |x|.
    e = tl.exp(-tl.abs(x))
    inv = 1.0 / (1.0 + e)
    small = e * inv
    pos = x >= 0
    return tl.where(pos, inv, small), tl.where(pos, small, inv)


@triton.jit
def _softplus_sigmoid(x):
    """(softplus(x), sigmoid(x)) sharing exp(-|x|); softplus = max(x, 0) + log1p(exp(-|x|))."""
    e = tl.exp(-tl.abs(x))
    # log1p by Kahan's trick, log(u) * e / (u - 1) with u = 1 + e, which cancels the rounding of 1 + e
    # (tl has no log1p on every supported Triton version).
    u = 1.0 + e
    is_one = u == 1.0
    log1p = tl.where(is_one, e, tl.log(u) * (e / tl.where(is_one, 1.0, u - 1.0)))
    inv = 1.0 / u
    return tl.maximum(x, 0.0) + log1p, tl.where(x >= 0, inv, e * inv)


@triton.jit
def _cast_out(x, out_ptr, EMULATE_RTNE: tl.constexpr):
    """``x`` (fp32 or fp64) in the element type of ``out_ptr``, rounded to nearest even.

    Triton's interpreter converts fp32 to bf16 by truncation (GPUs round to nearest even); with
    EMULATE_RTNE (set only under the interpreter for a bf16 output) the rounding is done on the bits
    so that interpreter runs see the GPU's numerics."""
    if EMULATE_RTNE:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(out_ptr.dtype.element_ty)
    return x.to(out_ptr.dtype.element_ty)


@triton.jit
def _scalar_from_split(hi, lo, ACC: tl.constexpr):
    # Triton passes Python floats as fp32; the host splits each float64 constant into two fp32 parts
    # so that fp64 runs see ~48 bits of it (eps = 1e-6, 1/N, 1/B are not fp32-representable).
    # Built as a [1] tensor rather than with .to(): the interpreter hands scalars over as Python floats.
    return tl.zeros([1], ACC) + hi + lo


@triton.jit
def _pair_weights(d_w, d_l, anchor_term, ref_l, beta, k1, k2, eps, eps_rel,
                  ARS: tl.constexpr, IPR: tl.constexpr, SAME_K: tl.constexpr, ANCHOR: tl.constexpr,
                  DETACH: tl.constexpr, NEED_GRAD: tl.constexpr, ABS: tl.constexpr, REL: tl.constexpr):
    """Per pair (sample mode) or per element (element mode): m, alpha, gamma, L_dpo, L_ipr, L and the
    derivatives of L w.r.t. d_w, d_l and the anchor term. ``ref_l``: the reference's squared error on
    the rejected half, used by the relative guard ``e = eps + eps_rel * ref_l`` (REL) only."""
    if REL:
        e = eps + eps_rel * ref_l
    else:
        e = eps + tl.zeros(d_l.shape, d_l.dtype)
    if ABS:
        # m = (d_l - d_w) / (|d_l| + e): the sign of the reward margin (docs/margin.md).
        den = tl.abs(d_l) + e
        m = (d_l - d_w) / den
    else:
        den = d_l + e
        m = (d_w - d_l) / den
    if ARS and IPR and SAME_K:
        # k1 == k2 (the paper's default 10/10): gamma = sigmoid(-k m) shares alpha's exp.
        alpha, gamma = _sigmoid_pair(k1 * m)
    else:
        if ARS:
            alpha, _ = _sigmoid_pair(k1 * m)
        else:
            alpha = tl.full(m.shape, 1.0, m.dtype)
        if IPR:
            _, gamma = _sigmoid_pair(k2 * m)
        else:
            gamma = tl.full(m.shape, 1.0, m.dtype)
    half_beta = 0.5 * beta
    z = -half_beta * (d_w - alpha * d_l)
    loss_dpo, sig_nz = _softplus_sigmoid(-z)  # sig_nz = sigmoid(-z) = -dL_dpo/dz
    if ANCHOR:
        loss_ipr = anchor_term
    else:
        loss_ipr = d_w
    loss = gamma * loss_dpo + (1.0 - gamma) * loss_ipr

    g_dw = tl.zeros(m.shape, m.dtype)
    g_dl = tl.zeros(m.shape, m.dtype)
    g_a = tl.zeros(m.shape, m.dtype)
    if NEED_GRAD:
        g_dw = gamma * half_beta * sig_nz
        g_dl = -gamma * half_beta * alpha * sig_nz
        if ANCHOR:
            g_a = 1.0 - gamma
        else:
            g_dw = g_dw + (1.0 - gamma)
        if not DETACH:
            g_m = tl.zeros(m.shape, m.dtype)
            if IPR:
                g_m = g_m - (loss_dpo - loss_ipr) * k2 * gamma * (1.0 - gamma)
            if ARS:
                g_m = g_m - gamma * sig_nz * half_beta * d_l * k1 * alpha * (1.0 - alpha)
            if ABS:
                # dm/dd_w = -1/den, dm/dd_l = 1/den - m sign(d_l)/den with sign(0) = 0 (d|x|/dx at 0 := 0).
                sgn = tl.where(d_l > 0, 1.0, tl.where(d_l < 0, -1.0, 0.0))
                g_dw = g_dw - g_m / den
                g_dl = g_dl + g_m * (1.0 - m * sgn) / den
            else:
                g_dw = g_dw + g_m / den
                g_dl = g_dl - g_m * (d_w + e) / (den * den)
    return m, alpha, gamma, loss_dpo, loss_ipr, loss, g_dw, g_dl, g_a


@triton.jit
def _reduce_partials(ptr, rows, row_mask, P, ACC: tl.constexpr, BLOCK_B: tl.constexpr,
                     BLOCK_P: tl.constexpr):
    """Sum ``ptr[rows, 0:P]`` (a ``[*, P]`` row-major slab) over P in a fixed order -> ``[BLOCK_B]``."""
    acc = tl.zeros([BLOCK_B, BLOCK_P], ACC)
    for p0 in range(0, P, BLOCK_P):
        cols = p0 + tl.arange(0, BLOCK_P)
        mask = row_mask[:, None] & (cols < P)[None, :]
        acc += tl.load(ptr + rows[:, None] * P + cols[None, :], mask=mask, other=0.0).to(ACC)
    return tl.sum(acc, axis=1)


@triton.jit
def _put_stat(tile, cols, col: tl.constexpr, value):
    """``tile[:, col] = value`` (a selection: the value's bits are stored unchanged)."""
    return tl.where(cols[None, :] == col, value[:, None], tile)


@triton.jit
def _fold(x, GROUP: tl.constexpr):
    """``[BLOCK] -> [BLOCK // GROUP]``: the sum of each run of ``GROUP`` consecutive values. With ``GROUP``
    the elements each thread holds contiguously (the launcher's ``_element_fold``) the reshape keeps the
    layout and the sum stays inside the thread: no shuffle, no shared memory."""
    return tl.sum(tl.reshape(x, [x.shape[0] // GROUP, GROUP]), axis=1)


@triton.jit
def _store_stat(stats_ptr, pairs, mask, col: tl.constexpr, value, NSTATS: tl.constexpr):
    tl.store(stats_ptr + pairs * NSTATS + col, value, mask=mask)


# --------------------------------------------------------------------------------------------------
# Sample weighting
# --------------------------------------------------------------------------------------------------


@triton.jit
def _sample_partial_kernel(p_ptr, r_ptr, t_ptr, part_ptr, N, CHUNK, ROWS, P,
                           ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Grid ``(P, 2B)``: partial sums over ``row[s*CHUNK : (s+1)*CHUNK]`` into ``part[4, 2B, P]``:
    ``(p-r)(p+r-2t)`` (cancellation-free ``(p-t)^2-(r-t)^2``), ``(p-t)^2``, ``(r-t)^2``, ``(p-r)^2``."""
    split = tl.program_id(0)
    row = tl.program_id(1)
    row_start = row.to(tl.int64) * N
    chunk_start = split.to(tl.int64) * CHUNK
    acc_d = tl.zeros([BLOCK], ACC)
    acc_pt = tl.zeros([BLOCK], ACC)
    acc_rt = tl.zeros([BLOCK], ACC)
    acc_pr = tl.zeros([BLOCK], ACC)
    # Offsets from the induction variable (not a loop-carried pointer) keep the divisibility facts
    # the compiler needs for vectorised loads.
    for start in range(0, CHUNK, BLOCK):
        offs = chunk_start + start + tl.arange(0, BLOCK)
        mask = offs < N
        p = tl.load(p_ptr + row_start + offs, mask=mask, other=0.0).to(ACC)
        r = tl.load(r_ptr + row_start + offs, mask=mask, other=0.0).to(ACC)
        t = tl.load(t_ptr + row_start + offs, mask=mask, other=0.0).to(ACC)
        pt = p - t
        rt = r - t
        pr = p - r
        acc_d += pr * (p + r - 2.0 * t)
        acc_pt += pt * pt
        acc_rt += rt * rt
        acc_pr += pr * pr
    out = part_ptr + row * P + split
    slab = ROWS * P
    tl.store(out, tl.sum(acc_d, axis=0))
    tl.store(out + slab, tl.sum(acc_pt, axis=0))
    tl.store(out + 2 * slab, tl.sum(acc_rt, axis=0))
    tl.store(out + 3 * slab, tl.sum(acc_pr, axis=0))


@triton.jit
def _sample_epilogue_kernel(part_ptr, weight_ptr, loss_ptr, stats_ptr, saved_ptr, B, P,
                            beta_hi, beta_lo, k1_hi, k1_lo, k2_hi, k2_lo, eps_hi, eps_lo,
                            eps_rel_hi, eps_rel_lo, inv_n_hi, inv_n_lo, scale_hi, scale_lo,
                            HAS_WEIGHT: tl.constexpr, ARS: tl.constexpr, IPR: tl.constexpr,
                            SAME_K: tl.constexpr, ANCHOR: tl.constexpr, DETACH: tl.constexpr,
                            ABS: tl.constexpr, REL: tl.constexpr, REDUCTION: tl.constexpr,
                            ACC: tl.constexpr, NSTATS: tl.constexpr, NSTATS_P2: tl.constexpr,
                            BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr):
    """One program: per pair, reduce ``part[4, 2B, P]``, evaluate Eq. 7-9, write ``stats[B, NSTATS]``,
    ``saved[2B, 2] = (c_t, c_r)`` and ``loss`` (``[B]`` for none, else the fixed-order sum over B)."""
    beta = _scalar_from_split(beta_hi, beta_lo, ACC)
    k1 = _scalar_from_split(k1_hi, k1_lo, ACC)
    k2 = _scalar_from_split(k2_hi, k2_lo, ACC)
    eps = _scalar_from_split(eps_hi, eps_lo, ACC)
    eps_rel = _scalar_from_split(eps_rel_hi, eps_rel_lo, ACC)
    inv_n = _scalar_from_split(inv_n_hi, inv_n_lo, ACC)
    scale = _scalar_from_split(scale_hi, scale_lo, ACC)  # 1/B for mean, else 1
    slab = 2 * B * P
    total = tl.zeros([BLOCK_B], ACC)
    for b0 in range(0, B, BLOCK_B):
        pairs = b0 + tl.arange(0, BLOCK_B)
        mask = pairs < B
        rej = pairs + B
        d_w = _reduce_partials(part_ptr, pairs, mask, P, ACC, BLOCK_B, BLOCK_P) * inv_n
        d_l = _reduce_partials(part_ptr, rej, mask, P, ACC, BLOCK_B, BLOCK_P) * inv_n
        mse_pw = _reduce_partials(part_ptr + slab, pairs, mask, P, ACC, BLOCK_B, BLOCK_P) * inv_n
        mse_pl = _reduce_partials(part_ptr + slab, rej, mask, P, ACC, BLOCK_B, BLOCK_P) * inv_n
        mse_rw = _reduce_partials(part_ptr + 2 * slab, pairs, mask, P, ACC, BLOCK_B, BLOCK_P) * inv_n
        mse_rl = _reduce_partials(part_ptr + 2 * slab, rej, mask, P, ACC, BLOCK_B, BLOCK_P) * inv_n
        anchor = _reduce_partials(part_ptr + 3 * slab, pairs, mask, P, ACC, BLOCK_B, BLOCK_P) * inv_n

        m, alpha, gamma, loss_dpo, loss_ipr, loss, g_dw, g_dl, g_a = _pair_weights(
            d_w, d_l, anchor, mse_rl, beta, k1, k2, eps, eps_rel, ARS, IPR, SAME_K, ANCHOR, DETACH, True,
            ABS, REL)

        if HAS_WEIGHT:
            weight = tl.load(weight_ptr + pairs, mask=mask, other=0.0).to(ACC)
        else:
            weight = tl.full([BLOCK_B], 1.0, ACC)
        weighted = weight * loss
        if REDUCTION == 0:
            tl.store(loss_ptr + pairs, weighted, mask=mask)
        else:
            total += tl.where(mask, weighted, 0.0)

        coef = weight * scale * 2.0 * inv_n
        tl.store(saved_ptr + 2 * pairs, coef * g_dw, mask=mask)
        tl.store(saved_ptr + 2 * pairs + 1, coef * g_a, mask=mask)
        tl.store(saved_ptr + 2 * rej, coef * g_dl, mask=mask)
        tl.store(saved_ptr + 2 * rej + 1, tl.zeros([BLOCK_B], ACC), mask=mask)

        # The 14 columns as one [BLOCK_B, NSTATS_P2] tile and one masked store: 14 separate stores kept 14
        # address pairs live and made ptxas spill one on sm_90 (bench/NOTES.md, SASS audit).
        cols = tl.arange(0, NSTATS_P2)
        tile = tl.zeros([BLOCK_B, NSTATS_P2], ACC)
        tile = _put_stat(tile, cols, 0, d_w)
        tile = _put_stat(tile, cols, 1, d_l)
        tile = _put_stat(tile, cols, 2, m)
        tile = _put_stat(tile, cols, 3, alpha)
        tile = _put_stat(tile, cols, 4, gamma)
        tile = _put_stat(tile, cols, 5, loss_dpo)
        tile = _put_stat(tile, cols, 6, loss_ipr)
        tile = _put_stat(tile, cols, 7, loss)
        tile = _put_stat(tile, cols, 8, mse_pw)
        tile = _put_stat(tile, cols, 9, mse_pl)
        tile = _put_stat(tile, cols, 10, mse_rw)
        tile = _put_stat(tile, cols, 11, mse_rl)
        tile = _put_stat(tile, cols, 12, -0.5 * beta * (d_w - d_l))
        tile = _put_stat(tile, cols, 13, tl.where(d_w < d_l, 1.0, 0.0).to(ACC))
        tl.store(stats_ptr + pairs[:, None] * NSTATS + cols[None, :], tile,
                 mask=mask[:, None] & (cols < NSTATS)[None, :])
    if REDUCTION != 0:
        tl.store(loss_ptr + tl.arange(0, 1), tl.sum(total, axis=0) * scale)


@triton.jit
def _sample_backward_kernel(grad_loss_ptr, p_ptr, r_ptr, t_ptr, saved_ptr, out_ptr, B, N,
                            PER_PAIR: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                            EMULATE_RTNE: tl.constexpr):
    """Grid ``(cdiv(N, BLOCK), 2B)``: ``grad[row] = g_row (c_t (p-t) + c_r (p-r))``."""
    block = tl.program_id(0)
    row = tl.program_id(1)
    if PER_PAIR:
        g = tl.load(grad_loss_ptr + row % B).to(ACC)
    else:
        g = tl.load(grad_loss_ptr).to(ACC)
    c_t = tl.load(saved_ptr + 2 * row).to(ACC) * g
    c_r = tl.load(saved_ptr + 2 * row + 1).to(ACC) * g
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    ptr_off = row.to(tl.int64) * N + offs
    p = tl.load(p_ptr + ptr_off, mask=mask, other=0.0).to(ACC)
    t = tl.load(t_ptr + ptr_off, mask=mask, other=0.0).to(ACC)
    # Rejected rows (and every row without the anchor term) have c_r == 0: a predicated-off load
    # moves no bytes, so ref_pred is read only where it matters. (A limit rather than `mask & bool`:
    # the interpreter cannot broadcast a scalar bool.)
    r_limit = tl.where(c_r != 0.0, N, 0)
    r = tl.load(r_ptr + ptr_off, mask=offs < r_limit, other=0.0).to(ACC)
    grad = c_t * (p - t) + c_r * (p - r)
    tl.store(out_ptr + ptr_off, _cast_out(grad, out_ptr, EMULATE_RTNE), mask=mask)


# --------------------------------------------------------------------------------------------------
# Element weighting
# --------------------------------------------------------------------------------------------------


@triton.jit
def _element_fused_kernel(p_ptr, r_ptr, t_ptr, weight_ptr, grad_ptr, part_ptr, B, N, CHUNK, P,
                          beta_hi, beta_lo, k1_hi, k1_lo, k2_hi, k2_lo, eps_hi, eps_lo,
                          eps_rel_hi, eps_rel_lo, inv_n_hi, inv_n_lo, scale_hi, scale_lo,
                          HAS_WEIGHT: tl.constexpr, ARS: tl.constexpr, IPR: tl.constexpr,
                          SAME_K: tl.constexpr, ANCHOR: tl.constexpr, DETACH: tl.constexpr,
                          ABS: tl.constexpr, REL: tl.constexpr, NEED_GRAD: tl.constexpr,
                          STATS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                          FOLD: tl.constexpr):
    """Grid ``(P, B)``: Eq. 7-9 per element of pair ``b`` over ``[s*CHUNK, (s+1)*CHUNK)``; writes
    ``dloss/dpred`` for both rows into ``grad[2B, N]`` (when NEED_GRAD) and 12 partial sums
    (d_w, d_l, m, alpha, gamma, L_dpo, L_ipr, L, 4 MSEs) into ``part[12, B, P]``. Without STATS only
    the loss sum (slot 7) is accumulated and written: one fp32 accumulator per lane instead of twelve,
    which matters for register pressure on a GPU. Each input is loaded in its own dtype.

    The accumulators are ``[BLOCK // FOLD]``: each step first sums the ``FOLD`` values a thread holds
    (``_fold``), so the loop carries one register per accumulator and thread instead of ``FOLD`` (the same
    number of additions). With 12 accumulators and 4 fp32 per thread that is 36 registers fewer across
    the loop (bench/NOTES.md, SASS audit: the heavy option set spilled at 128 registers without it)."""
    split = tl.program_id(0)
    pair = tl.program_id(1)
    beta = _scalar_from_split(beta_hi, beta_lo, ACC)
    k1 = _scalar_from_split(k1_hi, k1_lo, ACC)
    k2 = _scalar_from_split(k2_hi, k2_lo, ACC)
    eps = _scalar_from_split(eps_hi, eps_lo, ACC)
    eps_rel = _scalar_from_split(eps_rel_hi, eps_rel_lo, ACC)
    inv_n = _scalar_from_split(inv_n_hi, inv_n_lo, ACC)
    scale = _scalar_from_split(scale_hi, scale_lo, ACC)
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + pair).to(ACC)
    else:
        weight = 1.0
    coef = weight * scale * inv_n * 2.0  # d(element value)/dp carries the 2 of the square
    w_start = pair.to(tl.int64) * N
    l_start = (pair + B).to(tl.int64) * N
    chunk_start = split.to(tl.int64) * CHUNK
    s_loss = tl.zeros([BLOCK // FOLD], ACC)
    if STATS:
        s_dw = tl.zeros([BLOCK // FOLD], ACC)
        s_dl = tl.zeros([BLOCK // FOLD], ACC)
        s_m = tl.zeros([BLOCK // FOLD], ACC)
        s_alpha = tl.zeros([BLOCK // FOLD], ACC)
        s_gamma = tl.zeros([BLOCK // FOLD], ACC)
        s_dpo = tl.zeros([BLOCK // FOLD], ACC)
        s_ipr = tl.zeros([BLOCK // FOLD], ACC)
        s_pw = tl.zeros([BLOCK // FOLD], ACC)
        s_pl = tl.zeros([BLOCK // FOLD], ACC)
        s_rw = tl.zeros([BLOCK // FOLD], ACC)
        s_rl = tl.zeros([BLOCK // FOLD], ACC)
    for start in range(0, CHUNK, BLOCK):
        offs = chunk_start + start + tl.arange(0, BLOCK)
        mask = offs < N
        p_w = tl.load(p_ptr + w_start + offs, mask=mask, other=0.0).to(ACC)
        r_w = tl.load(r_ptr + w_start + offs, mask=mask, other=0.0).to(ACC)
        t_w = tl.load(t_ptr + w_start + offs, mask=mask, other=0.0).to(ACC)
        p_l = tl.load(p_ptr + l_start + offs, mask=mask, other=0.0).to(ACC)
        r_l = tl.load(r_ptr + l_start + offs, mask=mask, other=0.0).to(ACC)
        t_l = tl.load(t_ptr + l_start + offs, mask=mask, other=0.0).to(ACC)
        pt_w = p_w - t_w
        rt_w = r_w - t_w
        pr_w = p_w - r_w
        pt_l = p_l - t_l
        rt_l = r_l - t_l
        d_w = pr_w * (p_w + r_w - 2.0 * t_w)
        d_l = (p_l - r_l) * (p_l + r_l - 2.0 * t_l)
        m, alpha, gamma, loss_dpo, loss_ipr, loss, g_dw, g_dl, g_a = _pair_weights(
            d_w, d_l, pr_w * pr_w, rt_l * rt_l, beta, k1, k2, eps, eps_rel, ARS, IPR, SAME_K, ANCHOR, DETACH,
            NEED_GRAD, ABS, REL)
        if NEED_GRAD:
            grad_w = coef * (g_dw * pt_w + g_a * pr_w)
            grad_l = coef * (g_dl * pt_l)
            tl.store(grad_ptr + w_start + offs, grad_w.to(grad_ptr.dtype.element_ty), mask=mask)
            tl.store(grad_ptr + l_start + offs, grad_l.to(grad_ptr.dtype.element_ty), mask=mask)
        # Padding lanes evaluate the formulas on zeros (L_dpo = log 2 there): keep them out of the sums.
        s_loss += _fold(tl.where(mask, loss, 0.0), FOLD)
        if STATS:
            s_dw += _fold(tl.where(mask, d_w, 0.0), FOLD)
            s_dl += _fold(tl.where(mask, d_l, 0.0), FOLD)
            s_m += _fold(tl.where(mask, m, 0.0), FOLD)
            s_alpha += _fold(tl.where(mask, alpha, 0.0), FOLD)
            s_gamma += _fold(tl.where(mask, gamma, 0.0), FOLD)
            s_dpo += _fold(tl.where(mask, loss_dpo, 0.0), FOLD)
            s_ipr += _fold(tl.where(mask, loss_ipr, 0.0), FOLD)
            s_pw += _fold(pt_w * pt_w, FOLD)
            s_pl += _fold(pt_l * pt_l, FOLD)
            s_rw += _fold(rt_w * rt_w, FOLD)
            s_rl += _fold(rt_l * rt_l, FOLD)
    out = part_ptr + pair * P + split
    slab = B * P
    tl.store(out + 7 * slab, tl.sum(s_loss, axis=0))
    if STATS:
        tl.store(out, tl.sum(s_dw, axis=0))
        tl.store(out + slab, tl.sum(s_dl, axis=0))
        tl.store(out + 2 * slab, tl.sum(s_m, axis=0))
        tl.store(out + 3 * slab, tl.sum(s_alpha, axis=0))
        tl.store(out + 4 * slab, tl.sum(s_gamma, axis=0))
        tl.store(out + 5 * slab, tl.sum(s_dpo, axis=0))
        tl.store(out + 6 * slab, tl.sum(s_ipr, axis=0))
        tl.store(out + 8 * slab, tl.sum(s_pw, axis=0))
        tl.store(out + 9 * slab, tl.sum(s_pl, axis=0))
        tl.store(out + 10 * slab, tl.sum(s_rw, axis=0))
        tl.store(out + 11 * slab, tl.sum(s_rl, axis=0))


@triton.jit
def _element_epilogue_kernel(part_ptr, weight_ptr, loss_ptr, stats_ptr, B, P,
                             beta_hi, beta_lo, inv_n_hi, inv_n_lo, scale_hi, scale_lo,
                             HAS_WEIGHT: tl.constexpr, REDUCTION: tl.constexpr, STATS: tl.constexpr,
                             ACC: tl.constexpr, NSTATS: tl.constexpr, BLOCK_B: tl.constexpr,
                             BLOCK_P: tl.constexpr):
    """One program: per pair, reduce ``part[12, B, P]`` in a fixed order into means over the N
    elements (stats columns 0-11), reward margin and accuracy from the mean d_w / d_l, and the loss.
    Without STATS only the loss (column 7) is computed and the other columns are NaN."""
    beta = _scalar_from_split(beta_hi, beta_lo, ACC)
    inv_n = _scalar_from_split(inv_n_hi, inv_n_lo, ACC)
    scale = _scalar_from_split(scale_hi, scale_lo, ACC)
    slab = B * P
    total = tl.zeros([BLOCK_B], ACC)
    for b0 in range(0, B, BLOCK_B):
        pairs = b0 + tl.arange(0, BLOCK_B)
        mask = pairs < B
        if STATS:
            # Partial columns 0..11 are exactly stats columns 0..11 (d_w .. mse_ref_rejected).
            d_w = _reduce_partials(part_ptr, pairs, mask, P, ACC, BLOCK_B, BLOCK_P) * inv_n
            d_l = _reduce_partials(part_ptr + slab, pairs, mask, P, ACC, BLOCK_B, BLOCK_P) * inv_n
            _store_stat(stats_ptr, pairs, mask, 0, d_w, NSTATS)
            _store_stat(stats_ptr, pairs, mask, 1, d_l, NSTATS)
            for k in tl.static_range(2, 12):
                if k != 7:
                    mean = _reduce_partials(part_ptr + k * slab, pairs, mask, P, ACC, BLOCK_B,
                                            BLOCK_P) * inv_n
                    _store_stat(stats_ptr, pairs, mask, k, mean, NSTATS)
            _store_stat(stats_ptr, pairs, mask, 12, -0.5 * beta * (d_w - d_l), NSTATS)
            _store_stat(stats_ptr, pairs, mask, 13, tl.where(d_w < d_l, 1.0, 0.0).to(ACC), NSTATS)
        else:
            nan = tl.full([BLOCK_B], float("nan"), ACC)
            for k in tl.static_range(0, NSTATS):
                if k != 7:
                    _store_stat(stats_ptr, pairs, mask, k, nan, NSTATS)
        loss = _reduce_partials(part_ptr + 7 * slab, pairs, mask, P, ACC, BLOCK_B, BLOCK_P) * inv_n
        _store_stat(stats_ptr, pairs, mask, 7, loss, NSTATS)
        if HAS_WEIGHT:
            weighted = tl.load(weight_ptr + pairs, mask=mask, other=0.0).to(ACC) * loss
        else:
            weighted = loss
        if REDUCTION == 0:
            tl.store(loss_ptr + pairs, weighted, mask=mask)
        else:
            total += tl.where(mask, weighted, 0.0)
    if REDUCTION != 0:
        tl.store(loss_ptr + tl.arange(0, 1), tl.sum(total, axis=0) * scale)


@triton.jit
def _scale_rows_kernel(grad_loss_ptr, saved_ptr, out_ptr, B, N, PER_PAIR: tl.constexpr,
                       ACC: tl.constexpr, BLOCK: tl.constexpr, EMULATE_RTNE: tl.constexpr):
    """Grid ``(cdiv(N, BLOCK), 2B)``: ``out[row] = g_row * saved[row]`` (element-mode backward)."""
    block = tl.program_id(0)
    row = tl.program_id(1)
    if PER_PAIR:
        g = tl.load(grad_loss_ptr + row % B).to(ACC)
    else:
        g = tl.load(grad_loss_ptr).to(ACC)
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    ptr_off = row.to(tl.int64) * N + offs
    x = tl.load(saved_ptr + ptr_off, mask=mask, other=0.0).to(ACC)
    tl.store(out_ptr + ptr_off, _cast_out(g * x, out_ptr, EMULATE_RTNE), mask=mask)


# --------------------------------------------------------------------------------------------------
# Host side: launch configuration
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def launch_config(*, block: int | None = None, split: int | None = None, backward_block: int | None = None,
                  epilogue_blocks: tuple[int, int] | None = None, fold: int | None = None):
    """Force the launch configuration (tests and benchmarks; not thread-safe).

    ``block``: elements per loop step of the forward kernels; ``split``: programs per row (sample) or
    pair (element), capped at the row's number of blocks; ``backward_block``: elements per backward
    program; ``epilogue_blocks``: ``(BLOCK_B, BLOCK_P)`` tile of the epilogue; ``fold``: values of the
    element forward's ``[BLOCK]`` accumulators summed into one each step (capped at the block). All
    powers of two.
    """
    def pow2(name, value, low):
        if value is not None and (value < low or value & (value - 1)):
            raise ValueError(f"{name} must be a power of two >= {low}, got {value}")

    pow2("block", block, 16)
    pow2("backward_block", backward_block, 16)
    pow2("fold", fold, 1)
    if epilogue_blocks is not None:
        pow2("epilogue_blocks[0]", epilogue_blocks[0], 1)
        pow2("epilogue_blocks[1]", epilogue_blocks[1], 1)
    if split is not None and split < 1:
        raise ValueError(f"split must be >= 1, got {split}")
    previous = dict(_OVERRIDE)
    requested = dict(block=block, split=split, backward_block=backward_block, epilogue_blocks=epilogue_blocks,
                     fold=fold)
    _OVERRIDE.update({k: v for k, v in requested.items() if v is not None})
    try:
        yield
    finally:
        _OVERRIDE.clear()
        _OVERRIDE.update(previous)


@functools.cache
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    """Multiprocessors of ``device`` (the one seam ``bench.sass`` replaces to replay the launcher's
    configuration for a GPU it does not have)."""
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


def _forward_config(n: int, programs_per_split: int, device: torch.device, default_block: int):
    """(block, split, chunk): each of ``programs_per_split * split`` programs loops over ``chunk``
    elements (a multiple of ``block``) in steps of ``block``; ``split * chunk >= n``."""
    if INTERPRET:
        # The interpreter pays per program and per loop step, not per lane: few, wide programs.
        block = min(max(triton.next_power_of_2(n), 16), 4096)
        split = 1
    else:
        block = default_block
        # Memory-bound streaming: ~8 resident programs per SM so a batch of a few huge samples
        # (B = 1 video pair) still spreads over the whole GPU.
        target = 8 * _sm_count(device)
        split = max(1, -(-target // programs_per_split))
    block = _OVERRIDE.get("block", block)
    split = _OVERRIDE.get("split", split)
    n_blocks = -(-n // block)
    split = min(split, n_blocks)
    iters = -(-n_blocks // split)
    split = -(-n_blocks // iters)  # drop programs that would get no block
    return block, split, iters * block


def _element_fold(n: int, block: int) -> int:
    """FOLD of ``_element_fused_kernel``: the elements of a ``[block]`` tensor each thread holds
    contiguously, which it sums into one value before the loop carries them. On a 16-aligned N Triton
    lays ``block`` elements out ``block / (32 * warps)`` consecutive per thread (the 128-bit loads); on
    an unaligned N one per thread per row of threads, where a fold of 2 would be a shuffle across
    threads (80 registers instead of 64 on ragged): no fold there. The interpreter follows the same rule
    (any power of two up to the block gives the same sums up to rounding)."""
    fold = max(1, block // (32 * _ELEMENT_WARPS)) if n % 16 == 0 else 1
    return min(_OVERRIDE.get("fold", fold), block)


def _backward_block(n: int) -> int:
    block = min(max(triton.next_power_of_2(n), 16), 4096) if INTERPRET else 1024
    return _OVERRIDE.get("backward_block", block)


def _epilogue_blocks(b: int, p: int) -> tuple[int, int]:
    if "epilogue_blocks" in _OVERRIDE:
        return _OVERRIDE["epilogue_blocks"]
    # One program loops over chunks of BLOCK_B pairs and tiles of BLOCK_P partials: a tile of at most
    # 4096 values keeps it in registers while B and P stay one or two iterations in practice.
    block_b = min(triton.next_power_of_2(b), 64)
    block_p = min(triton.next_power_of_2(p), max(1, 4096 // block_b))
    return block_b, block_p


def _f32_split(name: str, x: float) -> tuple[float, float]:
    if not math.isfinite(x) or abs(x) > 3.0e38:
        raise ValueError(f"pgdpo triton backend: {name}={x!r} does not fit in float32")
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, struct.unpack("f", struct.pack("f", x - hi))[0]


def _acc_types(dtype: torch.dtype):
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def _on_device(t: torch.Tensor):
    # Triton launches on the current CUDA device, not the tensors' one.
    return contextlib.nullcontext() if INTERPRET else torch.cuda.device(t.device)


def _check_device(t: torch.Tensor) -> None:
    if INTERPRET and t.device.type != "cpu":
        raise ValueError(f"pgdpo triton backend: TRITON_INTERPRET=1 was set when pgdpo.kernels was "
                         f"imported, so the kernels run in the interpreter on CPU tensors; got {t.device}")
    if not INTERPRET and t.device.type != "cuda":
        raise ValueError(f"pgdpo triton backend: the kernels need CUDA tensors, got {t.device} (for CPU "
                         f"tensors set TRITON_INTERPRET=1 before importing pgdpo)")


def _check_inputs(pred, ref_pred, target, sample_weight, acc):
    if pred.dim() != 2 or pred.shape[0] % 2 or pred.shape[0] == 0 or pred.shape[1] == 0:
        raise ValueError(f"pgdpo triton backend: pred must be [2B, N] with B, N > 0, got {tuple(pred.shape)}")
    _check_device(pred)
    for name, t in (("pred", pred), ("ref_pred", ref_pred), ("target", target)):
        if t.dtype not in _LOW_DTYPES + (torch.float64,):
            raise TypeError(f"pgdpo triton backend: {name} has unsupported dtype {t.dtype}")
        if (t.dtype == torch.float64) != (pred.dtype == torch.float64):
            raise ValueError(f"pgdpo triton backend: {name} is {t.dtype} and pred is {pred.dtype}: float64 "
                             f"inputs must all be float64 (fp32 / bf16 / fp16 mix freely)")
        if t.shape != pred.shape or t.device != pred.device:
            raise ValueError(f"pgdpo triton backend: {name} is {tuple(t.shape)} on {t.device}; "
                             f"it must match pred ({tuple(pred.shape)} on {pred.device})")
    for name, t in (("pred", pred), ("ref_pred", ref_pred), ("target", target)):
        if not t.is_contiguous():
            raise ValueError(f"pgdpo triton backend: {name} must be contiguous")
    if pred.shape[0] > _MAX_GRID_Y:
        raise ValueError(f"pgdpo triton backend: at most {_MAX_GRID_Y // 2} pairs per call, got "
                         f"{pred.shape[0] // 2}")
    if sample_weight is not None:
        b = pred.shape[0] // 2
        if (sample_weight.shape != (b,) or sample_weight.dtype != acc or sample_weight.device != pred.device
                or not sample_weight.is_contiguous()):
            raise ValueError(f"pgdpo triton backend: sample_weight must be a contiguous [{b}] {acc} tensor "
                             f"on {pred.device}, got {tuple(sample_weight.shape)} {sample_weight.dtype} "
                             f"on {sample_weight.device}")


# --------------------------------------------------------------------------------------------------
# Host side: the kernels of the op pgdpo.loss.op defines
# --------------------------------------------------------------------------------------------------


def forward(pred, ref_pred, target, sample_weight, scalars, flags):
    """The ``fused_loss`` kernel (contract: ``pgdpo.loss.op``). Returns ``(loss, stats, saved)``.

    ``loss``: ``[B]`` (reduction 0 = none) or ``[]`` (1 = mean, 2 = sum); ``stats``: ``[B, NUM_STATS]``
    (element weighting without ``need_stats``: only the ``loss`` column, the others NaN);
    ``saved``: ``[2B, 2]`` per-row ``(c_t, c_r)`` (sample) or ``[2B, N]`` ``dloss/dpred`` (element,
    fp32 for bf16 / fp16 ``pred``, empty when not ``need_grad``). Two launches.
    """
    beta, k1, k2, eps, eps_rel = scalars
    opt = unpack_flags(flags)
    ars, ipr, anchor, element, detach = opt["ars"], opt["ipr"], opt["anchor"], opt["element"], opt["detach"]
    reduction, need_grad, abs_margin, need_stats = (opt["reduction"], opt["need_grad"], opt["abs_margin"],
                                                    opt["need_stats"])
    acc, acc_tl = _acc_types(pred.dtype)
    _check_inputs(pred, ref_pred, target, sample_weight, acc)
    if reduction not in (0, 1, 2):
        raise ValueError(f"pgdpo triton backend: reduction must be 0 (none), 1 (mean) or 2 (sum), "
                         f"got {reduction}")
    two_b, n = pred.shape
    b = two_b // 2
    scalars = dict(beta=_f32_split("beta", float(beta)), k1=_f32_split("k1", float(k1)),
                   k2=_f32_split("k2", float(k2)), eps=_f32_split("eps", float(eps)),
                   eps_rel=_f32_split("eps_rel", float(eps_rel)),
                   inv_n=_f32_split("1/N", 1.0 / n),
                   scale=_f32_split("scale", 1.0 / b if reduction == 1 else 1.0))  # the 1/B of mean
    flat = [v for pair in scalars.values() for v in pair]
    loss = torch.empty((b,) if reduction == 0 else (), dtype=acc, device=pred.device)
    stats = torch.empty((b, NUM_STATS), dtype=acc, device=pred.device)
    has_weight = sample_weight is not None
    flags = dict(HAS_WEIGHT=has_weight, ARS=bool(ars), IPR=bool(ipr), SAME_K=float(k1) == float(k2),
                 ANCHOR=bool(anchor), DETACH=bool(detach), ABS=bool(abs_margin), REL=float(eps_rel) != 0.0)

    if not element:
        block, split, chunk = _forward_config(n, two_b, pred.device, default_block=2048)
        partials = torch.empty((_NUM_SAMPLE_PARTIALS, two_b, split), dtype=acc, device=pred.device)
        saved = torch.empty((two_b, 2), dtype=acc, device=pred.device)
        block_b, block_p = _epilogue_blocks(b, split)
        with _on_device(pred):
            _sample_partial_kernel[(split, two_b)](
                pred, ref_pred, target, partials, n, chunk, two_b, split,
                ACC=acc_tl, BLOCK=block, num_warps=8, **_COMPILE)
            _sample_epilogue_kernel[(1,)](
                partials, sample_weight if has_weight else partials, loss, stats, saved, b, split, *flat,
                **flags, REDUCTION=int(reduction), ACC=acc_tl, NSTATS=NUM_STATS,
                NSTATS_P2=triton.next_power_of_2(NUM_STATS), BLOCK_B=block_b,
                # 8 warps: with 4, ptxas parked a value in local memory for some tiles (H20, 8 pairs:
                # BLOCK_P = 64); one program, so the registers per thread cost no occupancy
                BLOCK_P=block_p, num_warps=8, **_COMPILE)
        return loss, stats, saved

    # N not divisible by 16: rows start unaligned, so loads are per element whatever the block, and
    # 1024 elements per 256 threads kept 24 scalar addresses live per thread (128 registers, a spill on
    # sm_90 with the margin options); 512 halves that (64 registers, twice the occupancy). SASS audit,
    # bench/NOTES.md.
    block, split, chunk = _forward_config(n, b, pred.device, default_block=1024 if n % 16 == 0 else 512)
    partials = torch.empty((_NUM_ELEMENT_PARTIALS, b, split), dtype=acc, device=pred.device)
    saved = torch.empty((two_b, n) if need_grad else (0,), dtype=saved_dtype(pred.dtype), device=pred.device)
    block_b, block_p = _epilogue_blocks(b, split)
    with _on_device(pred):
        _element_fused_kernel[(split, b)](
            pred, ref_pred, target, sample_weight if has_weight else partials, saved if need_grad else pred,
            partials, b, n, chunk, split, *flat,
            **flags, NEED_GRAD=bool(need_grad), STATS=bool(need_stats), ACC=acc_tl, BLOCK=block,
            FOLD=_element_fold(n, block), num_warps=_ELEMENT_WARPS, **_COMPILE)
        _element_epilogue_kernel[(1,)](
            partials, sample_weight if has_weight else partials, loss, stats, b, split,
            *scalars["beta"], *scalars["inv_n"], *scalars["scale"],
            HAS_WEIGHT=has_weight, REDUCTION=int(reduction), STATS=bool(need_stats), ACC=acc_tl,
            NSTATS=NUM_STATS, BLOCK_B=block_b, BLOCK_P=block_p, num_warps=4, **_COMPILE)
    return loss, stats, saved


def backward(grad_loss, pred, ref_pred, target, saved, element, grad_dtype=None):
    """The ``fused_loss_backward`` kernel:
    ``dloss/dpred`` scaled by ``grad_loss`` (``[]``, or ``[B]`` for reduction none), in ``grad_dtype``
    (default: pred's dtype; for element weighting, the saved gradient's). One launch.

    Sample mode reads ``pred``, ``target`` (and ``ref_pred`` on chosen rows with the anchor term) and
    ``saved[2B, 2]``; element mode reads only ``saved[2B, N]`` (``pred`` etc. are ignored)."""
    if element and saved.dim() != 2:
        raise RuntimeError("pgdpo triton backend: element-weighting backward needs the gradient saved by a "
                           "forward run with need_grad=True")
    grad_rows = saved if element else pred
    _check_device(grad_rows)
    two_b, n = grad_rows.shape
    acc, acc_tl = _acc_types(grad_rows.dtype)
    if grad_loss.dim() not in (0, 1) or (grad_loss.dim() == 1 and grad_loss.shape[0] != two_b // 2):
        raise ValueError(f"pgdpo triton backend: grad_loss must be [] or [{two_b // 2}], "
                         f"got {tuple(grad_loss.shape)}")
    grad_loss = grad_loss.contiguous()
    out = torch.empty_like(grad_rows, dtype=grad_dtype or grad_rows.dtype)
    block = _backward_block(n)
    grid = (triton.cdiv(n, block), two_b)
    meta = dict(PER_PAIR=grad_loss.dim() == 1, ACC=acc_tl, BLOCK=block, num_warps=4,
                EMULATE_RTNE=INTERPRET and out.dtype == torch.bfloat16, **_COMPILE)
    with _on_device(grad_rows):
        if element:
            _scale_rows_kernel[grid](grad_loss, saved, out, two_b // 2, n, **meta)
        else:
            _sample_backward_kernel[grid](grad_loss, pred, ref_pred, target, saved, out, two_b // 2, n,
                                          **meta)
    return out
