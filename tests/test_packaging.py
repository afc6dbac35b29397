"""Installed layout: every library package is listed for setuptools, and kernels/ installs as pgdpo.kernels."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_installed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "pgdpo").rglob("__init__.py")}
    missing = on_disk - listed
    assert not missing, f"packages missing from pyproject.toml [tool.setuptools] packages: {sorted(missing)}"
    assert config["package-dir"]["pgdpo.kernels"] == "kernels"
    assert (ROOT / "kernels" / "__init__.py").exists()


def test_kernels_import_as_pgdpo_kernels_not_top_level(tmp_path):
    """From outside the repo, the kernels are `pgdpo.kernels`; no top-level `kernels` of ours exists
    (it would clash with Hugging Face's `kernels` package, which diffusers imports)."""
    code = ("import importlib.util, pathlib, pgdpo.kernels\n"
            "print(pathlib.Path(pgdpo.kernels.__path__[0]).resolve())\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "print(spec and pathlib.Path(spec.origin or '').resolve().parent)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode == 0, out.stderr
    ours, top_level = out.stdout.split("\n")[:2]
    assert Path(ours) == (ROOT / "kernels").resolve()
    assert top_level != str((ROOT / "kernels").resolve())
