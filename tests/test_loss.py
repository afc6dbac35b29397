"""One parametrised suite for every backend of the PG-DPO loss, against the float64 eager reference.

Each test runs over ``(backend, device)`` cases (``tests/_inputs.py``): on CPU the eager reference, the
C++ op and the Triton kernels under the interpreter; on a CUDA machine also the compiled Triton kernels
and the eager reference on CUDA tensors. Fused results are compared with ``pgdpo.loss.reference`` in float64
on the CPU (its gradients come from autograd, independent of the fused backward).
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
import zlib

import pytest
import torch

from pgdpo import STAT_NAMES, PGDPOLoss, pgdpo_loss
from pgdpo.loss.options import LossOptions
from pgdpo.loss.reference import pgdpo_loss_reference

from ._inputs import CUDA, FUSED_CASES, LOSS_CASES, PARALLEL_CASES, case_unavailable_reason, make_inputs
from ._parity import assert_matches, oracle, run


def _available(request):
    reason = case_unavailable_reason(request.param)
    if reason is not None:
        pytest.skip(f"{request.param.id} unavailable here: {reason}")
    return request.param


@pytest.fixture(params=LOSS_CASES, ids=lambda c: c.id)
def case(request):
    return _available(request)


@pytest.fixture(params=FUSED_CASES, ids=lambda c: c.id)
def fused(request):
    return _available(request)


@pytest.fixture(params=PARALLEL_CASES, ids=lambda c: c.id)
def parallel(request):
    return _available(request)


def test_fused_backends_available():
    """CI must exercise every fused backend (a build failure may not hide behind skips); on a CUDA
    machine the compiled Triton kernels must always be there."""
    for c in FUSED_CASES:
        if os.environ.get("CI") == "true" or c.device == "cuda":
            assert case_unavailable_reason(c) is None, f"{c.id}: {case_unavailable_reason(c)}"


OPTION_GRID = list(itertools.product(["pgdpo", "ars", "ipr", "dpo"], ["anchor", "reward"],
                                     ["sample", "element"], [True, False]))


@pytest.mark.parametrize("method,ipr_target,weighting,detach", OPTION_GRID)
def test_parity_every_option_float64(fused, method, ipr_target, weighting, detach):
    pred, ref, target = make_inputs((6, 3, 37), seed=zlib.crc32(f"{method}{ipr_target}{weighting}{detach}".encode()) % 1000)
    kw = dict(method=method, ipr_target=ipr_target, weighting=weighting, detach_weights=detach)
    assert_matches(run(fused, pred, ref, target, **kw), oracle(pred, ref, target, **kw),
                    rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighting", ["sample", "element"])
def test_parity_reduction_and_sample_weight(fused, reduction, weighting):
    pred, ref, target = make_inputs((8, 5, 11), seed=3)
    weight = torch.tensor([0.5, 2.0, 0.0, 1.25], dtype=torch.float64)
    upstream = torch.tensor([1.0, -0.5, 3.0, 0.25], dtype=torch.float64) if reduction == "none" else None
    kw = dict(reduction=reduction, weighting=weighting)
    got = run(fused, pred, ref, target, upstream=upstream, sample_weight=weight, **kw)
    assert got[0].shape == ((4,) if reduction == "none" else ())
    assert_matches(got, oracle(pred, ref, target, upstream=upstream, sample_weight=weight, **kw),
                    rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 1), (2, 7), (6, 3, 5, 7), (64, 3), (2, 1031), (4, 2, 3, 17, 19)])
@pytest.mark.parametrize("weighting", ["sample", "element"])
def test_parity_shapes(fused, shape, weighting):
    pred, ref, target = make_inputs(shape, seed=sum(shape))
    assert_matches(run(fused, pred, ref, target, weighting=weighting),
                    oracle(pred, ref, target, weighting=weighting), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weighting", ["sample", "element"])
def test_parity_low_precision_inputs(case, dtype, weighting):
    """Low-precision inputs: fp32 statistics and loss, gradient in pred's dtype."""
    pred, ref, target = make_inputs((4, 3, 50), dtype=dtype, seed=7)
    got = run(case, pred, ref, target, weighting=weighting)
    assert got[0].dtype == torch.float32 and all(s.dtype == torch.float32 for s in got[1].values())
    assert got[2].dtype == dtype
    # The oracle sees the same rounded inputs in float64: the only differences are fp32 arithmetic
    # and the rounding of the gradient to `dtype`.
    grad_tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert_matches(got, oracle(pred, ref, target, weighting=weighting), rtol=2e-4, atol=1e-6,
                    grad_rtol=grad_tol, grad_atol=grad_tol * float(got[2].abs().max()))


