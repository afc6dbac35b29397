"""Process group and model wrapping: FSDP2 (``fully_shard``, HSDP on a 2-D mesh), DDP, or a single process.

Launchers: ``torchrun`` and ``accelerate launch`` both export ``RANK`` / ``WORLD_SIZE`` /
``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT``; a plain ``python`` / ``pgdpo`` run is one process and
needs no launcher. NCCL on GPU, gloo on CPU; the same code path either way.

Several nodes (``torchrun --nnodes N``; docs/pipeline.md, "Several nodes"): ``LOCAL_RANK`` picks this
process's GPU and nothing else; ``RANK`` (global) decides everything a run computes (data shard, noise
stream, mesh coordinates) and rank 0 alone writes the run's files (metrics, plots, summary, the final
export; every rank writes its own checkpoint shard), so ``output_dir`` and ``data.path`` must be on a
filesystem every node sees.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import signal
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather  # what set_custom_all_gather takes
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import get_total_norm

from .config import ConfigError, DistributedConfig
from .elastic import process_group_store
from .layout import check_mesh, resolve_strategy
from .models import keep_fp32_names
from .parallel import device_mesh


@dataclass
class DistState:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    strategy: str  # "fsdp" | "ddp" | "none"
    initialized_here: bool = False
    #: ranks per sequence-parallel group (``distributed.sp_degree``); 1: no sequence parallelism
    sp_degree: int = 1
    #: HSDP replica groups (``distributed.replicate_degree``); 1: FSDP2 shards over the whole world
    replicate_degree: int = 1
    #: the ``(replicate, dp_shard, ring, ulysses)`` device mesh when ``sp_degree > 1`` or
    #: ``replicate_degree > 1`` (:func:`pgdpo.train.parallel.device_mesh`; sequence parallelism uses it);
    #: None otherwise
    mesh: object = None
    #: the mesh ``fully_shard`` gets: HSDP's 2-D ``(replicate, shard)`` one (the same ranks as ``mesh``)
    #: when ``replicate_degree > 1``; None: FSDP2's default 1-D mesh over the world
    fsdp_mesh: object = None
    #: processes per node (torchrun's ``LOCAL_WORLD_SIZE``; the world without a launcher)
    local_world_size: int = 1

    @property
    def shard_degree(self) -> int:
        """Ranks of one FSDP2 shard group (the world without HSDP)."""
        return self.world_size // self.replicate_degree

    @property
    def nodes(self) -> int:
        """Nodes of the launch (world / processes per node; 1 when that does not divide)."""
        n, rest = divmod(self.world_size, max(1, self.local_world_size))
        return n if n and not rest else 1

    def mesh_description(self) -> str:
        """``replicate=R shard=S sp=P`` (what the trainer prints at start)."""
        return f"replicate={self.replicate_degree} shard={self.shard_degree} sp={self.sp_degree}"

    @property
    def dp_size(self) -> int:
        """Data-parallel groups: the ranks of one sequence group run the same micro-batch."""
        return self.world_size // self.sp_degree

    @property
    def dp_rank(self) -> int:
        """Index of this rank's data-parallel group (its data shard and noise stream)."""
        return self.rank // self.sp_degree

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def broadcast_object(self, obj, src: int = 0):
        """``obj`` of rank ``src`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def on_rank0(self, fn):
        """Run ``fn`` on rank 0 only; every rank gets its result or raises its error (no hang)."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
                error = exc
        result, error = self.broadcast_object((result, error))
        if error is not None:
            raise error
        return result

    def all_ok(self, ok: bool) -> bool:
        """True on every rank when ``ok`` is true on every rank (to fail together, not hang)."""
        if not self.distributed:
            return ok
        flag = torch.tensor([0 if ok else 1], device=self.device)
        dist.all_reduce(flag)
        return int(flag.item()) == 0

    def shutdown(self, synchronize: bool = False) -> None:
        """Destroy the process group this run created. ``synchronize``: first wait for every rank (after a
        normal finish), so that no rank tears down its gloo connections while a peer still uses them (rank 0
        writing plots and the summary): that race aborted a worker at exit ("terminate called without an
        active exception"). After an error no barrier: a peer may never arrive."""
        if self.initialized_here and self.distributed:
            if synchronize:
                self.barrier()
            dist.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def leave_finished_worker() -> NoReturn:
    """End a torchrun worker whose run finished (process group destroyed, files closed, ranks synchronised)
    without the interpreter's teardown: flush the streams and the log, then ``os._exit(0)``.

    Why: under load, gloo's threads occasionally aborted a worker during that teardown ("terminate called
    without an active exception", SIGABRT; torch issue 179291 describes the race) after the run had
    finished, which turned a finished run into a failed launch. ``python -m pgdpo`` and the test workers
    call this; a library user's own process is never ended by pgdpo."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0)


def die_with_launcher() -> None:
    """Under torchrun (and ``accelerate launch``, which uses it), end this worker when its launcher dies.

    torchrun starts each worker in a session of its own, so a ``kill -9`` of the launcher (or of its
    process group) leaves the workers running as orphans that keep training and writing checkpoints
    while the next run resumes from the same folder. Linux ``PR_SET_PDEATHSIG`` sends this process
    SIGKILL when its parent exits; elsewhere this is a no-op.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    try:

        libc = ctypes.CDLL(None, use_errno=True)
        parent = os.getppid()
        if libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
            return
        if os.getppid() != parent or parent == 1:  # the launcher died before prctl took effect
            os._exit(1)
    except (OSError, AttributeError):
        return


