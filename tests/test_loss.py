"""One parametrised suite for every backend of the PG-DPO loss, against the float64 eager reference.

Fused backends ("triton" under the interpreter on CPU, "cpu" = the C++ op) are compared with
``pgdpo.reference`` (whose gradients come from autograd, independent of the fused backward); the
behavioural tests (equal policy/reference, numerics, determinism, compile, autocast) run on every backend.
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
from pgdpo.loss import cpu_unavailable_reason, triton_unavailable_reason
from pgdpo.options import LossOptions
from pgdpo.reference import pgdpo_loss_reference

from ._inputs import make_inputs

FUSED = ["triton", "cpu"]
ALL = ["torch", *FUSED]


def _reason(backend: str) -> str | None:
    if backend == "triton":
        return triton_unavailable_reason("cpu")
    if backend == "cpu":
        return cpu_unavailable_reason("cpu")
    return None


@pytest.fixture(params=ALL)
def backend(request):
    reason = _reason(request.param)
    if reason is not None:
        pytest.skip(f"{request.param} unavailable here: {reason}")
    return request.param


@pytest.fixture(params=FUSED)
def fused(request):
    reason = _reason(request.param)
    if reason is not None:
        pytest.skip(f"{request.param} unavailable here: {reason}")
    return request.param


def test_fused_backends_available_in_ci():
    """CI must exercise every fused backend: a build failure may not hide behind skips."""
    if os.environ.get("CI") != "true":
        pytest.skip("only enforced in CI (CI=true)")
    for name in FUSED:
        assert _reason(name) is None, f"{name}: {_reason(name)}"


def _run(backend, pred, ref, target, upstream=None, **kw):
    """Loss, stats and d loss / d pred (weighted by ``upstream`` for reduction='none')."""
    pred = pred.detach().clone().requires_grad_(True)
    loss, stats = pgdpo_loss(pred, ref, target, backend=backend, return_stats=True, **kw)
    (loss if upstream is None else (loss * upstream).sum()).backward()
    return loss.detach(), stats, pred.grad


def _oracle(pred, ref, target, upstream=None, sample_weight=None, **kw):
    opts = LossOptions(**kw)
    p = pred.detach().to(torch.float64).clone().requires_grad_(True)
    loss, stats = pgdpo_loss_reference(p, ref.to(torch.float64), target.to(torch.float64), opts,
                                       None if sample_weight is None else sample_weight.double())
    (loss if upstream is None else (loss * upstream.double()).sum()).backward()
    return loss.detach(), stats, p.grad


def _assert_matches(got, want, rtol, atol, grad_rtol=None, grad_atol=None):
    loss, stats, grad = got
    loss_ref, stats_ref, grad_ref = want
    torch.testing.assert_close(loss.double(), loss_ref, rtol=rtol, atol=atol)
    assert set(stats) == set(STAT_NAMES)
    for name in STAT_NAMES:
        torch.testing.assert_close(stats[name].double(), stats_ref[name], rtol=rtol, atol=atol,
                                   msg=lambda m, n=name: f"stat {n}: {m}")
    torch.testing.assert_close(grad.double(), grad_ref, rtol=grad_rtol or rtol, atol=grad_atol or atol)


OPTION_GRID = list(itertools.product(["pgdpo", "ars", "ipr", "dpo"], ["anchor", "reward"],
                                     ["sample", "element"], [True, False]))


@pytest.mark.parametrize("method,ipr_target,weighting,detach", OPTION_GRID)
def test_parity_every_option_float64(fused, method, ipr_target, weighting, detach):
    pred, ref, target = make_inputs((6, 3, 37), seed=zlib.crc32(f"{method}{ipr_target}{weighting}{detach}".encode()) % 1000)
    kw = dict(method=method, ipr_target=ipr_target, weighting=weighting, detach_weights=detach)
    _assert_matches(_run(fused, pred, ref, target, **kw), _oracle(pred, ref, target, **kw),
                    rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighting", ["sample", "element"])
def test_parity_reduction_and_sample_weight(fused, reduction, weighting):
    pred, ref, target = make_inputs((8, 5, 11), seed=3)
    weight = torch.tensor([0.5, 2.0, 0.0, 1.25], dtype=torch.float64)
    upstream = torch.tensor([1.0, -0.5, 3.0, 0.25], dtype=torch.float64) if reduction == "none" else None
    kw = dict(reduction=reduction, weighting=weighting)
    got = _run(fused, pred, ref, target, upstream=upstream, sample_weight=weight, **kw)
    assert got[0].shape == ((4,) if reduction == "none" else ())
    _assert_matches(got, _oracle(pred, ref, target, upstream=upstream, sample_weight=weight, **kw),
                    rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 1), (2, 7), (6, 3, 5, 7), (64, 3), (2, 1031), (4, 2, 3, 17, 19)])
@pytest.mark.parametrize("weighting", ["sample", "element"])
def test_parity_shapes(fused, shape, weighting):
    pred, ref, target = make_inputs(shape, seed=sum(shape))
    _assert_matches(_run(fused, pred, ref, target, weighting=weighting),
                    _oracle(pred, ref, target, weighting=weighting), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weighting", ["sample", "element"])
def test_parity_low_precision_inputs(backend, dtype, weighting):
    """Low-precision inputs: fp32 statistics and loss, gradient in pred's dtype."""
    pred, ref, target = make_inputs((4, 3, 50), dtype=dtype, seed=7)
    got = _run(backend, pred, ref, target, weighting=weighting)
    assert got[0].dtype == torch.float32 and all(s.dtype == torch.float32 for s in got[1].values())
    assert got[2].dtype == dtype
    # The oracle sees the same rounded inputs in float64: the only differences are fp32 arithmetic
    # and the rounding of the gradient to `dtype`.
    grad_tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    _assert_matches(got, _oracle(pred, ref, target, weighting=weighting), rtol=2e-4, atol=1e-6,
                    grad_rtol=grad_tol, grad_atol=grad_tol * float(got[2].abs().max()))