def test_parity_non_contiguous(case):
    base = make_inputs((3, 8, 2, 20), seed=11, device=case.device)
    # transposed and sliced views: [3,8,2,20] -> [8,3,20,2] -> take every other row of S
    views = [x.transpose(0, 1).transpose(2, 3)[:, :, ::2] for x in base]
    assert not views[0].is_contiguous()
    got = run(case, *views)
    want = oracle(*(v.contiguous() for v in views))
    assert_matches(got, want, rtol=1e-9, atol=1e-12)


def test_separate_halves_match_full_batch(case):
    # The halves are joined into the full batch before the kernels run: one computation, so bitwise.
    pred, ref, target = make_inputs((4, 3, 9), seed=5, device=case.device)
    full = pgdpo_loss(pred, ref, target, backend=case.backend)
    halves = pgdpo_loss(pred.chunk(2), ref.chunk(2), target.chunk(2), backend=case.backend)
    torch.testing.assert_close(halves, full, rtol=0, atol=0)


@pytest.mark.parametrize("weighting", ["sample", "element"])
@pytest.mark.parametrize("method", ["pgdpo", "dpo"])
def test_policy_equals_reference(case, method, weighting):
    """At initialisation d_w = d_l = 0: alpha = gamma = 0.5, L_dpo = ln 2 and L_ipr = 0."""
    _, ref, target = make_inputs((4, 2, 33), dtype=torch.float32, seed=2, device=case.device)
    loss, stats = pgdpo_loss(ref.clone(), ref, target, method=method, weighting=weighting,
                             backend=case.backend, return_stats=True)
    expected = 0.5 * math.log(2) if method == "pgdpo" else math.log(2)
    assert abs(loss.item() - expected) < 1e-6
    if method == "pgdpo":
        torch.testing.assert_close(stats["alpha"].cpu(), torch.full((2,), 0.5))
        torch.testing.assert_close(stats["gamma"].cpu(), torch.full((2,), 0.5))
    torch.testing.assert_close(stats["loss_dpo"].cpu(), torch.full((2,), math.log(2)))


def test_cancellation_free_d_w(case):
    """pred = ref + 1e-4 noise: fused d_w keeps 1e-5 relative accuracy; a difference of fp32 means cannot."""
    n = 4096 if case.backend == "triton" and case.device == "cpu" else 65536  # the interpreter is slow
    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, n, generator=g)
    ref = target + torch.randn(2, n, generator=g)
    pred = ref + 1e-4 * torch.randn(2, n, generator=g)
    _, stats = pgdpo_loss(*(x.to(case.device) for x in (pred, ref, target)), backend=case.backend,
                          return_stats=True)
    p64, r64, t64 = (x.double() for x in (pred, ref, target))
    exact = ((p64 - r64) * (p64 + r64 - 2 * t64)).mean(1)
    naive = (pred - target).square().mean(1) - (ref - target).square().mean(1)
    fused_err = ((stats["d_w"].cpu().double() - exact[:1]) / exact[:1]).abs().item()
    naive_err = ((naive.double() - exact) / exact).abs().max().item()
    assert fused_err <= 1e-5, fused_err
    assert naive_err > 100 * max(fused_err, 1e-7), (naive_err, fused_err)


