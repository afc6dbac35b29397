"""Does a dataset fit a model? Checked before training starts, with every mismatch named."""

from __future__ import annotations

import os
from pathlib import Path

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
        model_config: a model name of ``pgdpo.models.MODEL_CONFIGS``, a config dict with ``_class_name``,
            or a diffusers model (peft-wrapped or not).

    Checked: task (t2v data for a text-to-video model, i2v data for an image-to-video one), latent
    channels, text embedding width (Wan ``text_dim``, UNet ``cross_attention_dim``), for i2v the
    image-condition channels (model ``in_channels - out_channels``) and CLIP width (``image_dim``), and
    that the latent's height/width divide by the model's patch (Wan) or downsampling factor (UNet).
    """
    from pgdpo.models import adapter_for

    meta = _as_meta(meta)
    adapter = adapter_for(model_config)
    config = adapter.config
    problems = []
    model_task = "i2v" if adapter.family == "wan-i2v" else "t2v"
    if meta.task != model_task:
        problems.append(f"task: the dataset is {meta.task} but the model ({adapter.family}) needs "
                        f"{model_task} data")
    if meta.latent_channels != adapter.latent_channels:
        problems.append(f"latent channels: dataset latent_shape[0] = {meta.latent_channels}, model has "
                        f"{adapter.latent_channels} (out_channels)")
    text_key = "text_dim" if adapter.is_wan else "cross_attention_dim"
    if meta.text_dim != config[text_key]:
        problems.append(f"text dim: dataset text_dim = {meta.text_dim}, "
                        f"model {text_key} = {config[text_key]}")
    if meta.task == "i2v" and model_task == "i2v":
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
    if adapter.is_wan:
        pt, ph, pw = config["patch_size"]
        if f % pt or h % ph or w % pw:
            problems.append(f"latent F, H, W = {f}, {h}, {w} must be multiples of the patch size "
                            f"{tuple(config['patch_size'])}")
    else:
        factor = 2 ** (len(config["block_out_channels"]) - 1)
        if h % factor or w % factor:
            problems.append(f"latent H, W = {h}, {w} must be multiples of the UNet's downsampling "
                            f"factor {factor}")
    if problems:
        raise DataError("dataset and model are incompatible:\n  - " + "\n  - ".join(problems))
