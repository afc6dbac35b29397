"""A synthetic preference dataset: seeded random latents with a controllable chosen/rejected difference.

For the demo, tests and throughput runs without videos or encoders. Per pair ``i`` (generator seeded
with ``(seed, i)``, so pair ``i`` does not depend on how many pairs are made):

- ``chosen`` ~ N(0, 1) of ``[C, F, H, W]`` (unit variance, like normalised Wan latents);
- ``rejected = sqrt(1 - d^2) * chosen + d * noise``: unit variance, correlation ``sqrt(1 - d^2)`` with
  chosen, ``E||chosen - rejected||^2 / numel ~ 2 - 2 sqrt(1 - d^2)``; ``d = difference`` in ``[0, 1]``;
- ``encoder_hidden_states`` ~ N(0, 1) of ``[L, D]`` on the first ``n`` token rows and zero after them
  (``n`` uniform in ``[1, L]``), like a zero-padded UMT5 embedding;
- scores 1 and ``1 - d`` (margin ``d``);
- i2v: ``image_condition`` = 4 mask channels (1 on the first latent frame, 0 after it) and the chosen
  latent's first frame (zeros after it), the Wan2.1 I2V layout; ``encoder_hidden_states_image`` ~ N(0, 1).
"""

from __future__ import annotations

import math
import os

import torch

from .format import MASK_CHANNELS, DatasetMeta
from .writer import DatasetWriter


def synth_pair(index: int, *, task: str, latent_shape, text_len: int, text_dim: int, difference: float,
               seed: int, image_len: int = 257, image_dim: int = 1280) -> dict:
    """Tensors (float32) and scores of synthetic pair ``index``."""
    gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(index)) % (2 ** 63))
    c, f, h, w = (int(s) for s in latent_shape)
    chosen = torch.randn(c, f, h, w, generator=gen)
    noise = torch.randn(c, f, h, w, generator=gen)
    rejected = math.sqrt(1.0 - difference ** 2) * chosen + difference * noise
    text = torch.randn(text_len, text_dim, generator=gen)
    used = int(torch.randint(1, text_len + 1, (1,), generator=gen))
    text[used:] = 0
    out = {"chosen": chosen, "rejected": rejected, "encoder_hidden_states": text,
           "score_chosen": 1.0, "score_rejected": 1.0 - difference}
    if task == "i2v":
        mask = torch.zeros(MASK_CHANNELS, f, h, w)
        mask[:, 0] = 1.0
        first = torch.zeros(c, f, h, w)
        first[:, 0] = chosen[:, 0]
        out["image_condition"] = torch.cat([mask, first], dim=0)
        out["encoder_hidden_states_image"] = torch.randn(image_len, image_dim, generator=gen)
    return out


def synth_dataset(out: str | os.PathLike, *, pairs: int, task: str = "t2v", latent_shape=(16, 3, 8, 8),
                  text_len: int = 16, text_dim: int = 32, difference: float = 0.5, seed: int = 0,
                  image_len: int = 257, image_dim: int = 1280, dtype: torch.dtype | str = torch.float32,
                  shard_size: int = 64, overwrite: bool = False, progress: bool = True) -> DatasetMeta:
    """Write ``pairs`` synthetic pairs to the dataset folder ``out``; returns its meta."""
    from tqdm.auto import tqdm

    if pairs < 1:
        raise ValueError(f"pairs must be >= 1, got {pairs}")
    if not 0.0 <= difference <= 1.0:
        raise ValueError(f"difference must be in [0, 1], got {difference}")
    latent_shape = [int(s) for s in latent_shape]
    if len(latent_shape) != 4 or min(latent_shape) < 1:
        raise ValueError(f"latent_shape must be 4 positive integers C,F,H,W, got {latent_shape}")
    source = {"kind": "synthetic", "seed": seed, "difference": difference}
    with DatasetWriter(out, task=task, latent_shape=latent_shape, text_len=text_len, text_dim=text_dim,
                       dtype=dtype, image_embed_shape=[image_len, image_dim] if task == "i2v" else None,
                       shard_size=shard_size, source=source, overwrite=overwrite) as writer:
        for i in tqdm(range(pairs), desc="synth pairs", unit="pair", disable=not progress):
            pair = synth_pair(i, task=task, latent_shape=latent_shape, text_len=text_len, text_dim=text_dim,
                              difference=difference, seed=seed, image_len=image_len, image_dim=image_dim)
            writer.add(prompt_id=f"synth-{i}", prompt=f"synthetic prompt {i}", **pair)
    return writer.meta
