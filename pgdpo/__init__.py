"""pgdpo: fused PG-DPO (Policy-Guided DPO) loss and trainer for aligning diffusion models.

Paper: "Beyond Reward Margin: Rethinking and Resolving Likelihood Displacement in Diffusion Models
via Video Generation" (arXiv 2511.19049). ``docs/loss.md`` is the contract of the loss.
"""

import importlib

from . import _moved
from .loss import PGDPOLoss, pgdpo_loss
from .loss.options import METHODS, STAT_NAMES

_moved.install()  # the old paths of moved modules (pgdpo.loss.options, ...) keep working for one release

# Training pieces import diffusers (the "train" extra): resolved on first access only, so that
# `import pgdpo` for the loss alone stays light.
_LAZY = {
    "PreferenceStep": "pgdpo.train.step",
    "build_model": "pgdpo.train.models",
    "load_model": "pgdpo.train.models",
    "MODEL_CONFIGS": "pgdpo.train.models",
    "make_schedule": "pgdpo.train.diffusion",
}

__all__ = ["pgdpo_loss", "PGDPOLoss", "STAT_NAMES", "METHODS", *_LAZY]
__version__ = "0.1.0"


def __getattr__(name):
    if name in _LAZY:
        try:
            module = importlib.import_module(_LAZY[name])
        except ImportError as exc:
            raise ImportError(f"pgdpo.{name} is part of the training stack, which needs {exc.name or exc}: "
                              "install it with `pip install 'pgdpo[train]'` (the loss, pgdpo.pgdpo_loss, "
                              "needs torch alone)") from exc
        return getattr(module, name)
    raise AttributeError(f"module 'pgdpo' has no attribute {name!r}")
