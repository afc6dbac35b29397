"""Timestep-aware weighting of preference pairs ("Rethinking DPO in Diffusion Models", arXiv 2505.18736).

The reward signal of a pair varies in size by orders of magnitude across timesteps (high-noise steps
dominate), so the loss of a pair at timestep ``t`` is weighted by ``w(t)`` inversely proportional to the
spread of the reward signal at that timestep, normalised so that the average weight over the timesteps
the run draws is 1 (``L = sum_t w(t) / sum_t w(t) L_t`` of the paper).

``inverse-std``: the timestep range is cut into ``bins``; each bin keeps a running mean (momentum
``momentum``) of the squared reward margin ``(-0.5 beta (d_w - d_l))^2`` of the pairs drawn in it, summed
over all ranks, so every rank holds the same statistics. ``w(bin) = 1 / sqrt(E[r^2])``, divided by the
draw-frequency-weighted mean of ``w`` over the bins; bins not seen yet get weight 1 (as does every pair
before the first update). The weights are constants of the loss (no gradient).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .distributed import all_reduce_


class TimestepWeighting:
    """``fn(timesteps [B]) -> weights [B]`` for ``PreferenceStep(sample_weight_fn=...)``, with state.

    Call :meth:`observe` with each micro-batch's timesteps and reward margins, and :meth:`update` once
    per optimiser step (collective: every rank calls it) to fold them into the running statistics.
    """

    def __init__(self, bins: int = 10, momentum: float = 0.9, num_train_timesteps: int = 1000,
                 eps: float = 1e-12):
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.bins, self.momentum, self.eps = int(bins), float(momentum), float(eps)
        self.num_train_timesteps = float(num_train_timesteps)
        self.second_moment = torch.zeros(self.bins, dtype=torch.float64)
        self.frequency = torch.zeros(self.bins, dtype=torch.float64)
        self.seen = torch.zeros(self.bins, dtype=torch.bool)
        self._sums = torch.zeros(self.bins, dtype=torch.float64)
        self._counts = torch.zeros(self.bins, dtype=torch.float64)

    def bin_of(self, timesteps: Tensor) -> Tensor:
        x = timesteps.detach().double().cpu() / self.num_train_timesteps
        return (x * self.bins).long().clamp_(0, self.bins - 1)

    def weights_per_bin(self) -> Tensor:
        """``[bins]`` current weights (1 where a bin has no statistics yet)."""
        w = torch.ones(self.bins, dtype=torch.float64)
        if not bool(self.seen.any()):
            return w
        raw = 1.0 / (self.second_moment[self.seen] + self.eps).sqrt()
        freq = self.frequency[self.seen]
        norm = float((raw * freq).sum() / freq.sum()) if float(freq.sum()) > 0 else float(raw.mean())
        w[self.seen] = raw / norm
        return w

    def __call__(self, timesteps: Tensor) -> Tensor:
        w = self.weights_per_bin()[self.bin_of(timesteps)]
        return w.float().to(timesteps.device)

    def observe(self, timesteps: Tensor, reward_margin: Tensor) -> None:
        idx = self.bin_of(timesteps)
        r2 = reward_margin.detach().double().cpu().square()
        finite = torch.isfinite(r2)
        self._sums.index_add_(0, idx[finite], r2[finite])
        self._counts.index_add_(0, idx[finite], torch.ones_like(r2[finite]))

    def update(self) -> None:
        """Fold this step's observations (summed over ranks) into the running statistics."""
        both = torch.cat([self._sums, self._counts])
        all_reduce_(both, "sum")
        sums, counts = both[: self.bins], both[self.bins:]
        has = counts > 0
        mean = torch.where(has, sums / counts.clamp(min=1), torch.zeros_like(sums))
        m = self.momentum
        first = has & ~self.seen
        again = has & self.seen
        self.second_moment[first] = mean[first]
        self.second_moment[again] = m * self.second_moment[again] + (1 - m) * mean[again]
        self.frequency = m * self.frequency + (1 - m) * counts / counts.sum().clamp(min=1)
        self.seen |= has
        self._sums.zero_()
        self._counts.zero_()

    def state_dict(self) -> dict:
        return {"bins": self.bins, "momentum": self.momentum, "second_moment": self.second_moment.clone(),
                "frequency": self.frequency.clone(), "seen": self.seen.clone()}

    def load_state_dict(self, state: dict | None) -> None:
        if state is None:
            raise ValueError("the checkpoint has no timestep-weighting statistics but this run uses "
                             "method.timestep_weighting")
        if int(state["bins"]) != self.bins:
            raise ValueError(f"timestep weighting state has {state['bins']} bins, this run {self.bins} "
                             "(method.timestep_bins)")
        self.second_moment = state["second_moment"].clone().double()
        self.frequency = state["frequency"].clone().double()
        self.seen = state["seen"].clone().bool()
