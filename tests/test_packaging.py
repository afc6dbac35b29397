"""Installed layout: every library package is listed for setuptools; the source folders kernels/ (Triton) and
csrc/ (C++) are seen by Python only as pgdpo.kernels / pgdpo.csrc (links inside the package), never as
top-level packages that would shadow installed ones."""

import os
import re
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
    for source in ("kernels", "csrc"):
        assert f"pgdpo.{source}" in listed
        # A source folder, not a package: with an __init__.py a top-level `kernels` (or `csrc`) of ours would
        # shadow the installed distribution of that name whenever the repository root is on sys.path.
        assert not (ROOT / source / "__init__.py").exists(), f"{source}/__init__.py makes {source} importable"
        link = ROOT / "pgdpo" / source
        assert link.is_symlink() and link.resolve() == (ROOT / source).resolve()


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


_THEIRS = ("kernels", "csrc", "bench")


def _installed_elsewhere(name: str) -> str | None:
    """Where an installed top-level package ``name`` lives (looked up from outside the repository), or None."""
    code = (f"import importlib.util; s = importlib.util.find_spec({name!r}); "
            "print(s.origin if s and s.origin else (list(s.submodule_search_locations)[0] if s else ''))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd="/", env=env, capture_output=True, text=True,
                         timeout=120).stdout.strip()
    return out or None


