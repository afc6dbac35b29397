"""Tests specific to the fused C++ CPU op (csrc/, pgdpo/loss/cpu_op.py).

Parity with the reference over every option, dtype and layout is tests/test_loss.py's job (one suite for
all fused backends); this file covers what only the CPU op has: thread-count independence, float64
accuracy across many reduction chunks, the just-in-time build cache, the missing-compiler and
failed-build paths, and input checks of the raw torch ops.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pgdpo import pgdpo_loss
from pgdpo.loss import cpu_op, op
from pgdpo.loss.options import STAT_NAMES, LossOptions
from pgdpo.loss.reference import pgdpo_loss_reference

HAS_PREBUILT = importlib.util.find_spec("pgdpo._C") is not None


@pytest.fixture(scope="module")
def chunk() -> int:
    """The op's reduction chunk (elements per row), read from the built library."""
    reason = cpu_op.unavailable_reason()
    if reason is not None:
        pytest.skip(f"the fused CPU op is unavailable: {reason}")
    return int(cpu_op.read_marker(cpu_op.library_path())["chunk"])


def make_inputs(two_b: int, n: int, dtype=torch.float32, policy_offset: float = 0.05, seed: int = 0):
    """Policy close to the reference, both some way from the target: d_w, d_l small but not degenerate."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(two_b, n, generator=g, dtype=torch.float64)
    r = t + 0.5 * torch.randn(two_b, n, generator=g, dtype=torch.float64)
    p = r + policy_offset * torch.randn(two_b, n, generator=g, dtype=torch.float64)
    return tuple(x.to(dtype) for x in (p, r, t))


def run_cpu(p, r, t, **kw):
    """Loss, stats and dloss/dpred through pgdpo_loss(backend='cpu')."""
    p = p.clone().requires_grad_()
    loss, stats = pgdpo_loss(p, r, t, backend="cpu", return_stats=True, **kw)
    loss.sum().backward()
    return loss.detach(), stats, p.grad


def run_subprocess(code: str, env_update: dict[str, str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, **env_update)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("weighting", ["sample", "element"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_results_bitwise_identical_for_1_2_3_threads(chunk, weighting, dtype):
    # 5 chunks per row (the last one ragged): with 3 threads the (row, chunk) tasks are split in the
    # middle of rows, so a thread-dependent reduction order would show.
    p, r, t = make_inputs(4, 4 * chunk + 37, dtype)
    weight = torch.tensor([0.7, 1.3])
    kw = dict(weighting=weighting, detach_weights=False, sample_weight=weight)
    before = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results[threads] = run_cpu(p, r, t, **kw)
    finally:
        torch.set_num_threads(before)
    loss1, stats1, grad1 = results[1]
    for threads in (2, 3):
        loss, stats, grad = results[threads]
        assert torch.equal(loss, loss1), f"loss differs between 1 and {threads} threads"
        for name in STAT_NAMES:
            assert torch.equal(stats[name], stats1[name]), f"stat {name} differs between 1 and {threads} threads"
        assert torch.equal(grad, grad1), f"gradient differs between 1 and {threads} threads"


@pytest.mark.parametrize("weighting", ["sample", "element"])
@pytest.mark.parametrize("detach_weights", [True, False])
def test_float64_matches_reference_across_many_chunks(chunk, weighting, detach_weights):
    n = 5 * chunk + 123
    p, r, t = make_inputs(6, n, torch.float64)
    weight = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    kw = dict(weighting=weighting, detach_weights=detach_weights, sample_weight=weight, reduction="none")
    loss, stats, grad = run_cpu(p, r, t, **kw)

    options = LossOptions(weighting=weighting, detach_weights=detach_weights, reduction="none")
    p_ref = p.clone().requires_grad_()
    ref_loss, ref_stats = pgdpo_loss_reference(p_ref, r, t, options, weight)
    ref_loss.sum().backward()

    assert loss.dtype == stats["d_w"].dtype == grad.dtype == torch.float64
    tol = dict(rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(loss, ref_loss.detach(), **tol)
    for name in STAT_NAMES:
        torch.testing.assert_close(stats[name], ref_stats[name], **tol, msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(grad, p_ref.grad, **tol)


def test_float32_keeps_tiny_preference_differences_over_long_rows(chunk):
    # Early in training the policy is the reference plus a 1e-4 perturbation: d_w, d_l are ~1e-8 while
    # the two MSEs they are differences of are ~0.25, below float32's resolution of either MSE. The op
    # must still get them to float32-level relative accuracy (identity (p-r)(p+r-2t), chunked sums).
    n = 8 * chunk + 5
    p, r, t = make_inputs(4, n, torch.float64, policy_offset=1e-4, seed=1)
    p, r, t = (x.float() for x in (p, r, t))
    _, stats, _ = run_cpu(p, r, t)
    _, ref_stats = pgdpo_loss_reference(p.double(), r.double(), t.double(), LossOptions())
    for name in ("d_w", "d_l", "margin"):
        torch.testing.assert_close(stats[name].double(), ref_stats[name], rtol=1e-4, atol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_sample_backward_skips_ref_pred_where_its_coefficient_is_zero(chunk):
    # Rejected rows have no (p - r) term (c_r = 0), nor do chosen rows without the anchor IPR term:
    # the backward must not read ref_pred there (it saves a third of the traffic), which NaNs in
    # ref_pred would expose as a NaN gradient.
    p, r, t = make_inputs(4, chunk + 9)
    for method, nan_rows in (("pgdpo", slice(2, 4)), ("dpo", slice(0, 4))):
        opts = LossOptions(method=method)
        _, _, saved = raw_forward(*_op_args(p, r, t, opts=opts))
        assert torch.all(saved[nan_rows, 1] == 0)
        r_nan = r.clone()
        r_nan[nan_rows] = float("nan")
        grad = raw_backward(torch.tensor(1.0), p, r_nan, t, saved, False)
        expected = raw_backward(torch.tensor(1.0), p, r, t, saved, False)
        assert torch.equal(grad, expected), method


def test_second_load_reuses_the_jit_cache(chunk):
    lib = cpu_op.library_path()
    if not lib.startswith(str(cpu_op.cache_root())):
        pytest.skip(f"the op was loaded from a prebuilt library ({lib}), not the JIT cache")
    mtime = os.stat(lib).st_mtime_ns
    proc = run_subprocess("""
        import json
        from pgdpo.loss import cpu_op
        print(json.dumps({"reason": cpu_op.unavailable_reason(), "lib": cpu_op.library_path()}))
    """, {})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"reason": None, "lib": lib}
    assert "compiling" not in proc.stderr, proc.stderr
    assert os.stat(lib).st_mtime_ns == mtime, "the cached library was rebuilt"


@pytest.mark.skipif(HAS_PREBUILT, reason="a prebuilt pgdpo._C is used without any compiler")
def test_missing_compiler_is_a_clear_error_for_cpu_and_a_warned_fallback_for_auto(tmp_path):
    cache = tmp_path / "empty_cache"
    proc = run_subprocess("""
        import json, warnings
        import torch
        from pgdpo import pgdpo_loss
        g = torch.Generator().manual_seed(0)
        p, r, t = (torch.randn(4, 33, generator=g) for _ in range(3))
        out = {}
        try:
            pgdpo_loss(p, r, t, backend="cpu")
            out["cpu_error"] = None
        except ValueError as exc:
            out["cpu_error"] = str(exc)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = pgdpo_loss(p, r, t, backend="auto")
            second = pgdpo_loss(p, r, t, backend="auto")
        out["warnings"] = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        eager = pgdpo_loss(p, r, t, backend="torch")
        out["auto_is_eager"] = bool(torch.equal(first, eager) and torch.equal(second, eager))
        print(json.dumps(out))
    """, {"CXX": "/nonexistent/pgdpo-test-cxx", "PGDPO_CACHE_DIR": str(cache)})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["cpu_error"] is not None, "backend='cpu' without a compiler must raise"
    assert "no C++ compiler found" in out["cpu_error"] and "/nonexistent/pgdpo-test-cxx" in out["cpu_error"]
    assert len(out["warnings"]) == 1, out["warnings"]
    assert "falls back" in out["warnings"][0] and "no C++ compiler found" in out["warnings"][0]
    assert out["auto_is_eager"]
    assert "compiling" not in proc.stderr
    assert not list(cache.rglob("*.so")), "nothing may be built without a compiler"


@pytest.mark.skipif(HAS_PREBUILT, reason="a prebuilt pgdpo._C is used without any compiler")
@pytest.mark.skipif(shutil.which("g++") is None, reason="the fake compiler answers version probes with g++")
def broken_compiler(folder) -> Path:
    """A compiler that answers version probes (as g++) but fails every compilation, like a broken toolchain."""
    fake = folder / "broken-cxx"
    fake.write_text(textwrap.dedent("""\
        #!/bin/sh
        for arg in "$@"; do
            if [ "$arg" = "-c" ]; then echo 'fake-cxx: error: this compiler always fails' >&2; exit 1; fi
        done
        exec g++ "$@"
    """))
    fake.chmod(0o755)
    return fake


def test_failed_build_reports_the_compiler_output(tmp_path):
    fake = broken_compiler(tmp_path)
    proc = run_subprocess("""
        from pgdpo.loss import cpu_op
        print(cpu_op.unavailable_reason())
    """, {"CXX": str(fake), "PGDPO_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    assert "building the fused CPU op failed" in proc.stdout
    assert "fake-cxx: error: this compiler always fails" in proc.stdout


def test_incompatible_prebuilt_library_is_skipped_unloaded(tmp_path):
    # A pgdpo._C built for another torch must be neither loaded (its static op registration cannot be
    # undone) nor used; the file here is not even a library, so loading it would fail differently.
    fake = tmp_path / "_C.so"
    fake.write_bytes(b"\x7fELF-not-really" + b"PGDPO_CPU_OP_BUILD capability=DEFAULT torch=0.0.1 chunk=1;")
    path, note = cpu_op._try_prebuilt(str(fake))
    assert path is None
    assert "torch 0.0.1" in note


def _op_args(p, r, t, sample_weight=None, reduction=1, element=False, need_grad=True, opts=None):
    o = opts or LossOptions()
    flags = op.pack_flags(o.ars, o.ipr, o.anchor, element, True, need_grad, reduction)
    return (p, r, t, sample_weight, [o.beta, o.k1, o.k2, o.eps, o.eps_rel], flags)


def raw_forward(*args):
    """The C++ CPU kernel of pgdpo::fused_loss, called below autograd (what the op's autograd formula runs)."""
    with torch._C._AutoDispatchBelowAutograd():
        return op.fused_loss(*args)


def raw_backward(grad_loss, p, r, t, saved, element, grad_dtype=None):
    return op.fused_loss_backward(grad_loss, p, r, t, saved, element, grad_dtype or p.dtype)


def _bad_forward_cases():
    p, r, t = make_inputs(4, 40)
    return [
        ("sample_weight dtype", _op_args(p, r, t, torch.ones(2, dtype=torch.float64)), "accumulation dtype"),
        ("sample_weight shape", _op_args(p, r, t, torch.ones(3)), r"sample_weight must have shape \[2\]"),
        ("sample_weight 2-D", _op_args(p, r, t, torch.ones(2, 1)), r"sample_weight must have shape \[2\]"),
        ("dtype mismatch", _op_args(p, r.double(), t), "float64 inputs must all be float64"),
        ("shape mismatch", _op_args(p, r[:, :39].contiguous(), t), "ref_pred has shape"),
        ("odd batch", _op_args(p[:3], r[:3], t[:3]), "first dimension must be 2B"),
        ("3-D input", _op_args(p.view(4, 4, 10), r.view(4, 4, 10), t.view(4, 4, 10)), "must be 2-D"),
        ("non-contiguous", _op_args(p.t().contiguous().t(), r, t), "pred must be contiguous"),
        ("integer dtype", _op_args(*(x.to(torch.int32) for x in (p, r, t))), "pred must be float32"),
        ("empty rows", _op_args(p[:, :0], r[:, :0], t[:, :0]), "at least one element"),
        ("reduction code", _op_args(p, r, t, reduction=3), "reduction must be"),
    ]


@pytest.mark.parametrize("case", _bad_forward_cases(), ids=lambda c: c[0])
def test_raw_forward_rejects_bad_inputs(chunk, case):
    _, args, match = case
    with pytest.raises(RuntimeError, match=match):
        raw_forward(*args)


def test_raw_backward_rejects_bad_inputs(chunk):
    p, r, t = make_inputs(4, 40)
    _, _, saved = raw_forward(*_op_args(p, r, t))
    one = torch.tensor(1.0)
    with pytest.raises(RuntimeError, match="saved must be the contiguous"):
        raw_backward(one, p, r, t, saved[:3].contiguous(), False)
    with pytest.raises(RuntimeError, match="saved must be the contiguous"):
        raw_backward(one, p, r, t, saved.double(), False)
    with pytest.raises(RuntimeError, match=r"grad_loss must have shape \[\] or \[2\]"):
        raw_backward(torch.ones(3), p, r, t, saved, False)
    _, _, no_grad = raw_forward(*_op_args(p, r, t, element=True, need_grad=False))
    with pytest.raises(RuntimeError, match="need_grad=False"):
        raw_backward(one, no_grad, no_grad, no_grad, no_grad, True, torch.float32)


def test_flag_bits_of_the_cpp_kernel_match_the_op_definition():
    """The C++ kernel unpacks `flags` with its own copy of the bit values (csrc/pgdpo_cpu.h); they must be
    the ones pgdpo/loss/op.py packs, or the CPU kernel would silently compute another variant."""
    import re
    from pathlib import Path

    header = (Path(op.__file__).parents[2] / "csrc" / "pgdpo_cpu.h").read_text()
    cpp = {name: int(value) for name, value in re.findall(r"k(Flag\w+|ReductionShift|NumScalars) = (\d+)", header)}
    python = {"FlagArs": op.ARS, "FlagIpr": op.IPR, "FlagAnchor": op.ANCHOR, "FlagElement": op.ELEMENT,
              "FlagDetach": op.DETACH, "FlagNeedGrad": op.NEED_GRAD, "FlagAbsMargin": op.ABS_MARGIN,
              "FlagNoStats": op.NO_STATS, "ReductionShift": op.REDUCTION_SHIFT, "NumScalars": op.NUM_SCALARS}
    assert cpp == python


def test_cpu_kernel_is_registered_on_the_one_op():
    """Loading the C++ library registers the CPU kernels of pgdpo::fused_loss itself: no second op."""
    assert cpu_op.unavailable_reason() is None
    for name in ("fused_loss", "fused_loss_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pgdpo::{name}", "CPU"), name
    assert not hasattr(torch.ops.pgdpo_cpu, "forward")


def test_a_build_killed_midway_does_not_block_the_next_one(tmp_path):
    """A build killed while it held torch's lock file (Ctrl-C, a job's time limit) leaves ``lock`` in the
    build folder, and torch's cpp_extension then waits for it forever. The next process must build anyway
    (here with a compiler that fails at once, so the test needs no real build: it must say the build
    failed instead of hanging)."""
    fake = broken_compiler(tmp_path)
    env = {"CXX": str(fake), "PGDPO_CACHE_DIR": str(tmp_path / "cache")}
    where = run_subprocess("""
        from pgdpo.loss import cpu_op
        print(cpu_op.build_directory())
    """, env)
    build_dir = Path(where.stdout.strip().splitlines()[-1])
    build_dir.mkdir(parents=True)
    (build_dir / "lock").write_text("")  # what the killed build left
    code = "from pgdpo.loss import cpu_op\nprint(cpu_op.unavailable_reason())\n"
    try:
        proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True,
                              text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the build waited for the lock file a killed build left behind")
    assert proc.returncode == 0, proc.stderr
    assert "building the fused CPU op failed" in proc.stdout
    assert "left by a build of the CPU op that did not finish" in proc.stderr
