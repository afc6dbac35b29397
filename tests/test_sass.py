"""The SASS audit (bench/sass.py) on a small set of variants: compiled for sm_90 with no GPU, through the
launcher's own configuration and Triton's own specialisation. A kernel change that spills on sm_90 or
loses the 128-bit element loads fails here."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

ROOT = Path(__file__).resolve().parent.parent
TOOLS = Path(triton.__file__).resolve().parent / "backends" / "nvidia" / "bin"

pytestmark = pytest.mark.skipif(
    not ((TOOLS / "cuobjdump").exists() and any((TOOLS / p).exists() for p in ("ptxas", "ptxas-blackwell"))),
    reason=f"Triton's NVIDIA backend tools (cuobjdump, ptxas) are not in {TOOLS}")


#: The audits CI runs. 1: wan480 (N divisible by 16: the vector loads must be there) and ragged (odd N),
#: bf16 and mixed (bf16 pred/ref + fp32 target), both weightings, the default options and the per-pair
#: backward. 2: the register-heaviest variant, the fp32 element forward with statistics and the heavy
#: option set (abs margin, eps_rel, undetached, k1 != k2), which spilled 16 B per thread at 128
#: registers before its accumulators were folded (bench/NOTES.md, SASS audit).
AUDITS = {
    "streaming": ["--shapes", "wan480,ragged", "--dtypes", "bf16,mixed", "--options", "default,per-pair"],
    "heavy": ["--shapes", "wan480", "--dtypes", "fp32", "--weightings", "element", "--options", "abs-margin"],
}


@pytest.fixture(scope="module")
def audit(tmp_path_factory):
    """(processes, the audits' results merged: kernels and findings of both)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # conftest sets it for CPU runs
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    procs, merged = [], {"kernels": [], "findings": []}
    for name, args in AUDITS.items():
        out = tmp_path_factory.mktemp("sass") / f"{name}.json"
        proc = subprocess.run(
            [sys.executable, "-m", "bench.sass", "--arch", "90", "--gpus", "H100", *args, "--json", str(out),
             "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        procs.append(proc)
        if not out.exists():
            return procs, None
        result = json.loads(out.read_text())
        for key in merged:
            merged[key] += result[key]
    return procs, merged


def test_audit_finds_no_error(audit):
    procs, result = audit
    assert result is not None, [p.stderr for p in procs]
    errors = [f for f in result["findings"] if f["level"] == "error"]
    assert not errors, errors
    for proc in procs:
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_no_spill_on_sm90(audit):
    """No local-memory traffic at all on sm_90, in a loop or outside (no stack frame either)."""
    _, result = audit
    assert result["kernels"] and all(k["arch"] == 90 for k in result["kernels"])
    spilling = [(k["kernel"], k["id"], k["spill_bytes"], k["stack"]) for k in result["kernels"]
                if k["spill_bytes"] or k["spill_stores"] or k["spill_loads"] or k["stack"]]
    assert not spilling
    heavy = [k for k in result["kernels"] if k["kernel"] == "_element_fused_kernel"
             and k["signature"]["p_ptr"] == "*fp32" and k["constexprs"].get("ABS") == "True"]
    assert heavy, "the heavy fp32 element variant was not audited"


def test_element_loads_are_128_bit_where_n_is_aligned(audit):
    """The streaming kernels' loads are as wide as the layout allows on wan480 (bf16: 8 elements per
    thread = 128 bits), and the audit really reads widths: on the odd ragged N the same kernels load at
    element width (what Triton compiles without the divisibility hint)."""
    _, result = audit
    by_kernel = {}
    for k in result["kernels"]:
        if k["element"]:
            by_kernel.setdefault((k["kernel"], k["element"]["aligned"]), []).append(k["element"])
    for name in ("_sample_partial_kernel", "_sample_backward_kernel", "_scale_rows_kernel"):
        aligned = by_kernel[(name, True)]
        assert all(e["loads"] and min(e["loads"]) == 128 for e in aligned), (name, aligned)
        unaligned = by_kernel[(name, False)]
        assert all(e["loads"] and max(e["loads"]) <= 32 for e in unaligned), (name, unaligned)
    for e in by_kernel[("_element_fused_kernel", True)]:
        assert e["loads"] and min(e["loads"]) >= e["allowed_load"] >= 64, e
