"""``python -m bench.gpu --dry-run``: the prepared GPU run goes through on CPU (Triton's interpreter, tiny
shapes, a 2-block slice of Wan2.1-T2V-1.3B), writing every section's figures and the archive."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_run_dry_run_writes_every_section(tmp_path):
    out, archive = tmp_path / "gpu", tmp_path / "gpu.tar.gz"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--out", str(out), "--archive", str(archive),
                           "--dry-run", "--budget-s", "500"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    summary = json.loads((out / "summary.json").read_text())
    sections = summary["sections"]
    assert proc.returncode == 0, (proc.stderr[-3000:], sections)
    assert list(sections) == ["env", "tests", "loss", "graph", "sweep", "train"]
    assert all(s["status"] == "done" for s in sections.values()), sections
    env_info = json.loads((out / "env.json").read_text())
    assert env_info["torch"] and env_info["triton"] and "diffusers" in env_info["wheels"]
    assert "pytest exit 0" in sections["tests"]["detail"]
    assert list((out / "loss" / "smoke").glob("*.json")) and list((out / "loss" / "mixed").glob("*.json"))
    sweep = json.loads((out / "sweep.json").read_text())
    assert set(sweep["winners"]["tiny-video"]) == {"block", "split", "backward_block", "ms"}
    train = json.loads((out / "train.json").read_text())
    for label in ("lora", "full"):
        assert train[label]["step_time_s"] > 0 and train[label]["peak_mem_gb"] > 0, train[label]
        assert isinstance(train[label]["plan"], dict), train[label]
    # the archive holds the figures (and no weights)
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert "gpu/summary.json" in names and "gpu/train.json" in names
    assert not [n for n in names if n.endswith((".safetensors", ".distcp", ".pt"))]
