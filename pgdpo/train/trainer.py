"""The training loop of ``pgdpo train``: one trainer for pgdpo, dpo, ars, ipr (``PGDPOLoss``) and sft.

Per optimiser step, on every rank: ``grad_accum`` micro-batches from this rank's data shard, each noised
by a generator seeded from ``(seed, step, slot)``, ``slot`` the micro-batch's place in the step's window
of ``train.batch_size`` pairs (so a resumed run draws exactly what the uninterrupted run drew, also on
another number of processes when ``micro_batch_size`` is 1: see docs/resume.md), one
:class:`pgdpo.train.step.PreferenceStep` (policy forward with grad, reference forward without),
backward; then gradient clipping, AdamW, the LR schedule, the optional EMA reference update and
timestep-weighting statistics; statistics are reduced over micro-batches and ranks, written to
``metrics.jsonl`` and the trackers by rank 0; every ``save_every`` steps an atomic
checkpoint (:mod:`pgdpo.train.checkpoint`).
"""

from __future__ import annotations

import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.distributed as tdist
from tqdm.auto import tqdm

from ..loss.controller import K1K2Controller
from .checkpoint import (
    CheckpointError,
    GlobalRNG,
    archive_previous_run,
    list_checkpoints,
    load_checkpoint,
    read_summary,
    resolve_resume,
    save_checkpoint,
)
from .config import ConfigError, TrainConfig, loss_from_config
from .data.collate import collate
from .data.compat import check_compatible
from .data.dataset import PreferenceDataset
from .data.format import DataError
from .data.synth import synth_dataset
from .diagnostics import ALPHA_RANGE, GAMMA_RANGE, GammaMeter, LikelihoodProbe
from .distributed import (
    DistState,
    all_reduce_,
    clip_grad_norm,
    init_distributed,
    is_sharded,
    mixed_precision_dtype,
    sync_replicated_grads,
)
from .elastic import restart_count, run_id
from .ema import ema_update_
from .export import export_model
from .gamma import GAMMA_METHODS, measure_gamma
from .layout import resolve_layout
from .loading import build_models
from .log import setup_logging
from .metrics import MetricsLog, peak_memory_gb, read_metrics, reduce_stats
from .models import adapter_for
from .parallel import check_divisible, gradient_scale
from .plots import write_plots
from .prepare import PrepareOptions, prepare
from .sft import SFTStep
from .step import PreferenceStep
from .validation import Validator
from .weighting import TimestepWeighting


