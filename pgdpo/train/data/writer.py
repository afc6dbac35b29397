"""Write a preference dataset (format in :mod:`pgdpo.train.data.format`), one shard at a time.

Pairs are buffered until a shard is full, then written with ``safetensors`` to a temporary name and
renamed, so a crash never leaves a half-written shard under a final name. ``index.jsonl`` and, last,
``dataset.json`` are written by :meth:`DatasetWriter.close`: a folder without ``dataset.json`` is an
unfinished dataset and every reader refuses it. Each shard's checksum (:mod:`pgdpo.train.integrity`) is taken
from the bytes on disk before the rename and recorded in ``dataset.json``, so later damage is detected.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from ..integrity import file_checksum
from .format import (
    DTYPES,
    INDEX_FILE,
    MASK_CHANNELS,
    META_FILE,
    DatasetMeta,
    IndexEntry,
    dtype_name,
    shard_name,
    tensor_key,
)


class DatasetWriter:
    """Append pairs, get a dataset folder.

    Example::

        with DatasetWriter(out, task="t2v", latent_shape=(16, 21, 60, 104), text_len=512, text_dim=4096) as w:
            w.add(chosen=..., rejected=..., encoder_hidden_states=..., prompt_id="p0", score_chosen=0.9,
                  score_rejected=0.2)

    Args:
        root: output folder; created. Must be empty unless ``overwrite``.
        task: ``"t2v"`` or ``"i2v"``.
        latent_shape: ``[C, F, H, W]`` of each latent.
        text_len, text_dim: ``[L, D]`` of each text embedding.
        dtype: storage dtype of every tensor (inputs are cast).
        image_condition_shape: i2v only; default ``[4 + C, F, H, W]``.
        image_embed_shape: i2v only; ``[tokens, dim]`` of the CLIP image embedding (Wan2.1: 257 x 1280).
        shard_size: pairs per shard file.
        source: free-form JSON recorded in ``dataset.json`` (how the data was made).
    """

    def __init__(self, root: str | os.PathLike, *, task: str, latent_shape, text_len: int, text_dim: int,
                 dtype: torch.dtype | str = torch.bfloat16, image_condition_shape=None,
                 image_embed_shape=None, shard_size: int = 64, source: dict | None = None,
                 overwrite: bool = False):
        self.root = Path(root)
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        latent_shape = [int(s) for s in latent_shape]
        if task == "i2v" and image_condition_shape is None and len(latent_shape) == 4:
            image_condition_shape = [MASK_CHANNELS + latent_shape[0], *latent_shape[1:]]
        self.meta = DatasetMeta(
            task=task, latent_shape=latent_shape, text_len=int(text_len), text_dim=int(text_dim),
            dtype=dtype_name(dtype), image_condition_shape=None if image_condition_shape is None
            else [int(s) for s in image_condition_shape],
            image_embed_shape=None if image_embed_shape is None else [int(s) for s in image_embed_shape],
            source=dict(source or {}))
        json.dumps(self.meta.source)  # fail now, not at close, if it is not JSON
        self._dtype = DTYPES[self.meta.dtype]
        self._shapes = self.meta.field_shapes()
        if self.root.exists() and any(self.root.iterdir()) and not overwrite:
            raise FileExistsError(f"{self.root}: output folder is not empty (pass overwrite=True / "
                                  "--overwrite to replace its dataset files)")
        self.root.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for stale in [META_FILE, INDEX_FILE, *(p.name for p in self.root.glob("shard-*.safetensors"))]:
                (self.root / stale).unlink(missing_ok=True)
        self.shard_size = int(shard_size)
        self._buffer: dict[str, torch.Tensor] = {}
        self._pending: list[IndexEntry] = []
        self._entries: list[IndexEntry] = []
        self._shard = 0
        self._checksums: dict[str, str] = {}
        self._closed = False

    @property
    def num_pairs(self) -> int:
        return len(self._entries) + len(self._pending)

    def add(self, *, chosen: torch.Tensor, rejected: torch.Tensor, encoder_hidden_states: torch.Tensor,
            prompt_id: str | int, image_condition: torch.Tensor | None = None,
            encoder_hidden_states_image: torch.Tensor | None = None, prompt: str | None = None,
            score_chosen: float | None = None, score_rejected: float | None = None) -> int:
        """Add one pair (tensors without a batch dimension); returns its pair id."""
        if self._closed:
            raise RuntimeError("DatasetWriter is closed")
        tensors = {"chosen": chosen, "rejected": rejected, "encoder_hidden_states": encoder_hidden_states,
                   "image_condition": image_condition,
                   "encoder_hidden_states_image": encoder_hidden_states_image}
        pair = self.num_pairs
        for name, tensor in tensors.items():
            if name not in self._shapes:
                if tensor is not None:
                    raise ValueError(f"pair {pair} (prompt_id {prompt_id!r}): {name!r} given but a "
                                     f"{self.meta.task} dataset does not store it")
                continue
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"pair {pair} (prompt_id {prompt_id!r}): {name!r} is required for a "
                                 f"{self.meta.task} dataset")
            if list(tensor.shape) != self._shapes[name]:
                raise ValueError(f"pair {pair} (prompt_id {prompt_id!r}): {name!r} has shape "
                                 f"{list(tensor.shape)}, expected {self._shapes[name]}")
            if not torch.isfinite(tensor).all():
                raise ValueError(f"pair {pair} (prompt_id {prompt_id!r}): {name!r} has NaN or Inf values")
        margin = None
        for key, value in (("score_chosen", score_chosen), ("score_rejected", score_rejected)):
            if value is not None and not math.isfinite(float(value)):
                raise ValueError(f"pair {pair} (prompt_id {prompt_id!r}): {key} must be finite, got {value}")
        if score_chosen is not None and score_rejected is not None:
            margin = float(score_chosen) - float(score_rejected)
        keys = {}
        for name in self._shapes:
            keys[name] = tensor_key(pair, name)
            self._buffer[keys[name]] = tensors[name].detach().to("cpu", self._dtype).contiguous()
        self._pending.append(IndexEntry(
            pair=pair, shard=shard_name(self._shard), keys=keys, shapes=dict(self._shapes),
            dtype=self.meta.dtype, prompt_id=str(prompt_id), prompt=prompt,
            score_chosen=None if score_chosen is None else float(score_chosen),
            score_rejected=None if score_rejected is None else float(score_rejected), margin=margin))
        if len(self._pending) >= self.shard_size:
            self._flush()
        return pair

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._pending:
            return
        name = shard_name(self._shard)
        tmp = self.root / (name + ".tmp")

        save_file(self._buffer, str(tmp), metadata={"format": self.meta.format,
                                                     "format_version": str(self.meta.format_version)})
        self._checksums[name] = file_checksum(tmp)  # of the bytes on disk, as later readers see them
        os.replace(tmp, self.root / name)
        self._entries.extend(self._pending)
        self._pending, self._buffer = [], {}
        self._shard += 1

    def close(self) -> DatasetMeta:
        """Write the last shard, ``index.jsonl`` and ``dataset.json``; returns the meta."""
        if self._closed:
            return self.meta
        self._flush()
        if not self._entries:
            raise ValueError(f"{self.root}: no pairs were added; refusing to write an empty dataset")
        self.meta.num_pairs = len(self._entries)
        self.meta.num_shards = self._shard
        self.meta.checksums = dict(self._checksums)
        tmp = self.root / (INDEX_FILE + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for entry in self._entries:
                f.write(json.dumps(entry.to_json()) + "\n")
        os.replace(tmp, self.root / INDEX_FILE)
        tmp = self.root / (META_FILE + ".tmp")
        tmp.write_text(json.dumps(self.meta.to_json(), indent=2) + "\n")
        os.replace(tmp, self.root / META_FILE)
        self._closed = True
        return self.meta

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        # On an error the finished shards stay on disk but no dataset.json is written: readers refuse it.
