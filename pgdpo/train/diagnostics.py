"""Likelihood-displacement diagnostics for preference training of diffusion models.

The paper ("Beyond Reward Margin", arXiv 2511.19049) argues that Diffusion-DPO lowers the likelihood
of the *chosen* samples it is meant to favour (Sec. 3.2, Fig. 2), and that PG-DPO fixes this. The
tools here measure that claim on any model, and are cheap enough to leave on in real training at a
probe interval. None of them knows about a trainer; a trainer calls them.

``LikelihoodProbe``
    The chosen and rejected log-likelihood proxies of a fixed probe set of pairs (fixed noise, fixed
    timesteps), measured every ``every`` steps. The proxy is the paper's (appendix A.5.2): the
    Gaussian reverse step ``p(x_{t-1} | x_t)`` has log-density ``-c_t ||pred - target||^2 + const``,
    so ``log p ~ -mean_S (pred - target)^2`` per sample (higher is more likely). Model-agnostic: the
    probe holds :class:`ProbeBatch` es (noisy input, target, timesteps, cond) that are fed to the
    model as ``model(noisy, timesteps, cond)``, or any batch objects plus a ``predict_fn(model, batch)
    -> (pred, target)`` that the caller writes. Cost: one no-grad forward of the probe set per probe.

``gamma_statistic`` / ``gamma_from_pred`` / ``GammaMeter``
    The per-step log-likelihood advantage of Eq. 10 / Eq. 35 (appendix A.4): the first-order change of
    the chosen log-likelihood under one SGD step (learning rate ``lr``) of the method's loss minus
    that under one SGD step of the DPO loss, on the same batch from the same parameters::

        Gamma = -lr * grad(log p_w) . (grad L_method - grad L_dpo)

    with ``log p_w = -mean_b mean_S (pred_w - target_w)^2`` (the proxy above, averaged over the
    chosen half of the batch). Cost: 2 extra backward passes through the model on a retained graph
    (3 with ``components=True``, which also returns each method's own first-order change) and 2 extra
    copies of the trainable parameters' gradients in memory. Compute it every k steps, not every step.
    ``GammaMeter`` keeps the values and the running fraction of steps with ``Gamma > 0`` (the paper's
    81.7% on Wan2.1-14B and 76.9% on VideoCrafter2). With an optimiser other than SGD the step is not
    ``-lr * grad``; pass ``precondition`` (a per-parameter diagonal ``P``, the step being
    ``-lr * P * grad``) for a diagonal preconditioner you trust, or read Gamma as the paper defines it
    (SGD).

``WeightRangeTracker`` / ``MarginGradRecorder`` / ``pair_grad_norms``
    Ranges of the ARS weight alpha and the IPR switch gamma (mean, min, max, fraction inside the
    paper's target ranges alpha in [0.5, 0.8], gamma in (0, 0.5), appendix A.5.3), from the per-pair
    statistics ``pgdpo_loss(..., return_stats=True)`` already returns (free); and the DPO gradient norm
    against the reward margin (the paper's Fig. 1a). ``pair_grad_norms`` gives per-pair gradient norms
    either with respect to the prediction (free: one backward through the loss only) or with respect to
    the parameters (one backward through the model per pair).

``K1K2Controller`` (:mod:`pgdpo.loss.controller`, next to the loss it steers; importable from here too)
    Optional (``enabled=False`` by default): adapts K1 and K2 during training to keep alpha and gamma
    inside target ranges, the dataset-dependent tuning the paper recommends (A.5.3) and leaves to
    future work. Multiplicative update of ``log K`` from a smoothed vote of the out-of-range values.
    K can only scale the normalised margin ``m``: ``alpha = sigmoid(K1 m) >= 0.5`` exactly when
    ``m >= 0``, whatever K1 is, so a range on the other side of 0.5 from the data is unreachable; the
    controller then drives K to ``k_min`` (weights towards 0.5) and says so in ``state``.

Usage in a training loop (the trainer owns the model, the optimiser and the loss call)::

    probe = LikelihoodProbe(probe_batches, every=100)
    meter, ranges = GammaMeter(), WeightRangeTracker()
    for step, batch in enumerate(loader):
        pred = model(...); ref_pred = ref(...)                   # [2B, *S], chosen first
        loss, stats = pgdpo_loss(pred, ref_pred, target, k1=k1, k2=k2, return_stats=True)
        ranges.update(stats, step)
        if step % 100 == 0:                                     # 2 extra backward passes
            meter.update(gamma_from_pred(pred, ref_pred, target, params, lr=lr,
                                         loss_kwargs=dict(k1=k1, k2=k2)), step)
        loss.backward(); opt.step(); opt.zero_grad()
        probe.maybe_measure(step + 1, model)                    # one no-grad forward of the probe set
        k1, k2 = controller.update(stats)                       # K1K2Controller: constants unless enabled
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..loss import pgdpo_loss
from ..loss.controller import ALPHA_RANGE, GAMMA_RANGE, K1K2Controller
from ..loss.options import METHODS
from .diffusion import draw_noise, flow_matching_noising

__all__ = [
    "ProbeBatch", "make_probe_batch", "flow_matching_noising", "default_predict", "logp_proxy",
    "ProbeRecord", "LikelihoodProbe",
    "GammaResult", "gamma_from_pred", "gamma_statistic", "GammaMeter",
    "WeightRangeTracker", "MarginGradRecorder", "pair_grad_norms", "K1K2Controller",
    "ALPHA_RANGE", "GAMMA_RANGE",
]

PredictFn = Callable[[nn.Module, Any], tuple[Tensor, Tensor]]


# ----------------------------------------------------------------------------------------------------
# Probe batches and the likelihood proxy
# ----------------------------------------------------------------------------------------------------


@dataclass
class ProbeBatch:
    """A fixed batch of preference pairs, ready for the model: ``[2B, *S]`` with the chosen half first.

    ``noisy`` is the noisy input ``x_t``, ``target`` the regression target (noise, velocity or
    ``noise - x0``), ``timesteps`` ``[2B]`` (or None) what the model takes as its time argument, and
    ``cond`` anything else the model takes: a tensor or object (passed positionally after the
    timesteps) or a dict (passed as keywords). See :func:`default_predict`.
    """

    noisy: Tensor
    target: Tensor
    timesteps: Tensor | None = None
    cond: Any = None

    def __post_init__(self):
        if not isinstance(self.noisy, Tensor) or not isinstance(self.target, Tensor):
            raise TypeError("ProbeBatch: noisy and target must be tensors")
        if self.noisy.dim() == 0 or self.noisy.shape[0] == 0 or self.noisy.shape[0] % 2:
            raise ValueError(f"ProbeBatch: noisy must have shape [2B, ...] (chosen half first), got "
                             f"{tuple(self.noisy.shape)}")
        if self.target.shape[0] != self.noisy.shape[0]:
            raise ValueError(f"ProbeBatch: target has {self.target.shape[0]} rows but noisy has "
                             f"{self.noisy.shape[0]}")
        if self.timesteps is not None and (self.timesteps.dim() == 0
                                           or self.timesteps.shape[0] != self.noisy.shape[0]):
            raise ValueError(f"ProbeBatch: timesteps must have shape [{self.noisy.shape[0]}] (one per row), "
                             f"got {tuple(self.timesteps.shape)}")

    @property
    def num_pairs(self) -> int:
        return self.noisy.shape[0] // 2

    def to(self, device) -> ProbeBatch:
        def move(x):
            if isinstance(x, Tensor):
                return x.to(device)
            if isinstance(x, dict):
                return {k: move(v) for k, v in x.items()}
            return x

        return ProbeBatch(move(self.noisy), move(self.target), move(self.timesteps), move(self.cond))


Noising = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def make_probe_batch(x0_w: Tensor, x0_l: Tensor, timesteps: Tensor, noising: Noising = flow_matching_noising,
                     *, generator: torch.Generator | None = None, cond: Any = None) -> ProbeBatch:
    """Noise a set of pairs once, with one noise draw and one timestep shared by the two samples of a
    pair (as in the training step, ``pgdpo.train.step``), and return the fixed :class:`ProbeBatch`.

    ``x0_w``, ``x0_l``: ``[B, *S]`` clean chosen / rejected samples (latents). ``timesteps``: ``[B]``.
    ``noising(x0, noise, timesteps) -> (x_t, target)``: the schedule, e.g. :func:`flow_matching_noising`
    or ``lambda x0, n, t: (ddpm_scheduler.add_noise(x0, n, t), n)``. ``cond``: passed through (when it
    is a tensor of ``B`` rows it is repeated for both halves). Draw several timesteps per pair by
    repeating the pairs (``x0.repeat_interleave(k, 0)``) before calling.
    """
    if x0_w.shape != x0_l.shape:
        raise ValueError(f"x0_w has shape {tuple(x0_w.shape)} but x0_l has {tuple(x0_l.shape)}")
    if timesteps.shape != (x0_w.shape[0],):
        raise ValueError(f"timesteps must have shape [{x0_w.shape[0]}], got {tuple(timesteps.shape)}")
    # float32 noise as the training step draws it (pgdpo.train.diffusion.draw_noise: same seed, same noise
    # for any
    # latent dtype), at the latents' precision when that is higher (fp64 probes stay fp64)
    noise = draw_noise(x0_w.shape, x0_w, generator).to(torch.promote_types(x0_w.dtype, torch.float32))
    both = lambda a, b: torch.cat([a, b], 0)
    t2 = both(timesteps, timesteps)
    noisy, target = noising(both(x0_w, x0_l), both(noise, noise), t2)
    noisy, target = noisy.to(x0_w.dtype), target.to(x0_w.dtype)  # the latents' dtype, as NoisyPairs
    if isinstance(cond, Tensor) and cond.dim() > 0 and cond.shape[0] == x0_w.shape[0]:
        cond = both(cond, cond)
    return ProbeBatch(noisy, target, t2, cond)


def default_predict(model: nn.Module, batch: ProbeBatch) -> tuple[Tensor, Tensor]:
    """``model(noisy[, timesteps][, cond])`` (``cond`` as keywords when a dict) -> ``(pred, target)``.

    Accepts models that return a tensor, a tuple (first element) or an object with ``.sample``
    (diffusers). For any other calling convention pass your own ``predict_fn``.
    """
    if not isinstance(batch, ProbeBatch):
        raise TypeError(f"default_predict needs a ProbeBatch, got {type(batch).__name__}; pass "
                        f"predict_fn=(model, batch) -> (pred, target) for other batch types")
    args = [batch.noisy] + ([batch.timesteps] if batch.timesteps is not None else [])
    kwargs = {}
    if isinstance(batch.cond, dict):
        kwargs = batch.cond
    elif batch.cond is not None:
        args.append(batch.cond)
    out = model(*args, **kwargs)
    if hasattr(out, "sample"):
        out = out.sample
    elif isinstance(out, (tuple, list)):
        out = out[0]
    return out, batch.target


def logp_proxy(pred: Tensor, target: Tensor) -> Tensor:
    """Per-sample log-likelihood proxy ``-mean_S (pred - target)^2`` (appendix A.5.2), ``[N]`` in fp32+."""
    acc = torch.float64 if pred.dtype == torch.float64 else torch.float32
    return -(pred.to(acc) - target.to(acc)).square().flatten(1).mean(1)


# ----------------------------------------------------------------------------------------------------
# LikelihoodProbe
# ----------------------------------------------------------------------------------------------------


@dataclass
class ProbeRecord:
    """One probe measurement: per-pair chosen and rejected log-likelihood proxies (CPU float64)."""

    step: int
    chosen: Tensor
    rejected: Tensor

    @property
    def chosen_mean(self) -> float:
        return float(self.chosen.mean())

    @property
    def rejected_mean(self) -> float:
        return float(self.rejected.mean())


class LikelihoodProbe:
    """Chosen / rejected log-likelihood proxies of a fixed probe set, tracked over training.

    Args:
        batches: one batch or a list of batches (split a large probe set into several to bound
            memory). Each is a :class:`ProbeBatch`, or anything ``predict_fn`` understands.
        predict_fn: ``(model, batch) -> (pred, target)``, both ``[2B, *S]`` with the chosen half first.
            Default: :func:`default_predict`. Wrap it in autocast yourself if training uses it.
        every: :meth:`maybe_measure` measures when ``step % every == 0``.

    The model is put in eval mode (dropout off) for the measurement, under ``torch.no_grad()``, and its
    previous mode is restored. Measuring the reference once (``probe.measure(ref)``, not stored in the
    history) gives the baseline: at ``policy == reference`` both are equal.
    """

    def __init__(self, batches, predict_fn: PredictFn | None = None, *, every: int = 100):
        if isinstance(batches, (list, tuple)):
            self.batches = list(batches)
        else:
            self.batches = [batches]
        if not self.batches:
            raise ValueError("LikelihoodProbe needs at least one probe batch")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.predict_fn = predict_fn or default_predict
        self.every = every
        self.history: list[ProbeRecord] = []

    def due(self, step: int) -> bool:
        return step % self.every == 0

    @torch.no_grad()
    def measure(self, model: nn.Module, step: int | None = None) -> ProbeRecord:
        """Measure now. With ``step`` given, the record is appended to :attr:`history`."""
        was_training = model.training
        model.eval()
        try:
            chosen, rejected = [], []
            for batch in self.batches:
                pred, target = self.predict_fn(model, batch)
                if pred.shape != target.shape or pred.dim() == 0 or pred.shape[0] % 2:
                    raise ValueError(f"predict_fn must return pred and target of one shape [2B, ...], got "
                                     f"{tuple(pred.shape)} and {tuple(target.shape)}")
                lp = logp_proxy(pred, target).double().cpu()
                b = lp.shape[0] // 2
                chosen.append(lp[:b])
                rejected.append(lp[b:])
        finally:
            model.train(was_training)
        record = ProbeRecord(-1 if step is None else int(step), torch.cat(chosen), torch.cat(rejected))
        if step is not None:
            self.history.append(record)
        return record

    def maybe_measure(self, step: int, model: nn.Module) -> ProbeRecord | None:
        """Measure and record when ``step % every == 0``; otherwise return None (free)."""
        return self.measure(model, step) if self.due(step) else None

    def curves(self) -> dict[str, list[float]]:
        """Means over the probe set per recorded step: absolute values and changes since the first."""
        if not self.history:
            return {k: [] for k in ("step", "chosen_logp", "rejected_logp", "chosen_logp_change",
                                    "rejected_logp_change", "logp_gap")}
        c0, r0 = self.history[0].chosen, self.history[0].rejected
        return {
            "step": [r.step for r in self.history],
            "chosen_logp": [r.chosen_mean for r in self.history],
            "rejected_logp": [r.rejected_mean for r in self.history],
            "chosen_logp_change": [float((r.chosen - c0).mean()) for r in self.history],
            "rejected_logp_change": [float((r.rejected - r0).mean()) for r in self.history],
            "logp_gap": [float((r.chosen - r.rejected).mean()) for r in self.history],
        }

    def summary(self) -> dict[str, float]:
        """Last minus first recorded measurement, averaged over the probe set, and the fraction of the
        probe pairs whose chosen proxy rose."""
        if len(self.history) < 2:
            raise RuntimeError("LikelihoodProbe.summary needs at least two recorded measurements")
        first, last = self.history[0], self.history[-1]
        dc, dr = last.chosen - first.chosen, last.rejected - first.rejected
        return {"chosen_logp_change": float(dc.mean()), "rejected_logp_change": float(dr.mean()),
                "chosen_rose_fraction": float((dc > 0).double().mean()),
                "rejected_fell_fraction": float((dr < 0).double().mean()),
                "steps": [first.step, last.step]}

    def state_dict(self) -> dict:
        return {"every": self.every, "history": [(r.step, r.chosen.tolist(), r.rejected.tolist())
                                                 for r in self.history]}

    def load_state_dict(self, state: Mapping | None) -> None:
        """Restore the history; None (a checkpoint of a run without the probe) leaves it empty."""
        if state is None:
            return
        self.every = int(state["every"])
        self.history = [ProbeRecord(int(s), torch.tensor(c, dtype=torch.float64),
                                    torch.tensor(r, dtype=torch.float64)) for s, c, r in state["history"]]


# ----------------------------------------------------------------------------------------------------
# Gamma (Eq. 10 / Eq. 35)
# ----------------------------------------------------------------------------------------------------


@dataclass
class GammaResult:
    """Gamma of one step. ``delta_method`` / ``delta_baseline`` (only with ``components=True``) are the
    first-order changes of the chosen log-likelihood proxy under one step of each loss."""

    gamma: float
    lr: float
    method: str
    baseline: str
    delta_method: float | None = None
    delta_baseline: float | None = None


def _grads(output: Tensor, params: Sequence[Tensor], retain_graph: bool) -> list[Tensor]:
    gs = torch.autograd.grad(output, params, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]


def _dot(a: Sequence[Tensor], b: Sequence[Tensor], precondition: Sequence[Tensor] | None) -> float:
    total = torch.zeros((), dtype=torch.float64, device=a[0].device if a else "cpu")
    for i, (x, y) in enumerate(zip(a, b)):
        prod = x.double() * y.double()
        if precondition is not None:
            prod = prod * precondition[i].double()
        total = total + prod.sum()
    return float(total)


def gamma_from_pred(pred: Tensor, ref_pred: Tensor, target: Tensor, params: Iterable[Tensor], *, lr: float,
                    method: str = "pgdpo", baseline: str = "dpo", loss_kwargs: Mapping | None = None,
                    precondition: Sequence[Tensor] | None = None, components: bool = False,
                    retain_graph: bool = True) -> GammaResult:
    """Gamma of Eq. 10 from a prediction that still has its graph to ``params``.

    ``pred``, ``ref_pred``, ``target``: ``[2B, *S]`` (chosen half first), as given to ``pgdpo_loss``;
    ``params``: the trainable parameters (the gradients are taken with respect to these). Both losses
    are ``pgdpo_loss(pred, ref_pred, target, method=..., **loss_kwargs)`` with the same ``loss_kwargs``
    (beta, k1, k2, eps, ipr_target, weighting, sample_weight, backend, ...; reduction must give a
    scalar). ``retain_graph=True`` (default) keeps the graph so the caller can still backward the
    training loss. Cost: 2 backward passes through the model (3 with ``components``).
    """
    kw = dict(loss_kwargs or {})
    for bad in ("method", "return_stats"):
        if bad in kw:
            raise ValueError(f"loss_kwargs must not contain {bad!r}")
    if kw.get("reduction", "mean") == "none":
        raise ValueError("loss_kwargs: reduction='none' does not give a scalar loss; use 'mean' or 'sum'")
    for name in (method, baseline):
        if name not in METHODS:
            raise ValueError(f"method/baseline must be one of {sorted(METHODS)}, got {name!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if not pred.requires_grad:
        raise ValueError("gamma_from_pred: pred does not require grad; pass the policy's prediction with its "
                         "graph (computed with grad enabled)")
    params = [p for p in params]
    if not params:
        raise ValueError("gamma_from_pred: params is empty")
    if precondition is not None:
        precondition = list(precondition)
        if len(precondition) != len(params) or any(q.shape != p.shape for q, p in zip(precondition, params)):
            raise ValueError("precondition must hold one tensor per parameter, of the parameter's shape")
    b = pred.shape[0] // 2
    logp_w = logp_proxy(pred[:b], target[:b].detach()).mean()
    g_w = _grads(logp_w, params, True)
    loss_m = pgdpo_loss(pred, ref_pred, target, method=method, **kw)
    loss_b = pgdpo_loss(pred, ref_pred, target, method=baseline, **kw)
    if components:
        g_m = _grads(loss_m, params, True)
        g_b = _grads(loss_b, params, retain_graph)
        d_m = -lr * _dot(g_w, g_m, precondition)
        d_b = -lr * _dot(g_w, g_b, precondition)
        return GammaResult(d_m - d_b, lr, method, baseline, d_m, d_b)
    g_diff = _grads(loss_m - loss_b, params, retain_graph)
    return GammaResult(-lr * _dot(g_w, g_diff, precondition), lr, method, baseline)


def gamma_statistic(model: nn.Module, batch, *, lr: float, ref_pred: Tensor | None = None,
                    ref_model: nn.Module | None = None, predict_fn: PredictFn | None = None,
                    params: Iterable[Tensor] | None = None, method: str = "pgdpo", baseline: str = "dpo",
                    loss_kwargs: Mapping | None = None, precondition: Sequence[Tensor] | None = None,
                    components: bool = False) -> GammaResult:
    """Gamma of Eq. 10 on ``batch``, with its own forward pass (1 forward + 2 or 3 backward passes).

    The reference prediction is ``ref_pred`` or ``predict_fn(ref_model, batch)`` under no_grad.
    ``params`` defaults to the model's parameters that require grad. See :func:`gamma_from_pred`.
    """
    predict_fn = predict_fn or default_predict
    if ref_pred is None:
        if ref_model is None:
            raise ValueError("gamma_statistic needs ref_pred or ref_model")
        with torch.no_grad():
            ref_pred, _ = predict_fn(ref_model, batch)
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    with torch.enable_grad():
        pred, target = predict_fn(model, batch)
        return gamma_from_pred(pred, ref_pred.detach(), target.detach(), params, lr=lr, method=method,
                               baseline=baseline, loss_kwargs=loss_kwargs, precondition=precondition,
                               components=components, retain_graph=False)


class GammaMeter:
    """Gamma values over training and the running fraction of steps with Gamma > 0."""

    def __init__(self):
        self.steps: list[int] = []
        self.values: list[float] = []
        self.delta_method: list[float | None] = []
        self.delta_baseline: list[float | None] = []

    def update(self, result: GammaResult | float, step: int | None = None) -> None:
        if isinstance(result, GammaResult):
            value, dm, db = result.gamma, result.delta_method, result.delta_baseline
        else:
            value, dm, db = float(result), None, None
        self.steps.append(len(self.steps) if step is None else int(step))
        self.values.append(float(value))
        self.delta_method.append(dm)
        self.delta_baseline.append(db)

    @property
    def count(self) -> int:
        return len(self.values)

    @property
    def positive_fraction(self) -> float:
        """Fraction of measured steps with Gamma > 0 (NaN when nothing was measured)."""
        return sum(v > 0 for v in self.values) / len(self.values) if self.values else float("nan")

    def latest(self) -> dict[str, float]:
        """Scalars for a logger: the last Gamma and the running fraction positive (empty before any)."""
        if not self.values:
            return {}
        # "Gamma", as in the trainer's metrics.jsonl: "gamma" is the IPR weight's statistic
        return {"Gamma": self.values[-1], "Gamma_positive_fraction": self.positive_fraction}

    def running_positive_fraction(self) -> list[float]:
        out, pos = [], 0
        for i, v in enumerate(self.values, 1):
            pos += v > 0
            out.append(pos / i)
        return out

    def summary(self) -> dict[str, float | int]:
        vals = torch.tensor(self.values, dtype=torch.float64)
        out = {"count": self.count, "positive_fraction": self.positive_fraction,
               "mean": float(vals.mean()) if self.values else float("nan"),
               "median": float(vals.median()) if self.values else float("nan")}
        for name, seq in (("method", self.delta_method), ("baseline", self.delta_baseline)):
            known = [x for x in seq if x is not None]
            out[f"delta_{name}_mean"] = sum(known) / len(known) if known else None
            pos = sum(x > 0 for x in known) / len(known) if known else None
            out[f"delta_{name}_positive_fraction"] = pos
        return out

    def state_dict(self) -> dict:
        return {"steps": list(self.steps), "values": list(self.values),
                "delta_method": list(self.delta_method), "delta_baseline": list(self.delta_baseline)}

    def load_state_dict(self, state: Mapping | None) -> None:
        """Restore the history; None (a checkpoint of a run without the meter) leaves it empty."""
        if state is None:
            return
        self.steps, self.values = list(state["steps"]), list(state["values"])
        self.delta_method, self.delta_baseline = list(state["delta_method"]), list(state["delta_baseline"])


# ----------------------------------------------------------------------------------------------------
# alpha / gamma ranges, gradient norm vs margin
# ----------------------------------------------------------------------------------------------------


@dataclass
class _Running:
    lo: float
    hi: float
    n: int = 0
    total: float = 0.0
    inside: int = 0
    vmin: float = math.inf
    vmax: float = -math.inf
    step_mean: list = field(default_factory=list)
    step_min: list = field(default_factory=list)
    step_max: list = field(default_factory=list)

    def add(self, v: Tensor) -> None:
        v = v.detach().double().flatten().cpu()
        v = v[torch.isfinite(v)]
        if v.numel() == 0:
            self.step_mean.append(float("nan"))
            self.step_min.append(float("nan"))
            self.step_max.append(float("nan"))
            return
        self.n += v.numel()
        self.total += float(v.sum())
        self.inside += int(((v >= self.lo) & (v <= self.hi)).sum())
        mn, mx = float(v.min()), float(v.max())
        self.vmin, self.vmax = min(self.vmin, mn), max(self.vmax, mx)
        self.step_mean.append(float(v.mean()))
        self.step_min.append(mn)
        self.step_max.append(mx)

    def summary(self) -> dict:
        if self.n == 0:
            return {"count": 0, "mean": None, "min": None, "max": None, "inside_fraction": None,
                    "target_range": [self.lo, self.hi]}
        return {"count": self.n, "mean": self.total / self.n, "min": self.vmin, "max": self.vmax,
                "inside_fraction": self.inside / self.n, "target_range": [self.lo, self.hi]}


class WeightRangeTracker:
    """Ranges of alpha (ARS) and gamma (IPR) over training, from ``pgdpo_loss`` statistics.

    ``update(stats, step)`` takes the dict of ``[B]`` tensors that ``return_stats=True`` gives (keys
    ``"alpha"``, ``"gamma"``; also ``"margin"`` and ``"d_l"`` when present) and records per step the
    mean / min / max and over the whole run mean, min, max and the fraction of pair values inside the
    target ranges (closed intervals; defaults: the paper's alpha in [0.5, 0.8], gamma in (0, 0.5)).
    It also records how often the normalised margin ``m`` is positive: alpha > 0.5 and gamma < 0.5
    exactly when ``m > 0``, whatever K1 and K2 are.
    """

    def __init__(self, alpha_range: tuple[float, float] = ALPHA_RANGE,
                 gamma_range: tuple[float, float] = GAMMA_RANGE):
        for name, (lo, hi) in (("alpha_range", alpha_range), ("gamma_range", gamma_range)):
            if not lo <= hi:
                raise ValueError(f"{name} must be (low, high) with low <= high, got {(lo, hi)}")
        self.alpha = _Running(*alpha_range)
        self.gamma = _Running(*gamma_range)
        self.steps: list[int] = []
        self.margin_positive: list[float] = []
        self.d_l_positive: list[float] = []

    def update(self, stats: Mapping[str, Tensor], step: int | None = None) -> None:
        missing = [k for k in ("alpha", "gamma") if k not in stats]
        if missing:
            raise KeyError(f"WeightRangeTracker.update: stats lacks {missing}; pass the dict from "
                           f"pgdpo_loss(..., return_stats=True)")
        self.steps.append(len(self.steps) if step is None else int(step))
        self.alpha.add(stats["alpha"])
        self.gamma.add(stats["gamma"])
        for key, out in (("margin", self.margin_positive), ("d_l", self.d_l_positive)):
            if key in stats:
                out.append(float((stats[key].detach() > 0).double().mean()))

    def latest(self) -> dict[str, float]:
        """Scalars of the last update, for a logger: ``alpha_mean``, ``alpha_min``, ... (empty before any)."""
        if not self.steps:
            return {}
        out = {f"{w}_{k}": getattr(self, w).__dict__[f"step_{k}"][-1]
               for w in ("alpha", "gamma") for k in ("mean", "min", "max")}
        if self.margin_positive:
            out["margin_positive_fraction"] = self.margin_positive[-1]
        return out

    def per_step(self) -> dict[str, list[float]]:
        return {"step": list(self.steps),
                "alpha_mean": self.alpha.step_mean, "alpha_min": self.alpha.step_min,
                "alpha_max": self.alpha.step_max,
                "gamma_mean": self.gamma.step_mean, "gamma_min": self.gamma.step_min,
                "gamma_max": self.gamma.step_max,
                "margin_positive_fraction": list(self.margin_positive)}

    def summary(self) -> dict:
        mean = lambda xs: sum(xs) / len(xs) if xs else None
        return {"alpha": self.alpha.summary(), "gamma": self.gamma.summary(),
                "margin_positive_fraction": mean(self.margin_positive),
                "d_l_positive_fraction": mean(self.d_l_positive)}


def pair_grad_norms(pred: Tensor, ref_pred: Tensor, target: Tensor, *, params: Iterable[Tensor] | None = None,
                    method: str = "dpo", loss_kwargs: Mapping | None = None) -> tuple[Tensor, Tensor]:
    """Per-pair gradient norm of ``method``'s loss and the reward margin ``-0.5 beta (d_w - d_l)``.

    With ``params=None`` the norm is taken with respect to the prediction ``[pred_w; pred_l]`` of the
    pair (free: one backward through the loss, none through the model; ``pred`` need not require grad).
    With ``params`` (``pred`` must carry its graph to them) it is the norm of the parameter gradient
    of each pair's loss: one backward through the model per pair (graph retained). Returns
    ``(reward_margin [B], grad_norm [B])``, CPU float64. Fig. 1a plots one against the other.
    """
    kw = dict(loss_kwargs or {})
    kw.pop("reduction", None)
    b = pred.shape[0] // 2
    if params is None:
        leaf = pred.detach().requires_grad_(True)
        with torch.enable_grad():
            losses, stats = pgdpo_loss(leaf, ref_pred, target, method=method, reduction="none",
                                       return_stats=True, **kw)
            (g,) = torch.autograd.grad(losses.sum(), leaf)
        sq = g.double().flatten(1).square().sum(1)
        norms = (sq[:b] + sq[b:]).sqrt()
    else:
        params = list(params)
        losses, stats = pgdpo_loss(pred, ref_pred, target, method=method, reduction="none",
                                   return_stats=True, **kw)
        norms = torch.empty(b, dtype=torch.float64)
        for i in range(b):
            gs = _grads(losses[i], params, True)
            norms[i] = math.sqrt(sum(float(x.double().square().sum()) for x in gs))
    return stats["reward_margin"].detach().double().cpu(), norms.detach().cpu()


class MarginGradRecorder:
    """Pairs of (reward margin, gradient norm) collected over training: the data of the paper's Fig. 1a."""

    def __init__(self):
        self.margins: list[float] = []
        self.norms: list[float] = []
        self.steps: list[int] = []

    def record(self, reward_margin: Tensor, grad_norm: Tensor, step: int = -1) -> None:
        m, g = reward_margin.detach().double().flatten().cpu(), grad_norm.detach().double().flatten().cpu()
        if m.shape != g.shape:
            raise ValueError(f"reward_margin and grad_norm differ in size: {m.numel()} vs {g.numel()}")
        self.margins += m.tolist()
        self.norms += g.tolist()
        self.steps += [int(step)] * m.numel()

    def binned(self, bins: int = 10) -> dict[str, list[float]]:
        """Median gradient norm per margin quantile bin (equal-count bins, sorted by margin)."""
        if not self.margins:
            return {"margin": [], "grad_norm_median": [], "count": []}
        order = sorted(range(len(self.margins)), key=self.margins.__getitem__)
        n = len(order)
        chunks = [c for c in (order[i * n // bins:(i + 1) * n // bins] for i in range(bins)) if c]
        med = lambda xs: float(torch.tensor(xs, dtype=torch.float64).median())
        return {"margin": [med([self.margins[i] for i in c]) for c in chunks],
                "grad_norm_median": [med([self.norms[i] for i in c]) for c in chunks],
                "count": [len(c) for c in chunks]}

    def summary(self, bins: int = 5) -> dict:
        """Spearman rank correlation of margin and norm, and the ratio of the median norm in the top
        margin bin to that in the bottom bin (< 1: the gradient shrinks as the margin grows)."""
        if len(self.margins) < 2:
            return {"count": len(self.margins), "spearman": None, "top_to_bottom_ratio": None}
        rank = lambda xs: torch.tensor(xs, dtype=torch.float64).argsort().argsort().double()
        rm, rg = rank(self.margins), rank(self.norms)
        rm, rg = rm - rm.mean(), rg - rg.mean()
        denom = float(rm.norm() * rg.norm())
        b = self.binned(bins)
        bottom, top = b["grad_norm_median"][0], b["grad_norm_median"][-1]
        return {"count": len(self.margins), "spearman": float((rm * rg).sum()) / denom if denom else None,
                "top_to_bottom_ratio": top / bottom if bottom > 0 else None,
                "margin_range": [min(self.margins), max(self.margins)]}
