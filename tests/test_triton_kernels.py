"""Kernel-level tests of the Triton backend (``pgdpo.kernels.pgdpo_loss``), called through its backend
contract (``forward`` / ``backward``, see ``pgdpo.loss.op``) and compared with the float64 eager reference
(gradients from autograd). Public-API parity lives in ``test_loss.py``; this file covers what depends
on the launch configuration: programs per sample, ragged chunks, the epilogue's tiling, determinism,
fp64 accumulation, the fused element-mode gradient and the interpreter flag.

Without a GPU the kernels run in Triton's interpreter (``conftest.py`` sets ``TRITON_INTERPRET=1``),
which is slow per program: shapes stay tiny.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pgdpo.loss import triton_unavailable_reason
from pgdpo.loss.op import pack_flags
from pgdpo.loss.options import STAT_NAMES, LossOptions
from pgdpo.loss.reference import pgdpo_loss_reference

from ._inputs import make_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_REASON = triton_unavailable_reason(DEVICE)
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"triton backend unavailable: {_REASON}")

if _REASON is None:
    from pgdpo.kernels import pgdpo_loss as K

# torch's softplus (used by the reference) returns x itself above x = 20, which is off by up to
# exp(-20) ~ 2e-9 relative; the kernels evaluate log1p(exp(-|x|)) exactly. Element weighting hits
# |z| > 20 on some elements at beta = 100, so its float64 tolerance is a notch looser.
TOL64 = {"sample": dict(rtol=1e-10, atol=1e-13), "element": dict(rtol=1e-8, atol=1e-12)}
WEIGHTINGS = ["sample", "element"]


def _scalars(opts):
    return [opts.beta, opts.k1, opts.k2, opts.eps, opts.eps_rel]


def _flags(opts, need_grad=True, reduction=None):
    return pack_flags(opts.ars, opts.ipr, opts.anchor, opts.element, opts.detach_weights, need_grad,
                      opts.reduction_code if reduction is None else reduction, opts.abs_margin)


def _call(pred, ref, target, opts, weight=None, upstream=None, need_grad=True):
    """Backend forward + backward on ``[2B, *S]`` inputs -> (loss, stats [B, 14], saved, grad [2B, N])."""
    two_b = pred.shape[0]
    flat = [x.reshape(two_b, -1).contiguous().to(DEVICE) for x in (pred, ref, target)]
    acc = torch.float64 if pred.dtype == torch.float64 else torch.float32
    w = None if weight is None else weight.to(DEVICE, acc)
    loss, stats, saved = K.forward(*flat, w, _scalars(opts), _flags(opts, need_grad))
    if not need_grad:
        return loss, stats, saved, None
    g = torch.ones((), dtype=acc) if upstream is None else upstream.to(acc)
    grad = K.backward(g.to(DEVICE), *flat, saved, opts.element, pred.dtype)
    return loss, stats, saved, grad


def _oracle(pred, ref, target, opts, weight=None, upstream=None):
    """Float64 reference: loss, stats [B, 14] (STAT_NAMES order) and autograd's d(loss . upstream)/dpred."""
    p = pred.detach().double().requires_grad_(True)
    loss, stats = pgdpo_loss_reference(p, ref.double(), target.double(), opts,
                                       None if weight is None else weight.double())
    (loss if upstream is None else (loss * upstream.double()).sum()).backward()
    return loss.detach(), torch.stack([stats[k] for k in STAT_NAMES], 1), p.grad.reshape(pred.shape[0], -1)


def _assert_close(got, want, rtol, atol, grad_rtol=None, grad_atol=None):
    loss, stats, _, grad = got
    loss_ref, stats_ref, grad_ref = want
    torch.testing.assert_close(loss.cpu().double(), loss_ref, rtol=rtol, atol=atol)
    for i, name in enumerate(STAT_NAMES):
        torch.testing.assert_close(stats[:, i].cpu().double(), stats_ref[:, i], rtol=rtol, atol=atol,
                                   msg=lambda m, n=name: f"stat {n}: {m}")
    torch.testing.assert_close(grad.cpu().double(), grad_ref, rtol=grad_rtol or rtol, atol=grad_atol or atol)


# ---------------------------------------------------------------------------------------------
# Launch configuration


