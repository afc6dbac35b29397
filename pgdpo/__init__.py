"""pgdpo: fused PG-DPO (Policy-Guided DPO) loss and trainer for aligning diffusion models.

Paper: "Beyond Reward Margin: Rethinking and Resolving Likelihood Displacement in Diffusion Models
via Video Generation" (arXiv 2511.19049). ``SPEC.md`` is the contract of this package.
"""

from .loss import PGDPOLoss, pgdpo_loss
from .options import METHODS, STAT_NAMES

__all__ = ["pgdpo_loss", "PGDPOLoss", "STAT_NAMES", "METHODS"]
__version__ = "0.1.0"
