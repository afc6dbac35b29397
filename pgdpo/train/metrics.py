"""What a run reports: per-step statistics reduced over micro-batches and ranks, ``metrics.jsonl``, and
experiment trackers (TensorBoard, W&B) through accelerate's tracker classes.

``metrics.jsonl`` holds one JSON object per logged optimiser step. On resume it is cut back to the
resumed step before new lines are appended, so a step appears once. Non-finite numbers are written as
``null``.

Diagnostics fields (``logging.diagnostics_every: k > 0``; on the logged steps that were measured, i.e.
``step % k == 0``):

- ``Gamma``: Eq. 10's ``-lr grad(log p_w) . (grad L_method - grad L_dpo)`` on the step's first micro-batch
  of every data-parallel rank, at the parameters before the step's update (:mod:`pgdpo.train.gamma`).
  Capital G: not the IPR switch ``gamma`` (``gamma_mean`` / ``gamma_min`` / ``gamma_max`` /
  ``gamma_in_range``). Only for methods pgdpo, ars and ipr (dpo: 0 by definition; sft: undefined); not
  measured on steps with lr 0 (the first warmup step).
- ``Gamma_positive_fraction``: running fraction of the measured steps so far with ``Gamma > 0`` (the
  paper reports 77-82%); checkpointed, so a resumed run continues it.
- ``probe_logp_chosen`` / ``probe_logp_rejected`` (and ``*_change`` since step 0): the likelihood probe
  (:class:`pgdpo.train.diagnostics.LikelihoodProbe`) on fixed pairs and noise.

Always (preference methods): ``alpha_in_range`` / ``gamma_in_range``, the fractions of pairs in the
paper's ranges; with ``method.k_controller``: ``k1``, ``k2``.
"""

from __future__ import annotations

import json
import math
import os
import warnings

import torch

from .distributed import all_reduce_

#: per-pair statistics that are also logged as min and max over the global batch
RANGE_STATS = ("alpha", "gamma", "margin")


def reduce_stats(stat_chunks: list[dict[str, torch.Tensor]], losses: list[torch.Tensor]) -> dict[str, float]:
    """Mean (and min / max for :data:`RANGE_STATS`) of per-pair statistics over the global batch.

    ``stat_chunks``: this rank's ``{name: [b] tensor}`` per micro-batch; ``losses``: this rank's
    micro-batch losses. Three collectives (sum, min, max) whatever the number of statistics.
    """
    names = sorted(stat_chunks[0]) if stat_chunks else []
    cat = {n: torch.cat([c[n].detach().reshape(-1).double().cpu() for c in stat_chunks]) for n in names}
    count = float(next(iter(cat.values())).numel()) if cat else 0.0
    loss_sum = float(sum(float(x.detach()) for x in losses))
    sums = torch.tensor([count, float(len(losses)), loss_sum] + [float(cat[n].sum()) for n in names],
                        dtype=torch.float64)
    ranged = [n for n in names if n in RANGE_STATS]
    mins = torch.tensor([float(cat[n].min()) for n in ranged], dtype=torch.float64)
    maxs = torch.tensor([float(cat[n].max()) for n in ranged], dtype=torch.float64)
    all_reduce_(sums, "sum")
    if ranged:
        all_reduce_(mins, "min")
        all_reduce_(maxs, "max")
    out = {"loss": sums[2].item() / max(sums[1].item(), 1.0)}
    for i, n in enumerate(names):
        out[n if n not in RANGE_STATS else f"{n}_mean"] = sums[3 + i].item() / max(sums[0].item(), 1.0)
    for i, n in enumerate(ranged):
        out[f"{n}_min"] = mins[i].item()
        out[f"{n}_max"] = maxs[i].item()
    out.pop("loss_mean", None)
    return out


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocator peak on GPU, process peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return rss / 2**20
    except (ImportError, OSError):  # pragma: no cover - non-POSIX
        return float("nan")


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(path: str) -> list[dict]:
    """The records of a ``metrics.jsonl`` (an unfinished last line from a crash is skipped)."""
    records = []
    if not os.path.isfile(path):
        return records
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


class MetricsLog:
    """``metrics.jsonl`` plus trackers; rank 0 only (other ranks get a no-op instance)."""

    def __init__(self, output_dir: str, *, active: bool, resume_step: int, trackers: list[str], run_name: str,
                 config: dict):
        self.active = active
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.trackers = []
        self._file = None
        if not active:
            return
        self._truncate(resume_step)
        self._file = open(self.path, "a")
        self.trackers = _start_trackers(trackers, output_dir, run_name, resume_step, config)

    def _truncate(self, resume_step: int) -> None:
        kept = [r for r in read_metrics(self.path)
                if isinstance(r.get("step"), int) and r["step"] <= resume_step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def log(self, record: dict) -> None:
        if not self.active:
            return
        clean = {k: _clean(v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        values = {k: v for k, v in clean.items() if k != "step" and isinstance(v, (int, float))}
        for tracker in self.trackers:
            tracker.log(values, step=record["step"])

    def sync(self) -> None:
        """fsync ``metrics.jsonl`` (at checkpoints: the lines up to the checkpoint survive a crash)."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self.sync()
            self._file.close()
            self._file = None
        for tracker in self.trackers:
            try:
                tracker.finish()
            except Exception as exc:  # noqa: BLE001 - a tracker failing at exit must not lose the run
                warnings.warn(f"pgdpo train: tracker {tracker.name} failed to finish: {exc}", stacklevel=2)
        self.trackers = []


def _start_trackers(names: list[str], output_dir: str, run_name: str, resume_step: int, config: dict) -> list:
    """accelerate trackers, started on rank 0 only (no Accelerator: the trainer owns the loop)."""
    if not names:
        return []
    from accelerate import PartialState
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, filter_trackers

    PartialState()  # accelerate's logging needs its state; it joins our process group (no collective)
    logging_dir = os.path.join(output_dir, "tensorboard")
    available = [str(t) for t in filter_trackers(list(names), logging_dir)]
    for name in names:
        if name not in available:
            warnings.warn(f"pgdpo train: tracker {name!r} is not installed; skipping it "
                          f"(pip install {name})", stacklevel=3)
    trackers = []
    for name in available:
        cls = LOGGER_TYPE_TO_CLASS[name]
        if name == "tensorboard":
            # purge_step drops events after the resumed step, as metrics.jsonl is truncated
            tracker = cls(run_name, logging_dir, purge_step=resume_step + 1)
        elif name == "wandb":
            tracker = cls(run_name, dir=output_dir, resume="allow")
        else:  # pragma: no cover - only tensorboard and wandb pass config validation
            tracker = cls(run_name)
        tracker.main_process_only = False  # already on rank 0; avoids creating accelerate's PartialState
        tracker.start()
        try:
            tracker.store_init_configuration(_flat_hparams(config))
        except Exception as exc:  # noqa: BLE001 - hparams are a nicety
            warnings.warn(f"pgdpo train: tracker {name} did not take the config: {exc}", stacklevel=3)
        trackers.append(tracker)
    return trackers


def _flat_hparams(config: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_hparams(v, key + "."))
        elif isinstance(v, (bool, int, float, str)) or v is None:
            out[key] = "none" if v is None else v
        else:
            out[key] = str(v)
    return out