def test_parity_non_contiguous(backend):
    base = make_inputs((3, 8, 2, 20), seed=11)
    # transposed and sliced views: [3,8,2,20] -> [8,3,20,2] -> take every other row of S
    views = [x.transpose(0, 1).transpose(2, 3)[:, :, ::2] for x in base]
    assert not views[0].is_contiguous()
    got = _run(backend, *views)
    want = _oracle(*(v.contiguous() for v in views))
    _assert_matches(got, want, rtol=1e-9, atol=1e-12)


def test_separate_halves_match_full_batch(backend):
    pred, ref, target = make_inputs((4, 3, 9), seed=5)
    full = pgdpo_loss(pred, ref, target, backend=backend)
    halves = pgdpo_loss(pred.chunk(2), ref.chunk(2), target.chunk(2), backend=backend)
    torch.testing.assert_close(halves, full, rtol=0, atol=0)


@pytest.mark.parametrize("weighting", ["sample", "element"])
@pytest.mark.parametrize("method", ["pgdpo", "dpo"])
def test_policy_equals_reference(backend, method, weighting):
    """At initialisation d_w = d_l = 0: alpha = gamma = 0.5, L_dpo = ln 2 and L_ipr = 0."""
    _, ref, target = make_inputs((4, 2, 33), dtype=torch.float32, seed=2)
    loss, stats = pgdpo_loss(ref.clone(), ref, target, method=method, weighting=weighting,
                             backend=backend, return_stats=True)
    expected = 0.5 * math.log(2) if method == "pgdpo" else math.log(2)
    assert abs(loss.item() - expected) < 1e-6
    if method == "pgdpo":
        torch.testing.assert_close(stats["alpha"], torch.full((2,), 0.5))
        torch.testing.assert_close(stats["gamma"], torch.full((2,), 0.5))
    torch.testing.assert_close(stats["loss_dpo"], torch.full((2,), math.log(2)))