def init_distributed(cfg: DistributedConfig, device: str = "auto") -> DistState:
    """Join the process group the launcher describes (or run as one process) and pick the device."""
    die_with_launcher()
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device: cuda was asked for but torch.cuda.is_available() is False")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")

    sp, replicate = cfg.sp_degree, cfg.replicate_degree
    check_mesh(world, sp, replicate)  # before the process group: a bad layout fails without a hang
    strategy = resolve_strategy(cfg.strategy, world, sp, replicate)

    initialized_here = False
    if world > 1 and not dist.is_initialized():
        backend = cfg.backend
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        if backend == "nccl" and dev.type != "cuda":
            raise ConfigError("distributed.backend: nccl needs CUDA devices; use gloo (or auto) on CPU")
        kwargs = {"backend": backend, "rank": rank, "world_size": world, "timeout": timedelta(minutes=30)}
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        kwargs.update(process_group_store(world, kwargs["timeout"]))  # an elastic restart: its own keys
        dist.init_process_group(**kwargs)
        initialized_here = True
    if strategy in ("fsdp", "ddp") and world == 1 and not dist.is_initialized():
        # FSDP2 / DDP need a process group even for one process: a private single-rank one.
        _init_single_process_group(dev)
        initialized_here = True
    mesh = fsdp_mesh = None
    if sp > 1 or replicate > 1:
        fsdp_mesh, mesh = device_mesh(world, sp, replicate, dev)
        if replicate == 1:
            fsdp_mesh = None  # plain FSDP2: its default mesh over the world
    return DistState(rank=rank, world_size=world, local_rank=local_rank, device=dev, strategy=strategy,
                     initialized_here=initialized_here, sp_degree=sp, replicate_degree=replicate, mesh=mesh,
                     fsdp_mesh=fsdp_mesh, local_world_size=_env_int("LOCAL_WORLD_SIZE", world))


def _init_single_process_group(dev: torch.device) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, 1, is_master=True)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", store=store, rank=0, world_size=1)


#: Environment switch that runs ``model.precision: bf16`` on CPU too (bf16 compute, fp32 master weights and
#: reduction, as on GPU): slow on most CPUs, so off by default; the tests use it to run the GPU's
#: precision path (tests/test_train_bf16.py).
CPU_BF16_ENV = "PGDPO_CPU_BF16"