def step_seed(seed: int, step: int, slot: int, micro: int = 0) -> int:
    """Seed of the noise / timestep generator of one micro-batch: a hash of its coordinates (the trainer
    passes the micro-batch's :func:`batch_slot`, ``micro`` 0)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step), int(slot), int(micro)])
    return int(state.generate_state(1, dtype=np.uint64)[0]) & ((1 << 63) - 1)


def batch_slot(dp_rank: int, dp_size: int, micro: int) -> int:
    """Which micro-batch of the step's global window of pairs a rank's ``micro``-th one is: the loader
    gives micro-batch ``micro`` of the ``dp_size`` ranks the ``micro``-th window of ``dp_size x
    micro_batch_size`` pairs, rank ``dp_rank`` its ``dp_rank``-th micro-batch. The same pairs get the same
    slot however the step is split (with ``micro_batch_size`` 1; with more, the ranks interleave the
    window's pairs, so the grouping, and the noise, depends on ``dp_size``)."""
    return int(micro) * int(dp_size) + int(dp_rank)


def latent_shape_for(config: TrainConfig, adapter) -> list[int]:
    """Latent ``[C, F, H, W]`` of the configured video size (``ModelAdapter.latent_shape``, floored)."""
    d = config.data
    return list(adapter.latent_shape(d.frames, d.height, d.width))


# Wan's output is a reshaped view; the loss only reads it (no in-place op), which is what the FSDP2 warning
# is about, so it is silenced for that message only.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


class Trainer:
    """Set up from a :class:`TrainConfig` (collective: every rank builds one), then :meth:`train`."""

    def __init__(self, config: TrainConfig):
        self.cfg = config.validate()  # (load_config already did; a config built in code gets it here)
        self.dist: DistState = init_distributed(config.distributed, config.device)
        self.finished = False  # set by train() on every rank at a normal end (close() then synchronises)
        self.out = config.output_dir
        self.is_main = self.dist.is_main
        self.log_file = sys.stderr  # the progress bar's stream
        self.log = setup_logging(self.is_main)  # rank 0 the only writer
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------------------ helpers

    def info(self, message: str) -> None:
        self.log.info(message)  # (silent on ranks other than 0)

    # ------------------------------------------------------------------------------------------ setup

    def _setup(self) -> None:
        cfg = self.cfg
        # model, reference, mesh, accumulation, checkpointing: resolved once (as `pgdpo plan` resolves them)
        self.layout = resolve_layout(cfg, self.dist.world_size)
        self.grad_accum = self.layout.grad_accum  # the ranks of a sequence group share a batch
        self.dist.on_rank0(lambda: os.makedirs(self.out, exist_ok=True))
        self.restart_count, self.run_id = restart_count(), run_id()
        self.resume_path, self.stale = self.dist.on_rank0(self._find_resume)

        # Global RNGs: seeded per rank (nothing in the step draws from them; they are saved anyway).
        random.seed(cfg.seed + self.dist.rank)
        np.random.seed((cfg.seed + self.dist.rank) % 2**32)
        torch.manual_seed(cfg.seed + self.dist.rank)
        self.global_rng = GlobalRNG()

        self.arch = self.layout.arch
        self.adapter = self.layout.spec
        self._prepare_data()
        self._build_models()
        self._build_optimizer()
        self.start_step = 0
        self.probe = self._build_probe() if cfg.logging.diagnostics_every else None
        self.gamma_meter = None  # Gamma of Eq. 10 every diagnostics_every steps (methods with a DPO baseline)
        if cfg.logging.diagnostics_every and cfg.method.name in GAMMA_METHODS:
            self.gamma_meter = GammaMeter()
        if self.resume_path is not None:
            self._load(self.resume_path)
        self.metrics = MetricsLog(self.out, active=self.is_main, resume_step=self.start_step,
                                  trackers=cfg.logging.trackers, run_name=cfg.logging.run_name,
                                  config=cfg.to_dict())
        self.validator = None
        if cfg.validation.every:
            self.validator = Validator(cfg, out=self.out, dist=self.dist, dataset=self.dataset,
                                       adapter=self.adapter, model=self.model, schedule=self.step_fn.schedule,
                                       autocast_dtype=self.step_fn.autocast_dtype, metrics=self.metrics,
                                       log=self.log)
        if self.is_main:
            import yaml

            self.config_yaml = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
            with open(os.path.join(self.out, "config.yaml"), "w") as f:
                f.write(self.config_yaml)
        else:
            self.config_yaml = ""

    def _find_resume(self):
        """(checkpoint to resume from or None, checkpoint folders to delete once a new one is written).

        A restarted worker group of an elastic launch (torchrun ``--max-restarts``: every worker started
        again; ``TORCHELASTIC_RESTART_COUNT`` > 0, or, on a node whose own workers did not fail and so
        count 0, checkpoints in ``output_dir`` written by this launch's run id) continues from the newest
        complete checkpoint this launch wrote; before this launch wrote one, it starts as the first
        attempt did. Either way the files there are this launch's: nothing is archived."""
        ck = self.cfg.checkpoint
        existing = list_checkpoints(self.out)
        ours = self._launch_checkpoints(existing)
        restart = self.restart_count > 0 or bool(ours)
        what = (f"restart {self.restart_count} of an elastic launch" if self.restart_count else
                f"a restarted worker group of elastic launch {self.run_id}")
        path = None
        for step, candidate in reversed(ours):
            try:
                path = resolve_resume(candidate, self.out)  # verified against its manifest
            except CheckpointError as exc:
                self.log.info(f"{what}: skipping the damaged {os.path.basename(candidate)}: {exc}")
                continue
            self.log.info(f"{what}: resuming from {os.path.basename(candidate)} (step {step}), the latest "
                          "complete checkpoint of this launch")
            break
        if restart and path is None:
            self.log.info(f"{what}: no complete checkpoint of this launch in {self.out} yet; starting as "
                          f"the first attempt did (checkpoint.resume: {ck.resume})")
        if path is None:
            path = resolve_resume(ck.resume, self.out, log=self.log.info)
        if path is not None:
            step = int(read_summary(path)["step"])
            stale = [p for s, p in existing if s > step]
            if stale:
                self.log.info(f"resuming from {path} (step {step}); the later checkpoints "
                              f"{[os.path.basename(p) for p in stale]} belong to the abandoned run and are "
                              "deleted when the next checkpoint is written")
            return path, stale
        if ck.resume == "latest":
            self.log.info(f"--resume latest: no complete checkpoint in {self.out}; starting from step 0")
        if ck.overwrite or restart:  # (a restart: what is there is this launch's first attempt's)
            if existing and not restart:
                self.log.info(f"--overwrite: the checkpoints of the previous run in {self.out} are deleted "
                              "when the first new one is written")
            return None, [p for _, p in existing]
        moved = archive_previous_run(self.out)  # (never on a restart: returned above)
        if moved:
            self.log.info(f"{self.out} held a previous run; moved its checkpoints and logs to {moved} "
                          "(pass --resume latest to continue a run, --overwrite to replace it)")
        return None, []

    def _launch_checkpoints(self, existing: list[tuple[int, str]]) -> list[tuple[int, str]]:
        """The complete checkpoints of ``existing`` written by this elastic launch (its run id; every one
        on a restart whose launch has no id), oldest first; [] outside an elastic launch."""
        if self.run_id is None:
            return list(existing) if self.restart_count > 0 else []
        ours = []
        for step, path in existing:
            try:
                if read_summary(path).get("elastic_run_id") == self.run_id:
                    ours.append((step, path))
            except CheckpointError:
                continue
        return ours

    def _prepare_data(self) -> None:
        cfg = self.cfg
        path = cfg.data_path()
        if cfg.data.synthesize:  # decided on rank 0 alone: every rank must agree on the collective
            exists = os.path.join(path, "dataset.json")
            self.dist.on_rank0(lambda: os.path.isfile(exists) or self._synthesize(path))
        elif not os.path.isdir(path):
            raise DataError(f"data.path: no dataset folder at {path!r}; make one with `pgdpo data pairs` "
                            "/ `pgdpo data encode` (or `pgdpo data synth`), or set data.synthesize: true to "
                            "write a synthetic one there (as configs/demo.yaml does)")
        # step_pairs: an epoch holds whole steps, and the data position is a global pair index that
        # resumes on another number of processes (docs/resume.md)
        self.dataset = PreferenceDataset(path, batch_size=cfg.train.micro_batch_size, rank=self.dist.dp_rank,
                                         world_size=self.dist.dp_size, seed=cfg.seed,
                                         step_pairs=cfg.train.micro_batch_size * self.dist.dp_size
                                         * self.grad_accum,
                                         shuffle=cfg.data.shuffle, drop_last=True, dtype=torch.float32,
                                         pin_memory=self.dist.device.type == "cuda")
        check_compatible(self.dataset.meta, self.arch)
        expected = latent_shape_for(cfg, self.adapter)
        if list(self.dataset.meta.latent_shape) != expected:
            self.info(f"note: the dataset's latents are {self.dataset.meta.latent_shape} [C, F, H, W] but "
                      f"data.height/width/frames = {cfg.data.height}x{cfg.data.width}x{cfg.data.frames} mean "
                      f"{expected}; training uses the dataset's (set data.* to match for `pgdpo plan`)")

        check_divisible(self.adapter, self.dataset.meta.latent_shape, self.dist.sp_degree)

    def _synthesize(self, path: str) -> None:
        cfg, a = self.cfg, self.adapter
        shape = latent_shape_for(cfg, a)
        self.log.info(f"writing a synthetic {cfg.data.synth_kind} dataset of {cfg.data.synth_pairs} pairs, "
                      f"latents {shape}, to {path}")
        synth_dataset(path, pairs=cfg.data.synth_pairs, task=a.task,
                      latent_shape=shape, text_len=cfg.data.text_len, text_dim=a.text_dim,
                      difference=cfg.data.synth_difference, seed=cfg.seed, overwrite=True, progress=False,
                      kind=cfg.data.synth_kind, **a.synthetic_extras())

    def _build_models(self) -> None:
        """Policy and reference on meta, sharded, materialised and filled (:mod:`pgdpo.train.loading`)."""
        m, meth = self.cfg.model, self.cfg.method
        compute = mixed_precision_dtype(m.precision, self.dist.device)
        if m.precision == "bf16" and compute is None:
            self.info("model.precision bf16 runs in fp32 on CPU (PGDPO_CPU_BF16=1 runs it in bf16)")
        elif compute is not None:
            name = str(compute).removeprefix("torch.")
            self.info(f"compute dtype {name} (fp32 master weights and reduction)")
        autocast = compute if self.dist.strategy != "fsdp" else None  # FSDP2: MixedPrecisionPolicy

        model, reference = build_models(self.cfg, self.dist, self.arch,
                                        with_reference=self.layout.with_reference_copy)
        self.adapter = adapter_for(model)
        model.train()
        if reference is not None and m.lora_rank:
            self.info("note: model.lora_rank > 0 with method.reference: copy keeps a second copy of the base "
                      "weights; method.reference: lora uses the policy with its adapters off instead (same "
                      "reference, no copy)")

        self.weighting = None
        if meth.timestep_weighting == "inverse-std":
            self.weighting = TimestepWeighting(meth.timestep_bins, meth.timestep_momentum)
        schedule_options = {}
        if meth.schedule == "flow":
            schedule_options = {"shift": meth.flow_shift, "density": meth.flow_density}
        # dropout, attention, checkpointing, heap trim (CPU), sequence parallel, DDP: one order for both
        # (pgdpo.train.prepare); FSDP2 sharded them on meta already (build_models)
        options = PrepareOptions(disable_dropout=m.disable_dropout, attention_backend=m.attention,
                                 checkpoint_every=self.layout.checkpoint_every or 0,
                                 trim_host_heap=self.dist.device.type == "cpu",
                                 sp_degree=self.dist.sp_degree, mesh=self.dist.mesh, dist=self.dist,
                                 precision=m.precision)
        prepared = prepare(model, options)
        if reference is not None:
            prepare(reference, options, trainable=False)
        if meth.name == "sft":
            step = SFTStep(model, meth.schedule, sample_weight_fn=self.weighting,
                           schedule_options=schedule_options, autocast_dtype=autocast,
                           disable_dropout=m.disable_dropout)
        else:
            step = PreferenceStep(model, reference, meth.schedule, loss_from_config(meth),
                                  sample_weight_fn=self.weighting, schedule_options=schedule_options,
                                  autocast_dtype=autocast, disable_dropout=m.disable_dropout)
        step.checkpointed_blocks = prepared.checkpointed_blocks
        if self.weighting is not None:
            self.weighting.num_train_timesteps = float(step.schedule.num_train_timesteps)
        policy = prepared.module
        # DDP: the step calls the wrapper (gradient sync); pgdpo.train.models.unwrap_model sees through it
        # where the step looks inside (adapters, dtypes)
        if policy is not model:
            step.policy = policy
        self.model, self.policy, self.reference, self.step_fn = model, policy, reference, step
        self.controller = None
        if meth.k_controller:
            self.controller = K1K2Controller(meth.k1, meth.k2, enabled=True, loss=step.loss)

        self.loss_scale = gradient_scale(self.dist.sp_degree)
        self.ema_reference = reference if meth.ref_ema_every else None
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        lora_note = f", LoRA rank {m.lora_rank}" if m.lora_rank else ""
        mesh_note = (f", sequence parallel {self.dist.sp_degree} (Ulysses; {self.dist.dp_size} data-parallel "
                   "group(s))" if self.dist.sp_degree > 1 else "")
        if self.dist.strategy == "fsdp":  # the mesh: HSDP replica groups x shard group, SP inside it
            mesh_note = f", mesh {self.dist.mesh_description()}{mesh_note}"
            if self.dist.nodes > 1:
                mesh_note += f", {self.dist.nodes} nodes of {self.dist.local_world_size}"
                self._note_node_spans()
        ema = f" (EMA every {meth.ref_ema_every} steps)" if meth.ref_ema_every else ""
        self.info(f"model {m.path or m.name} ({self.adapter.family}): {n_all:,} parameters "
                  f"({n_train:,} trained{lora_note}), "
                  f"{self.dist.world_size} process(es), strategy {self.dist.strategy}{mesh_note}, device "
                  f"{self.dist.device}; method {meth.name}, reference "
                  f"{'none' if meth.name == 'sft' else meth.reference}"
                  f"{ema}")

    def _note_node_spans(self) -> None:
        """Several nodes: say where a collective crosses them (shard groups or sequence groups wider than
        a node), and what keeps FSDP2's all-gathers inside a node (docs/pipeline.md, "Several nodes")."""
        d, per_node = self.dist, self.dist.local_world_size
        if d.shard_degree > per_node:
            self.info(f"note: a shard group of {d.shard_degree} ranks is wider than a node ({per_node} "
                      "processes): FSDP2's all-gathers and reduce-scatters cross the inter-node link every "
                      f"block; distributed.replicate_degree {d.nodes} (HSDP) keeps them inside a node")
        if d.sp_degree > per_node:
            self.info(f"note: a sequence group of {d.sp_degree} ranks is wider than a node: Ulysses' "
                      "all-to-alls cross the inter-node link; an sp_degree of at most the GPUs per node "
                      "keeps them inside")

    def _build_optimizer(self) -> None:
        from diffusers.optimization import get_scheduler

        o = self.cfg.optim
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        if not self.params:
            raise ConfigError("the policy has no trainable parameters (model.lora_targets matched no "
                              "module?)")
        # Sharded (DTensor) and replicated (fp32-kept, FSDP2 ignored_params) parameters in separate groups:
        # the foreach kernels of one group cannot mix the two kinds.
        groups = [[p for p in self.params if is_sharded(p)], [p for p in self.params if not is_sharded(p)]]
        self.optimizer = torch.optim.AdamW([{"params": g} for g in groups if g], lr=o.lr,
                                           betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        self.lr_scheduler = get_scheduler(o.scheduler, self.optimizer, num_warmup_steps=o.warmup_steps,
                                          num_training_steps=self.cfg.train.max_steps)

    def _build_probe(self):
        """Fixed probe set (first pairs of the dataset, fixed noise) for
        pgdpo.train.diagnostics.LikelihoodProbe."""
        n = min(4, self.dataset.num_pairs)
        batch = collate([self.dataset.read_pair(i) for i in range(n)], dtype=torch.float32)
        batch = {k: v.to(self.dist.device) for k, v in batch.items()}
        gen = torch.Generator(device=self.dist.device).manual_seed(step_seed(self.cfg.seed, 0, 0, 1 << 20))
        pairs = self.step_fn.schedule.noise_pairs(batch["chosen"], batch["rejected"], gen)
        probe_batch = (pairs.noisy, pairs.model_timesteps, batch, pairs.target)
        adapter, step = self.adapter, self.step_fn

        def predict(model, b):
            noisy, t, cond, target = b
            ctx = (torch.autocast(noisy.device.type, dtype=step.autocast_dtype) if step.autocast_dtype
                   else nullcontext())
            with ctx:
                pred = adapter.predict(model, noisy.to(adapter.input_dtype(model)), t, cond)
            return pred, target

        return LikelihoodProbe([probe_batch], predict, every=self.cfg.logging.diagnostics_every)

    # ------------------------------------------------------------------------------------------ state

    def _load(self, path: str) -> None:
        rank_state, trainer_state = load_checkpoint(path, dist_state=self.dist, policy=self.policy,
                                                    optimizer=self.optimizer, reference=self.ema_reference)
        problem = self.layout.resume_problem(trainer_state)
        if problem:
            raise CheckpointError(f"{path}: {problem}")
        for change in self.layout.resume_changes(trainer_state):  # another mesh or number of processes
            self.info(f"resuming {os.path.basename(path)}: {change}")
        for name, component in self._states().items():  # each checks that the saved state fits it
            if component is None:
                continue
            try:
                component.load_state_dict(trainer_state.get(name))  # (the controller steers the loss too)
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"{path}: {name}: {exc}; resume with the checkpoint's config") from None
        for name, component in self._rank_states().items():  # this rank's own file
            try:
                component.load_state_dict(rank_state.get(name))
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"{path}: {name} (rank {self.dist.rank}) cannot be restored: {exc}"
                                      ) from None
        self.start_step = int(trainer_state["step"])
        self.info(f"resumed from {path} at step {self.start_step}")

    def _states(self) -> dict:
        """The pieces of training state a checkpoint's ``trainer_state.json`` holds, by their key there
        (None: this run has no such piece; it is saved as null). Each has ``state_dict`` and a
        ``load_state_dict`` that checks the saved state fits it: a new piece is one entry here."""
        return {"lr_scheduler": self.lr_scheduler, "weighting": self.weighting, "probe": self.probe,
                "controller": self.controller, "gamma": self.gamma_meter}

    def _rank_states(self) -> dict:
        """The pieces of state each rank keeps in its own ``rank-<r>.pt``: the data position and the global
        RNGs (the model, optimiser and EMA reference are tensors, saved sharded by DCP)."""
        return {"data": self.dataset, "rng": self.global_rng}

    def save(self, step: int, last_record: dict | None) -> str:
        self.metrics.sync()
        trainer_state = {
            "step": step, "world_size": self.dist.world_size, "grad_accum": self.grad_accum,
            "sp_degree": self.dist.sp_degree, "replicate_degree": self.dist.replicate_degree,
            "seed": self.cfg.seed, "dp_size": self.dist.dp_size,
            "batch_size": self.cfg.train.batch_size, "micro_batch_size": self.cfg.train.micro_batch_size,
            "has_reference_state": self.ema_reference is not None,
            **{name: c.state_dict() if c is not None else None for name, c in self._states().items()},
        }
        summary = {"step": step, "world_size": self.dist.world_size, "sp_degree": self.dist.sp_degree,
                   "replicate_degree": self.dist.replicate_degree, "method": self.cfg.method.name,
                   "model": self.cfg.model.path or self.cfg.model.name, "time": time.time(),
                   # which elastic launch wrote it: a restart resumes from its own launch's checkpoints
                   "elastic_run_id": self.run_id, "restart_count": self.restart_count,
                   "metrics": {k: v for k, v in (last_record or {}).items() if isinstance(v, (int, float))}}
        rank_state = {name: c.state_dict() for name, c in self._rank_states().items()}
        self.finish_pending_save()  # one save in flight at a time
        result = save_checkpoint(self.out, step, dist_state=self.dist, policy=self.policy,
                                 optimizer=self.optimizer, reference=self.ema_reference,
                                 rank_state=rank_state,
                                 trainer_state=trainer_state, summary=summary, config_yaml=self.config_yaml,
                                 keep_last=self.cfg.checkpoint.keep_last, stale=self.stale,
                                 async_group=self._async_group())
        if isinstance(result, str):
            return result
        self.pending_save = result
        return result.path

    def _async_group(self):
        """The gloo group of DCP async_save (its collectives run in a background thread, so apart from the
        training's process group); None for synchronous saves (also without a process group)."""
        if not self.cfg.checkpoint.async_save or not self.dist.distributed:
            return None
        if getattr(self, "_async_pg", None) is None:
            self._async_pg = tdist.new_group(backend="gloo")
        return self._async_pg

    def poll_pending_save(self) -> None:
        """Complete an async checkpoint once every rank's write is done (one tiny all-reduce per step)."""
        pending = getattr(self, "pending_save", None)
        if pending is not None and pending.written():
            self.finish_pending_save()

    def finish_pending_save(self) -> str | None:
        pending, self.pending_save = getattr(self, "pending_save", None), None
        return pending.finish() if pending is not None else None

    # ------------------------------------------------------------------------------------------ loop

    def _to_device(self, batch: dict) -> dict:
        dev = self.dist.device
        return {k: v.to(dev, non_blocking=True) for k, v in batch.items()}

    def _next_batch(self, data_iter) -> dict:
        """The next batch; a damaged shard or a non-finite pair (:class:`DataError` from the loader, which
        verifies each shard's checksum on first read) stops every rank before the step, naming the file."""
        batch, error = None, None
        try:
            batch = next(data_iter)
        except DataError as exc:
            error = exc
        if self.dist.world_size > 1 and not self.dist.all_ok(error is None):
            messages = [None] * self.dist.world_size
            tdist.all_gather_object(messages, None if error is None else str(error))
            if error is None:
                rank, message = next((r, m) for r, m in enumerate(messages) if m is not None)
                error = DataError(f"rank {rank}: {message}")
        if error is not None:
            raise error
        return batch

    def _grad_sync(self, last: bool):
        """DDP: no all-reduce on the micro-batches before the last one. FSDP2: reduce-scatter every one
        (sharded gradients accumulate; nothing unsharded is kept between micro-batches)."""
        if self.dist.strategy == "ddp" and not last:
            return self.policy.no_sync()
        return nullcontext()

    def train_step(self, step: int, data_iter) -> dict | None:
        """One optimiser step (``step`` counts from 1). Returns the metrics record on logging steps."""
        cfg, dev = self.cfg, self.dist.device
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        chunks, losses, tokens, flops, weights = [], [], 0, 0, []
        lr = self.optimizer.param_groups[0]["lr"]
        first_batch = self._to_device(self._next_batch(data_iter))
        gamma = None
        # (lr 0, e.g. the first warmup step: no update, Gamma 0 by its definition; not measured, so the
        # positive fraction counts the steps that move the model)
        if self.gamma_meter is not None and step % cfg.logging.diagnostics_every == 0 and lr > 0:
            gamma = self._measure_gamma(step, first_batch, lr)
        for micro in range(self.grad_accum):
            batch = first_batch if micro == 0 else self._to_device(self._next_batch(data_iter))
            # the ranks of a sequence group draw the same noise (dp_rank): they run one sample together
            slot = batch_slot(self.dist.dp_rank, self.dist.dp_size, micro)
            gen = torch.Generator(device=dev).manual_seed(step_seed(cfg.seed, step, slot))
            with self._grad_sync(micro == self.grad_accum - 1):
                out = self.step_fn(batch, gen)
                (out.loss * (self.loss_scale / self.grad_accum)).backward()
            chunks.append(_with_range_fractions({k: v for k, v in out.stats.items() if k != "loss"}))
            losses.append(out.loss.detach())
            tokens += out.tokens
            flops += out.model_flops
            if out.sample_weight is not None:
                weights.append(out.sample_weight.detach())
            if self.weighting is not None:
                self.weighting.observe(out.timesteps, out.stats["reward_margin"])
        sync_replicated_grads(self.params, self.dist)
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = clip_grad_norm(self.params, max_norm)
        if not math.isfinite(grad_norm):
            raise FloatingPointError(
                f"step {step}: the gradient norm is {grad_norm} (loss {float(losses[-1])}); the optimiser "
                f"step was not taken. The last complete checkpoint in {self.out} is intact")
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.weighting is not None:
            self.weighting.update()
        if self.ema_reference is not None and step % cfg.method.ref_ema_every == 0:
            ema_update_(self.ema_reference, self.policy, cfg.method.ref_ema_rate)
        probe = self.probe.maybe_measure(step, self.policy) if self.probe is not None else None
        if self.controller is not None:
            self._steer(chunks)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        dt = time.perf_counter() - t0
        if step % cfg.train.log_every and step != cfg.train.max_steps:
            return None
        record = {"step": step}
        record.update(reduce_stats(chunks, losses))
        world = self.dist.dp_size  # a sequence group processes one sample's tokens once
        record.update({
            "lr": lr, "grad_norm": grad_norm, "epoch": self.dataset.epoch,
            "step_time_s": dt, "tokens_per_s": tokens * world / dt,
            "pairs_per_s": cfg.train.batch_size / dt,
            "tflops_per_device": flops / dt / 1e12,
            "peak_mem_gb": peak_memory_gb(dev),
        })
        if weights:
            record["sample_weight_mean"] = float(torch.cat(weights).float().mean())
        if self.controller is not None:
            record["k1"], record["k2"] = self.controller.k1, self.controller.k2
        if gamma is not None:  # Eq. 10 on this step's first micro-batch (not the IPR weight ``gamma``)
            record["Gamma"] = gamma
            record["Gamma_positive_fraction"] = self.gamma_meter.positive_fraction
        if probe is not None:
            record["probe_logp_chosen"] = probe.chosen_mean
            record["probe_logp_rejected"] = probe.rejected_mean
            first = self.probe.history[0]
            record["probe_logp_chosen_change"] = float((probe.chosen - first.chosen).mean())
            record["probe_logp_rejected_change"] = float((probe.rejected - first.rejected).mean())
        return record

    def _measure_gamma(self, step: int, batch: dict, lr: float) -> float:
        """Gamma (:mod:`pgdpo.train.gamma`) at the parameters before this step's update, on its first
        micro-batch with the training forward's noise (a generator of its own with the same seed, so the
        training draws are unchanged); recorded in :attr:`gamma_meter`."""
        seed = step_seed(self.cfg.seed, step, batch_slot(self.dist.dp_rank, self.dist.dp_size, 0))
        gen = torch.Generator(device=self.dist.device).manual_seed(seed)
        value = measure_gamma(self.step_fn, self.params, batch, gen, lr=lr, dist=self.dist,
                              loss_scale=self.loss_scale)
        self.gamma_meter.update(value, step=step)
        return value

    def _steer(self, chunks: list[dict]) -> None:
        """K1/K2 controller: one update per optimiser step from the margins of the whole global batch
        (gathered over ranks, so every rank steers identically); the next step uses the new K."""
        m = torch.cat([c["margin"].detach().reshape(-1).double().cpu() for c in chunks])
        world = self.dist.world_size
        if world > 1:  # all-gather by a sum of rank-placed rows (CPU tensors, NCCL-safe helper)
            rows = torch.zeros(world, m.numel(), dtype=torch.float64)
            rows[self.dist.rank] = m
            m = all_reduce_(rows, "sum").reshape(-1)
        self.controller.update(m)  # the next step's loss uses the new K1, K2

    def train(self) -> dict:
        """Run to ``train.max_steps``; returns the summary (also printed by rank 0). Its phases, in order:
        :meth:`_before_steps` (the likelihood probe's baseline, the "before" samples), :meth:`_run_steps`
        (per step: train, log, checkpoint, validate; a signal stops after a checkpoint) and
        :meth:`_after_steps` (the final export, the before/after grid, the plots, the summary)."""
        t_start = time.perf_counter()
        self._before_steps()
        saved_at, signal_number = self._run_steps()
        summary = self._after_steps(time.perf_counter() - t_start, saved_at, signal_number)
        self.finished = True  # every rank got here: close() may wait for the others
        return summary

    def _before_steps(self) -> None:
        max_steps = self.cfg.train.max_steps
        if self.probe is not None and not self.probe.history:
            self.probe.measure(self.policy, step=self.start_step)  # the baseline of the *_change curves
        if self.start_step >= max_steps:
            self.info(f"already at step {self.start_step} >= train.max_steps {max_steps}: nothing to train")
        if self.validator is not None and self.start_step == 0:
            self.validator.run(0)  # the "before" samples

    def _run_steps(self) -> tuple[int, int | None]:
        """The training steps from :attr:`start_step`; returns (the step of the last checkpoint written,
        the signal that stopped the run or None)."""
        cfg = self.cfg
        max_steps, save_every = cfg.train.max_steps, cfg.checkpoint.save_every
        data_iter = self.dataset.stream()
        bar = tqdm(total=max_steps, initial=self.start_step, desc=f"pgdpo train ({cfg.method.name})",
                   unit="step", disable=not (self.is_main and cfg.logging.progress), dynamic_ncols=True,
                   file=self.log_file)
        last, saved_at = None, self.start_step
        stop = _StopRequest()
        try:
            with stop.installed():
                for step in range(self.start_step + 1, max_steps + 1):
                    record = self.train_step(step, data_iter)
                    if record is not None:
                        self.metrics.log(record)
                        last = record
                        bar.set_postfix(_postfix(record), refresh=False)
                    bar.update(1)
                    self.poll_pending_save()
                    stopping = not self.dist.all_ok(stop.signal is None)  # any rank signalled: all stop
                    if (save_every and step % save_every == 0) or step == max_steps or stopping:
                        self.save(step, last)
                        saved_at = step
                    if self.validator is not None and (self.validator.due(step, max_steps) or stopping):
                        self.validator.run(step)
                    if stopping:
                        self.info(f"stopped by a signal after step {step}; checkpoint-{step} written "
                                  "(continue with --resume latest)")
                        break
            self.finish_pending_save()  # the last checkpoint is complete before the run ends
        finally:
            bar.close()
        return saved_at, stop.signal

    def _after_steps(self, wall: float, saved_at: int, signal_number: int | None) -> dict:
        """The final export (a finished run, not one stopped by a signal), the validation grid, the plots
        and the summary (printed by rank 0)."""
        cfg = self.cfg
        final = None
        if saved_at >= cfg.train.max_steps:  # finished (not stopped by a signal): the model users load
            final = export_model(self.model, os.path.join(self.out, "final"), dist=self.dist)
            kind = "diffusers LoRA weights" if cfg.model.lora_rank else "diffusers save_pretrained layout"
            self.info(f"wrote {final} ({kind})")
        summary = self._summary(wall, saved_at)
        summary["final"] = final
        summary["signal"] = signal_number
        if self.validator is not None:
            summary["samples"] = self.validator.finish()
            if self.validator.first_reward is not None:
                summary["validation_reward"] = (self.validator.first_reward, self.validator.last_reward)
        if self.is_main and cfg.logging.plots:
            summary["plots"] = write_plots(self.out)
        if self.is_main:
            print(format_summary(summary), flush=True)
        return summary

    def _summary(self, wall: float, saved_at: int) -> dict:
        records = read_metrics(os.path.join(self.out, "metrics.jsonl")) if self.is_main else []
        out = {"output_dir": self.out, "method": self.cfg.method.name, "steps": saved_at,
               "model": self.cfg.model.path or self.cfg.model.name, "processes": self.dist.world_size,
               "strategy": self.dist.strategy, "wall_s": wall, "trained_steps": saved_at - self.start_step,
               "checkpoint": os.path.join(self.out, f"checkpoint-{saved_at}") if saved_at else None,
               "data_verified_shards": len(self.dataset.verified),
               "data_verify_s": self.dataset.verify_seconds}
        if records:
            tail = records[-max(1, min(10, len(records) // 5 or 1)):]
            mean = lambda key, rs: (sum(r[key] for r in rs if isinstance(r.get(key), (int, float)))
                                    / max(1, sum(isinstance(r.get(key), (int, float)) for r in rs)))
            out["first"] = records[0]
            out["last"] = records[-1]
            keys = ("loss", "accuracy", "reward_margin", "alpha_mean", "gamma_mean", "mse_policy_chosen",
                    "mse_policy_rejected", "mse_ref_chosen", "mse_ref_rejected", "tokens_per_s",
                    "step_time_s")
            out["tail_mean"] = {k: mean(k, tail) for k in keys if any(k in r for r in tail)}
            out["peak_mem_gb"] = max((r.get("peak_mem_gb") or 0.0) for r in records)
        return out

    def close(self, finished: bool | None = None) -> None:
        """Close the metrics and the process group; ``finished`` (default: whether :meth:`train` returned):
        the run ended normally, so every rank reaches this point and may wait for the others."""
        metrics = getattr(self, "metrics", None)
        if metrics is not None:
            metrics.close()
        self.dist.shutdown(synchronize=self.finished if finished is None else finished)


class _StopRequest:
    """SIGTERM (a scheduler's preemption notice, torchrun passing on a kill) or a first Ctrl-C: finish the
    step, write a checkpoint, stop. A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.signal: int | None = None

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        # (a print, not the logger: logging takes locks, which a signal handler must not)
        print(f"\npgdpo train: got {signal.Signals(signum).name}: stopping after this step with a checkpoint "
              "(Ctrl-C again to interrupt at once)", file=sys.stderr, flush=True)

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():  # handlers live in the main thread
            yield
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _postfix(record: dict) -> dict:
    out = {"loss": f"{record['loss']:.4g}"}
    if "accuracy" in record:
        out["acc"] = f"{record['accuracy']:.2f}"
    if "alpha_mean" in record:
        out["α"] = f"{record['alpha_mean']:.2f}"
        out["γ"] = f"{record['gamma_mean']:.2f}"
    out["lr"] = f"{record['lr']:.2g}"
    out["tok/s"] = f"{record['tokens_per_s']:.3g}"
    return out


def format_summary(s: dict) -> str:
    """The end-of-run summary printed by ``pgdpo train``."""
    lines = [f"pgdpo train: done: {s['steps']} steps ({s['trained_steps']} this run) of {s['method']} on "
             f"{s['model']}, {s['processes']} process(es) ({s['strategy']}), {s['wall_s']:.1f} s"]
    tm, first = s.get("tail_mean"), s.get("first")
    if tm and first:
        lines.append(f"  loss            {first['loss']:.4g} (step {first['step']}) -> {tm['loss']:.4g} "
                     "(mean of the last steps)")
        if "accuracy" in tm:
            lines.append(f"  implicit acc.   {tm['accuracy']:.3f}    reward margin {tm['reward_margin']:.4g}")
        if "alpha_mean" in tm:
            last = s["last"]
            lines.append(f"  alpha           {tm['alpha_mean']:.3f} (last step range "
                         f"{last.get('alpha_min', 0):.3f}..{last.get('alpha_max', 0):.3f})    "
                         f"gamma {tm['gamma_mean']:.3f} (range "
                         f"{last.get('gamma_min', 0):.3f}..{last.get('gamma_max', 0):.3f})")
        if "mse_ref_chosen" in tm:
            lines.append(f"  MSE chosen      policy {tm['mse_policy_chosen']:.5g} vs reference "
                         f"{tm['mse_ref_chosen']:.5g}   (lower = more likely)")
            lines.append(f"  MSE rejected    policy {tm['mse_policy_rejected']:.5g} vs reference "
                         f"{tm['mse_ref_rejected']:.5g}")
        elif "mse_policy_chosen" in tm:
            lines.append(f"  MSE chosen      policy {tm['mse_policy_chosen']:.5g}")
        lines.append(f"  throughput      {tm['tokens_per_s']:.4g} tokens/s, {tm['step_time_s']:.3g} s/step, "
                     f"peak memory {s.get('peak_mem_gb', float('nan')):.2f} GB")
    if s.get("data_verified_shards"):
        lines.append(f"  data checksums  {s['data_verified_shards']} shard(s) verified on first read in "
                     f"{s['data_verify_s']:.3g} s")
    lines.append(f"  metrics         {os.path.join(s['output_dir'], 'metrics.jsonl')}")
    if s.get("checkpoint"):
        lines.append(f"  checkpoint      {s['checkpoint']}")
    if s.get("final"):
        lines.append(f"  final model     {s['final']} (diffusers: from_pretrained / load_lora_adapter)")
    if s.get("plots"):
        lines.append(f"  plots           {', '.join(s['plots'])}")
    if s.get("validation_reward"):
        first, last = s["validation_reward"]
        lines.append(f"  val. reward     {first:+.3f} at the start -> {last:+.3f} at the end (mean over the "
                     "validation prompts and seeds)")
    if s.get("samples"):
        lines.append(f"  samples         {os.path.dirname(s['samples'])}/step-*/*.gif, {s['samples']}")
    return "\n".join(lines)


def train(config: TrainConfig) -> dict:
    """Build a :class:`Trainer` and run it (collective under torchrun); returns the summary."""
    trainer = Trainer(config)
    try:
        return trainer.train()
    finally:
        trainer.close()


def _with_range_fractions(stats: dict) -> dict:
    """Add per-pair indicators of alpha / gamma inside the paper's ranges (their means are the in-range
    fractions of metrics.jsonl: ``alpha_in_range``, ``gamma_in_range``)."""
    for name, (lo, hi) in (("alpha", ALPHA_RANGE), ("gamma", GAMMA_RANGE)):
        if name in stats:
            v = stats[name].detach()
            stats[f"{name}_in_range"] = ((v >= lo) & (v <= hi)).to(v.dtype)
    return stats
