"""Wan2.1 image-to-video: the T2V transformer with 36 input channels and CLIP image tokens.

The input is diffusers' Wan I2V pipeline layout: ``cat([noisy 16, mask 4, first-frame latent 16])`` along
channels (``in_channels - out_channels = 20`` channels of ``batch["image_condition"]``), and the CLIP
tokens ``batch["encoder_hidden_states_image"]`` ``[B, Li, image_dim]`` projected to the model width.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from .wan_t2v import TINY_WAN, WAN21_COMMON, WanT2V


class WanI2V(WanT2V):
    """Wan2.1 image-to-video (a Wan config whose ``in_channels`` differ from its ``out_channels``)."""

    family: ClassVar[str] = "wan-i2v"
    task: ClassVar[str] = "i2v"
    pipeline_class: ClassVar[str | None] = "WanImageToVideoPipeline"
    condition_keys: ClassVar[tuple[str, ...]] = (
        "encoder_hidden_states", "image_condition", "encoder_hidden_states_image")
    named_configs: ClassVar[dict[str, dict]] = {
        # 36 input channels; CLIP tokens of width image_dim are projected to the model width
        # (24 = 2 heads x 12), which is what the added k/v projections read (added_kv_proj_dim = width).
        "tiny-wan-i2v": {**TINY_WAN, "in_channels": 36, "image_dim": 24, "added_kv_proj_dim": 24},
        "wan2.1-i2v-14b": {**WAN21_COMMON, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40,
                           "in_channels": 36, "image_dim": 1280, "added_kv_proj_dim": 5120},
    }

    @classmethod
    def matches(cls, config: dict) -> bool:
        return config.get("_class_name") == cls.class_name and config["in_channels"] != config["out_channels"]

    @property
    def image_dim(self) -> int:
        return self.config["image_dim"]

    @property
    def image_condition_channels(self) -> int:
        """4 mask + 16 first-frame latent = 20 (``in_channels - out_channels``)."""
        return self.config["in_channels"] - self.config["out_channels"]

    def condition_shapes(self, batch: int, frames: int, height: int, width: int, *, text_len: int,
                         image_len: int = 0) -> dict[str, tuple[int, ...]]:
        return {**super().condition_shapes(batch, frames, height, width, text_len=text_len),
                "image_condition": (batch, self.image_condition_channels, frames, height, width),
                "encoder_hidden_states_image": (batch, image_len, self.image_dim)}

    def synthetic_extras(self) -> dict:
        # The real CLIP image encoder gives 257 tokens of 1280; a tiny model gets a few tokens.
        return {"image_len": 257 if self.image_dim >= 1280 else 8, "image_dim": self.image_dim}

    def predict(self, model: nn.Module, noisy: Tensor, timesteps: Tensor, batch: dict, *,
                paired: bool = True) -> Tensor:
        hidden = torch.cat([noisy, self._both(batch["image_condition"], noisy, paired)], dim=1)
        return model(hidden_states=hidden, timestep=timesteps,
                     encoder_hidden_states=self._both(batch["encoder_hidden_states"], noisy, paired),
                     encoder_hidden_states_image=self._both(batch["encoder_hidden_states_image"], noisy,
                                                            paired),
                     return_dict=False)[0]
