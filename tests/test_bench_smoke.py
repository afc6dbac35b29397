"""The benchmark suite and the demo (a front end over it) run end to end on tiny shapes (CI; ~30 s on
2 cores).

Timings are not asserted (speed is a benchmark, not a test): only that the outputs are well-formed,
the figures are positive and ordered, and every provider that ran agrees with the float64 reference.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-smoke")
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--no-progress", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, f"python -m bench --smoke failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return out, proc


def _check_summary(fig: dict):
    for key in ("median_ms", "min_ms", "max_ms", "p10_ms", "p90_ms", "q1_ms", "q3_ms"):
        assert math.isfinite(fig[key]) and fig[key] > 0, (key, fig)
    assert fig["min_ms"] <= fig["p10_ms"] <= fig["q1_ms"] <= fig["median_ms"] <= fig["q3_ms"]
    assert fig["median_ms"] <= fig["p90_ms"] <= fig["max_ms"]
    assert fig["n"] >= 1
    assert fig["gbps"] > 0 and fig["time_over_floor"] > 0


def test_smoke_json(smoke):
    out, _ = smoke
    record = json.loads((out / "bench.json").read_text())
    assert record["schema"] == "pgdpo-bench/1"
    for key in ("python", "torch", "triton"):
        assert key in record["versions"]
    assert "commit" in record["git"] and "dirty" in record["git"]
    assert record["machine"]["cpu_model"] and record["machine"]["torch_threads"] >= 1
    for when in ("start", "end"):
        assert record["bandwidth"][when]["gbps_median"] > 0
    passes = record["config"]["passes"]
    assert passes == ["fwd", "bwd", "fwdbwd"]
    assert len(record["cases"]) == 2 and {c["dtype"] for c in record["cases"]} == {"fp32", "bf16"}
    for case in record["cases"]:
        assert case["floor"]["fwdbwd"]["bytes"] == 4 * math.prod(case["shape"]) * (
            4 if case["dtype"] == "fp32" else 2)
        assert case["floor"]["fwdbwd"]["ms"] > 0
        assert case["providers"]["eager"]["available"], case["providers"]["eager"]
        for name, entry in case["providers"].items():
            if not entry["available"]:
                assert entry["reason"], f"{name} unavailable without a reason"
                continue
            ver = entry["verify"]
            assert ver["ok"], f"{case['name']} {case['dtype']} {name} disagrees with the reference: {ver}"
            assert ver["grad_dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[case["dtype"]]
            for err in ("loss_max_abs_err", "grad_max_rel_err", "stats_max_abs_err"):
                assert math.isfinite(ver[err]) and ver[err] >= 0
            assert entry["first_call_s"] > 0
            for pass_ in passes:
                _check_summary(entry["passes"][pass_])
            mem = entry["memory"]
            assert mem["extra_bytes"] >= 0 and mem["peak_bytes"] >= mem["extra_bytes"], mem
        if case["providers"]["compile"]["available"]:
            assert case["providers"]["compile"]["compile_s"] > 0
        if all(case["providers"][p]["available"] for p in ("fused", "eager")):
            assert case["speedups"]["fwdbwd"]["fused_vs_eager"] > 0
    assert record["summary"]["all_agree"]


def test_smoke_markdown_and_plot(smoke):
    out, proc = smoke
    md = (out / "bench.md").read_text()
    assert md.startswith("# pgdpo loss benchmark")
    rows = [line for line in md.splitlines() if line.startswith("| tiny-")]
    assert len(rows) == 2 * 3 + 2 * 3  # time rows (case x pass) + agreement rows (case x provider)
    header = next(line for line in md.splitlines() if line.startswith("| case | shape"))
    assert all(row.count("|") == header.count("|") for row in rows[:6])
    assert "| case | shape" in proc.stdout  # the table is printed too
    png = (out / "bench.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    import matplotlib.image

    img = matplotlib.image.imread(out / "bench.png")
    assert img.shape[0] > 200 and img.shape[1] > 200


def test_bench_rejects_bad_arguments():
    from bench.__main__ import main

    assert main(["--shapes", "3x4x5", "--no-progress"]) == 2  # odd first dimension
    assert main(["--providers", "fused,nonsense"]) == 2
    assert main(["--dtypes", "int8"]) == 2


def test_demo_is_the_suite_and_runs_outside_the_repository(tmp_path):
    """`pgdpo demo` from a folder where the repository's `bench/` is not importable (as from an installed
    wheel): it runs the suite of pgdpo.tools.benchmark, so its record has the suite's schema, the suite's
    float64 checks with the suite's tolerances, and it prints the suite's tables."""
    out = tmp_path / "demo"
    code = ("import importlib.util, sys\n"
            "assert importlib.util.find_spec('bench') is None, 'the repository bench/ is importable here'\n"
            "from pgdpo.tools.demo import main\n"
            "sys.exit(main(['--shapes', 'tiny-video,2x3x9x11', '--dtypes', 'fp32,bf16', '--repeats', '3',\n"
            f"               '--warmup', '1', '--no-progress', '--out', {str(out)!r}]))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-4000:]}"

    from pgdpo.tools.benchmark.cases import DTYPES
    from pgdpo.tools.benchmark.providers import TOLERANCES
    from pgdpo.tools.benchmark.suite import SCHEMA

    record = json.loads((out / "bench.json").read_text())
    assert record["schema"] == SCHEMA
    assert record["config"]["passes"] == ["fwdbwd"] and record["config"]["providers"] == ["fused", "eager"]
    assert [(c["name"], c["dtype"]) for c in record["cases"]] == [
        ("tiny-video", "fp32"), ("tiny-video", "bf16"), ("2x3x9x11", "fp32"), ("2x3x9x11", "bf16")]
    for case in record["cases"]:
        assert case["providers"]["eager"]["available"]
        for name, entry in case["providers"].items():
            if not entry["available"]:
                assert entry["reason"] and entry["reason"] in proc.stdout  # said, not hidden
                continue
            assert entry["verify"]["ok"], (case["name"], case["dtype"], name, entry["verify"])
            assert entry["verify"]["tolerance"] == TOLERANCES[DTYPES[case["dtype"]]]
            _check_summary(entry["passes"]["fwdbwd"])
    assert record["summary"]["all_agree"]
    assert (out / "bench.md").read_text() in proc.stdout  # the suite's report is what is printed
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| tiny-video |", "| 2x3x9x11 |"))]
    assert len(rows) == 4 + 4 * 2  # time rows (case) + agreement rows (case x provider)
    assert "agree with the float64 reference on every case" in proc.stdout


# Placed first on sys.meta_path: `pgdpo.loss.cpu_op` fails to import, as where the C++ op cannot be loaded.
_NO_CPU_OP = """
import importlib.abc, importlib.machinery, sys
class _NoCpuOp(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name == "pgdpo.loss.cpu_op":
            return importlib.machinery.ModuleSpec(name, self)
    def create_module(self, spec):
        raise ImportError("blocked by the test")
    def exec_module(self, module):
        pass
sys.meta_path.insert(0, _NoCpuOp())
"""


def test_demo_without_the_fused_op_says_why_and_times_the_rest():
    code = _NO_CPU_OP + ("from pgdpo.tools.demo import main\n"
                         "sys.exit(main(['--shapes', 'tiny-image', '--dtypes', 'fp32', '--repeats', '2',\n"
                         "               '--warmup', '0', '--no-progress', '--device', 'cpu']))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-4000:]}"
    assert "- fused: unavailable: the fused C++ op could not be loaded (blocked by the test)" in proc.stdout
    assert "| tiny-image | fp32 | fused | cpu | unavailable:" in proc.stdout
    assert "| tiny-image | fp32 | eager | torch | yes |" in proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1].startswith(
        "eager agrees with the float64 reference on every case")


def test_progress_bar_is_tqdm_on_stderr(capsys):
    from tqdm import tqdm

    from pgdpo.tools.benchmark.suite import _NoBar, _progress

    assert isinstance(_progress(3, False), _NoBar)
    bar = _progress(3, True)
    assert isinstance(bar, tqdm) and not bar.disable
    bar.set_description_str("case")
    bar.update()
    bar.close()
    drawn = capsys.readouterr()
    assert "case" in drawn.err and "1/3" in drawn.err and drawn.out == ""
    auto = _progress(3, None)  # only on a terminal: pytest captures stderr, so off here
    assert isinstance(auto, tqdm) and auto.disable == (not sys.stderr.isatty())
    auto.close()


def test_demo_help(capsys):
    from pgdpo.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "fused" in text and "eager" in text and "--repeats" in text


def test_demo_rejects_bad_shape(capsys):
    from pgdpo.tools.demo import main

    assert main(["--shapes", "3x4"]) == 2
    assert "first dimension 2B" in capsys.readouterr().err
    assert main(["--dtypes", "int8"]) == 2
    assert "unknown dtype 'int8'" in capsys.readouterr().err
    assert main(["--device", "tpu"]) == 2
    assert "--device" in capsys.readouterr().err
