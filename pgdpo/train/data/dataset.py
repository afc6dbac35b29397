"""Streaming, rank-sharded, per-epoch shuffled, resumable loader of a preference dataset.

Order of one epoch (a pure function of ``seed``, ``epoch`` and the dataset, identical on every rank):

1. the shards are permuted (seeded by ``(seed, epoch)``) and cut into groups of ``mix_shards`` shards;
2. the pairs of each group are permuted together, and the groups are concatenated: the global order
   reads the shards group by group, so a rank has at most ``mix_shards`` shard files open at once
   and reads them memory-mapped, one tensor at a time (never a whole shard, never the whole dataset);
3. the global order is cut to a multiple of ``step_pairs`` (the pairs of one optimiser step over all
   ranks; default ``world_size * batch_size``) (``drop_last=True``: the few pairs dropped change from
   epoch to epoch) or padded to one by repeating its first pairs (``drop_last=False``: every pair is
   seen, a few twice), so every rank gets the same number of full batches and an epoch holds whole
   steps;
4. rank ``r`` takes positions ``r, r + world_size, r + 2 world_size, ...``: with ``drop_last=True`` the
   ranks' pairs are disjoint and together they are the epoch's pairs.

One optimizer step of all ranks together (``world_size * batch_size`` pairs) is one contiguous window
of the global order, so the window is the same whatever ``(world_size, batch_size)`` with that product,
which is what lets a run resume on a different world size with the same global batch. With
``step_pairs`` (a step of several micro-batches per rank) the step is the window of ``step_pairs`` pairs,
whatever split into ranks x micro-batches, and the epoch's length does not depend on the split.

Resuming: :meth:`PreferenceDataset.state_dict` records ``epoch`` and ``position`` (batches this rank
has already been given in that epoch) and ``consumed`` (pairs all ranks have been given: a global index
into the epoch's order); a new loader with the same settings and
:meth:`~PreferenceDataset.load_state_dict` yields exactly the batches the uninterrupted run would have,
also on another number of ranks when ``step_pairs`` agrees (``consumed`` is converted to this loader's
position).
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import torch

from .collate import collate
from .format import (
    DataError,
    DatasetMeta,
    IndexEntry,
    ShardReader,
    read_index,
    read_meta,
    read_pair,
    verify_shard,
    warn_no_checksums,
)

#: settings that fix the order of the batches; a saved state can only be loaded where they agree
_ORDER_KEYS = ("seed", "shuffle", "drop_last", "mix_shards", "num_pairs")


class PreferenceDataset:
    """Batches of preference pairs from a dataset folder, for one rank of ``world_size``.

    Iterating yields the rest of the current epoch as collated batches (see :func:`collate`), then moves
    to the next epoch: ``for batch in loader`` is one epoch; :meth:`stream` never ends.

    Args:
        root: dataset folder (``dataset.json``, ``index.jsonl``, shards).
        batch_size: pairs per batch on this rank.
        rank, world_size: this process's data-parallel rank and the number of ranks.
        seed: shuffling seed (the same on every rank).
        shuffle: permute shards and pairs each epoch; ``False`` reads in pair order.
        drop_last: cut the epoch to full global batches (disjoint ranks); ``False`` pads by repetition.
        step_pairs: pairs per optimiser step over all ranks (a multiple of ``world_size * batch_size``;
            default that product): the epoch is cut (or padded) to whole steps, and a saved state
            resumes on any split of it into ranks and batches.
        mix_shards: shards whose pairs are shuffled together (more mixing, more open files).
        dtype: cast floating tensors of each batch (default: the stored dtype).
        pin_memory: pin each batch in page-locked memory.
        with_ids: also put ``"pair_id"`` (long ``[B]``) and ``"margin"`` (float ``[B]``, NaN when unknown)
            in each batch; off by default so batches are exactly the ``PreferenceStep`` format.
        validate: open every shard's header now and check every indexed tensor is there with the indexed
            shape and dtype (cheap: headers only), so a bad file fails at start-up, not hours in.
        verify: check each shard's bytes against its checksum in ``dataset.json`` the first time this
            loader opens it, before any of its tensors is handed out (one extra sequential read of the
            shard; :attr:`verify_seconds` totals the time). A dataset without checksums loads with a
            warning.
        check_finite: refuse a pair with a NaN or Inf value, naming the shard, pair and tensor.
    """

    def __init__(self, root: str | os.PathLike, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = True, mix_shards: int = 4,
                 dtype: torch.dtype | None = None, pin_memory: bool = False, with_ids: bool = False,
                 validate: bool = True, verify: bool = True, check_finite: bool = True,
                 step_pairs: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if mix_shards < 1:
            raise ValueError(f"mix_shards must be >= 1, got {mix_shards}")
        self.root = Path(root)
        self.meta: DatasetMeta = read_meta(self.root)
        self.entries: list[IndexEntry] = read_index(self.root, self.meta)
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        self.seed, self.shuffle, self.drop_last = int(seed), bool(shuffle), bool(drop_last)
        self.mix_shards = int(mix_shards)
        self.step_pairs = self.global_batch if step_pairs is None else int(step_pairs)
        if self.step_pairs < 1 or self.step_pairs % self.global_batch:
            raise ValueError(f"step_pairs ({step_pairs}) must be a positive multiple of world_size x "
                             f"batch_size = {self.global_batch}")
        self.dtype, self.pin_memory, self.with_ids = dtype, pin_memory, with_ids
        self.shards: list[str] = list(dict.fromkeys(e.shard for e in self.entries))
        self._pairs_of_shard: dict[str, list[int]] = {s: [] for s in self.shards}
        for entry in self.entries:
            self._pairs_of_shard[entry.shard].append(entry.pair)
        if self.step_pairs > len(self.entries) and self.drop_last:
            raise DataError(f"{self.root}: {len(self.entries)} pairs are fewer than one global batch "
                            f"(world_size {world_size} x batch_size {batch_size} x micro-batches per step "
                            f"{self.step_pairs // self.global_batch} = {self.step_pairs}); "
                            "use drop_last=False, a smaller batch, or more data")
        self._readers: OrderedDict[str, ShardReader] = OrderedDict()
        self.verify, self.check_finite = bool(verify), bool(check_finite)
        self.verified: set[str] = set()  # shards whose checksum this loader has checked
        self.verify_seconds = 0.0
        if self.verify and self.meta.checksums is None:
            warn_no_checksums(self.root)
        self.epoch, self.position = 0, 0
        self._order_cache: tuple[int, list[int]] | None = None
        if validate:
            for shard in self.shards:
                reader = ShardReader(self.root / shard)
                for pair in self._pairs_of_shard[shard]:
                    entry = self.entries[pair]
                    for name, key in entry.keys.items():
                        reader.check(key, entry.shapes[name], entry.dtype)

    # ------------------------------------------------------------------------------------------ order

    @property
    def num_pairs(self) -> int:
        return len(self.entries)

    @property
    def global_batch(self) -> int:
        """Pairs per step over all ranks."""
        return self.world_size * self.batch_size

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        n, s = self.num_pairs, self.step_pairs
        steps = n // s if self.drop_last else -(-n // s)
        return steps * (s // self.global_batch)

    def global_order(self, epoch: int) -> list[int]:
        """Pair ids of one epoch over all ranks (before cutting/padding to full global batches)."""
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        if not self.shuffle:
            order = list(range(self.num_pairs))
        else:
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2 ** 63))
            shards = [self.shards[i] for i in torch.randperm(len(self.shards), generator=gen).tolist()]
            order = []
            for start in range(0, len(shards), self.mix_shards):
                group = [p for s in shards[start:start + self.mix_shards] for p in self._pairs_of_shard[s]]
                order.extend(group[i] for i in torch.randperm(len(group), generator=gen).tolist())
        self._order_cache = (epoch, order)
        return order

    def epoch_batches(self, epoch: int | None = None) -> list[list[int]]:
        """Pair ids of every batch this rank gets in ``epoch`` (default: the current one)."""
        order = self.global_order(self.epoch if epoch is None else epoch)
        total = len(self) * self.global_batch
        if total > len(order):  # drop_last=False: pad by cycling from the start
            order = order + [order[i % len(order)] for i in range(total - len(order))]
        mine = order[self.rank:total:self.world_size]
        return [mine[i:i + self.batch_size] for i in range(0, len(mine), self.batch_size)]

    # ------------------------------------------------------------------------------------------ reading

    def verify_shard(self, shard: str) -> None:
        """Check ``shard`` against its checksum, once per loader (:class:`DataError` naming it if not)."""
        if not self.verify or shard in self.verified:
            return

        t0 = time.perf_counter()
        verify_shard(self.root, shard, self.meta)
        self.verify_seconds += time.perf_counter() - t0
        self.verified.add(shard)

    def _reader(self, shard: str) -> ShardReader:
        reader = self._readers.pop(shard, None)
        if reader is None:
            reader = ShardReader(self.root / shard)  # a garbled header is named as such first
            self.verify_shard(shard)
        self._readers[shard] = reader
        while len(self._readers) > self.mix_shards + 1:  # keep the current group (+1 across a boundary)
            self._readers.popitem(last=False)
        return reader

    def read_pair(self, pair: int) -> dict[str, torch.Tensor]:
        """The tensors of one pair (no batch dimension)."""
        if not 0 <= pair < self.num_pairs:
            raise IndexError(f"pair {pair} out of range [0, {self.num_pairs})")
        entry = self.entries[pair]
        tensors = read_pair(self._reader(entry.shard), entry)
        if self.check_finite:
            for name, tensor in tensors.items():
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    bad = int((~torch.isfinite(tensor)).sum())
                    where = f"{self.root / entry.shard}: pair {pair} (prompt_id {entry.prompt_id!r})"
                    raise DataError(f"{where}: {name!r} (tensor {entry.keys[name]!r}) has {bad} NaN/Inf "
                                    "value(s); the step was not run. Fix or drop the pair "
                                    "(`pgdpo data check --deep` lists the first bad tensor)")
        return tensors

    def make_batch(self, pairs: list[int]) -> dict[str, torch.Tensor]:
        """Collated batch of the given pair ids."""
        batch = collate([self.read_pair(p) for p in pairs], dtype=self.dtype, pin_memory=self.pin_memory)
        if self.with_ids:
            batch["pair_id"] = torch.tensor(pairs, dtype=torch.long)
            batch["margin"] = torch.tensor([float("nan") if self.entries[p].margin is None
                                            else self.entries[p].margin for p in pairs], dtype=torch.float32)
        return batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self._roll_over()
        batches = self.epoch_batches(self.epoch)
        while self.position < len(batches):
            pairs = batches[self.position]
            batch = self.make_batch(pairs)
            self.position += 1  # counted when handed out: a state saved after using it resumes after it
            yield batch
        self._roll_over()

    def stream(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches forever, epoch after epoch."""
        while True:
            yield from self

    def _roll_over(self) -> None:
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch."""
        self.epoch, self.position = int(epoch), 0

    # ------------------------------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """``{"epoch", "position", ...}``: where the next batch comes from, plus the order-fixing settings."""
        epoch, position = (self.epoch + 1, 0) if self.position >= len(self) else (self.epoch, self.position)
        return {"epoch": epoch, "position": position, "seed": self.seed, "shuffle": self.shuffle,
                "drop_last": self.drop_last, "mix_shards": self.mix_shards, "num_pairs": self.num_pairs,
                "world_size": self.world_size, "batch_size": self.batch_size, "step_pairs": self.step_pairs,
                "consumed": position * self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict`; the next batch is the one the saved run would have had next.

        The settings that fix the order must agree. The global batch ``world_size * batch_size`` must
        too, but it may be split differently (e.g. 8 ranks x 2 pairs -> 16 ranks x 1 pair); or, for a
        state that records them, ``step_pairs`` agrees and the pairs consumed are a whole number of this
        loader's global batches (e.g. 4 ranks x 1 pair x 1 micro-batch -> 2 ranks x 1 pair x 2).
        """
        for key in ("epoch", "position", *_ORDER_KEYS, "world_size", "batch_size"):
            if key not in state:
                raise KeyError(f"load_state_dict: state has no {key!r} "
                               "(expected a PreferenceDataset.state_dict())")
        for key in _ORDER_KEYS:
            if state[key] != getattr(self, key):
                raise ValueError(f"load_state_dict: saved {key}={state[key]!r} but this loader has "
                                 f"{key}={getattr(self, key)!r}; the batch order would differ")
        saved_global = state["world_size"] * state["batch_size"]
        consumed = int(state.get("consumed", int(state["position"]) * saved_global))
        saved_step = state.get("step_pairs")  # (None: a state from before step_pairs: same global batch)
        if saved_step is None and saved_global == self.global_batch:
            position = int(state["position"])
        elif saved_step == self.step_pairs and consumed % self.global_batch == 0:
            position = consumed // self.global_batch  # the same global index in the same epoch length
        else:
            raise ValueError(
                "load_state_dict: saved global batch world_size x batch_size = "
                f"{state['world_size']} x {state['batch_size']} = {saved_global} "
                f"({saved_step or saved_global} pairs per step), this loader has {self.world_size} x "
                f"{self.batch_size} = {self.global_batch} ({self.step_pairs} per step); "
                "the global batch, or the pairs per step, must be equal to resume mid-epoch")
        self.epoch, self.position = int(state["epoch"]), position
        if not 0 <= self.position <= len(self):
            raise ValueError(f"load_state_dict: position {self.position} outside [0, {len(self)}]")
        self._roll_over()

    def __repr__(self) -> str:
        return (f"PreferenceDataset({str(self.root)!r}, task={self.meta.task}, pairs={self.num_pairs}, "
                f"shards={len(self.shards)}, batch_size={self.batch_size}, "
                f"rank={self.rank}/{self.world_size}, "
                f"batches/epoch={len(self)}, epoch={self.epoch}, position={self.position})")
