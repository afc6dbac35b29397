"""Where a training run's memory goes, per rank: the named terms, from the model's parameter counts.

One home for these formulas: ``bench/run_memory.py`` writes a whole run's measured peak beside their sum
(CPU, gloo), and ``pgdpo plan`` (:mod:`pgdpo.tools.plan`) budgets GPUs with them. The peak of a step (at
the start of the backward, or while the last block is recomputed) is the sum of:

- ``shard``: this rank's rows of every parameter (FSDP2 gives each of N ranks ``ceil(rows / N)`` rows;
  parameters diffusers keeps in fp32 are replicated). Full fine-tuning: fp32 master weights; LoRA: the
  frozen base in the compute dtype plus fp32 adapters.
- ``root unit``: the parameters outside the blocks (patch/text/time embeddings, head), all-gathered in
  the compute dtype for the forward and kept until the backward has used them (FSDP2 does not reshard
  the root module after its forward).
- ``in-flight blocks``: two blocks' all-gathered parameters at once (the backward gathers the next block
  while this one's parameters are in use; with activation checkpointing that is the block recomputed
  next). With ``reshard_after_forward: false`` the whole model stays gathered instead.
- ``all-gather staging``: NCCL (GPU): FSDP2's flat all-gather output, one more block-sized buffer. For
  a synchronous all-gather FSDP2 frees a block's flat output only after the next block's copy-out (to
  overlap that copy-out with the next all-gather on a copy stream), so the forward holds the previous
  block's flat output, this block's and this block's parameters: three block-sized buffers.
  Gloo (CPU): none. gloo's own all-gather would stage its whole output in a temporary (a third buffer in
  the backward, beside one block's parameters and the next one's prefetched output), so pgdpo
  all-gathers with in-place broadcasts that FSDP2 sees as asynchronous, and it frees each flat output
  right after its copy-out (:class:`pgdpo.train.distributed.InPlaceAllGather`): two block-sized buffers
  at most. Measured with ``bench/run_memory.py``.
- ``unsharded gradients``: the fp32 gradients of up to two blocks' trained parameters before their
  reduce-scatter (LoRA: the adapters only).
- ``activations``: what the policy forward saves for its backward (:func:`activation_bytes`); with
  activation checkpointing each block keeps only its input, and one block at a time is recomputed.
- ``gradients`` and ``optimizer state``: the sharded fp32 gradients and AdamW's two fp32 moments of the
  trained parameters (from the first optimiser step on).
- ``reference``: a frozen copy (its shard, in the compute dtype; EMA: fp32), or nothing for a LoRA policy
  with its adapters off.

Not in the sum: the process's own baseline (imports, the process group; on GPU the CUDA context and NCCL
buffers, the planner's ``overhead``) and the allocator's slack (on CPU kept small by
:mod:`pgdpo.train.host_memory`; on GPU the caching allocator's, in the planner's ``overhead``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from .loading import meta_model
from .models import adapter_for, keep_fp32_names

#: bytes per element of the compute dtype
COMPUTE_BYTES = {"bf16": 2, "fp32": 4}
#: optimizer-state bytes per trained parameter: the trainer's AdamW keeps two fp32 moments
OPTIMIZER_STATE_BYTES = {"adamw": 8}
#: activation bytes saved by one Wan block per token, as (x d, x ffn), by compute precision: measured
#: with ``torch.autograd.graph.saved_tensors_hooks`` on diffusers' eager block (tests/test_plan.py
#: re-measures it)
ACT_PER_TOKEN = {"bf16": (72, 4), "fp32": (92, 8)}
#: per sample and block: cross-attention text keys/values (+ fp32 norm input), bytes per (text token x d)
ACT_TEXT = {"bf16": 8, "fp32": 12}
#: embeddings, output norm and head, per token (bytes x d), once per forward
ACT_OUTSIDE = 16
#: backward transient, as a fraction of one block's activations
WORKSPACE_FRACTION = 0.5
#: block-sized all-gather buffers beyond the two in flight, by process-group backend (module doc)
STAGING_BLOCKS = {"nccl": 1, "gloo": 0}
#: the terms of a step's peak, in the order reports list them
TERMS = ("shard", "root unit", "in-flight blocks", "unsharded gradients", "all-gather staging",
         "activations", "gradients", "optimizer state", "reference")


@dataclass(frozen=True)
class Parameter:
    """One parameter of the policy as the trainer builds it: ``rows`` is dim 0 (what FSDP2 shards)."""

    numel: int
    rows: int
    #: kept in fp32 and replicated (diffusers' ``_keep_in_fp32_modules``)
    kept: bool
    lora: bool
    #: in a transformer block (an FSDP2 unit of its own), else in the root unit
    block: int | None


def parameter_table(arch: dict, lora_rank: int = 0, lora_targets: tuple = ()) -> tuple[Parameter, ...]:
    """Every parameter of the policy the trainer builds for ``arch`` (:func:`pgdpo.train.loading.meta_model`,
    on the meta device: no memory), with LoRA adapters of ``lora_rank`` on ``lora_targets``."""
    lora = None
    if lora_rank:
        from peft import LoraConfig

        lora = LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=list(lora_targets))
    model = meta_model(json.loads(json.dumps(arch)), torch.float32, lora=lora)
    kept = set(keep_fp32_names(model))
    block_of = {}
    for i, block in enumerate(adapter_for(model).blocks(model)):
        for p in block.parameters():
            block_of[id(p)] = i
    return tuple(Parameter(p.numel(), p.shape[0] if p.dim() else 1, n in kept, ".lora_" in n,
                           block_of.get(id(p))) for n, p in model.named_parameters())


def per_rank_elements(table, ranks: int, *, kept: bool, lora: bool | None = None) -> int:
    """Elements rank 0 (the largest shard) holds of the parameters of ``table`` selected by ``kept`` and
    ``lora`` (None: both): FSDP2 gives each rank ``ceil(rows / ranks)`` rows; kept ones are whole."""
    total = 0
    for p in table:
        if p.kept != kept or (lora is not None and p.lora != lora):
            continue
        total += p.numel if kept else math.ceil(p.rows / ranks) * (p.numel // p.rows if p.rows else 0)
    return total


@dataclass(frozen=True)
class Counts:
    """The parameter counts the terms need (:func:`counts`). ``block`` and ``outside`` count what FSDP2
    all-gathers: the fp32-kept parameters are replicated (in the ``shard`` term) and never gathered."""

    parameters: int
    #: the largest block's sharded parameters (the blocks of a Wan are alike)
    block: int
    blocks: int
    #: sharded parameters outside the blocks (the root unit)
    outside: int
    lora: int
    #: the largest block's trained sharded parameters (full fine-tuning: ``block``; LoRA: its adapters)
    block_trained: int
    largest_tensor: int


def counts(table, *, lora: bool) -> Counts:
    per_block: dict[int, int] = {}
    trained: dict[int, int] = {}
    outside = 0
    for p in table:
        if p.kept:
            continue
        if p.block is None:
            outside += p.numel
            continue
        per_block[p.block] = per_block.get(p.block, 0) + p.numel
        if p.lora or not lora:
            trained[p.block] = trained.get(p.block, 0) + p.numel
    return Counts(parameters=sum(p.numel for p in table), block=max(per_block.values(), default=0),
                  blocks=len(per_block), outside=outside, lora=sum(p.numel for p in table if p.lora),
                  block_trained=max(trained.values(), default=0),
                  largest_tensor=max((p.numel for p in table), default=0))


def static_terms(table, ranks: int, *, precision: str, lora: bool, reference: str,
                 reference_sharded: bool = True, optimizer: str = "adamw") -> dict[str, int]:
    """Bytes per rank (rank 0) of what lives for the whole run: ``shard``, ``gradients``, ``optimizer
    state``, ``reference``, over ``ranks`` FSDP2 ranks (1: not sharded); ``reference`` one of copy, ema,
    lora, none."""
    cb = COMPUTE_BYTES[precision]

    def sharded(n, **k):
        return per_rank_elements(table, n, kept=False, **k)

    def kept(**k):
        return per_rank_elements(table, 1, kept=True, **k)

    if lora:
        shard = sharded(ranks, lora=False) * cb + kept(lora=False) * 4 + sharded(ranks, lora=True) * 4
        trained = sharded(ranks, lora=True) + kept(lora=True)
    else:
        shard = (sharded(ranks) + kept()) * 4
        trained = sharded(ranks) + kept()
    ref_bytes = {"copy": cb, "ema": 4}.get(reference)
    if ref_bytes is None:
        ref = 0
    else:
        n = ranks if reference_sharded else 1
        ref = sharded(n, lora=False) * ref_bytes + kept(lora=False) * 4
    return {"shard": shard, "gradients": trained * 4,
            "optimizer state": trained * OPTIMIZER_STATE_BYTES[optimizer], "reference": ref}


def fsdp_terms(c: Counts, ranks: int, *, precision: str, reshard_after_forward: bool = True,
               backend: str = "nccl") -> dict[str, int]:
    """Bytes per rank FSDP2 holds unsharded during a step (nothing on one rank): ``root unit``,
    ``in-flight blocks``, ``unsharded gradients``, ``all-gather staging`` (see the module doc: one block
    with ``backend`` nccl, none with gloo)."""
    if backend not in STAGING_BLOCKS:
        raise ValueError(f"backend must be one of {', '.join(STAGING_BLOCKS)}, not {backend!r}")
    if ranks <= 1:
        return {"root unit": 0, "in-flight blocks": 0, "unsharded gradients": 0, "all-gather staging": 0}
    cb = COMPUTE_BYTES[precision]
    if reshard_after_forward:
        root, blocks = c.outside * cb, 2 * c.block * cb
    else:  # the whole model stays gathered from the forward to the backward
        root, blocks = c.outside * cb, c.blocks * c.block * cb
    return {"root unit": root, "in-flight blocks": blocks, "unsharded gradients": 2 * c.block_trained * 4,
            "all-gather staging": STAGING_BLOCKS[backend] * c.block * cb}


def block_activation_bytes(dim: int, ffn_dim: int, tokens: int, text_len: int,
                           precision: str = "bf16") -> int:
    """Bytes one Wan block saves for backward for one video of ``tokens`` tokens."""
    per_d, per_f = ACT_PER_TOKEN[precision]
    return int(tokens * (per_d * dim + per_f * ffn_dim) + ACT_TEXT[precision] * text_len * dim)


def activation_bytes(*, dim: int, ffn_dim: int, layers: int, videos: int, tokens: int, local_tokens: int,
                     text_len: int, precision: str, checkpoint_every: int | None) -> int:
    """Bytes the policy forward of ``videos`` videos keeps for its backward at the backward's peak, per rank.

    ``tokens`` per video, ``local_tokens`` of them on this rank (sequence parallelism: ``tokens / sp``;
    the embeddings before the split are whole). ``checkpoint_every``: None (off) keeps every block's
    activations; k checkpoints blocks 0, k, 2k, ..., which keep only their input (``d`` elements per token)
    until one of them is recomputed. Plus a backward workspace of half a block and the embeddings/head.
    """
    cb = COMPUTE_BYTES[precision]
    block = videos * block_activation_bytes(dim, ffn_dim, local_tokens, text_len, precision)
    outside = videos * (tokens * cb * dim + local_tokens * (ACT_OUTSIDE - cb) * dim)
    checkpointed = math.ceil(layers / checkpoint_every) if checkpoint_every else 0
    stored = checkpointed * videos * local_tokens * dim * cb + (layers - checkpointed) * block
    if checkpointed:
        stored += block  # the block being recomputed
    return int(stored + WORKSPACE_FRACTION * block + outside)


def export_bytes(c: Counts, *, lora: bool, max_shard_size: int, writer: bool) -> int:
    """Extra bytes of the final export on a rank: the writing rank holds one output file's tensors (full
    fine-tuning: at most ``max_shard_size``, or one larger tensor) plus the tensor being gathered; the
    others one gathered tensor at a time (:mod:`pgdpo.train.export`). LoRA: the adapters, fp32."""
    if lora:
        return c.lora * 4 if writer else 0
    one = c.largest_tensor * 4
    return max(max_shard_size, one) + one if writer else one


def step_peak_terms(table, *, ranks: int, precision: str, lora: bool, reference: str,
                    dim: int, ffn_dim: int, videos: int, tokens: int, text_len: int,
                    checkpoint_every: int | None, sp_degree: int = 1, reference_sharded: bool = True,
                    reshard_after_forward: bool = True, optimizer: str = "adamw",
                    backend: str = "nccl") -> dict[str, int]:
    """Every term of :data:`TERMS` in bytes per rank (rank 0) at a training step's peak, after the first
    optimiser step (the optimizer state exists); their sum is the model's answer for the peak."""
    c = counts(table, lora=lora)
    out = static_terms(table, ranks, precision=precision, lora=lora, reference=reference,
                       reference_sharded=reference_sharded, optimizer=optimizer)
    out.update(fsdp_terms(c, ranks, precision=precision, reshard_after_forward=reshard_after_forward,
                          backend=backend))
    out["activations"] = activation_bytes(dim=dim, ffn_dim=ffn_dim, layers=c.blocks, videos=videos,
                                          tokens=tokens, local_tokens=tokens // sp_degree, text_len=text_len,
                                          precision=precision, checkpoint_every=checkpoint_every)
    return {k: out[k] for k in TERMS}
