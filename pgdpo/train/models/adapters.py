"""Per-family call adapters: how a Wan T2V / Wan I2V / UNet3D model is called and what its inputs are.

A :class:`ModelAdapter` knows how one family is called: which batch keys it needs, how the ``[2B]``
model input is assembled from the noisy latents and the ``[B]`` conditions, what latent a video becomes,
how many tokens a sample is, and what one forward costs in FLOPs (for MFU and the planner).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .latents import VAE_FACTORS, latent_shape
from .registry import _CLASSES, WAN_CLASS, _model_class, resolve_config
from .wrappers import unwrap_model


@dataclass(frozen=True)
class ModelAdapter:
    """How to call one model family.

    Attributes:
        family: ``"wan-t2v"``, ``"wan-i2v"`` or ``"unet3d"``.
        latent_channels: channels ``C`` of the latents ``[B, C, F, H, W]`` (and of the model's output).
        condition_keys: batch keys with per-pair conditions (each ``[B, ...]``, shared by chosen/rejected).
        config: the model's full config (constructor defaults filled in), with ``_class_name``.
    """

    family: str
    latent_channels: int
    condition_keys: tuple[str, ...]
    config: dict

    @property
    def is_wan(self) -> bool:
        return self.family.startswith("wan")

    @property
    def image_condition_channels(self) -> int:
        """Channels of ``batch["image_condition"]`` for Wan I2V: 4 mask + 16 first-frame latent = 20."""
        return self.config["in_channels"] - self.config["out_channels"] if self.family == "wan-i2v" else 0

    @property
    def text_dim(self) -> int:
        """Width ``D`` of ``batch["encoder_hidden_states"]`` ``[B, L, D]``."""
        return self.config["text_dim"] if self.is_wan else self.config["cross_attention_dim"]

    @property
    def image_dim(self) -> int | None:
        """Width of ``batch["encoder_hidden_states_image"]`` (CLIP tokens) for Wan I2V, else None."""
        return self.config["image_dim"] if self.family == "wan-i2v" else None

    @property
    def vae_factors(self) -> tuple[int, int]:
        """``(temporal, spatial)`` compression of the family's VAE
        (:data:`pgdpo.train.models.VAE_FACTORS`)."""
        return VAE_FACTORS[self.config["_class_name"]]

    def latent_shape(self, frames: int, height: int, width: int, *,
                     strict: bool = False) -> tuple[int, int, int, int]:
        """Latent ``(C, F', H', W')`` of a ``frames x height x width`` video for this model
        (:func:`pgdpo.train.models.latent_shape` with ``C = out_channels`` and the family's VAE factors)."""
        temporal, spatial = self.vae_factors
        return latent_shape(frames, height, width, channels=self.latent_channels, temporal_factor=temporal,
                            spatial_factor=spatial, strict=strict)

    def input_dtype(self, model: nn.Module) -> torch.dtype:
        """dtype the model's input layer expects (its weight dtype; fp32-kept modules aside)."""
        base = unwrap_model(model)
        return (base.patch_embedding if self.is_wan else base.conv_in).weight.dtype

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The repeated blocks (activation checkpointing / regional compile units), in forward order."""
        base = unwrap_model(model)
        if self.is_wan:
            return list(base.blocks)
        return [*base.down_blocks, base.mid_block, *base.up_blocks]

    def predict(self, model: nn.Module, noisy: Tensor, timesteps: Tensor, batch: dict, *,
                paired: bool = True) -> Tensor:
        """Model output ``[2B, C, F, H, W]`` for noisy latents ``[2B, C, F, H, W]``.

        ``timesteps``: ``[2B]`` in the model's own units (``1000 * sigma`` for Wan, step index for UNet).
        ``batch`` holds the ``[B, ...]`` conditions; they are repeated so chosen and rejected of a pair
        see the same prompt (and image), and cast to ``noisy``'s dtype. ``paired=False``: ``noisy`` is
        ``[B, ...]`` (one half, e.g. supervised fine-tuning on the chosen samples) and the conditions
        are used as they are.
        """
        def both(x: Tensor) -> Tensor:
            return (torch.cat([x, x], dim=0) if paired else x).to(noisy.dtype)

        text = both(batch["encoder_hidden_states"])
        if self.family == "wan-t2v":
            out = model(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=text,
                        return_dict=False)
        elif self.family == "wan-i2v":
            # Wan I2V pipeline layout: cat([noisy 16, mask 4, first-frame latent 16]) along channels.
            hidden = torch.cat([noisy, both(batch["image_condition"])], dim=1)
            out = model(hidden_states=hidden, timestep=timesteps, encoder_hidden_states=text,
                        encoder_hidden_states_image=both(batch["encoder_hidden_states_image"]),
                        return_dict=False)
        else:
            out = model(sample=noisy, timestep=timesteps, encoder_hidden_states=text, return_dict=False)
        return out[0]

    def tokens_per_sample(self, latent_shape) -> int:
        """Sequence length the model processes for one ``[C, F, H, W]`` (or ``[B, C, F, H, W]``) latent.

        Wan: patches, ``(F/pt) (H/ph) (W/pw)``. UNet3D: latent positions ``F H W`` at full resolution.
        """
        f, h, w = (int(s) for s in tuple(latent_shape)[-3:])
        if self.is_wan:
            pt, ph, pw = self.config["patch_size"]
            return (f // pt) * (h // ph) * (w // pw)
        return f * h * w

    def forward_flops_per_sample(self, latent_shape, text_len: int = 512, image_len: int = 257) -> int:
        """Matmul FLOPs (2 per multiply-add) of one forward for one sample, without recompute.

        Wan: closed form over the linear layers and attention (see :func:`wan_forward_flops`).
        UNet3D: counted by ``torch.utils.flop_counter`` on a meta-device copy (no memory, no compute).
        Training (forward + backward) is about 3x this; with full activation checkpointing, 4x.
        """
        from .flops import counted_forward_flops, wan_forward_flops

        if self.is_wan:
            return wan_forward_flops(self.config, latent_shape, text_len=text_len,
                                     image_len=image_len if self.family == "wan-i2v" else 0)
        return counted_forward_flops(self.config, latent_shape, text_len=text_len)


def adapter_for(model_or_config: nn.Module | str | dict) -> ModelAdapter:
    """The :class:`ModelAdapter` of a model (diffusers, or peft / DDP-wrapped), a model name, or a config."""
    if isinstance(model_or_config, nn.Module):
        base = unwrap_model(model_or_config)
        # FSDP2 swaps the class for a subclass (FSDPWanTransformer3DModel): look up the diffusers class.
        class_name = next((c.__name__ for c in type(base).__mro__ if c.__name__ in _CLASSES),
                          type(base).__name__)
        if class_name not in _CLASSES:
            raise TypeError(f"unsupported model class {class_name}; expected one of {list(_CLASSES)}")
        config = {"_class_name": class_name, **dict(base.config)}
    else:
        config = resolve_config(model_or_config)
        class_name = config["_class_name"]
        cls = _model_class(class_name)
        # Fill constructor defaults so partial config dicts work.
        config = {"_class_name": class_name, **dict(cls.extract_init_dict(config)[0]), **config}
    if class_name == WAN_CLASS:
        if config["in_channels"] != config["out_channels"]:
            return ModelAdapter("wan-i2v", config["out_channels"],
                                ("encoder_hidden_states", "image_condition", "encoder_hidden_states_image"),
                                config)
        return ModelAdapter("wan-t2v", config["out_channels"], ("encoder_hidden_states",), config)
    return ModelAdapter("unet3d", config["out_channels"], ("encoder_hidden_states",), config)


def tokens_per_sample(model_or_config, latent_shape) -> int:
    """Tokens per sample of a model, name or config (see :meth:`ModelAdapter.tokens_per_sample`)."""
    return adapter_for(model_or_config).tokens_per_sample(latent_shape)
