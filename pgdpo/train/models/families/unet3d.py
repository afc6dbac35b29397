"""UNet3D: diffusers' ``UNet3DConditionModel`` (VideoCrafter2 / ModelScope) on ``[B, C, F, H, W]`` latents of
Stable Diffusion's image VAE applied frame by frame."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from ..spec import ModelSpec
from ..wrappers import unwrap_model

UNET3D_CLASS = "UNet3DConditionModel"


class UNet3D(ModelSpec):
    """Video UNet: ``model(sample, timestep, encoder_hidden_states)``, integer DDPM timesteps, every latent
    position a token at full resolution, FLOPs counted on meta (no closed form)."""

    family: ClassVar[str] = "unet3d"
    class_name: ClassVar[str] = UNET3D_CLASS
    subfolder: ClassVar[str] = "unet"
    # Stable Diffusion's AutoencoderKL frame by frame: 4 blocks -> 2 ** 3 = 8 in space, 1 in time.
    vae_factors: ClassVar[tuple[int, int]] = (1, 8)
    text_dim_key: ClassVar[str] = "cross_attention_dim"
    named_configs: ClassVar[dict[str, dict]] = {
        "tiny-unet3d": {
            "_class_name": UNET3D_CLASS,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ("CrossAttnDownBlock3D", "DownBlock3D"),
            "up_block_types": ("UpBlock3D", "CrossAttnUpBlock3D"),
            "block_out_channels": (16, 32),
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "cross_attention_dim": 32,
            "attention_head_dim": 8,
        },
    }

    @property
    def downsampling(self) -> int:
        """Spatial downsampling of the latent inside the UNet: ``2 ** (levels - 1)``."""
        return 2 ** (len(self.config["block_out_channels"]) - 1)

    # ---- geometry
    def pixel_multiples(self) -> tuple[int, int]:
        _, spatial = self.vae_factors
        return spatial * self.downsampling, spatial * self.downsampling

    def latent_grid_problem(self, f: int, h: int, w: int, what: str) -> str | None:
        factor = self.downsampling
        if h % factor or w % factor:
            return (f"{what} latent H, W = {h}, {w} is not divisible by the UNet's downsampling factor "
                    f"{factor}")
        return None  # (a UNet pads odd sizes itself: nothing is a hard requirement of a batch)

    def tokens_per_sample(self, latent_shape) -> int:
        """Latent positions ``F H W`` at full resolution."""
        f, h, w = (int(s) for s in tuple(latent_shape)[-3:])
        return f * h * w

    # ---- the call
    def model_timesteps(self, timesteps: Tensor) -> Tensor:
        """Integer timesteps (diffusers' UNets embed a step index)."""
        return timesteps.long()

    def input_layer(self, model: nn.Module) -> nn.Module:
        return unwrap_model(model).conv_in

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        base = unwrap_model(model)
        return [*base.down_blocks, base.mid_block, *base.up_blocks]

    def predict(self, model: nn.Module, noisy: Tensor, timesteps: Tensor, batch: dict, *,
                paired: bool = True) -> Tensor:
        text = self._both(batch["encoder_hidden_states"], noisy, paired)
        return model(sample=noisy, timestep=timesteps, encoder_hidden_states=text, return_dict=False)[0]

    # ---- files
    def save_lora(self, folder: str, layers: dict, metadata: dict) -> None:
        from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

        StableDiffusionLoraLoaderMixin.save_lora_weights(folder, unet_lora_layers=layers,
                                                         unet_lora_adapter_metadata=metadata)
