"""The old import paths of moved modules (pgdpo/_moved.py): each still imports, once, as its new module, with
a DeprecationWarning that names the new home and real pgdpo versions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pgdpo
from pgdpo import _moved

ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = """
import importlib, json, sys, warnings
import pgdpo
from pgdpo import _moved
out = {}
for old, new in _moved.MOVED.items():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    out[old] = {"same": module is importlib.import_module(new),
                "warnings": [str(w.message) for w in caught if w.category is DeprecationWarning]}
print(json.dumps(out))
"""


def test_versions_are_real():
    assert _moved.ADDED_IN == pgdpo.__version__  # the shims came with the release that moved the modules
    added, removed = (tuple(int(x) for x in v.split(".")) for v in (_moved.ADDED_IN, _moved.REMOVED_IN))
    assert removed > added


def test_every_old_path_imports_once_as_its_new_module():
    """One fresh interpreter imports each old path once (a module imported before would not warn again)."""
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert set(result) == set(_moved.MOVED)
    for old, new in _moved.MOVED.items():
        assert result[old]["same"], f"{old} is not the module {new}"
        expected = (f"{old} moved to {new} in pgdpo {_moved.ADDED_IN}; import it from there (the old path "
                    f"goes away in pgdpo {_moved.REMOVED_IN})")
        assert expected in result[old]["warnings"], (old, result[old]["warnings"])