@pytest.mark.parametrize("n", [1, 15, 16, 144, 700, 4097, 3 * 2**31 + 5])
@pytest.mark.parametrize("block,split", [(16, 1), (16, 7), (32, 6), (64, 1000), (4096, 3)])
def test_forward_config_tiles_each_row_exactly(n, block, split):
    """Chunks are whole blocks, every element is covered, and no program is left without work."""
    with K.launch_config(block=block, split=split):
        got_block, got_split, chunk = K._forward_config(n, 4, torch.device(DEVICE), default_block=1024)
    assert got_block == block and chunk % block == 0
    assert 1 <= got_split <= split
    assert got_split * chunk >= n > (got_split - 1) * chunk


def test_launch_config_validates_and_restores():
    with pytest.raises(ValueError, match="block must be a power of two"):
        with K.launch_config(block=24):
            pass
    with pytest.raises(ValueError, match="split must be >= 1"):
        with K.launch_config(split=0):
            pass
    with pytest.raises(ValueError, match="fold must be a power of two"):
        with K.launch_config(fold=3):
            pass
    with K.launch_config(block=32, split=3):
        with K.launch_config(split=5):
            assert K._OVERRIDE == {"block": 32, "split": 5}
        assert K._OVERRIDE == {"block": 32, "split": 3}
    assert K._OVERRIDE == {}


def test_element_fold_follows_the_thread_layout():
    """The element forward folds the values each thread holds contiguously: block / (32 x warps) on a
    16-aligned N (4 fp32 per thread on the GPU's 1024 x 8 warps), none on an unaligned N (one value per
    thread there, so a fold would cross threads); a forced fold is capped at the block."""
    assert K._element_fold(16 * 999, 1024) == 1024 // (32 * K._ELEMENT_WARPS) == 4
    assert K._element_fold(16 * 999, 128) == 1
    assert K._element_fold(59163, 512) == 1
    with K.launch_config(fold=8):
        assert K._element_fold(700, 32) == 8
        assert K._element_fold(700, 4) == 4