@pytest.mark.parametrize("weighting", ["sample", "element"])
def test_bitwise_deterministic(parallel, weighting):
    """Two calls give identical bits where the work is split across threads or GPU programs (a reduction
    order that depended on scheduling, or an atomic add, would show here); 2^17 elements per sample, so
    the C++ op uses several chunks and threads and the GPU many programs."""
    pred, ref, target = make_inputs((4, 2, 2**16), dtype=torch.float32, seed=9)
    a = run(parallel, pred, ref, target, weighting=weighting)
    b = run(parallel, pred, ref, target, weighting=weighting)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    assert all(torch.equal(a[1][k], b[1][k]) for k in STAT_NAMES)


@pytest.mark.parametrize("method", ["pgdpo", "ars", "ipr"])
@pytest.mark.parametrize("weighting", ["sample", "element"])
def test_gradcheck_through_weights(case, method, weighting):
    """detach_weights=False: the gradient (through alpha, gamma and m) matches finite differences."""
    pred, ref, target = make_inputs((4, 5), seed=13, device=case.device)
    pred.requires_grad_(True)
    fn = lambda p: pgdpo_loss(p, ref, target, method=method, weighting=weighting, detach_weights=False,
                              beta=5.0, backend=case.backend)
    assert torch.autograd.gradcheck(fn, (pred,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_loss_scale_scales_gradient(case):
    """Gradient accumulation: scaling the loss scales the gradient exactly (power of two)."""
    pred, ref, target = make_inputs((4, 2, 21), dtype=torch.float32, seed=4, device=case.device)
    p1 = pred.clone().requires_grad_(True)
    p2 = pred.clone().requires_grad_(True)
    pgdpo_loss(p1, ref, target, backend=case.backend).backward()
    (0.25 * pgdpo_loss(p2, ref, target, backend=case.backend)).backward()
    torch.testing.assert_close(p2.grad, 0.25 * p1.grad, rtol=0, atol=0)


def test_autocast_bfloat16(case):
    """Under autocast the model emits bf16; the loss runs on those values and grads flow to the model."""
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16).to(case.device)
    x = torch.randn(4, 16, device=case.device)
    _, ref, target = make_inputs((4, 16), dtype=torch.float32, seed=1, device=case.device)
    with torch.autocast(case.device, dtype=torch.bfloat16):
        pred = model(x)
        assert pred.dtype == torch.bfloat16
        loss = pgdpo_loss(pred, ref, target, backend=case.backend)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert model.weight.grad is not None and torch.isfinite(model.weight.grad).all()
    want = pgdpo_loss_reference(*(v.detach().cpu().double() for v in (pred, ref, target)), LossOptions())[0]
    torch.testing.assert_close(loss.cpu().double(), want, rtol=1e-4, atol=1e-6)


def test_torch_compile_fullgraph(case):
    torch._dynamo.reset()
    pred, ref, target = make_inputs((4, 3, 40), dtype=torch.float32, seed=6, device=case.device)

    def step(p, r, t):
        loss, stats = pgdpo_loss(p, r, t, backend=case.backend, return_stats=True)
        return loss * 2.0, stats["alpha"].mean()

    compiled = torch.compile(step, fullgraph=True)
    p_eager = pred.clone().requires_grad_(True)
    p_comp = pred.clone().requires_grad_(True)
    loss_e, alpha_e = step(p_eager, ref, target)
    loss_c, alpha_c = compiled(p_comp, ref, target)
    loss_e.backward()
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(alpha_c, alpha_e, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(p_comp.grad, p_eager.grad, rtol=1e-5, atol=1e-9)


def test_module_applies_its_options(case):
    """PGDPOLoss's keywords reach the computation: the module with non-default options matches the float64
    reference with those options (and not with the defaults), values and gradients."""
    options = dict(method="ars", beta=50.0, k1=3.0, ipr_target="reward", weighting="element", reduction="sum")
    crit = PGDPOLoss(**options, backend=case.backend)
    assert "method='ars'" in repr(crit) and "k1=3.0" in repr(crit)
    pred, ref, target = make_inputs((4, 7), seed=8, device=case.device)
    p = pred.clone().requires_grad_(True)
    loss = crit(p, ref, target)
    loss.backward()
    want_loss, _, want_grad = oracle(pred, ref, target, **options)
    torch.testing.assert_close(loss.cpu(), want_loss, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(p.grad.cpu(), want_grad, rtol=1e-9, atol=1e-12)
    default_loss = oracle(pred, ref, target, reduction="sum")[0]
    assert not torch.allclose(loss.cpu(), default_loss, rtol=1e-3)


# ---------------------------------------------------------------------------------------------
# Bad inputs: each raises ValueError or TypeError naming the argument.

def _bad_cases(device="cpu"):
    p, r, t = make_inputs((4, 3), dtype=torch.float32, device=device)
    ones = lambda *a, **k: torch.ones(*a, device=device, **k)
    yield "odd batch", (p[:3], r[:3], t[:3]), {}, ValueError, "first dimension"
    yield "shape mismatch", (p, r[:, :2], t), {}, ValueError, "ref_pred has shape"
    yield "integer pred", (p.long(), r, t), {}, TypeError, "pred must be a floating-point"
    yield "integer target", (p, r, t.int()), {}, TypeError, "target must be a floating-point"
    yield "mixed devices", (p, r.to("meta"), t), {}, ValueError, "ref_pred is on meta"
    yield "empty", (p[:, :0], r[:, :0], t[:, :0]), {}, ValueError, "empty"
    yield "zero-d", (p[0, 0], r[0, 0], t[0, 0]), {}, ValueError, "0-d"
    yield "not a tensor", (p.tolist(), r, t), {}, TypeError, "pred must be a torch.Tensor"
    yield "halves differ", ((p[:2], p[2:, :2]), r, t), {}, ValueError, "pred: chosen half"
    yield "method", (p, r, t), {"method": "kto"}, ValueError, "method must be one of"
    yield "weighting", (p, r, t), {"weighting": "token"}, ValueError, "weighting must be one of"
    yield "ipr_target", (p, r, t), {"ipr_target": "sft"}, ValueError, "ipr_target must be one of"
    yield "reduction", (p, r, t), {"reduction": "avg"}, ValueError, "reduction must be one of"
    yield "backend", (p, r, t), {"backend": "cuda"}, ValueError, "backend must be one of"
    yield "beta zero", (p, r, t), {"beta": 0.0}, ValueError, "beta must be > 0"
    yield "beta negative", (p, r, t), {"beta": -1.0}, ValueError, "beta must be > 0"
    yield "beta string", (p, r, t), {"beta": "100"}, TypeError, "beta must be a real number"
    yield "eps negative", (p, r, t), {"eps": -1e-6}, ValueError, "eps must be > 0"
    yield "eps zero", (p, r, t), {"eps": 0.0}, ValueError, "eps must be > 0"
    yield "k1 negative", (p, r, t), {"k1": -1.0}, ValueError, "k1 must be >= 0"
    yield "k2 negative", (p, r, t), {"k2": -2.0}, ValueError, "k2 must be >= 0"
    yield "k1 nan", (p, r, t), {"k1": float("nan")}, ValueError, "k1 must be finite"
    yield "weight length", (p, r, t), {"sample_weight": ones(3)}, ValueError, r"sample_weight must have shape \[2\]"
    yield "weight int", (p, r, t), {"sample_weight": ones(2, dtype=torch.long)}, TypeError, "sample_weight must be floating"
    yield "weight list", (p, r, t), {"sample_weight": [1.0, 1.0]}, TypeError, "sample_weight must be a torch.Tensor"
    yield "weight grad", (p, r, t), {"sample_weight": ones(2, requires_grad=True)}, ValueError, "sample_weight requires grad"
    yield "ref grad", (p, r.clone().requires_grad_(True), t), {}, ValueError, "ref_pred requires grad"
    yield "target grad", (p, r, t.clone().requires_grad_(True)), {}, ValueError, "target requires grad"
    yield "detach not bool", (p, r, t), {"detach_weights": 1}, TypeError, "detach_weights must be a bool"


BAD = [c[0] for c in _bad_cases()]


@pytest.mark.parametrize("name", BAD)
def test_bad_input_raises_clear_error(case, name):
    _, args, kwargs, exc, match = next(c for c in _bad_cases(case.device) if c[0] == name)
    with pytest.raises(exc, match=match):
        pgdpo_loss(*args, **{"backend": case.backend, **kwargs})


def test_bad_module_options():
    with pytest.raises(ValueError, match="method must be one of"):
        PGDPOLoss(method="orpo")
    with pytest.raises(ValueError, match="backend must be one of"):
        PGDPOLoss(backend="gpu")


def test_triton_on_cpu_without_interpreter_is_an_error():
    code = ("import torch, pgdpo\n"
            "x = torch.randn(2, 3)\n"
            "try:\n"
            "    pgdpo.pgdpo_loss(x, x, x, backend='triton')\n"
            "except ValueError as e:\n"
            "    print('ERR', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERR backend='triton' is not available" in out.stdout
    assert "TRITON_INTERPRET=1" in out.stdout


def test_stats_carry_no_graph(case):
    pred, ref, target = make_inputs((4, 6), dtype=torch.float32, seed=12, device=case.device)
    _, stats = pgdpo_loss(pred.clone().requires_grad_(True), ref, target, backend=case.backend, return_stats=True)
    assert all(v.grad_fn is None and not v.requires_grad for v in stats.values())


@pytest.mark.large
@pytest.mark.parametrize("weighting", ["sample", "element"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_parity_video_shape_large(fused, weighting, dtype):
    """A real video-latent shape (the CPU benchmark's): many chunks / programs per sample."""
    pred, ref, target = make_inputs((4, 16, 8, 30, 52), dtype=dtype, seed=21)
    got = run(fused, pred, ref, target, weighting=weighting)
    want = oracle(pred, ref, target, weighting=weighting)
    if dtype == torch.float64:
        assert_matches(got, want, rtol=1e-9, atol=1e-12)
    else:
        assert_matches(got, want, rtol=2e-4, atol=1e-6, grad_rtol=1e-2,
                        grad_atol=1e-2 * float(got[2].abs().max()))


@pytest.mark.parametrize("weighting", ["sample", "element"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_custom_op_opcheck(fused, weighting, reduction):
    """torch.library.opcheck: schema, fake (meta) kernel, autograd registration, no aliasing."""
    from pgdpo.loss import op

    pred, ref, target = (x.reshape(4, -1).contiguous()
                         for x in make_inputs((4, 3, 5), dtype=torch.float32, device=fused.device))
    pred.requires_grad_(True)
    flags = op.pack_flags(True, True, True, weighting == "element", True, True,
                          {"none": 0, "mean": 1}[reduction])
    weight = torch.tensor([0.5, 2.0], device=fused.device)
    torch.library.opcheck(op.op_for(fused.backend, fused.device), (pred, ref, target, weight,
                                                                   [100.0, 10.0, 10.0, 1e-6, 0.0], flags))


def test_double_backward_is_refused(fused):
    """The fused backward is first-order only: a second derivative is an error, never silent zeros."""
    pred, ref, target = make_inputs((4, 6), dtype=torch.float32, seed=3, device=fused.device)
    pred.requires_grad_(True)
    (grad,) = torch.autograd.grad(pgdpo_loss(pred, ref, target, backend=fused.backend), pred, create_graph=True)
    with pytest.raises(RuntimeError, match="does not require grad|once_differentiable"):
        grad.sum().backward()


def test_fp16_element_gradient_survives_loss_scaling(case):
    """fp16, element weighting, loss scaled by 65536 (GradScaler): the gradient keeps fp16 precision."""
    pred, ref, target = make_inputs((2, 1_000_000), dtype=torch.float16, seed=17, device=case.device)
    scale = 65536.0
    p = pred.clone().requires_grad_(True)
    (scale * pgdpo_loss(p, ref, target, weighting="element", backend=case.backend)).backward()
    want = oracle(pred, ref, target, weighting="element")[2] * scale
    grad = p.grad.cpu()
    rel = ((grad.double() - want).abs() / want.abs().clamp_min(1e-30))[want.abs() > 1e-3 * want.abs().max()]
    assert grad.dtype == torch.float16
    # fp16 rounding of the result gives a median of ~1.7e-4; an fp16 stored gradient (subnormal here) ~3e-3
    assert rel.median() < 5e-4, float(rel.median())


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device: a CUDA graph capture")
def test_cuda_graph_capture_replays_the_fused_loss():
    """The Triton path is capturable in a CUDA graph (no host syncs, no allocations from the host in the
    forward and backward): a replay on new inputs gives what an eager call gives."""
    pred, ref, target = (x.cuda() for x in make_inputs((4, 3, 1000), dtype=torch.float32, seed=31))
    p = pred.clone().requires_grad_(True)
    for _ in range(2):  # warm-up on a side stream, as torch.cuda.graphs asks
        pgdpo_loss(p, ref, target, backend="triton").backward()
    p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = pgdpo_loss(p, ref, target, backend="triton")
        loss.backward()
    new = make_inputs((4, 3, 1000), dtype=torch.float32, seed=32)
    with torch.no_grad():
        for dst, src in zip((p, ref, target), new):
            dst.copy_(src.cuda())
    graph.replay()
    want_loss, _, want_grad = run(FUSED_CASES[-1], *new)
    torch.testing.assert_close(loss.detach().cpu(), want_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(p.grad.cpu(), want_grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("backend", ["auto", "torch", "cpu", "triton"])
@pytest.mark.parametrize("weighting", ["sample", "element"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_meta_tensors_give_meta_outputs_of_the_real_shapes_and_dtypes(backend, weighting, reduction, dtype):
    """Meta tensors (a model built on the meta device, shape inference): every backend answers with meta
    outputs shaped and typed as a real CPU call's, loss, stats and gradient, without running a kernel."""
    shape = (4, 3, 2, 4, 4)
    gen = torch.Generator().manual_seed(0)
    real = [torch.randn(shape, generator=gen).to(dtype) for _ in range(3)]
    real[2] = real[2].float()  # an fp32 target, as in training
    real[0].requires_grad_(True)
    meta = [x.detach().to("meta").requires_grad_(x.requires_grad) for x in real]
    kwargs = dict(weighting=weighting, reduction=reduction, return_stats=True)
    loss, stats = pgdpo_loss(*real, backend="torch", **kwargs)
    loss.sum().backward()
    meta_loss, meta_stats = pgdpo_loss(*meta, backend=backend, **kwargs)
    meta_loss.sum().backward()
    assert meta_loss.device.type == "meta" and meta[0].grad.device.type == "meta"
    assert (meta_loss.shape, meta_loss.dtype) == (loss.shape, loss.dtype)
    assert (meta[0].grad.shape, meta[0].grad.dtype) == (real[0].grad.shape, real[0].grad.dtype)
    assert meta_stats.keys() == stats.keys()
    for name in stats:
        assert (meta_stats[name].shape, meta_stats[name].dtype) == (stats[name].shape, stats[name].dtype), name


def test_fp32_input_range_of_docs(case):
    """docs/loss.md's fp32 input range: inside ``X <= sqrt(FLT_MAX / (8 N))`` every backend's loss is finite
    and agrees with float64 (to the summation bound ``N eps``, with room for the margin's division and the
    log-sigmoid); far outside (1e20) the per-element terms overflow and the loss is not finite."""
    shape = (4, 2, 3, 4)
    n = math.prod(shape[1:])
    inside = math.sqrt(torch.finfo(torch.float32).max / (8 * n)) / 2
    gen = torch.Generator().manual_seed(0)
    unit = [torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1 for _ in range(3)]
    want = pgdpo_loss(*(u * inside for u in unit), backend="torch")
    got = pgdpo_loss(*((u * inside).float().to(case.device) for u in unit), backend=case.backend)
    assert torch.isfinite(got)
    torch.testing.assert_close(got.double().cpu(), want, rtol=64 * n * torch.finfo(torch.float32).eps, atol=0)
    beyond = pgdpo_loss(*((u * 1e20).float().to(case.device) for u in unit), backend=case.backend)
    assert not torch.isfinite(beyond)