def test_installed_packages_named_like_our_folders_stay_theirs(tmp_path):
    """Packages named like the repository's top-level folders (Hugging Face's ``kernels``, which the newest
    transformers imports; a ``csrc``; a ``bench``), everything run from the repository root, where
    ``python -m`` / ``torchrun -m`` put the root first on sys.path: ``python -m pgdpo --help`` and a tiny
    training run work, pgdpo's kernels and C++ sources are ours (pgdpo.kernels, pgdpo.csrc), and
    ``import kernels`` / ``import csrc`` give theirs: the installed one where there is one (transformers
    then really imports it), else a stand-in package first on PYTHONPATH. (``bench`` is ours from the root
    by design, a development folder run as ``python -m bench``, so the library must never import it.)"""
    site = tmp_path / "site"
    theirs = {}
    for name in _THEIRS:
        installed = _installed_elsewhere(name)
        if installed is not None and name != "bench":
            theirs[name] = Path(installed).resolve()
            continue
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text(f"NAME = {name!r}\n")
        theirs[name] = (site / name / "__init__.py").resolve()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    help_run = subprocess.run([sys.executable, "-m", "pgdpo", "--help"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
    assert help_run.returncode == 0, help_run.stderr[-3000:]
    out = tmp_path / "run"
    code = f"""
import runpy, sys
sys.argv = ["pgdpo", "train", "--config", "configs/demo.yaml", "--output-dir", {str(out)!r}, "--max-steps", "2",
            "--logging.progress", "false", "--logging.trackers", "[]", "--logging.plots", "false",
            "--train.batch_size", "2", "--train.micro_batch_size", "1", "--validation.every", "0",
            "--data.synth_pairs", "4"]
try:
    runpy.run_module("pgdpo", run_name="__main__")
except SystemExit as exc:
    assert not exc.code, exc.code
import pgdpo.kernels, pgdpo.csrc
print("OURS", pgdpo.kernels.__path__[0], pgdpo.csrc.__path__[0])
print("BENCH_IMPORTED", "bench" in sys.modules)
import csrc, kernels
print("THEIRS", kernels.__file__, csrc.__file__)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "done: 2 steps" in proc.stdout
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.split(" ")[0].isupper())
    ours_kernels, ours_csrc = lines["OURS"].split()
    assert Path(ours_kernels).resolve() == (ROOT / "kernels").resolve()
    assert Path(ours_csrc).resolve() == (ROOT / "csrc").resolve()
    assert lines["BENCH_IMPORTED"] == "False", "the library imported the development folder bench/"
    got_kernels, got_csrc = (Path(f).resolve() for f in lines["THEIRS"].split())
    assert (got_kernels, got_csrc) == (theirs["kernels"], theirs["csrc"])


def _blocking(*packages: str) -> str:
    """Code for a finder placed first on sys.meta_path that makes importing ``packages`` fail, as on a
    machine where they are not installed."""
    return f'''
import importlib.abc, importlib.machinery, sys
BLOCKED = {packages!r}
class _Blocked(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return importlib.machinery.ModuleSpec(name, self)
    def create_module(self, spec):
        raise ImportError(f"No module named {{spec.name!r}} (blocked by the test)", name=spec.name)
    def exec_module(self, module):
        pass
sys.meta_path.insert(0, _Blocked())
'''


_NO_TRITON = _blocking("triton")


def test_loss_library_needs_torch_alone(tmp_path):
    """The loss layer imports and runs (forward, backward, module form, every backend here) with diffusers,
    peft, accelerate and transformers unimportable, and does not import them."""
    code = _blocking("diffusers", "peft", "accelerate", "transformers") + (
        "import torch, pgdpo\n"
        "from pgdpo.loss import PGDPOLoss, loss_with_options, LossOptions, resolve_backend\n"
        "p = torch.randn(4, 6, requires_grad=True); r = torch.randn(4, 6); t = torch.randn(4, 6)\n"
        "for backend in ('auto', 'cpu', 'torch'):\n"
        "    p.grad = None\n"
        "    pgdpo.pgdpo_loss(p, r, t, backend=backend).backward()\n"
        "    print(backend, 'GRAD', bool(torch.isfinite(p.grad).all()))\n"
        "print('MODULE', float(PGDPOLoss(method='dpo')(p, r, t)) > 0)\n"
        "print('LOADED', sorted(m for m in ('diffusers', 'peft', 'accelerate', 'transformers') if m in sys.modules))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    for backend in ("auto", "cpu", "torch"):
        assert f"{backend} GRAD True" in out.stdout
    assert "MODULE True" in out.stdout and "LOADED []" in out.stdout


def test_library_works_without_triton(tmp_path):
    """triton is a Linux-only requirement: without it, the loss still runs on the 'cpu' and 'torch'
    backends, 'auto' picks the C++ op, and 'triton' is a clear error naming the package."""
    code = _NO_TRITON + (
        "import warnings, torch, pgdpo\n"
        "x = torch.randn(4, 3); r = torch.randn(4, 3); t = torch.randn(4, 3)\n"
        "with warnings.catch_warnings():\n"
        "    warnings.simplefilter('error')\n"  # auto must not fall back to eager: the C++ op is there
        "    a = pgdpo.pgdpo_loss(x, r, t)\n"
        "e = pgdpo.pgdpo_loss(x, r, t, backend='torch')\n"
        "print('CLOSE', bool(torch.allclose(a, e, rtol=1e-5, atol=1e-6)))\n"
        "try:\n"
        "    pgdpo.pgdpo_loss(x, r, t, backend='triton')\n"
        "except ValueError as err:\n"
        "    print('ERR', err)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert "CLOSE True" in out.stdout
    assert "ERR backend='triton' is not available" in out.stdout and "triton" in out.stdout.split("ERR")[1]


def _readme_test_command() -> str:
    lines = (ROOT / "README.md").read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("# Run the tests"))
    return next(line for line in lines[i + 1:] if not line.startswith("#")).strip()  # past the comment


def test_ci_runs_the_readme_test_command_from_the_constraints():
    """.ci/run is the README's test command, and both install from constraints.txt (what was tested)."""
    command = _readme_test_command()
    assert command in (ROOT / ".ci" / "run").read_text()
    assert command.count("-c constraints.txt") >= 2  # torch first, then the package and its extras
    assert "pytest" in command


def test_ci_reruns_the_numerics_files_under_other_instruction_sets():
    """.ci/run runs .ci/numerics under two settings other than the machine's own (an instruction set with 2
    threads, the portable kernels with 1), and every file .ci/numerics names exists."""
    run = (ROOT / ".ci" / "run").read_text()
    settings = re.findall(r"^ATEN_CPU_CAPABILITY=(\w+) OMP_NUM_THREADS=(\d) bash \.ci/numerics$", run, re.M)
    assert len(set(settings)) >= 2 and {t for _, t in settings} == {"1", "2"}, settings
    files = re.findall(r"tests/test_\w+\.py", (ROOT / ".ci" / "numerics").read_text())
    assert files and all((ROOT / f).is_file() for f in files), [f for f in files if not (ROOT / f).is_file()]


def test_constraints_pin_every_dependency():
    """Every requirement of the package and of its dev extra is pinned with == in constraints.txt."""
    import re

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.split(";")[0].partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pinned[re.sub(r"[-_.]+", "-", name.strip().lower())] = version.strip()
    wanted = project["dependencies"] + project["optional-dependencies"]["dev"]
    names = {re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.\-]+", req).group(0).lower()) for req in wanted}
    missing = sorted(names - set(pinned))
    assert not missing, f"not pinned in constraints.txt: {missing}"


def _layout_rows() -> dict[str, str]:
    """The README's layout table: path cell -> description cell."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Layout"):]
    rows = {}
    for line in section.splitlines()[1:]:
        if line.startswith("## "):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].startswith("`"):
            rows[cells[0]] = cells[1]
    return rows


def test_readme_layout_table_describes_the_tree():
    """Each folder of the package has a row naming every one of its modules and subfolders, and every name
    the table gives exists."""
    rows = _layout_rows()
    for folder in sorted({p.parent for p in (ROOT / "pgdpo").rglob("*.py")} - {ROOT / "pgdpo"}):
        rel = folder.relative_to(ROOT).as_posix() + "/"
        cell = rows.get(f"`{rel}`")
        assert cell is not None, f"README layout table has no row for {rel}"
        named = set(re.findall(r"`([\w]+(?:\.py|/))`", cell))
        on_disk = {p.name for p in folder.glob("*.py") if not p.name.startswith("_")}
        on_disk |= {p.name + "/" for p in folder.iterdir() if (p / "__init__.py").exists()}
        assert named == on_disk, f"{rel}: the table names {sorted(named - on_disk)} that do not exist and " \
                                 f"misses {sorted(on_disk - named)}"


def test_every_module_says_its_job():
    """Every module of the package opens with a docstring."""
    import ast

    for path in sorted((ROOT / "pgdpo").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and len(doc.split()) >= 3, f"{path.relative_to(ROOT)} has no opening docstring"