# Forced splits of a 700-element sample: one program, several (700 = 6*112 + 28: the last chunk is
# not a multiple of the block), a ragged tail (chunk 128, last program 60 elements), a split capped at
# the number of blocks, and the default; the element forward's accumulators folded by 4 (a GPU's 4 fp32
# per thread) and by the whole block, with padding lanes inside the folded groups.
CONFIGS = [dict(block=16, split=1), dict(block=16, split=7), dict(block=32, split=6),
           dict(block=64, split=1000), dict(), dict(block=32, split=6, fold=4), dict(block=16, split=7, fold=16)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_results_independent_of_programs_per_sample(weighting, config):
    pred, ref, target = make_inputs((4, 700), seed=21)
    weight = torch.tensor([0.75, 1.5], dtype=torch.float64)
    opts = LossOptions(k1=7.0, k2=12.0, detach_weights=False, weighting=weighting)
    with K.launch_config(**config):
        got = _call(pred, ref, target, opts, weight)
    _assert_close(got, _oracle(pred, ref, target, opts, weight), **TOL64[weighting])


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_bitwise_identical_across_calls_with_many_programs(weighting):
    pred, ref, target = make_inputs((4, 300), dtype=torch.float32, seed=9)
    opts = LossOptions(weighting=weighting)
    with K.launch_config(block=16, split=5, backward_block=64):
        a = _call(pred, ref, target, opts)
        b = _call(pred, ref, target, opts)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_epilogue_loops_over_pair_chunks_and_partial_tiles(weighting, reduction):
    """5 pairs in chunks of 2 and 7 partials per row in tiles of 2: every loop of the epilogue runs."""
    pred, ref, target = make_inputs((10, 3, 37), seed=5)
    weight = torch.tensor([1.0, 0.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    upstream = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0], dtype=torch.float64) if reduction == "none" else None
    opts = LossOptions(weighting=weighting, reduction=reduction, method="ars", ipr_target="reward")
    with K.launch_config(block=16, split=7, epilogue_blocks=(2, 2)):
        got = _call(pred, ref, target, opts, weight, upstream)
    assert got[0].shape == ((5,) if reduction == "none" else ())
    _assert_close(got, _oracle(pred, ref, target, opts, weight, upstream), **TOL64[weighting])


# ---------------------------------------------------------------------------------------------
# Numerics


def test_fp64_inputs_accumulate_in_fp64():
    """pred = ref + 1e-7 noise: d_w ~ 1e-8 comes out to fp64 precision (fp32 sums would keep ~7 digits)."""
    _, ref, target = make_inputs((4, 500), seed=3)
    pred = ref + 1e-7 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    opts = LossOptions()
    with K.launch_config(block=16, split=4):
        loss, stats, saved, grad = _call(pred, ref, target, opts)
    assert loss.dtype == stats.dtype == saved.dtype == grad.dtype == torch.float64
    p, r, t = pred.reshape(4, -1), ref.reshape(4, -1), target.reshape(4, -1)
    exact = ((p - r) * (p + r - 2 * t)).mean(1)
    torch.testing.assert_close(stats[:, 0].cpu(), exact[:2], rtol=1e-12, atol=0)
    torch.testing.assert_close(stats[:, 1].cpu(), exact[2:], rtol=1e-12, atol=0)


def test_fp64_scalar_options_keep_full_precision():
    """eps, beta, k1, k2 that are not fp32-representable: fp64 results match the fp64 reference far
    below fp32 rounding (Triton passes Python floats as fp32; the kernels rebuild them from two parts)."""
    pred, ref, target = make_inputs((4, 2, 25), seed=4)
    opts = LossOptions(eps=0.1, beta=1 / 3, k1=0.7, k2=1.3, detach_weights=False)
    got = _call(pred, ref, target, opts)
    _assert_close(got, _oracle(pred, ref, target, opts), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_low_precision_inputs_split_across_programs(dtype, weighting):
    pred, ref, target = make_inputs((4, 300), dtype=dtype, seed=7)
    opts = LossOptions(weighting=weighting)
    with K.launch_config(block=32, split=3):
        got = _call(pred, ref, target, opts)
    loss, stats, saved, grad = got
    assert loss.dtype == stats.dtype == torch.float32 and grad.dtype == dtype
    if weighting == "element":
        # fp32, so that the gradient is rounded to `dtype` once, after the upstream scale
        assert saved.dtype == torch.float32 and saved.shape == (4, 300)
    # The oracle sees the same rounded inputs in fp64; differences are fp32 arithmetic and the rounding
    # of the gradient to `dtype`.
    grad_tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    _assert_close(got, _oracle(pred, ref, target, opts), rtol=2e-4, atol=1e-6, grad_rtol=grad_tol,
                  grad_atol=grad_tol * float(grad.abs().max()))


# ---------------------------------------------------------------------------------------------
# Backward


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_reduction_none_with_per_pair_upstream_grad(weighting):
    pred, ref, target = make_inputs((8, 45), seed=8)
    upstream = torch.tensor([1.0, -0.5, 3.0, 0.0], dtype=torch.float64)
    opts = LossOptions(reduction="none", weighting=weighting, method="ipr", detach_weights=False)
    with K.launch_config(block=16, split=2, backward_block=16):
        got = _call(pred, ref, target, opts, upstream=upstream)
    _assert_close(got, _oracle(pred, ref, target, opts, upstream=upstream), **TOL64[weighting])
    assert torch.all(got[3].reshape(2, 4, 45)[:, 3] == 0)  # pair 3 has zero upstream grad


def test_element_gradient_is_computed_in_the_forward():
    pred, ref, target = make_inputs((6, 2, 19), seed=10)
    weight = torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64)
    opts = LossOptions(weighting="element", reduction="sum", detach_weights=False)
    with K.launch_config(block=16, split=2):
        loss, stats, saved, _ = _call(pred, ref, target, opts, weight, need_grad=True)
        loss_ng, stats_ng, saved_ng, _ = _call(pred, ref, target, opts, weight, need_grad=False)
    _, _, grad_ref = _oracle(pred, ref, target, opts, weight)
    # saved is dloss/dpred itself, before any backward call
    torch.testing.assert_close(saved.cpu(), grad_ref, **TOL64["element"])
    # the backward only scales it by the upstream gradient
    flat = [x.reshape(6, -1).to(DEVICE) for x in (pred, ref, target)]
    grad = K.backward(torch.tensor(2.5, dtype=torch.float64, device=DEVICE), *flat, saved, True)
    assert torch.equal(grad, 2.5 * saved)
    # need_grad=False skips the gradient (empty saved) without changing loss or stats
    assert saved_ng.numel() == 0
    assert torch.equal(loss_ng, loss) and torch.equal(stats_ng, stats)
    with pytest.raises(RuntimeError, match="need_grad=True"):
        K.backward(torch.tensor(1.0, dtype=torch.float64, device=DEVICE), *flat, saved_ng, True)


@pytest.mark.parametrize("method", ["pgdpo", "dpo"])
def test_sample_backward_reads_ref_only_where_needed(method):
    """c_r (the anchor coefficient) is 0 on rejected rows, and on every row without IPR: the backward
    must not depend on ref_pred there, so NaNs in those rows of ref_pred cannot leak into the grad."""
    pred, ref, target = make_inputs((6, 40), seed=12, device=DEVICE)
    opts = LossOptions(method=method)
    loss, stats, saved, grad = _call(pred, ref, target, opts)
    zero_rows = slice(3, 6) if method == "pgdpo" else slice(0, 6)
    assert torch.all(saved[zero_rows, 1] == 0)
    if method == "pgdpo":
        assert torch.all(saved[:3, 1] != 0)
    poisoned = ref.clone()
    poisoned[zero_rows] = float("nan")
    one = torch.tensor(1.0, dtype=torch.float64, device=DEVICE)
    grad_poisoned = K.backward(one, pred, poisoned, target, saved, False)
    assert torch.equal(grad_poisoned, grad)
    torch.testing.assert_close(grad.cpu(), _oracle(pred, ref, target, opts)[2], **TOL64["sample"])


# ---------------------------------------------------------------------------------------------
# Errors and the interpreter flag


def _bad_forward_cases():
    p, r, t = (x.to(DEVICE) for x in make_inputs((4, 6), dtype=torch.float32))
    w = torch.ones(2, device=DEVICE)
    yield "non-contiguous", (p.t().contiguous().t(), r, t, None, 1), "pred must be contiguous"
    yield "dtype mismatch", (p, r.double(), t, None, 1), "ref_pred is"
    yield "shape", (p[:, :3], r, t, None, 1), "must match pred"
    yield "weight dtype", (p, r, t, w.double(), 1), "sample_weight must be a contiguous"
    yield "reduction", (p, r, t, w, 3), "reduction must be"
    yield "odd rows", (p[:3], r[:3], t[:3], None, 1), r"pred must be \[2B, N\]"


@pytest.mark.parametrize("case", list(_bad_forward_cases()), ids=lambda c: c[0])
def test_forward_rejects_bad_inputs(case):
    _, (p, r, t, w, reduction), match = case
    with pytest.raises(ValueError, match=match):
        K.forward(p, r, t, w, _scalars(LossOptions()), _flags(LossOptions(), reduction=reduction))


def test_backward_rejects_bad_upstream_shape():
    p, r, t = make_inputs((4, 6), device=DEVICE)
    _, _, saved = K.forward(p, r, t, None, _scalars(LossOptions()), _flags(LossOptions(), reduction=0))
    with pytest.raises(ValueError, match=r"grad_loss must be \[\] or \[2\]"):
        K.backward(torch.ones(3, dtype=torch.float64, device=DEVICE), p, r, t, saved, False)


def test_interpret_flag_follows_environment_at_import():
    assert K.INTERPRET is (os.environ.get("TRITON_INTERPRET") == "1")
    if DEVICE == "cuda":
        return
    # Only "1" turns the interpreter on; without it CPU tensors are refused with the remedy named.
    code = ("import torch\n"
            "from pgdpo.kernels import pgdpo_loss as K\n"
            "print('INTERPRET', K.INTERPRET)\n"
            "x = torch.randn(2, 3)\n"
            "try:\n"
            "    K.forward(x, x, x, None, [1.0, 1.0, 1.0, 1e-6, 0.0], 1 << 8)\n"
            "except ValueError as e:\n"
            "    print('ERR', e)\n")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "INTERPRET False" in out.stdout
    assert "ERR" in out.stdout and "TRITON_INTERPRET=1" in out.stdout


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device with ~20 GB free: 2^31 elements per input")
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_inputs_over_2_31_elements(weighting):
    """int64 offsets: a [2, 2^30 + ...] bf16 batch (over 2^31 elements per input). Each sample repeats one
    small random tile, so its means equal the tile's and d loss / d pred at every element equals the
    tile problem's gradient scaled by tile / N: the float64 oracle of the tile checks the far end."""
    period = 768
    n = period * (2**30 // period + 1)
    assert 2 * n > 2**31
    small = make_inputs((2, period), dtype=torch.bfloat16, seed=41)
    big = [x.to(DEVICE).repeat(1, n // period) for x in small]
    opts = LossOptions(weighting=weighting)
    loss, stats, _, grad = _call(*big, opts)
    want_loss, want_stats, want_grad = _oracle(*small, opts)
    torch.testing.assert_close(loss.cpu().double(), want_loss, rtol=2e-4, atol=1e-6)
    torch.testing.assert_close(stats[:, 0].cpu().double(), want_stats[:, 0], rtol=2e-3, atol=1e-6)  # d_w
    tail = grad[:, -period:].cpu().double() * (n // period)  # the last tile: offsets beyond 2^31 in row 1
    torch.testing.assert_close(tail, want_grad, rtol=1e-2, atol=1e-2 * float(want_grad.abs().max()))
