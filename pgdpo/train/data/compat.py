"""Does data fit a model? One home for the dataset/batch-versus-model checks, with every mismatch named.

:func:`check_compatible` checks a dataset's ``dataset.json`` before training starts (every problem listed
at once); :func:`check_batch` checks one batch of tensors before a step (the first problem, naming the
bad key). Both take the model's expectations from its family's specification
(:class:`pgdpo.train.models.ModelSpec`): the task, the latent channels and the grid's divisibility, the
``text_dim``, ``image_dim`` and ``image_condition_channels``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from ..models import spec_for
from .format import MASK_CHANNELS, DataError, DatasetMeta, read_meta


def _as_meta(meta) -> DatasetMeta:
    if isinstance(meta, DatasetMeta):
        return meta
    if isinstance(meta, dict):
        return DatasetMeta.from_json(meta, where="dataset meta")
    if isinstance(meta, (str, os.PathLike)):
        return read_meta(Path(meta))
    raise TypeError("meta must be a DatasetMeta, a dataset.json dict or a dataset folder, "
                    f"got {type(meta).__name__}")


def check_compatible(meta, model_config) -> None:
    """Raise :class:`DataError` listing every way the dataset and the model disagree.

    Args:
        meta: a :class:`DatasetMeta`, a ``dataset.json`` dict, or a dataset folder.
        model_config: a model name of ``pgdpo.train.models.MODEL_CONFIGS``, a config dict with
        ``_class_name``,
            or a diffusers model (peft-wrapped or not).

    Checked: task (t2v data for a text-to-video model, i2v data for an image-to-video one), latent
    channels, text embedding width (Wan ``text_dim``, UNet ``cross_attention_dim``), for i2v the
    image-condition channels (model ``in_channels - out_channels``) and CLIP width (``image_dim``), and
    that the latent's grid fits the model (``ModelSpec.latent_grid_problem``).
    """
    meta = _as_meta(meta)
    adapter = spec_for(model_config)
    config = adapter.config
    problems = []
    task = adapter.task
    if meta.task != task:
        problems.append(f"task: the dataset is {meta.task} but the model ({adapter.family}) needs "
                        f"{task} data")
    if meta.latent_channels != adapter.latent_channels:
        problems.append(f"latent channels: dataset latent_shape[0] = {meta.latent_channels}, model has "
                        f"{adapter.latent_channels} (out_channels)")
    if meta.text_dim != adapter.text_dim:
        problems.append(f"text dim: dataset text_dim = {meta.text_dim}, "
                        f"model {adapter.text_dim_key} = {adapter.text_dim}")
    if meta.task == "i2v" and task == "i2v":
        want = adapter.image_condition_channels
        got = meta.image_condition_shape[0]
        if got != want:
            problems.append(f"image condition channels: dataset image_condition_shape[0] = {got}, model "
                            f"in_channels - out_channels = {want} ({MASK_CHANNELS} mask + "
                            f"{want - MASK_CHANNELS} first-frame latent)")
        if meta.image_embed_shape[1] != config.get("image_dim"):
            problems.append("image embedding dim: dataset image_embed_shape[1] = "
                            f"{meta.image_embed_shape[1]}, "
                            f"model image_dim = {config.get('image_dim')}")
    _, f, h, w = meta.latent_shape
    grid = adapter.latent_grid_problem(f, h, w, "dataset")
    if grid:
        problems.append(grid)
    if problems:
        raise DataError("dataset and model are incompatible:\n  - " + "\n  - ".join(problems))


def check_batch(adapter, batch: Mapping, device=None) -> None:
    """Raise a clear error naming the bad key when ``batch`` does not fit the model of ``adapter``.

    ``batch``: ``chosen`` / ``rejected`` ``[B, C, F, H, W]`` latents, ``encoder_hidden_states``
    ``[B, L, D]``, and for Wan I2V ``image_condition`` ``[B, 20, F, H, W]`` and
    ``encoder_hidden_states_image`` ``[B, Li, image_dim]``; all floating point, on ``device`` (if given).
    KeyError for a missing key, TypeError for a wrong type or dtype, ValueError for a wrong shape or device.
    """
    a = adapter
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a dict of tensors, got {type(batch).__name__}")
    required = ("chosen", "rejected", *a.condition_keys)
    missing = [k for k in required if k not in batch]
    if missing:
        raise KeyError(f"batch is missing {missing}; a {a.family} step needs keys {list(required)}")
    for k in required:
        v = batch[k]
        if not isinstance(v, Tensor):
            raise TypeError(f"batch[{k!r}] must be a torch.Tensor, got {type(v).__name__}")
        if not v.is_floating_point():
            raise TypeError(f"batch[{k!r}] must be a floating-point tensor, got {v.dtype}")
    chosen, rejected = batch["chosen"], batch["rejected"]
    if chosen.dim() != 5:
        raise ValueError(f"batch['chosen'] must be [B, C, F, H, W] latents, got shape {tuple(chosen.shape)}")
    if rejected.shape != chosen.shape:
        raise ValueError(f"batch['rejected'] has shape {tuple(rejected.shape)} but batch['chosen'] has "
                         f"{tuple(chosen.shape)}; the videos of a pair must have one shape")
    if rejected.dtype != chosen.dtype:
        raise TypeError(f"batch['rejected'] is {rejected.dtype} but batch['chosen'] is {chosen.dtype}")
    b, c, f, h, w = chosen.shape
    if b == 0:
        raise ValueError("batch['chosen'] is empty (B = 0)")
    if c != a.latent_channels:
        raise ValueError(f"batch['chosen'] has {c} channels but the {a.family} model takes "
                         f"{a.latent_channels}-channel latents")
    grid = a.batch_grid_problem(f, h, w, "batch['chosen']")  # (a UNet pads odd sizes itself)
    if grid:
        raise ValueError(grid)
    text = batch["encoder_hidden_states"]
    if text.dim() != 3 or text.shape[0] != b or text.shape[2] != a.text_dim:
        raise ValueError(f"batch['encoder_hidden_states'] must be [B={b}, L, D={a.text_dim}], got "
                         f"{tuple(text.shape)}")
    if a.task == "i2v":
        cond = batch["image_condition"]
        expected = (b, a.image_condition_channels, f, h, w)
        if tuple(cond.shape) != expected:
            raise ValueError(f"batch['image_condition'] must be [B, {MASK_CHANNELS} mask + "
                             f"{a.image_condition_channels - MASK_CHANNELS} latent, F, H, W] = "
                             f"{list(expected)}, got {tuple(cond.shape)}")
        img = batch["encoder_hidden_states_image"]
        if img.dim() != 3 or img.shape[0] != b or img.shape[2] != a.image_dim:
            raise ValueError(f"batch['encoder_hidden_states_image'] must be [B={b}, tokens, "
                             f"{a.image_dim}], got {tuple(img.shape)}")
    if device is not None:
        for k in required:
            if batch[k].device != device:
                raise ValueError(f"batch[{k!r}] is on {batch[k].device} but the policy is on {device}")
