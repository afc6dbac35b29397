"""The K1/K2 controller: steers PG-DPO's ``K1`` (alpha) and ``K2`` (gamma) to keep the weights in range.

It lives next to the loss it steers (:class:`~pgdpo.loss.PGDPOLoss`, whose options it updates); the
diagnostics that watch the same ranges (:class:`pgdpo.train.diagnostics.WeightRangeTracker`) import the
ranges from here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["K1K2Controller", "ALPHA_RANGE", "GAMMA_RANGE"]

#: The paper's target ranges (appendix A.5.3): alpha in [0.5, 0.8] (K1 = 10), gamma in (0, 0.5) (K2 = 10).
ALPHA_RANGE = (0.5, 0.8)
GAMMA_RANGE = (0.0, 0.5)


class K1K2Controller:
    """Adapt K1 and K2 during training to keep alpha and gamma inside target ranges (off by default).

    Each :meth:`update` takes this step's normalised margins ``m`` (``stats["margin"]`` or a tensor) and
    returns the ``(k1, k2)`` to use for the next step. For each weight ``v = sigmoid(s K m)`` (``s=+1``
    for alpha, ``-1`` for gamma) it computes the values under the current K, and a vote ``u`` in
    ``[-1, 1]``: each value outside ``[lo, hi]`` votes for the direction of ``log K`` that moves it
    towards the range (raising K pushes ``v`` away from 0.5, lowering it pulls ``v`` towards 0.5),
    values inside vote 0. The vote is smoothed, ``u_s <- smoothing u_s + (1 - smoothing) u``, and
    ``K <- clip(K exp(rate u_s), k_min, k_max)``. At equilibrium as many values leave the range on one
    side as on the other (or none does).

    K cannot move a value across 0.5 (``alpha >= 0.5`` iff ``m >= 0``). When most values sit on the far
    side of 0.5 from the range, the vote drives K down to ``k_min``; :attr:`state` then reports
    ``"k1_at_k_min"`` / ``"k2_at_k_min"``. With ``enabled=False`` :meth:`update` returns the initial
    K1, K2 unchanged.

    ``loss``: the :class:`~pgdpo.loss.PGDPOLoss` it steers; its options get the new ``(k1, k2)`` at every
    :meth:`update` and :meth:`load_state_dict` (so no caller rewrites the loss's options from outside).
    """

    def __init__(self, k1: float = 10.0, k2: float = 10.0, *, enabled: bool = False,
                 alpha_range: tuple[float, float] = ALPHA_RANGE,
                 gamma_range: tuple[float, float] = GAMMA_RANGE,
                 rate: float = 0.05, smoothing: float = 0.8, k_min: float = 0.01, k_max: float = 1e4,
                 control_k1: bool = True, control_k2: bool = True, loss=None):
        for name, v in (("k1", k1), ("k2", k2), ("rate", rate), ("k_min", k_min), ("k_max", k_max)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive finite number, got {v!r}")
        if not 0 <= smoothing < 1:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing!r}")
        if k_min > k_max:
            raise ValueError(f"k_min ({k_min}) > k_max ({k_max})")
        for name, (lo, hi) in (("alpha_range", alpha_range), ("gamma_range", gamma_range)):
            if not 0 <= lo <= hi <= 1:
                raise ValueError(f"{name} must satisfy 0 <= low <= high <= 1, got {(lo, hi)}")
        self.enabled = enabled
        self.k1, self.k2 = float(k1), float(k2)
        self.alpha_range, self.gamma_range = tuple(alpha_range), tuple(gamma_range)
        self.rate, self.smoothing, self.k_min, self.k_max = rate, smoothing, k_min, k_max
        self.control = {"k1": control_k1, "k2": control_k2}
        self.vote = {"k1": 0.0, "k2": 0.0}
        self.state: dict[str, Any] = {}
        self.history: list[tuple[float, float]] = []
        self.loss = loss

    @staticmethod
    def _vote(m: Tensor, k: float, sign: float, lo: float, hi: float) -> tuple[float, float]:
        sm = sign * m
        v = torch.sigmoid(k * sm)
        need = torch.where(v < lo, 1.0, torch.where(v > hi, -1.0, 0.0))  # wanted direction of v
        away = torch.sign(sm)  # how v moves when log K grows
        inside = float(((v >= lo) & (v <= hi)).double().mean())
        return float((need * away).mean()), inside

    def update(self, margin: Tensor | Mapping[str, Tensor]) -> tuple[float, float]:
        """Feed this step's normalised margins (``[B]``); returns ``(k1, k2)`` for the next step."""
        if not self.enabled:
            return self.k1, self.k2
        m = margin["margin"] if isinstance(margin, Mapping) else margin
        m = m.detach().double().flatten().cpu()
        m = m[torch.isfinite(m)]
        if m.numel() == 0:
            return self.k1, self.k2
        for key, sign, (lo, hi) in (("k1", 1.0, self.alpha_range), ("k2", -1.0, self.gamma_range)):
            k = getattr(self, key)
            u, inside = self._vote(m, k, sign, lo, hi)
            self.state[f"{'alpha' if key == 'k1' else 'gamma'}_inside_fraction"] = inside
            if not self.control[key]:
                continue
            self.vote[key] = self.smoothing * self.vote[key] + (1 - self.smoothing) * u
            k = min(max(k * math.exp(self.rate * self.vote[key]), self.k_min), self.k_max)
            setattr(self, key, k)
            self.state[f"{key}_at_k_min"] = k <= self.k_min
        self.history.append((self.k1, self.k2))
        self._steer()
        return self.k1, self.k2

    def _steer(self) -> None:
        """Give the steered loss (if any) the current K1, K2."""
        if self.loss is not None:
            self.loss.options = dataclasses.replace(self.loss.options, k1=self.k1, k2=self.k2)

    def state_dict(self) -> dict:
        return {"k1": self.k1, "k2": self.k2, "vote": dict(self.vote), "enabled": self.enabled}

    def load_state_dict(self, state: Mapping | None) -> None:
        if state is None:
            raise ValueError("the checkpoint has no K1/K2 controller state but this run steers K1/K2 "
                             "(method.k_controller)")
        self.k1, self.k2 = float(state["k1"]), float(state["k2"])
        self.vote = dict(state["vote"])
        self.enabled = bool(state["enabled"])
        self._steer()
