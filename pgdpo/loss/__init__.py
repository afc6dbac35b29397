"""The loss library: the fused PG-DPO loss and everything it needs, with torch as the only dependency.

=================  ==========================================================================
module             its one job
=================  ==========================================================================
``api``            ``pgdpo_loss`` / ``PGDPOLoss`` / ``loss_with_options``: the public entry points
``options``        the loss's enumerations (methods, margins, backends, ...) and ``LossOptions``
``inputs``         checks of the tensor inputs (errors that name the argument), the flat layout
``backends``       which backend runs, why one is unavailable, the "auto" choice
``op``             the ``pgdpo::fused_loss`` op: schema, fake kernels, the one autograd formula
``cpu_op``         finding, building and loading the C++ CPU kernels of ``csrc/``
``reference``      the eager (and float64) reference implementation, the ``"torch"`` backend
``controller``     ``K1K2Controller``: steers K1 / K2 during training to keep alpha and gamma in range
=================  ==========================================================================

The Triton kernels live in ``kernels/`` (``pgdpo.kernels``), the C++ sources in ``csrc/``; the contract of
the loss is ``docs/loss.md``.
"""

from .api import PGDPOLoss, loss_with_options, pgdpo_loss
from .backends import cpu_unavailable_reason, resolve_backend, triton_unavailable_reason
from .options import BACKENDS, MARGINS, METHODS, STAT_NAMES, LossOptions
from .reference import pgdpo_loss_reference

__all__ = ["pgdpo_loss", "PGDPOLoss", "loss_with_options", "LossOptions", "METHODS", "MARGINS", "BACKENDS",
           "STAT_NAMES", "resolve_backend", "triton_unavailable_reason", "cpu_unavailable_reason",
           "pgdpo_loss_reference"]