def mixed_precision_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Compute dtype for ``precision``: bf16 on GPU (on CPU too with ``PGDPO_CPU_BF16=1``); None (fp32
    everywhere) on CPU otherwise, or for fp32."""
    if precision == "bf16" and (device.type == "cuda" or os.environ.get(CPU_BF16_ENV) == "1"):
        return torch.bfloat16
    return None


class InPlaceAllGather(AllGather):
    """FSDP2's parameter all-gather for gloo, without gloo's staging copy: each rank's slot of the flat
    output is broadcast in place from the rank that holds it.

    Gloo's ``all_gather_into_tensor`` receives into a temporary as large as the whole output and then
    copies it out (2 processes: peak = 2x the output), so on CPU every block's all-gather briefly holds
    one more block-sized buffer. ``W`` in-place broadcasts move the same bytes per rank (the ``W-1``
    other slots) and allocate nothing; measured faster than gloo's all-gather as well (bench/NOTES.md).

    The last broadcast is left asynchronous and its work returned, so that FSDP2 treats the all-gather
    as an asynchronous one (it waits on the work before the copy-out) and frees each block's flat output
    right after that block's copy-out. For a synchronous all-gather it defers that free to the next
    block's copy-out, to overlap the copy-out with the next all-gather on a GPU's copy stream, which a
    CPU does not have: a third block-sized buffer for nothing. So a rank holds at most two block-sized
    buffers (the flat output and the parameters, or one block's parameters and the next one's prefetched
    output); ``pgdpo.train.memory`` counts them.
    """

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 async_op: bool = False) -> dist.Work:
        slots = output_tensor.split(input_tensor.numel())  # FSDP2's flat output: one slot per rank
        if len(slots) != group.size():
            raise ValueError(f"all-gather output of {output_tensor.numel()} elements is not {group.size()} "
                             f"slots of the input's {input_tensor.numel()}")
        own = slots[group.rank()]
        if own.data_ptr() != input_tensor.data_ptr():  # FSDP2 copies its input into its slot already
            own.copy_(input_tensor.reshape(-1))
        for src in range(len(slots) - 1):
            dist.broadcast(slots[src], group=group, group_src=src)
        return dist.broadcast(slots[-1], group=group, group_src=len(slots) - 1, async_op=True)


def wrap_model(model: nn.Module, blocks: list[nn.Module], state: DistState, *, precision: str,
               reshard_after_forward: bool = True, trainable: bool = True,
               cpu_offload: bool = False) -> nn.Module:
    """Shard (FSDP2), replicate (DDP) or keep ``model`` as it is, after moving it to the device.

    FSDP2: ``fully_shard`` on each block, then on the root, over :attr:`DistState.fsdp_mesh` (HSDP's 2-D
    ``(replicate, shard)`` mesh, or the world); with bf16 on GPU a
    ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` (fp32 sharded master weights). The
    parameters diffusers keeps in fp32 (``_keep_in_fp32_modules``: time embedder, norms, Wan's
    ``scale_shift_table``; small) are left out of the sharding (``ignored_params``): replicated, fp32 in
    the forward whatever the policy, their gradients averaged by :func:`sync_replicated_grads`. A frozen
    model (``trainable=False``, the reference) is sharded the same way. DDP wraps only trainable models.
    ``cpu_offload``: FSDP2 ``CPUOffloadPolicy`` (the sharded parameters live in host memory).
    On gloo (CPU) every unit all-gathers with :class:`InPlaceAllGather` (no staging copy, no deferred
    free). A model on the meta device stays there (FSDP2 shards it without memory; ``to_empty`` follows).
    """
    on_meta = any(p.is_meta for p in model.parameters())
    if not on_meta:
        model.to(state.device)
    if state.strategy == "fsdp":
        compute = mixed_precision_dtype(precision, state.device)
        params = dict(model.named_parameters())
        kwargs = {"mesh": state.fsdp_mesh, "reshard_after_forward": reshard_after_forward,
                  "ignored_params": {params[n] for n in keep_fp32_names(model) if n in params} or None}
        if compute is not None:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
        if cpu_offload:  # sharded parameters, their gradients and the optimiser states in host memory
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=state.device.type == "cuda")
        for block in blocks:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        if state.device.type == "cpu" and dist.is_initialized() and dist.get_backend() == "gloo":
            all_gather = InPlaceAllGather()
            for unit in (*blocks, model):
                unit.set_custom_all_gather(all_gather)
        return model
    if state.strategy == "ddp" and trainable:
        ids = [state.device.index] if state.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    return model


def is_sharded(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "placements")


def sync_replicated_grads(params: list[torch.Tensor], state: DistState) -> None:
    """Average over ranks the gradients of the parameters FSDP2 leaves replicated (``ignored_params``);
    call once per optimiser step, after the last backward (sharded ones are reduce-scattered by FSDP2, and
    under HSDP all-reduced across the replica groups). These are replicated on every rank of every group,
    so they are averaged over the whole world, as FSDP2 averages the sharded ones."""
    if state.strategy != "fsdp" or state.world_size == 1:
        return
    for p in params:
        if p.grad is not None and not is_sharded(p):
            all_reduce_(p.grad)
            p.grad.div_(state.world_size)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Global gradient 2-norm over sharded (DTensor) and replicated parameters, clipped to ``max_norm``.

    ``torch.nn.utils.clip_grad_norm_`` cannot mix DTensors and tensors in one call, so each kind is
    measured on its own (``get_total_norm``) and the two are combined.
    """
    grads = [[p.grad for p in params if p.grad is not None and is_sharded(p)],
             [p.grad for p in params if p.grad is not None and not is_sharded(p)]]
    norms = []
    for group in grads:
        if group:
            norm = get_total_norm(group)
            norms.append(float(norm.full_tensor() if is_sharded(norm) else norm))
    total = math.sqrt(sum(n * n for n in norms))
    coef = max_norm / (total + 1e-6)  # torch.nn.utils.clip_grad_norm_'s coefficient
    if coef < 1:
        for group in grads:
            if group:
                torch._foreach_mul_(group, coef)
    return float(total)


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (no-op without a process group); ``op``: sum, min, max.

    A CPU tensor under NCCL (which reduces GPU tensors only) makes a round trip through the GPU.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        if tensor.device.type == "cpu" and dist.get_backend() == "nccl":
            on_gpu = tensor.cuda()
            dist.all_reduce(on_gpu, op=ops[op])
            tensor.copy_(on_gpu.cpu())
        else:
            dist.all_reduce(tensor, op=ops[op])
    return tensor
