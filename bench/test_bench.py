"""pytest-benchmark form of the suite: ``pytest bench/ --benchmark-only`` (not part of ``pytest tests/``).

Same providers, inputs and verification as ``python -m bench``, forward + backward only, small cases.
Each (case) is one benchmark group, so pytest-benchmark's table compares fused / eager / compile
side by side; ``extra_info`` carries the byte floor and the errors against the float64 reference.
For the full report (bandwidth, floor ratios, memory, JSON/markdown/plot) use ``python -m bench``.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from pgdpo.loss.options import LossOptions
from pgdpo.tools.benchmark import machine
from pgdpo.tools.benchmark.cases import Case, make_inputs, parse_shape, rotation_sets
from pgdpo.tools.benchmark.providers import PROVIDERS, make_providers, oracle, verify

pytest.importorskip("pytest_benchmark")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = {
    "cpu": [("cpu-target", torch.float32), ("sdxl", torch.bfloat16), ("ragged", torch.float32)],
    "cuda": [("wan480", torch.bfloat16), ("wan480", torch.float32), ("cpu-target", torch.float32),
             ("ragged", torch.bfloat16)],
}[DEVICE.type]
OPTIONS = LossOptions()


@pytest.fixture(scope="module")
def inputs():
    """Input sets per case, made once: enough of them to rotate through more than twice the cache."""
    cache = {}

    def get(case: Case):
        if case not in cache:
            cache.clear()  # one case's sets at a time
            n = rotation_sets(case, machine.cache_bytes(DEVICE), max_bytes=2 << 30)
            sets = [make_inputs(case, DEVICE, seed=i) for i in range(n)]
            cache[case] = (sets, oracle(sets[0], OPTIONS))
        return cache[case]

    return get


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case_name,dtype", CASES, ids=[f"{n}-{str(d)[6:]}" for n, d in CASES])
def test_fwdbwd(benchmark, inputs, case_name, dtype, provider):
    case = Case(case_name, parse_shape(case_name)[1], dtype)
    (prov,) = make_providers([provider], DEVICE, OPTIONS)
    reason = prov.unavailable_reason()
    if reason is not None:
        pytest.skip(f"{provider} unavailable: {reason}")
    sets, ref = inputs(case)
    fn = prov.build(case)
    check = verify(fn, sets[0], ref, dtype)  # also the first call: compiles, builds, autotunes
    assert check["ok"], f"{provider} disagrees with the float64 reference: {check}"

    cycle = itertools.cycle(sets)

    def fwdbwd():
        p, r, t = next(cycle)
        loss, _ = fn(p, r, t)
        torch.autograd.grad(loss, p)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)

    benchmark.group = f"{case.label} {case.shape_str()} fwd+bwd"
    benchmark.extra_info.update(
        backend=prov.backend, floor_bytes=case.floor_bytes("fwdbwd"), rotation_sets=len(sets),
        loss_max_abs_err=check["loss_max_abs_err"], grad_max_rel_err=check["grad_max_rel_err"])
    benchmark.pedantic(fwdbwd, rounds=30 if DEVICE.type == "cpu" else 200, iterations=1,
                       warmup_rounds=3 if DEVICE.type == "cpu" else 20)