def test_cancellation_free_d_w(backend):
    """pred = ref + 1e-4 noise: fused d_w keeps 1e-5 relative accuracy; a difference of fp32 means cannot."""
    n = 4096 if backend == "triton" else 65536
    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, n, generator=g)
    ref = target + torch.randn(2, n, generator=g)
    pred = ref + 1e-4 * torch.randn(2, n, generator=g)
    _, stats = pgdpo_loss(pred, ref, target, backend=backend, return_stats=True)
    p64, r64, t64 = (x.double() for x in (pred, ref, target))
    exact = ((p64 - r64) * (p64 + r64 - 2 * t64)).mean(1)
    naive = (pred - target).square().mean(1) - (ref - target).square().mean(1)
    fused_err = ((stats["d_w"].double() - exact[:1]) / exact[:1]).abs().item()
    naive_err = ((naive.double() - exact) / exact).abs().max().item()
    assert fused_err <= 1e-5, fused_err
    assert naive_err > 100 * max(fused_err, 1e-7), (naive_err, fused_err)


@pytest.mark.parametrize("weighting", ["sample", "element"])
def test_bitwise_deterministic(backend, weighting):
    pred, ref, target = make_inputs((4, 3, 300), dtype=torch.float32, seed=9)
    a = _run(backend, pred, ref, target, weighting=weighting)
    b = _run(backend, pred, ref, target, weighting=weighting)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    assert all(torch.equal(a[1][k], b[1][k]) for k in STAT_NAMES)


