"""Option parsing and validation shared by every backend of the PG-DPO loss.

The loss is specified in ``docs/loss.md``; this module turns the user-facing keywords
(``method``, ``ipr_target``, ``weighting``, ...) into the flat flags the kernels take, and raises
clear errors naming the bad argument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

METHODS = {
    # name: (ars, ipr)  -- the rows of the paper's Tab. 2
    "pgdpo": (True, True),
    "ars": (True, False),
    "ipr": (False, True),
    "dpo": (False, False),
}
IPR_TARGETS = ("anchor", "reward")
WEIGHTINGS = ("sample", "element")
#: Readings of the normalised margin (docs/margin.md): "signed" is the paper's printed Eq. 7,
#: m = (d_w - d_l)/(d_l + eps); "abs" is m = (d_l - d_w)/(|d_l| + eps), whose sign is the reward margin's.
MARGINS = ("signed", "abs")
REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
BACKENDS = ("auto", "triton", "cpu", "torch")

#: Per-pair statistics, in the column order of the fused ops' ``stats`` output ``[B, len(STAT_NAMES)]``.
STAT_NAMES = (
    "d_w",  # mean_S[(p_w-t_w)^2] - mean_S[(r_w-t_w)^2]
    "d_l",  # same on the rejected half
    "margin",  # m: (d_w - d_l) / (d_l + e) ("signed") or (d_l - d_w) / (|d_l| + e) ("abs")
    "alpha",  # ARS weight (1 when ARS is off)
    "gamma",  # IPR switch (1 when IPR is off)
    "loss_dpo",  # softplus(-z)
    "loss_ipr",  # anchor or reward term
    "loss",  # per-pair loss L_b (before sample_weight and reduction)
    "mse_policy_chosen",
    "mse_policy_rejected",
    "mse_ref_chosen",
    "mse_ref_rejected",
    "reward_margin",  # -0.5 * beta * (d_w - d_l)
    "accuracy",  # 1.0 where d_w < d_l
)
NUM_STATS = len(STAT_NAMES)
STAT_INDEX = {name: i for i, name in enumerate(STAT_NAMES)}


@dataclass(frozen=True)
class LossOptions:
    """Resolved, validated options of the PG-DPO loss (``docs/loss.md``)."""

    method: str = "pgdpo"
    beta: float = 100.0
    k1: float = 10.0
    k2: float = 10.0
    eps: float = 1e-6
    ipr_target: str = "anchor"
    weighting: str = "sample"
    margin: str = "signed"
    eps_rel: float = 0.0
    detach_weights: bool = True
    reduction: str = "mean"

    def __post_init__(self):
        _check_choice("method", self.method, METHODS)
        _check_choice("ipr_target", self.ipr_target, IPR_TARGETS)
        _check_choice("weighting", self.weighting, WEIGHTINGS)
        _check_choice("margin", self.margin, MARGINS)
        _check_choice("reduction", self.reduction, REDUCTIONS)
        # eps = 0 makes the margin 0/0 = NaN at initialisation (policy == reference): refused.
        for name in ("beta", "eps"):
            _check_number(name, getattr(self, name), positive=True)
        for name in ("k1", "k2", "eps_rel"):
            _check_number(name, getattr(self, name), positive=False)
        if not isinstance(self.detach_weights, bool):
            raise TypeError(f"detach_weights must be a bool, got {type(self.detach_weights).__name__}")

    @property
    def ars(self) -> bool:
        return METHODS[self.method][0]

    @property
    def ipr(self) -> bool:
        return METHODS[self.method][1]

    @property
    def anchor(self) -> bool:
        return self.ipr_target == "anchor"

    @property
    def element(self) -> bool:
        return self.weighting == "element"

    @property
    def abs_margin(self) -> bool:
        return self.margin == "abs"

    @property
    def reduction_code(self) -> int:
        return REDUCTIONS[self.reduction]


def _check_choice(name: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")


def _check_number(name: str, value, *, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if not positive and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
