"""Old import paths of modules that moved, kept importable for one release with a ``DeprecationWarning``.

``import pgdpo.options`` (the path before the loss library became ``pgdpo.loss``) gives the module
``pgdpo.loss.options`` itself: one module object under two names, so ``isinstance`` checks and monkeypatches
agree. A moved package maps its submodules too (``pgdpo.data.format`` -> its new home). The table is the
one list of moves; each entry goes in the release :data:`REMOVED_IN`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

#: the release whose layout made these paths old (pgdpo's version when the shims were added) ...
ADDED_IN = "0.1.0"
#: ... and the release that drops them
REMOVED_IN = "0.2.0"

#: old module path -> new module path (kept from :data:`ADDED_IN`, removed in :data:`REMOVED_IN`).
MOVED = {
    "pgdpo.options": "pgdpo.loss.options",
    "pgdpo.reference": "pgdpo.loss.reference",
    "pgdpo.ops": "pgdpo.loss.op",
    "pgdpo.cpu_op": "pgdpo.loss.cpu_op",
    # the training layer
    "pgdpo.step": "pgdpo.train.step",
    "pgdpo.models": "pgdpo.train.models",
    "pgdpo.attention": "pgdpo.train.models.attention",
    "pgdpo.diffusion": "pgdpo.train.diffusion",
    "pgdpo.diagnostics": "pgdpo.train.diagnostics",
    "pgdpo.data": "pgdpo.train.data",
    "pgdpo.integrity": "pgdpo.train.integrity",
    "pgdpo.preview": "pgdpo.train.preview",
    # the tools on top
    "pgdpo.plan": "pgdpo.tools.plan",
    "pgdpo.demo": "pgdpo.tools.demo",
    "pgdpo.toy": "pgdpo.tools.toy",
    # the model families got a file each (pgdpo.train.models.families); the package keeps the old names
    "pgdpo.train.models.adapters": "pgdpo.train.models",
}


def new_name(fullname: str) -> str | None:
    """Where the module once importable as ``fullname`` lives now, or None if it did not move."""
    if fullname in MOVED:
        return MOVED[fullname]
    for old, new in MOVED.items():
        if fullname.startswith(old + "."):
            return new + fullname[len(old):]
    return None


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {self.target} in pgdpo {ADDED_IN}; import it from there (the "
                      f"old path goes away in pgdpo {REMOVED_IN})", DeprecationWarning, stacklevel=2)
        return importlib.import_module(self.target)

    def exec_module(self, module):
        pass  # already executed under its new name


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        target_name = new_name(fullname)
        if target_name is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Alias(target_name))


def install() -> None:
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