@pytest.mark.parametrize("method", ["pgdpo", "ars", "ipr"])
@pytest.mark.parametrize("weighting", ["sample", "element"])
def test_gradcheck_through_weights(backend, method, weighting):
    """detach_weights=False: the gradient (through alpha, gamma and m) matches finite differences."""
    pred, ref, target = make_inputs((4, 5), seed=13)
    pred.requires_grad_(True)
    fn = lambda p: pgdpo_loss(p, ref, target, method=method, weighting=weighting, detach_weights=False,
                              beta=5.0, backend=backend)
    assert torch.autograd.gradcheck(fn, (pred,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_loss_scale_scales_gradient(backend):
    """Gradient accumulation: scaling the loss scales the gradient exactly (power of two)."""
    pred, ref, target = make_inputs((4, 2, 21), dtype=torch.float32, seed=4)
    p1 = pred.clone().requires_grad_(True)
    p2 = pred.clone().requires_grad_(True)
    pgdpo_loss(p1, ref, target, backend=backend).backward()
    (0.25 * pgdpo_loss(p2, ref, target, backend=backend)).backward()
    torch.testing.assert_close(p2.grad, 0.25 * p1.grad, rtol=0, atol=0)


def test_autocast_bfloat16(backend):
    """Under autocast the model emits bf16; the loss runs on those values and grads flow to the model."""
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16)
    x = torch.randn(4, 16)
    _, ref, target = make_inputs((4, 16), dtype=torch.float32, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = model(x)
        assert pred.dtype == torch.bfloat16
        loss = pgdpo_loss(pred, ref, target, backend=backend)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert model.weight.grad is not None and torch.isfinite(model.weight.grad).all()
    want = pgdpo_loss_reference(pred.detach().double(), ref.double(), target.double(), LossOptions())[0]
    torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-6)


def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    pred, ref, target = make_inputs((4, 3, 40), dtype=torch.float32, seed=6)

    def step(p, r, t):
        loss, stats = pgdpo_loss(p, r, t, backend=backend, return_stats=True)
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


def test_module_matches_functional(backend):
    pred, ref, target = make_inputs((4, 7), dtype=torch.float32, seed=8)
    crit = PGDPOLoss(method="ars", beta=50.0, k1=3.0, reduction="sum", backend=backend)
    assert "method='ars'" in repr(crit)
    torch.testing.assert_close(crit(pred, ref, target),
                               pgdpo_loss(pred, ref, target, method="ars", beta=50.0, k1=3.0,
                                          reduction="sum", backend=backend), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Bad inputs: each raises ValueError or TypeError naming the argument.

def _good():
    return make_inputs((4, 3), dtype=torch.float32)


def _bad_cases():
    p, r, t = _good()
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
    yield "weight length", (p, r, t), {"sample_weight": torch.ones(3)}, ValueError, r"sample_weight must have shape \[2\]"
    yield "weight int", (p, r, t), {"sample_weight": torch.ones(2, dtype=torch.long)}, TypeError, "sample_weight must be floating"
    yield "weight list", (p, r, t), {"sample_weight": [1.0, 1.0]}, TypeError, "sample_weight must be a torch.Tensor"
    yield "weight grad", (p, r, t), {"sample_weight": torch.ones(2, requires_grad=True)}, ValueError, "sample_weight requires grad"
    yield "ref grad", (p, r.clone().requires_grad_(True), t), {}, ValueError, "ref_pred requires grad"
    yield "target grad", (p, r, t.clone().requires_grad_(True)), {}, ValueError, "target requires grad"
    yield "detach not bool", (p, r, t), {"detach_weights": 1}, TypeError, "detach_weights must be a bool"


BAD = list(_bad_cases())


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_raises_clear_error(backend, case):
    _, args, kwargs, exc, match = case
    with pytest.raises(exc, match=match):
        pgdpo_loss(*args, **{"backend": backend, **kwargs})


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


def test_stats_carry_no_graph(backend):
    pred, ref, target = make_inputs((4, 6), dtype=torch.float32, seed=12)
    _, stats = pgdpo_loss(pred.clone().requires_grad_(True), ref, target, backend=backend, return_stats=True)
    assert all(v.grad_fn is None and not v.requires_grad for v in stats.values())


@pytest.mark.large
@pytest.mark.parametrize("weighting", ["sample", "element"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_parity_video_shape_large(fused, weighting, dtype):
    """A real video-latent shape (the CPU benchmark's): many chunks / programs per sample."""
    pred, ref, target = make_inputs((4, 16, 8, 30, 52), dtype=dtype, seed=21)
    got = _run(fused, pred, ref, target, weighting=weighting)
    want = _oracle(pred, ref, target, weighting=weighting)
    if dtype == torch.float64:
        _assert_matches(got, want, rtol=1e-9, atol=1e-12)
    else:
        _assert_matches(got, want, rtol=2e-4, atol=1e-6, grad_rtol=1e-2,
                        grad_atol=1e-2 * float(got[2].abs().max()))


@pytest.mark.parametrize("weighting", ["sample", "element"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_custom_op_opcheck(fused, weighting, reduction):
    """torch.library.opcheck: schema, fake (meta) kernel, autograd registration, no aliasing."""
    from pgdpo import ops

    pred, ref, target = (x.reshape(4, -1).contiguous() for x in make_inputs((4, 3, 5), dtype=torch.float32))
    pred.requires_grad_(True)
    flags = ops.pack_flags(True, True, True, weighting == "element", True, True,
                           {"none": 0, "mean": 1}[reduction])
    weight = torch.tensor([0.5, 2.0])
    torch.library.opcheck(ops.fused_loss, (pred, ref, target, weight, [100.0, 10.0, 10.0, 1e-6], flags, fused))


def test_double_backward_is_refused(fused):
    """The fused backward is first-order only: a second derivative is an error, never silent zeros."""
    pred, ref, target = make_inputs((4, 6), dtype=torch.float32, seed=3)
    pred.requires_grad_(True)
    (grad,) = torch.autograd.grad(pgdpo_loss(pred, ref, target, backend=fused), pred, create_graph=True)
    with pytest.raises(RuntimeError, match="does not require grad|once_differentiable"):
        grad.sum().backward()


def test_fp16_element_gradient_survives_loss_scaling(backend):
    """fp16, element weighting, loss scaled by 65536 (GradScaler): the gradient keeps fp16 precision."""
    pred, ref, target = make_inputs((2, 1_000_000), dtype=torch.float16, seed=17)
    scale = 65536.0
    p = pred.clone().requires_grad_(True)
    (scale * pgdpo_loss(p, ref, target, weighting="element", backend=backend)).backward()
    want = _oracle(pred, ref, target, weighting="element")[2] * scale
    rel = ((p.grad.double() - want).abs() / want.abs().clamp_min(1e-30))[want.abs() > 1e-3 * want.abs().max()]
    assert p.grad.dtype == torch.float16
    # fp16 rounding of the result gives a median of ~1.7e-4; an fp16 stored gradient (subnormal here) ~3e-3
    assert rel.median() < 5e-4, float(rel.median())
