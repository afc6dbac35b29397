"""``pgdpo plan``: will a PG-DPO run fit, and how long will a step take? Estimated before you start.

    pgdpo plan --config configs/wan2.1-i2v-14b.yaml --gpus 32 --gpu h20
    pgdpo plan --config configs/wan2.1-i2v-14b.yaml --model.lora_rank 64 --method.reference lora \\
               --gpus 8 --gpu h20 --json

The run planned is the one ``pgdpo train`` would start from the same config and ``--section.key VALUE``
overrides on ``--gpus`` processes (one schema: :mod:`pgdpo.train.config`, resolved once by
:func:`pgdpo.train.layout.resolve_layout`); the planner's own options describe only the hardware (GPU type,
count, links) and the estimate (MFU, overhead, margin).

What is modelled (per GPU, Wan2.1 ``WanTransformer3DModel`` families; every number is an estimate):

- **Parameters** are counted exactly on the meta device (``pgdpo.train.models.build_model(name,
  device="meta")``).
- **Policy, gradients, optimizer, reference** are laid out as the trainer lays them out
  (:func:`static_memory`, from the parameter table of the model ``pgdpo.train.loading.meta_model``
  builds): FSDP2 gives each of the N ranks ``ceil(rows / N)`` rows of every parameter (rank 0, the largest
  shard, is reported), except the parameters diffusers keeps in fp32 (``_keep_in_fp32_modules``), which
  the trainer replicates. Full fine-tuning: fp32 master weights (4 B/param), fp32 gradients (4 B), AdamW's
  two fp32 moments (8 B). LoRA (``lora_rank > 0``): the frozen base in the compute dtype plus 16 B per
  LoRA parameter. ``cpu_offload`` (``distributed.cpu_offload``): the sharded parts of the three live in
  host memory. A CPU test checks these figures against a real 2-process run.
- **Reference**: ``copy`` a frozen copy in the compute dtype (bf16), sharded like the policy or, with
  ``reference_sharded=False`` (``distributed.reference_sharded: false``), whole on every GPU (and no
  all-gathers); ``ema`` a copy kept in fp32; ``lora`` nothing (the policy with adapters off); ``none``.
- **Setup peak**: the shards filled in place plus one tensor's rows in flight (a replicated reference: one
  whole tensor); it must fit too.
- **Sequence parallelism** (``sp_degree``, ``distributed.sp_degree``): the ``sp_degree`` GPUs of a group
  run one micro-batch, each on ``tokens / sp_degree`` of every video (activations divided accordingly;
  the embeddings before the split stay whole), so a step holds ``micro_batch x GPUs / sp_degree`` pairs
  per accumulation step; the Ulysses all-to-alls (4 per self-attention: q, k, v, out, in every forward,
  backward and recompute) are added to the step time at the sequence group's link, not overlapped.
- **FSDP buffers**: the all-gathered compute-dtype weights of two blocks (current + prefetched) and the
  unsharded fp32 gradients of two blocks before reduce-scatter (``reshard_after_forward=False``: the
  whole model stays gathered between forward and backward).
- **Activations** of the ``2 x micro_batch`` videos one forward sees, ``T`` tokens each
  (``T = F' H' W' / (1 x 2 x 2 patch)``, latent ``F' = (F - 1)/4 + 1``, ``H' = H/8``, ``W' = W/8``:
  480p x 81 frames -> 21 x 30 x 52 = 32,760 tokens). Bytes saved for backward by one Wan block, per
  token: ``72 d + 4 ffn`` in bf16 (``92 d + 8 ffn`` in fp32), plus ``8 L d`` per sample for the text
  keys/values -- measured with ``torch.autograd.graph.saved_tensors_hooks`` on diffusers' eager block
  (FP32LayerNorm, fp32 RMSNorm/RoPE and gating make it well above the textbook ``34 d``; the test suite
  re-measures it). Without checkpointing all blocks keep theirs; with checkpointing each block keeps its
  input (``2 d`` bytes/token in bf16) and one block is recomputed at a time; ``checkpoint_every = k``
  (``model.checkpoint_every``): blocks 0, k, 2k, ... are checkpointed and the others keep theirs. Plus
  a backward workspace of half a block's activations and the model's embeddings/head (``16 d`` bytes/token).
- **Overhead**: a fixed ``overhead_gib`` (CUDA context, NCCL buffers, cuBLAS workspaces; default 4 GiB),
  and the plan asks for ``margin`` (default 8%) of the GPU's memory to stay free (allocator fragmentation).
- **Step time**: forward FLOPs per video from ``pgdpo.train.models`` (``~2 params T + 4 layers T^2 d``);
  backward 2x forward (LoRA: the linear layers' weight gradients are skipped), + the recompute of the
  checkpointed blocks, +1 reference forward; divided by ``gpus x peak bf16 x mfu``. ``mfu`` (default 0.40)
  is the assumed fraction of the dense bf16 peak achieved on all executed FLOPs, recompute included.
  FSDP2 overlaps its communication with compute, so a step takes the larger of the two, plus the
  sequence-parallel all-to-alls, which are on the critical path.
- **Mesh** (:class:`pgdpo.train.layout.Layout`, read from the config): ``distributed.replicate_degree``
  R replica groups (HSDP) of ``shard_degree`` S = GPUs / R consecutive ranks; FSDP2 shards the weights,
  gradients and AdamW states over the S ranks of a group (memory: the static parts divided by S, not by
  all GPUs), ``sp_degree`` consecutive ranks inside a shard group form a sequence-parallel group.
- **Network** (:data:`GPUS`, overridable: ``intra_node_gbps``, ``inter_node_gbps``, ``gpus_per_node``):
  per GPU, one direction, the intra-node (NVLink) and inter-node (NIC) bandwidth and 8 GPUs per node;
  ranks fill the nodes in order.
- **Communication** (:func:`collectives`, :func:`communication`): every collective one rank issues per
  optimiser step, with its group and sizes, counted as the trainer issues them (a 4-process CPU test
  counts them on a real run): the FSDP2 all-gathers of each unit (block, root) for the policy forward,
  the backward (``reshard_after_forward``) and the reference forward, and the reduce-scatter of its fp32
  gradients, per micro-batch, inside the shard group; HSDP's all-reduce of each gradient shard across the
  R replica groups; the all-reduce of the replicated fp32 gradients over all GPUs once per step; the
  Ulysses all-to-alls (4 per self-attention per forward, backward and recompute) and the output
  all-gather inside the sequence group. Ring algorithms: an all-gather or reduce-scatter over n ranks sends
  (n-1)/n of the full buffer per rank, an all-reduce 2(n-1)/n, an all-to-all (n-1)/n. A group inside one
  node runs at the intra-node bandwidth; one that spans nodes at the inter-node bandwidth (its ring's
  slowest link). Reported: each collective's calls, bytes, link and time, the totals intra / inter node,
  and HSDP (one replica group per node) vs plain FSDP over all GPUs (``hsdp``).
- **Layouts** (:func:`layout_options`): every (``sp_degree``, ``replicate_degree``, micro-batch,
  accumulation) the trainer accepts for the batch on these GPUs, planned and ranked: fitting, shortest
  step, least inter-node time, least memory. A config whose batch does not divide into whole
  micro-batches (``runnable`` false) gets the best of them named.

Configs are read by the trainer's loader (``pgdpo.train.config``: misspelt keys and bad values are errors,
left-out keys take the trainer's defaults; no config: the trainer's defaults, as ``pgdpo train`` without
``--config``); the planner adds one check of its own, that ``data.frames`` / ``data.height`` /
``data.width`` give whole latents and patches for the model (:func:`check_video`). The keys that matter
here: ``model.name``, ``model.path``, ``model.precision``, ``model.gradient_checkpointing``,
``model.checkpoint_every``, ``model.lora_rank``, ``model.lora_targets``, ``data.frames``, ``data.height``,
``data.width``, ``data.text_len``, ``method.name`` (sft: no reference), ``method.reference`` (copy | lora),
``method.ref_ema_every`` (> 0: EMA reference), ``optim.name``, ``train.batch_size`` (pairs per optimiser
step over all GPUs), ``train.micro_batch_size`` (pairs per forward per GPU), ``distributed.strategy``,
``distributed.reshard_after_forward``, ``distributed.sp_degree``, ``distributed.replicate_degree``,
``distributed.reference_sharded``, ``distributed.cpu_offload``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import math
import os
import sys
from dataclasses import dataclass

from ..train import memory
from ..train.cli import parse_overrides
from ..train.config import TrainConfig, from_dict, load_config, set_key
from ..train.layout import Layout, check_mesh, pretrained_config, resolve_layout, resolve_strategy
from ..train.memory import ACT_PER_TOKEN, OPTIMIZER_STATE_BYTES, block_activation_bytes
from ..train.models import MODEL_CONFIGS, resolve_config, spec_for

GIB = 1024 ** 3


@dataclass(frozen=True)
class GPU:
    name: str
    #: total memory as the driver reports it (nvidia-smi), GiB
    memory_gib: float
    #: dense bf16 tensor-core peak, FLOP/s
    peak_bf16: float
    #: intra-node bandwidth per GPU, one direction (NVLink through NVSwitch), bytes/s
    intra_node: float
    #: inter-node bandwidth per GPU, one direction (its share of the node's NICs), bytes/s
    inter_node: float
    #: GPUs per node (one NVSwitch domain)
    gpus_per_node: int = 8


#: Dense bf16 peaks (no sparsity), memory and network of the GPUs the planner knows: 8-GPU HGX/DGX nodes.
#: Link rates are the published peaks, one direction per GPU (NCCL's "bus bandwidth" reaches ~80% of them);
#: every one is overridable (``--intra-node-gbps``, ``--inter-node-gbps``, ``--gpus-per-node``).
#: - intra-node: NVLink 4 (H100/H200/H20 SXM) is 18 links x 50 GB/s = 900 GB/s bidirectional, 450 GB/s
#:   each way (NVIDIA H100/H200 datasheets; the H20 datasheet lists "NVLink 900GB/s", the same NVLink 4
#:   bidirectional figure); A100 SXM NVLink 3: 600 GB/s bidirectional, 300 GB/s each way.
#: - inter-node: DGX/HGX H100 and H200 reference nodes have one 400 Gb/s ConnectX-7 NDR InfiniBand port per
#:   GPU = 50 GB/s; DGX A100 one 200 Gb/s HDR port per GPU = 25 GB/s. H20 nodes have no reference design
#:   (vendors ship 4 to 8 NICs of 200-400 Gb/s): assumed 200 Gb/s per GPU = 25 GB/s, the conservative end;
#:   pass --inter-node-gbps 50 for a 400 Gb/s-per-GPU fabric.
GPUS: dict[str, GPU] = {
    "h20": GPU("NVIDIA H20 96 GB", 95.6, 148e12, 450e9, 25e9),
    "h100": GPU("NVIDIA H100 SXM 80 GB", 79.6, 989e12, 450e9, 50e9),
    "h200": GPU("NVIDIA H200 141 GB", 140.4, 989e12, 450e9, 50e9),
    "a100": GPU("NVIDIA A100 SXM 80 GB", 80.0, 312e12, 300e9, 25e9),
}

#: optimizer-state bytes per trained parameter (the memory terms' home: :mod:`pgdpo.train.memory`)
OPTIMIZERS = OPTIMIZER_STATE_BYTES
#: image tokens of the Wan2.1 I2V models' CLIP image encoder (ViT-H/14 at 224 px: 256 patches + CLS);
#: counted in the FLOPs of a model with an image projection
IMAGE_LEN = 257


@dataclass(frozen=True)
class _Setup:
    """One run as the planner evaluates it: derived from a :class:`~pgdpo.train.layout.Layout` and its
    ``TrainConfig`` by :func:`_setup_from_layout` (never configured directly: the config is the one
    schema). The what-if variants (suggestions, layouts, HSDP vs plain FSDP) are copies of it with a field
    changed (``dataclasses.replace``)."""

    model: str
    frames: int
    height: int
    width: int
    #: preference pairs per optimiser step over all GPUs
    batch_size: int
    #: pairs per forward per GPU (a forward sees 2x this many videos: chosen + rejected)
    micro_batch_size: int
    text_len: int
    image_len: int
    precision: str
    optimizer: str
    gradient_checkpointing: bool
    #: copy | lora | ema | none (pgdpo.train.layout.reference_kind)
    reference: str
    #: 0: full fine-tuning; > 0: LoRA adapters of this rank are trained, the base is frozen
    lora_rank: int
    lora_targets: tuple
    strategy: str
    reshard_after_forward: bool
    #: distributed.reference_sharded: the frozen reference sharded like the policy, or replicated
    reference_sharded: bool
    #: distributed.cpu_offload: the policy's sharded weights, gradients and optimizer states in host memory
    cpu_offload: bool
    #: distributed.sp_degree: ranks per Ulysses sequence-parallel group (each holds tokens / sp_degree)
    sp_degree: int
    #: model.checkpoint_every: with gradient checkpointing, recompute blocks 0, k, 2k, ...
    checkpoint_every: int

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """Latent ``(C, F', H', W')`` of the video for the model
        (``pgdpo.train.models.ModelSpec.latent_shape``: ``C`` from its config, the VAE's factors)."""
        return spec_for(model_arch(self.model)).latent_shape(self.frames, self.height, self.width)


# ------------------------------------------------------------------------------------------ config


def model_arch(model: str) -> dict:
    """The config of ``model``: a name of ``MODEL_CONFIGS`` or a local diffusers folder (``model.path``)."""
    return resolve_config(model) if model in MODEL_CONFIGS else pretrained_config(model)


def check_video(arch: dict, model: str, frames: int, height: int, width: int) -> None:
    """The planner's own check of ``data.frames`` / ``data.height`` / ``data.width`` (the trainer reads the
    size from its dataset instead): the VAE must encode the video exactly (Wan: 4k+1 frames, H and W
    multiples of 8) and the latent grid must hold whole patches (Wan) / downsampled grids (UNet). A
    ``ValueError`` naming the key."""
    spec = spec_for(arch)
    try:
        spec.latent_shape(frames, height, width, strict=True)
    except ValueError as exc:  # "frames must be ...", "height must be ...", "width must be ..."
        raise ValueError(f"data.{exc} (model {model})") from None
    mh, mw = spec.pixel_multiples()
    if height % mh or width % mw:
        raise ValueError(f"data.height and data.width must be multiples of {mh} x {mw} for {model} (its VAE "
                         f"and patch / downsampling), got {height} x {width}")


def _setup_from_layout(layout: Layout, config: TrainConfig, *, model: str | None = None) -> _Setup:
    """The run to plan, as the trainer resolves it (:func:`pgdpo.train.layout.resolve_layout`: the
    architecture from ``model.path`` or ``model.name``, the reference kind, the checkpointing), plus the
    video size and the FSDP options of its config. ``model``: plan this model instead (a name when
    ``model.path`` is not on this machine)."""
    d, dist = config.data, config.distributed
    model = model or layout.model
    check_video(model_arch(model) if model != layout.model else layout.arch, model, d.frames, d.height,
                d.width)
    return _Setup(model=model, frames=d.frames, height=d.height, width=d.width,
                  batch_size=layout.batch_size, micro_batch_size=layout.micro_batch_size,
                  text_len=d.text_len, image_len=IMAGE_LEN, precision=layout.precision,
                  optimizer=config.optim.name, gradient_checkpointing=layout.checkpoint_every is not None,
                  reference=layout.reference, lora_rank=layout.lora_rank,
                  lora_targets=tuple(layout.lora_targets), strategy=dist.strategy,
                  reshard_after_forward=dist.reshard_after_forward,
                  reference_sharded=dist.reference_sharded, cpu_offload=dist.cpu_offload,
                  sp_degree=layout.sp_degree, checkpoint_every=config.model.checkpoint_every)


def read_config(config: TrainConfig | dict | str | os.PathLike | None,
                overrides=()) -> tuple[str, TrainConfig]:
    """``(where, config)``: a training config (a YAML file, its mapping, a ``TrainConfig``, or None for the
    trainer's defaults) with ``(dotted_key, value)`` overrides (what ``pgdpo train --section.key VALUE``
    gives), read by the trainer's own loader (``pgdpo.train.config``): a misspelt key or a bad value is
    the same error ``pgdpo train`` gives."""
    overrides = list(overrides)
    if isinstance(config, TrainConfig):
        if not overrides:
            return "config", config
        config = copy.deepcopy(config)
        for key, value in overrides:
            set_key(config, key, value)
        return "config", config.validate()
    if config is None or isinstance(config, (str, os.PathLike)):
        where = os.fspath(config) if config is not None else "config"
        return where, load_config(config, overrides)
    return "config", from_dict(config, overrides)


# ------------------------------------------------------------------------------------------ model


@functools.lru_cache(maxsize=16)
def model_summary(name: str, lora_rank: int = 0, lora_targets: tuple = ()) -> dict:
    """Exact parameter counts of a named model on the meta device (no memory), and its Wan shape."""
    from torch import nn

    from pgdpo.train.models import adapter_for, build_model, count_parameters

    model = build_model(model_arch(name), device="meta")
    adapter = adapter_for(model)
    dims = adapter.transformer_dims()
    if dims is None:
        raise ValueError(f"pgdpo plan models WanTransformer3DModel (Wan2.1) memory; {name!r} is "
                         f"{type(model).__name__}")
    blocks = adapter.blocks(model)
    block_params = [count_parameters(b) for b in blocks]
    lora = 0
    if lora_rank:
        for module_name, module in model.named_modules():
            if isinstance(module, nn.Linear) and any(module_name == t or module_name.endswith("." + t)
                                                     for t in lora_targets):
                lora += lora_rank * (module.in_features + module.out_features)
    c = adapter.config
    return {"name": name, "family": adapter.family, "parameters": count_parameters(model),
            "block_parameters": max(block_params), "layers": len(blocks),
            "outside_parameters": count_parameters(model) - sum(block_params),
            "lora_parameters": lora, **dims, "config": c}


@functools.lru_cache(maxsize=16)
def parameter_table(name: str, lora_rank: int = 0, lora_targets: tuple = ()) -> tuple:
    """:func:`pgdpo.train.memory.parameter_table` of the model ``name`` (a :data:`MODEL_CONFIGS` name or a
    local folder): every parameter of the policy the trainer builds, as :class:`~pgdpo.train.memory.Parameter`
    rows (``rows``: dim 0, what FSDP2 shards; ``kept``: fp32 and replicated; ``block``: its FSDP2 unit, None
    for the root)."""
    return memory.parameter_table(model_arch(name), lora_rank, lora_targets)


def _unit(p) -> int:
    """The FSDP2 unit of a parameter row: its block's index, -1 for the root."""
    return -1 if p.block is None else p.block


@functools.lru_cache(maxsize=256)
def unit_shard_elements(name: str, lora_rank: int, lora_targets: tuple, ranks: int,
                        trained_only: bool = False) -> tuple[tuple[int, int], ...]:
    """``(unit, elements)`` per FSDP2 unit (root first, then the blocks): the elements rank 0 holds of its
    sharded parameters over ``ranks`` (``trained_only``: of the ones with gradients; LoRA: the adapters)."""
    table = parameter_table(name, lora_rank, lora_targets)
    select = {"lora": True} if trained_only and lora_rank else {}
    return tuple((u, memory.per_rank_elements([p for p in table if _unit(p) == u], ranks, kept=False,
                                              **select))
                 for u in sorted({_unit(p) for p in table}))


def static_memory(s: _Setup, ranks: int) -> dict:
    """Bytes per rank (rank 0) of the policy weights, gradients, optimizer states and reference over
    ``ranks`` FSDP2 ranks (1: not sharded): :func:`pgdpo.train.memory.static_terms`, plus what CPU offload
    moves to host memory (the sharded part of each)."""
    table = parameter_table(s.model, s.lora_rank, tuple(s.lora_targets))
    lora = s.lora_rank > 0
    terms = memory.static_terms(table, ranks, precision=s.precision, lora=lora, reference=s.reference,
                                reference_sharded=s.reference_sharded, optimizer=s.optimizer)
    kept = memory.per_rank_elements(table, 1, kept=True)
    trained_sharded = memory.per_rank_elements(table, ranks, kept=False, lora=True if lora else None)
    return {"policy weights": terms["shard"], "gradients": terms["gradients"],
            "optimizer states": terms["optimizer state"], "reference": terms["reference"],
            "offloadable": {"policy weights": terms["shard"] - kept * 4, "gradients": trained_sharded * 4,
                            "optimizer states": trained_sharded * OPTIMIZERS[s.optimizer]},
            "largest_tensor": max(p.numel for p in table)}


# ------------------------------------------------------------------------------------------ plan


#: bytes each rank sends per byte of the full buffer, ring algorithms (NCCL's rings; an all-to-all sends
#: all but its own share): all-gather / reduce-scatter (n-1)/n, all-reduce 2(n-1)/n
RING_FACTOR = {"all-gather": lambda n: (n - 1) / n, "reduce-scatter": lambda n: (n - 1) / n,
               "all-reduce": lambda n: 2 * (n - 1) / n, "all-to-all": lambda n: (n - 1) / n}


def mesh_groups(world: int, shard_degree: int, sp_degree: int) -> dict[str, list[list[int]]]:
    """The ranks of every process group of the ``(replicate, shard)`` mesh (rank = r x shard_degree + s;
    :class:`pgdpo.train.layout.Layout`): ``shard`` groups of consecutive ranks (FSDP2's all-gathers and
    reduce-scatters), ``replicate`` groups of the ranks with the same shard index (HSDP's all-reduce),
    ``sequence`` groups of ``sp_degree`` consecutive ranks inside a shard group, and ``world``."""
    return {"shard": [list(range(g, g + shard_degree)) for g in range(0, world, shard_degree)],
            "replicate": [list(range(i, world, shard_degree)) for i in range(shard_degree)],
            "sequence": [list(range(g, g + sp_degree)) for g in range(0, world, sp_degree)],
            "world": [list(range(world))]}


def crosses_nodes(groups: list[list[int]], gpus_per_node: int) -> bool:
    """Whether any of ``groups`` (rank lists; ranks fill the nodes in order) spans more than one node."""
    return any(len({r // gpus_per_node for r in g}) > 1 for g in groups)


def collectives(s: _Setup, *, world: int, strategy: str, shard_degree: int, replicate_degree: int,
                accum: int, videos: int, local_tokens: int, checkpointed: int) -> list[dict]:
    """The collectives one rank issues in one optimiser step, as the trainer runs them (counted on a real
    run by ``tests/_plan_worker.py``): one entry per kind, with ``call_bytes`` (the full buffer of each
    call of one pass: the gathered / unreduced tensor, an all-to-all's local input), ``passes`` (times the
    list runs per step) and ``group`` (``shard``, ``replicate``, ``sequence`` or ``world``, see
    :func:`mesh_groups`).

    FSDP2 (``fully_shard`` per block and at the root, :func:`pgdpo.train.distributed.wrap_model`), per
    micro-batch: an all-gather of each unit in the compute dtype for the policy forward; again in the
    backward when ``reshard_after_forward`` (the root too); for the reference forward: a sharded copy's
    units (with ``reshard_after_forward: false`` a copy stays gathered after its first forward, no traffic)
    or, for the LoRA reference (adapters off), the policy's units again (unless they stay gathered); a
    reduce-scatter of each unit's trained gradients in fp32 (``reduce_dtype``; every micro-batch: the
    trainer keeps no unsharded gradients between them); HSDP: an all-reduce of each reduce-scattered shard
    over the replica group. Once per step: an all-reduce over the world of each trained fp32-kept
    (replicated) gradient (:func:`pgdpo.train.distributed.sync_replicated_grads`). Ulysses (``sp_degree``):
    4 all-to-alls (q, k, v, out) per self-attention in each forward, backward and recompute, and an
    all-gather of the model's output per forward. DDP: one all-reduce of the gradients per step (bucketed).
    Small metric all-reduces (loss statistics, the gradient norm) are left out."""
    key = (s.model, s.lora_rank, tuple(s.lora_targets))
    table = parameter_table(*key)
    cb = memory.COMPUTE_BYTES[s.precision]
    lora = s.lora_rank > 0
    out: list[dict] = []

    def add(name, op, group, ranks, call_bytes, passes):
        call_bytes = [int(b) for b in call_bytes if b]
        if call_bytes and passes and ranks > 1:
            out.append({"name": name, "op": op, "group": group, "ranks": ranks, "call_bytes": call_bytes,
                        "passes": passes, "calls": passes * len(call_bytes),
                        "bytes": passes * sum(call_bytes),
                        "bytes_per_rank": passes * sum(call_bytes) * RING_FACTOR[op](ranks)})

    def gathered(model_key, n):
        return [n * elements * cb for _, elements in unit_shard_elements(*model_key, n)]

    trained_kept = [p.numel * 4 for p in table if p.kept and p.lora == lora]
    if strategy == "fsdp":
        S, R = shard_degree, replicate_degree
        policy = gathered(key, S)
        resharded = s.reshard_after_forward
        add("all-gather, policy forward", "all-gather", "shard", S, policy, accum)
        add("all-gather, policy backward", "all-gather", "shard", S, policy, accum if resharded else 0)
        if s.reference in ("copy", "ema") and s.reference_sharded:
            reference = gathered((s.model, 0, ()), S)
            add("all-gather, reference forward", "all-gather", "shard", S, reference,
                accum if resharded else 0)
        elif s.reference == "lora":
            add("all-gather, reference forward (policy, adapters off)", "all-gather", "shard", S, policy,
                accum if resharded else 0)
        trained = [S * elements * 4 for _, elements in unit_shard_elements(*key, S, trained_only=True)]
        add("reduce-scatter, gradients", "reduce-scatter", "shard", S, trained, accum)
        add("all-reduce, gradient shards across replica groups (HSDP)", "all-reduce", "replicate", R,
            [b // S for b in trained], accum)
        add("all-reduce, replicated fp32 gradients", "all-reduce", "world", world, trained_kept, 1)
    elif strategy == "ddp":
        add("all-reduce, gradients (DDP)", "all-reduce", "world", world,
            [sum(p.numel for p in table if p.lora or not lora) * 4], 1)
    sp = s.sp_degree
    if sp > 1:
        m = model_summary(s.model, s.lora_rank, tuple(s.lora_targets))
        layers, forwards = m["layers"], 1 + (s.reference != "none")
        attention = (forwards + 1) * layers + checkpointed  # self-attentions run per micro-batch
        add("all-to-all, sequence parallel attention (q, k, v, out)", "all-to-all", "sequence", sp,
            [videos * local_tokens * m["dim"] * cb] * 4, accum * attention)
        config = m["config"]
        patch = math.prod(config["patch_size"])
        add("all-gather, sequence parallel output", "all-gather", "sequence", sp,
            [sp * videos * local_tokens * config["out_channels"] * patch * cb], accum * forwards)
    return out


def communication(colls: list[dict], *, world: int, shard_degree: int, sp_degree: int, gpu: GPU) -> dict:
    """Where each collective of :func:`collectives` runs and how long it takes: a group within one node
    moves its bytes at ``gpu.intra_node``, one that spans nodes at ``gpu.inter_node`` (the slowest link of
    its ring); seconds = bytes per rank / bandwidth. Totals intra / inter node; ``fsdp_s`` (all-gathers,
    reduce-scatters and all-reduces of the weights and gradients: overlapped with compute by FSDP2) and
    ``exposed_s`` (the sequence-parallel collectives: on the critical path)."""
    groups = mesh_groups(world, shard_degree, sp_degree)
    totals = {"intra_node_s": 0.0, "inter_node_s": 0.0, "intra_node_bytes": 0.0, "inter_node_bytes": 0.0,
              "fsdp_s": 0.0, "exposed_s": 0.0}
    placed = []
    for c in colls:
        link = "inter" if crosses_nodes(groups[c["group"]], gpu.gpus_per_node) else "intra"
        seconds = c["bytes_per_rank"] / (gpu.inter_node if link == "inter" else gpu.intra_node)
        placed.append(c | {"link": link, "seconds": seconds})
        totals[f"{link}_node_s"] += seconds
        totals[f"{link}_node_bytes"] += c["bytes_per_rank"]
        totals["exposed_s" if c["group"] == "sequence" else "fsdp_s"] += seconds
    return {"collectives": placed, **totals}




def _evaluate(s: _Setup, gpus: int, gpu: GPU, *, mfu: float, overhead_gib: float, margin: float,
              replicate_degree: int = 1) -> dict:
    from pgdpo.train.models import adapter_for, wan_forward_flops

    m = model_summary(s.model, s.lora_rank, tuple(s.lora_targets))
    adapter = adapter_for(model_arch(s.model))
    cfg = m["config"]
    # the mesh as the trainer resolves it (pgdpo.train.layout): FSDP2 shards inside groups of
    # shard_degree = gpus / replicate_degree ranks
    strategy = resolve_strategy(s.strategy, gpus, s.sp_degree, replicate_degree)
    shard_degree = check_mesh(gpus, s.sp_degree, replicate_degree)
    shard = shard_degree if strategy == "fsdp" else 1
    P, d, f, L = m["parameters"], m["dim"], m["ffn_dim"], m["layers"]
    cb = memory.COMPUTE_BYTES[s.precision]
    lora = s.lora_rank > 0
    trainable = m["lora_parameters"] if lora else P
    notes: list[str] = []

    # ---- batch layout: the sp ranks of a sequence group run one micro-batch together
    sp = s.sp_degree
    if m["heads"] % sp:
        raise ValueError(f"distributed.sp_degree {sp} must divide the attention heads ({m['heads']})")
    dp = gpus // sp
    per_step = s.micro_batch_size * dp
    accum = max(1, math.ceil(s.batch_size / per_step))
    effective_batch = accum * per_step
    if effective_batch != s.batch_size:
        if s.batch_size < per_step:
            notes.append(f"batch_size {s.batch_size} < micro_batch_size {s.micro_batch_size} x {dp} "
                         f"data-parallel groups: a step holds at least {per_step} pairs (the trainer needs "
                         f"batch_size a multiple of {per_step}; see the layouts that run it above)")
        else:
            notes.append(f"batch_size {s.batch_size} is not a multiple of micro_batch_size x GPUs = "
                         f"{per_step}; "
                         f"planned as {effective_batch} ({accum} accumulation steps)")
    videos = 2 * s.micro_batch_size
    latent = s.latent_shape
    tokens = adapter.tokens_per_sample(latent)
    image_len = s.image_len if adapter.image_dim else 0

    # ---- memory (bytes per GPU)
    if tokens % sp:
        raise ValueError(f"distributed.sp_degree {sp} must divide the tokens per video ({tokens})")
    local_tokens = tokens // sp
    static = static_memory(s, shard)
    mem = {k: float(static[k]) for k in ("policy weights", "gradients", "optimizer states")}
    host = 0.0
    if s.cpu_offload:
        for key, moved in static["offloadable"].items():
            host += moved
            mem[key] -= moved
    mem["reference"] = float(static["reference"])
    ref_sharded = s.reference_sharded and shard > 1 and s.reference in ("copy", "ema")
    if shard > 1:
        # root unit, in-flight blocks, all-gather staging and unsharded gradients (pgdpo.train.memory)
        terms = memory.fsdp_terms(memory.counts(parameter_table(s.model, s.lora_rank, tuple(s.lora_targets)),
                                                lora=s.lora_rank > 0),
                                  shard, precision=s.precision, reshard_after_forward=s.reshard_after_forward)
        mem["fsdp buffers"] = float(sum(terms.values()))
        if not s.reshard_after_forward and ref_sharded:
            # nothing reshards the frozen copy after its no-grad forward: it stays whole
            mem["fsdp buffers"] += P * cb
            notes.append("distributed.reshard_after_forward: false keeps the sharded reference gathered "
                         f"after its first forward (no backward reshards it): {P * cb / GIB:.1f} GiB per "
                         "GPU in 'fsdp buffers'")
    else:
        mem["fsdp buffers"] = 0.0
    checkpointed = math.ceil(L / s.checkpoint_every) if s.gradient_checkpointing else 0
    mem["activations"] = memory.activation_bytes(
        dim=d, ffn_dim=f, layers=L, videos=videos, tokens=tokens, local_tokens=local_tokens,
        text_len=s.text_len, precision=s.precision,
        checkpoint_every=s.checkpoint_every if s.gradient_checkpointing else None)
    mem["overhead"] = overhead_gib * GIB
    total = sum(mem.values())
    # setup (pgdpo.train.loading): shards filled in place, one tensor's rows in flight (a replicated
    # reference: one whole tensor, all-gathered); before any activation
    in_flight = static["largest_tensor"] * 4 / (1 if (s.reference in ("copy", "ema") and not ref_sharded)
                                                 else shard)
    setup = (mem["policy weights"] + mem["reference"] + in_flight + mem["overhead"])
    capacity = gpu.memory_gib * GIB
    usable = capacity * (1 - margin)
    if s.precision == "fp32":
        notes.append("precision fp32: activations and gathered weights in fp32; bf16 halves them")
    if s.cpu_offload:
        notes.append(f"CPU offload: {host / GIB:.1f} GiB of weights/gradients/optimizer states per GPU in "
                     "host memory; the optimizer step runs on the CPU")

    # ---- FLOPs and time
    fwd = wan_forward_flops(cfg, latent, text_len=s.text_len, image_len=image_len)
    attn = L * 4 * tokens * tokens * d
    bwd = 2 * fwd if not lora else (fwd - attn) + 2 * attn  # LoRA: no weight grads of the frozen linears
    recompute = fwd * checkpointed / L
    ref = fwd if s.reference != "none" else 0
    per_video = {"policy forward": fwd, "backward": bwd, "recompute": recompute, "reference forward": ref}
    step_flops = 2 * effective_batch * sum(per_video.values())
    model_flops = 2 * effective_batch * (fwd + 2 * fwd + ref)  # MFU numerator: no recompute
    compute_s = step_flops / (gpus * gpu.peak_bf16 * mfu)
    if s.batch_size < per_step:
        notes.append(f"a {s.batch_size}-pair step spread over the {gpus} GPUs would take about "
                     f"{compute_s * s.batch_size / effective_batch:.0f} s of compute")
    # communication per GPU per step, placed on the intra- or inter-node link (collectives, communication)
    comm = communication(collectives(s, world=gpus, strategy=strategy, shard_degree=shard_degree,
                                     replicate_degree=replicate_degree, accum=accum, videos=videos,
                                     local_tokens=local_tokens, checkpointed=checkpointed),
                         world=gpus, shard_degree=shard_degree, sp_degree=sp, gpu=gpu)
    # FSDP2 overlaps its all-gathers and reduce-scatters (and HSDP's all-reduces) with compute; the
    # Ulysses all-to-alls are on the critical path
    comm_s, sp_s = comm["fsdp_s"], comm["exposed_s"]
    step_s = max(compute_s, comm_s) + sp_s

    return {
        "settings": dataclasses.asdict(s) | {"lora_targets": list(s.lora_targets)},
        "gpus": gpus, "gpu": dataclasses.asdict(gpu), "strategy": strategy,
        "model": {"name": s.model, "family": m["family"], "parameters": P, "trainable_parameters": trainable,
                  "layers": L, "dim": d, "ffn_dim": f, "latent_shape": list(latent),
                  "tokens_per_video": tokens},
        "batch": {"pairs_per_step": effective_batch, "requested_pairs_per_step": s.batch_size,
                  "pairs_per_forward_per_gpu": s.micro_batch_size, "videos_per_forward_per_gpu": videos,
                  "grad_accumulation": accum},
        "memory_gib": {k: v / GIB for k, v in mem.items()},
        "host_memory_gib": host / GIB, "total_gib": total / GIB, "setup_peak_gib": setup / GIB,
        "static_bytes_per_rank": {k: static[k] for k in ("policy weights", "gradients", "optimizer states",
                                                          "reference")},
        "sequence_parallel": {"sp_degree": sp, "data_parallel_groups": dp, "tokens_per_rank": local_tokens},
        "mesh": {"replicate_degree": replicate_degree, "shard_degree": shard_degree, "sp_degree": sp,
                 "nodes": math.ceil(gpus / gpu.gpus_per_node), "gpus_per_node": gpu.gpus_per_node},
        "runnable": effective_batch == s.batch_size,
        "communication": comm,
        "capacity_gib": gpu.memory_gib,
        "usable_gib": usable / GIB,
        "utilization": total / capacity, "fits": max(total, setup) <= usable,
        "flops": {"forward_per_video": fwd, "per_video": per_video, "per_step": step_flops,
                  "model_flops_per_step": model_flops},
        "time": {"assumed_mfu": mfu, "compute_s": compute_s, "comm_s": comm_s, "sp_comm_s": sp_s,
                 "step_s": step_s,
                 "pairs_per_s": effective_batch / step_s,
                 "tokens_per_s": 2 * effective_batch * tokens / step_s,
                 "model_flops_utilization": model_flops / step_s / (gpus * gpu.peak_bf16)},
        "notes": notes,
    }


def _suggestions(s: _Setup, gpus: int, gpu_name: str, evaluate) -> list[dict]:
    """Single changes (and a few pairs of them) that make the plan fit, cheapest first."""
    candidates: list[tuple[str, _Setup, int]] = []
    ckpt = dataclasses.replace(s, gradient_checkpointing=True)
    if not s.gradient_checkpointing:
        candidates.append(("gradient checkpointing (model.gradient_checkpointing: true)", ckpt, gpus))
    if s.micro_batch_size > 1:
        candidates.append(("micro_batch_size 1 (train.micro_batch_size: 1; more accumulation steps)",
                           dataclasses.replace(s, micro_batch_size=1), gpus))
    if s.reference in ("copy", "ema") and not s.reference_sharded:
        candidates.append(("sharded reference (distributed.reference_sharded: true)",
                           dataclasses.replace(s, reference_sharded=True), gpus))
    heads = model_summary(s.model)["heads"]
    for n in (2, 4, 8):
        degree = s.sp_degree * n
        if s.strategy in ("auto", "fsdp") and gpus % degree == 0 and heads % degree == 0:
            candidates.append((f"sequence parallelism (distributed.sp_degree: {degree})",
                               dataclasses.replace(s, sp_degree=degree), gpus))
    if s.reference != "lora":
        lora = dataclasses.replace(s, lora_rank=s.lora_rank or 64, reference="lora")
        candidates.append((f"LoRA policy + LoRA reference (model.lora_rank: {lora.lora_rank}, "
                           "method.reference: lora)", lora, gpus))
        if not s.gradient_checkpointing:
            candidates.append(("LoRA reference + gradient checkpointing",
                               dataclasses.replace(lora, gradient_checkpointing=True), gpus))
    if not s.cpu_offload and s.strategy != "ddp":
        candidates.append(("FSDP2 CPU offload of weights/gradients/optimizer states "
                           "(distributed.cpu_offload: true)", dataclasses.replace(s, cpu_offload=True), gpus))
    for settings in (s, ckpt) if not s.gradient_checkpointing else (s,):
        for n in (2, 4, 8, 16, 32, 64):
            more = gpus * n
            if settings.strategy in ("ddp", "none") or evaluate(settings, more)["fits"]:
                if settings.strategy not in ("ddp", "none"):
                    what = f"{more} GPUs" + ("" if settings is s else " + gradient checkpointing")
                    candidates.append((what, settings, more))
                break
    out = []
    for change, settings, n in candidates:
        try:
            result = evaluate(settings, n)
        except ValueError:  # e.g. an sp_degree that does not divide an HSDP shard group
            continue
        out.append({"change": change, "gpus": n, "gpu": gpu_name, "total_gib": result["total_gib"],
                    "fits": result["fits"], "step_s": result["time"]["step_s"]})
    return out


def layout_options(s: _Setup, gpus: int, evaluate, *, max_micro_batch: int = 4) -> list[dict]:
    """Every layout that runs ``s.batch_size`` pairs per step on ``gpus`` GPUs as the trainer would
    accept it: ``sp_degree`` (dividing the heads and the tokens:
    :func:`pgdpo.train.parallel.check_divisible`), ``replicate_degree`` (the HSDP mesh rules of
    :func:`pgdpo.train.layout.check_mesh`) and a micro-batch (up to ``max_micro_batch``) whose accumulation
    is whole (:meth:`pgdpo.train.config.TrainConfig.grad_accum`), each planned; best first: fitting, then
    the shortest step, the least inter-node time, the least memory."""
    from pgdpo.train.config import TrainConfig
    from pgdpo.train.models import spec_for
    from pgdpo.train.parallel import check_divisible

    spec = spec_for(model_arch(s.model))
    batch = TrainConfig()
    options = []
    for sp in (n for n in range(1, gpus + 1) if gpus % n == 0):
        try:
            check_divisible(spec, s.latent_shape, sp)
        except ValueError:
            continue
        for replicate in (n for n in range(1, gpus + 1) if gpus % n == 0):
            for micro in range(1, max_micro_batch + 1):
                batch.train = dataclasses.replace(batch.train, batch_size=s.batch_size,
                                                  micro_batch_size=micro)
                try:
                    check_mesh(gpus, sp, replicate)
                    accum = batch.grad_accum(gpus // sp)
                    r = evaluate(dataclasses.replace(s, sp_degree=sp, micro_batch_size=micro), gpus,
                                 replicate)
                except ValueError:
                    continue
                c = r["communication"]
                options.append({
                    "sp_degree": sp, "replicate_degree": replicate, "shard_degree": gpus // replicate,
                    "micro_batch_size": micro, "grad_accum": accum, "data_parallel_groups": gpus // sp,
                    "fits": r["fits"], "total_gib": r["total_gib"], "step_s": r["time"]["step_s"],
                    "intra_node_s": c["intra_node_s"], "inter_node_s": c["inter_node_s"],
                    "overrides": f"--distributed.sp_degree {sp} --distributed.replicate_degree {replicate} "
                                 f"--train.micro_batch_size {micro}"})
    options.sort(key=lambda o: (not o["fits"], round(o["step_s"], 3), o["inter_node_s"], o["total_gib"]))
    return options


def hsdp_saving(s: _Setup, gpus: int, replicate_degree: int, evaluate,
                gpus_per_node: int) -> dict | None:
    """Plain FSDP2 over all ``gpus`` vs HSDP with one replica group per node (or the configured
    ``replicate_degree`` when > 1): the communication of each, and what HSDP saves. None on one node, or
    when neither mesh can run this layout."""
    if gpus <= gpus_per_node:
        return None
    hsdp = (replicate_degree if replicate_degree > 1
            else gpus // gpus_per_node if gpus % gpus_per_node == 0 else None)
    try:
        plain, per_node = evaluate(s, gpus, 1), evaluate(s, gpus, hsdp) if hsdp else None
    except ValueError:
        return None
    if per_node is None or plain["strategy"] != "fsdp":
        return None
    keys = ("intra_node_s", "inter_node_s", "inter_node_bytes", "fsdp_s")
    a, b = plain["communication"], per_node["communication"]
    return {"replicate_degree": hsdp, "shard_degree": gpus // hsdp,
            "plain_fsdp": {k: a[k] for k in keys}, "hsdp": {k: b[k] for k in keys},
            "saves_inter_node_s": a["inter_node_s"] - b["inter_node_s"],
            "saves_inter_node_bytes": a["inter_node_bytes"] - b["inter_node_bytes"],
            "saves_step_s": plain["time"]["step_s"] - per_node["time"]["step_s"],
            "memory_gib": {"plain_fsdp": plain["total_gib"], "hsdp": per_node["total_gib"]}}


def plan(config: TrainConfig | dict | str | os.PathLike | None = None, *, gpus: int, gpu: str = "h20",
         config_overrides=(), mfu: float = 0.40, overhead_gib: float = 4.0, margin: float = 0.08,
         intra_node_gbps: float | None = None, inter_node_gbps: float | None = None,
         gpus_per_node: int | None = None, suggest: bool = True) -> dict:
    """Memory per GPU, step time and whether it fits, for a training run on ``gpus`` x ``gpu``.

    The run is what ``pgdpo train`` would start from the same config on ``gpus`` processes: the config and
    its overrides are read by the trainer's loader and resolved by :func:`pgdpo.train.layout.resolve_layout`;
    the other arguments describe the hardware and the estimate.

    Args:
        config: a training config: a YAML path, its mapping, a validated ``TrainConfig``, or None for the
            trainer's defaults (``pgdpo train`` without ``--config``).
        config_overrides: ``(dotted_key, value)`` pairs applied to the config as ``pgdpo train`` applies its
            ``--section.key VALUE`` arguments (values typed as YAML reads them: ``("data.frames", 81)``,
            ``("model.gradient_checkpointing", True)``).
        gpus: number of GPUs (processes); the mesh (``distributed.replicate_degree``, ``sp_degree``) is the
            config's.
        gpu: a key of :data:`GPUS` (``h20``, ``h100``, ``h200``, ``a100``).
        mfu: assumed fraction of the bf16 peak achieved (all executed FLOPs, recompute included).
        overhead_gib: fixed per-GPU overhead (CUDA context, NCCL, workspaces).
        margin: fraction of GPU memory kept free for fragmentation; fits = total <= (1 - margin) x capacity.
        intra_node_gbps, inter_node_gbps, gpus_per_node: the network (GB/s per GPU, one direction; GPUs per
            node); None: the GPU's (:data:`GPUS`).
        suggest: also evaluate changes that make it fit (``"suggestions"``) and the layouts that run the
            batch (``"layouts"``).

    Returns:
        A JSON-serialisable dict: ``settings`` (the run as planned), ``layout`` (the run as ``pgdpo train``
        resolves it on ``gpus`` processes: :func:`pgdpo.train.layout.resolve_layout`), ``memory_gib``
        (components), ``total_gib``, ``capacity_gib``, ``fits``, ``model`` (parameter counts, tokens),
        ``batch``, ``flops``, ``time`` (``step_s`` ...), ``notes``, ``suggestions``; ``communication`` (each
        collective per step: calls, bytes, link, seconds; totals intra / inter node), ``hsdp`` (plain FSDP
        vs HSDP across nodes), ``layouts`` (every layout that runs the batch on ``gpus``, best first:
        :func:`layout_options`), ``runnable`` (whole accumulation).
    """
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
        raise ValueError(f"gpus must be a positive integer, got {gpus!r}")
    where, train_config = read_config(config, config_overrides)
    m = train_config.model
    arch, path_note = None, None
    try:
        if m.path and not os.path.isdir(m.path):  # planning before the weights are here
            arch = resolve_config(m.name)
            path_note = (f"model.path {m.path!r} is not here: planned with model.name {m.name!r} "
                         "(pgdpo train reads the architecture from model.path)")
        layout = resolve_layout(train_config, gpus, arch=arch, exact_batch=False)
        settings = _setup_from_layout(layout, train_config, model=m.name if arch is not None else None)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    replicate_degree = layout.replicate_degree
    if gpu not in GPUS:
        raise ValueError(f"unknown gpu {gpu!r}; expected one of {sorted(GPUS)}")
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    if not 0 <= margin < 1:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    spec = GPUS[gpu]
    for key, value in (("intra_node_gbps", intra_node_gbps), ("inter_node_gbps", inter_node_gbps),
                       ("gpus_per_node", gpus_per_node)):
        if value is not None and (isinstance(value, bool) or not value > 0
                                  or (key == "gpus_per_node" and not isinstance(value, int))):
            raise ValueError(f"{key} must be a positive {'integer' if key == 'gpus_per_node' else 'number'}, "
                             f"got {value!r}")
    spec = dataclasses.replace(
        spec, intra_node=spec.intra_node if intra_node_gbps is None else intra_node_gbps * 1e9,
        inter_node=spec.inter_node if inter_node_gbps is None else inter_node_gbps * 1e9,
        gpus_per_node=gpus_per_node or spec.gpus_per_node)

    def evaluate(s, n, replicate=replicate_degree):
        return _evaluate(s, n, spec, mfu=mfu, overhead_gib=overhead_gib, margin=margin,
                         replicate_degree=replicate)

    result = evaluate(settings, gpus)
    result["layout"] = layout.as_dict()
    if path_note:
        result["notes"].append(path_note)
    result["gpu"]["key"] = gpu
    result["assumptions"] = {"mfu": mfu, "overhead_gib": overhead_gib, "margin": margin,
                             "intra_node_gbps": spec.intra_node / 1e9,
                             "inter_node_gbps": spec.inter_node / 1e9,
                             "gpus_per_node": spec.gpus_per_node,
                             "activation_bytes_per_token_per_block": dict(zip(("x_dim", "x_ffn"),
                                                                              ACT_PER_TOKEN[settings.precision]))}
    result["suggestions"] = _suggestions(settings, gpus, gpu, evaluate) if suggest else []
    result["hsdp"] = hsdp_saving(settings, gpus, replicate_degree, evaluate, spec.gpus_per_node)
    result["layouts"] = layout_options(settings, gpus, evaluate) if suggest else []
    return result


# ------------------------------------------------------------------------------------------ output


def _fmt_count(n: float) -> str:
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _fmt_time(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.2f} s"


def format_plan(result: dict, steps: int | None = None) -> str:
    """A readable report of :func:`plan`'s result."""
    s, m, b, t = result["settings"], result["model"], result["batch"], result["time"]
    sp = result["sequence_parallel"]
    g = result["gpu"]
    sharded = ", sharded" if s["reference_sharded"] and result["strategy"] == "fsdp" else ""
    ref = {"copy": f"frozen copy ({s['precision']}{sharded if s['reference_sharded'] else ', replicated'})",
           "ema": "EMA copy (fp32)", "lora": "LoRA adapters disabled", "none": "none (SFT)"}[s["reference"]]
    tuning = f"LoRA rank {s['lora_rank']}" if s["lora_rank"] else "full fine-tuning"
    lines = [
        f"PG-DPO plan: {m['name']} ({_fmt_count(m['parameters'])} params, {tuning}: "
        f"{_fmt_count(m['trainable_parameters'])} trained) on {result['gpus']} x {g['name']} "
        f"({result['strategy']})",
        f"  video {s['frames']} frames {s['height']}x{s['width']} -> latent {m['latent_shape']} -> "
        f"{m['tokens_per_video']:,} tokens/video; {b['pairs_per_step']} pairs/step = "
        f"{b['pairs_per_forward_per_gpu']} pair(s)/forward x {sp['data_parallel_groups']} data-parallel "
        f"group(s) x {b['grad_accumulation']} accumulation"
        + (f"; sequence parallel {sp['sp_degree']} (Ulysses): {sp['tokens_per_rank']:,} tokens/GPU"
           if sp["sp_degree"] > 1 else ""),
        f"  precision {s['precision']}, optimizer {s['optimizer']}, gradient checkpointing "
        f"{'on' if s['gradient_checkpointing'] else 'off'}, reference {ref}",
        "",
        f"  {'memory per GPU':<22}{'GiB':>9}",
    ]
    for key, value in result["memory_gib"].items():
        lines.append(f"  {key:<22}{value:>9.1f}")
    verdict = "FITS" if result["fits"] else "DOES NOT FIT"
    lines += [f"  {'total':<22}{result['total_gib']:>9.1f}   of {result['capacity_gib']:.1f} GiB "
              f"({100 * result['utilization']:.0f}%; usable {result['usable_gib']:.1f}) -> {verdict}",
              f"  {'setup peak':<22}{result['setup_peak_gib']:>9.1f}   (shards + one tensor in flight, "
              "before any activation)"
              + (f"; host memory {result['host_memory_gib']:.1f} GiB/GPU (CPU offload)"
                 if result["host_memory_gib"] else ""), ""]
    lines.append(f"  step: {_fmt_count(result['flops']['per_step'])}FLOP executed at MFU "
                 f"{t['assumed_mfu']:.2f} of {g['peak_bf16'] / 1e12:.0f} TFLOP/s -> compute "
                 f"{_fmt_time(t['compute_s'])}, FSDP traffic {_fmt_time(t['comm_s'])} (overlapped)"
                 + (f" + all-to-all {_fmt_time(t['sp_comm_s'])}" if sp["sp_degree"] > 1 else "") + " -> "
                 f"{_fmt_time(t['step_s'])}/step, {t['tokens_per_s']:,.0f} tokens/s")
    if steps:
        lines.append(f"  {steps} steps: {_fmt_time(steps * t['step_s'])}")
    lines += _format_network(result)
    for note in result["notes"]:
        lines.append(f"  note: {note}")
    if result["suggestions"] and not result["fits"]:
        lines += ["", "  to make it fit:"]
        shown = [x for x in result["suggestions"] if x["fits"]] or result["suggestions"]
        for x in shown:
            where = "" if "GPUs" in x["change"] else f" on {x['gpus']} GPUs"
            still = "" if x["fits"] else " (still does not fit)"
            lines.append(f"    - {x['change']}{where}: {x['total_gib']:.1f} GiB/GPU, "
                         f"{_fmt_time(x['step_s'])}/step{still}")
    return "\n".join(lines)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _format_network(result: dict) -> list[str]:
    """The mesh, where each collective runs and its time, HSDP vs plain FSDP, and the layouts that run the
    batch (lines of :func:`format_plan`)."""
    mesh, c, a = result["mesh"], result["communication"], result["assumptions"]
    lines = ["", f"  mesh: replicate={mesh['replicate_degree']} shard={mesh['shard_degree']} "
             f"sp={mesh['sp_degree']} on {mesh['nodes']} node(s) of {mesh['gpus_per_node']} GPUs; per GPU "
             f"{a['intra_node_gbps']:.0f} GB/s intra-node, {a['inter_node_gbps']:.0f} GB/s inter-node"]
    if c["collectives"]:
        lines.append(f"  {'communication per step, per GPU':<66}{'calls':>6}{'sent':>11}  link   {'time':>8}")
        for x in c["collectives"]:
            what = f"{x['name']} [{x['group']} {x['ranks']}]"
            lines.append(f"  {what:<66}{x['calls']:>6}{_gb(x['bytes_per_rank']):>11}  {x['link']:<6} "
                         f"{_fmt_time(x['seconds']):>8}")
        lines.append(f"  intra-node {_fmt_time(c['intra_node_s'])} ({_gb(c['intra_node_bytes'])}), "
                     f"inter-node {_fmt_time(c['inter_node_s'])} ({_gb(c['inter_node_bytes'])}) per step")
    h = result.get("hsdp")
    if h:
        p, q = h["plain_fsdp"], h["hsdp"]
        lines.append(f"  HSDP (replicate={h['replicate_degree']} x shard={h['shard_degree']}) vs plain FSDP "
                     f"over {result['gpus']} GPUs: inter-node {_fmt_time(q['inter_node_s'])} vs "
                     f"{_fmt_time(p['inter_node_s'])} per step (saves {_gb(h['saves_inter_node_bytes'])} per "
                     f"GPU, {_fmt_time(h['saves_inter_node_s'])}); memory {h['memory_gib']['hsdp']:.1f} vs "
                     f"{h['memory_gib']['plain_fsdp']:.1f} GiB/GPU")
    options = result.get("layouts") or []
    if options:
        b = result["batch"]
        best = options[0]
        if not result["runnable"] or not result["fits"]:
            lines.append(f"  as configured the trainer cannot run it; the best layout for "
                         f"{b['requested_pairs_per_step']} pairs on {result['gpus']} GPUs: "
                         f"{best['overrides']}")
        lines.append(f"  layouts that run {b['requested_pairs_per_step']} pairs/step on {result['gpus']} "
                     "GPUs (best first):")
        current = (mesh["sp_degree"], mesh["replicate_degree"], b["pairs_per_forward_per_gpu"])
        for o in options[:5]:
            mark = "  <- this config" if (o["sp_degree"], o["replicate_degree"],
                                          o["micro_batch_size"]) == current else ""
            lines.append(f"    sp={o['sp_degree']} replicate={o['replicate_degree']} "
                         f"micro_batch={o['micro_batch_size']} x accum={o['grad_accum']}: "
                         f"{o['total_gib']:.1f} GiB{'' if o['fits'] else ' (does not fit)'}, "
                         f"{_fmt_time(o['step_s'])}/step, inter-node {_fmt_time(o['inter_node_s'])}{mark}")
    return lines


def gpu_table() -> str:
    lines = [f"  {'key':<6}{'GPU':<26}{'memory GiB':>11}{'bf16 TFLOP/s':>14}{'intra GB/s':>12}"
             f"{'inter GB/s':>12}{'GPUs/node':>11}"]
    for key, g in GPUS.items():
        lines.append(f"  {key:<6}{g.name:<26}{g.memory_gib:>11.1f}{g.peak_bf16 / 1e12:>14.0f}"
                     f"{g.intra_node / 1e9:>12.0f}{g.inter_node / 1e9:>12.0f}{g.gpus_per_node:>11}")
    return "\n".join(lines)


_EPILOG = """\
The run is read as pgdpo train reads it: --config FILE.yaml plus any --section.key VALUE override, the
trainer's defaults for what they leave out, resolved as the trainer resolves it on --gpus processes (model
from model.path or model.name, reference, strategy, mesh, accumulation, checkpointing: the JSON's "layout").
Without --config: the trainer's defaults (its tiny test model); pass --config configs/<model>.yaml or
--model.name ... The other options here describe the hardware and the estimate.

examples:
  pgdpo plan --config configs/wan2.1-i2v-14b.yaml --gpus 32 --gpu h20
  pgdpo plan --model.name wan2.1-t2v-14b --data.frames 81 --data.height 480 --data.width 832 \\
             --train.batch_size 16 --model.lora_rank 64 --method.reference lora --gpus 8 --gpu h20 --json
  pgdpo plan --config configs/wan2.1-i2v-14b.yaml --gpus 32 --gpu h20 --distributed.replicate_degree 1 \\
             --inter-node-gbps 50                (plain FSDP over the 4 nodes, 400 Gb/s per GPU)

config keys the estimate reads (as --section.key VALUE): model.name, model.path, model.precision,
  model.gradient_checkpointing (true | false | auto), model.checkpoint_every, model.lora_rank,
  model.lora_targets, data.frames, data.height, data.width, data.text_len, method.name (sft: no
  reference), method.reference (copy | lora), method.ref_ema_every, optim.name, train.batch_size,
  train.micro_batch_size, distributed.strategy, distributed.sp_degree, distributed.replicate_degree,
  distributed.reshard_after_forward, distributed.reference_sharded, distributed.cpu_offload

GPUs (dense bf16 peak; per GPU, one direction: NVLink within a node, the network across nodes):
{gpus}

The estimate (see `python -c "import pgdpo.tools.plan; help(pgdpo.tools.plan)"`): FSDP2 shards fp32 master
weights, fp32 gradients and AdamW states (16 B/param) over the GPUs of a shard group (all of them, or
GPUs / distributed.replicate_degree with HSDP); the reference is a bf16 sharded copy (or LoRA adapters
disabled: no copy); activations are measured per Wan block (72 d + 4 ffn bytes/token in bf16); step time =
executed FLOPs / (GPUs x peak x MFU); each collective of a step (ring byte counts) runs on NVLink when its
group is inside a node, else on the network; the layouts that run the batch on --gpus are ranked.
"""

#: the planner's own flags before it read the trainer's config (PlanSettings), and the config key each
#: became: only to say so when one is given (the --section.key form is the one way now)
_RETIRED_FLAGS = {
    "--model": "--model.name NAME", "--frames": "--data.frames N", "--height": "--data.height PIXELS",
    "--width": "--data.width PIXELS", "--batch": "--train.batch_size PAIRS",
    "--micro-batch": "--train.micro_batch_size PAIRS", "--precision": "--model.precision bf16|fp32",
    "--optimizer": "--optim.name adamw", "--checkpointing": "--model.gradient_checkpointing true",
    "--no-checkpointing": "--model.gradient_checkpointing false",
    "--reference": "--method.reference copy|lora (sft: --method.name sft; EMA: --method.ref_ema_every K)",
    "--lora-rank": "--model.lora_rank R --method.reference lora", "--strategy": "--distributed.strategy S",
    "--sp-degree": "--distributed.sp_degree N", "--checkpoint-every": "--model.checkpoint_every K",
    "--replicated-reference": "--distributed.reference_sharded false",
    "--cpu-offload": "--distributed.cpu_offload true", "--text-len": "--data.text_len N",
}


def _retired_flag(extra: list[str]) -> str | None:
    """The error for the first retired flag among the unparsed arguments, or None."""
    for token in extra:
        flag = token.split("=", 1)[0]
        if flag in _RETIRED_FLAGS:
            return (f"{flag} is gone: pgdpo plan reads the training config as pgdpo train does; use "
                    f"{_RETIRED_FLAGS[flag]}")
    return None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pgdpo plan", formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="pgdpo plan [--config FILE.yaml] [--section.key VALUE ...] --gpus N "
                                      "[--gpu TYPE] [hardware and output options]",
                                description="Will a PG-DPO training run fit? Memory per GPU (policy, "
                                "gradients, optimizer, reference, activations,\noverhead) and step time, "
                                "estimated before you start, for the run pgdpo train would start from the "
                                "same\nconfig and overrides.", epilog=_EPILOG.format(gpus=gpu_table()))
    p.add_argument("--config", metavar="FILE.yaml",
                   help="training config (pgdpo train's YAML; default: the trainer's defaults); "
                        "--section.key VALUE overrides it")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    p.add_argument("--gpu", choices=sorted(GPUS), default="h20", help="GPU type (default h20)")
    p.add_argument("--intra-node-gbps", type=float, help="intra-node (NVLink) bandwidth per GPU, GB/s one "
                   "direction (default: the GPU's, in the table below)")
    p.add_argument("--inter-node-gbps", type=float, help="inter-node (network) bandwidth per GPU, GB/s one "
                   "direction (default: the GPU's; 50 = a 400 Gb/s NIC per GPU)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node (default 8)")
    p.add_argument("--mfu", type=float, default=0.40, help="assumed MFU on all executed FLOPs (default 0.40)")
    p.add_argument("--overhead-gib", type=float, default=4.0, help="fixed per-GPU overhead (default 4 GiB)")
    p.add_argument("--margin", type=float, default=0.08, help="fraction of memory kept free (default 0.08)")
    p.add_argument("--steps", type=int, help="also print the time for this many steps (e.g. 3000)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args, extra = _parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        retired = _retired_flag(extra)
        if retired:
            raise ValueError(retired)
        config_overrides = parse_overrides(extra)  # --section.key VALUE, as pgdpo train reads them
        result = plan(args.config, gpus=args.gpus, gpu=args.gpu, config_overrides=config_overrides,
                      mfu=args.mfu, overhead_gib=args.overhead_gib, margin=args.margin,
                      intra_node_gbps=args.intra_node_gbps, inter_node_gbps=args.inter_node_gbps,
                      gpus_per_node=args.gpus_per_node)
    except (ValueError, FileNotFoundError) as exc:
        print(f"pgdpo plan: error: {exc}", file=sys.stderr)
        return 2
    if args.steps:
        result["time"]["steps"] = args.steps
        result["time"]["total_s"] = args.steps * result["time"]["step_s"]
    print(json.dumps(result, indent=2) if args.json else format_plan(result, args.steps))
    return 0


__all__ = ["GPUS", "GPU", "plan", "read_config", "check_video", "model_summary",
           "block_activation_bytes", "collectives", "communication", "mesh_groups", "layout_options",
           "format_plan", "main"]
