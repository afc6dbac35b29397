"""The training stack's log: ``logging.getLogger("pgdpo.train")``, written by rank 0 alone.

Messages are what a user reads on stderr (``pgdpo train: ...``); the other ranks of a run log nothing,
so N processes do not print N copies. :func:`setup_logging` is called by each
:class:`~pgdpo.train.trainer.Trainer` (stderr as it is then: under a test's capture, the capture).
"""

from __future__ import annotations

import logging
import sys

#: the logger of the training stack (children: ``pgdpo.train.<module>``)
logger = logging.getLogger("pgdpo.train")

_PREFIX = "pgdpo train: "


class _Rank0Handler(logging.StreamHandler):
    """The one handler pgdpo installs (replaced, never stacked, when a second Trainer starts)."""


def setup_logging(is_main: bool, stream=None) -> logging.Logger:
    """Point :data:`logger` at ``stream`` (default: ``sys.stderr`` now) on rank 0 and silence it elsewhere."""
    for handler in [h for h in logger.handlers if isinstance(h, _Rank0Handler)]:
        logger.removeHandler(handler)
    if is_main:
        handler = _Rank0Handler(sys.stderr if stream is None else stream)
        handler.setFormatter(logging.Formatter(_PREFIX + "%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    else:
        logger.setLevel(logging.CRITICAL + 1)  # rank 0 is the only writer
    logger.propagate = False  # the user sees each message once, in pgdpo's words
    return logger
