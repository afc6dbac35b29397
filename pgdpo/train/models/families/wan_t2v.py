"""Wan2.1 text-to-video: diffusers' ``WanTransformer3DModel`` on 16-channel latents of the Wan VAE.

Also the closed form of its forward FLOPs (:func:`wan_forward_flops`) and the shared fields of the real
Wan2.1 configs, which the image-to-video family (:mod:`.wan_i2v`) builds on.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from ..spec import ModelSpec
from ..wrappers import unwrap_model

WAN_CLASS = "WanTransformer3DModel"

# Shared fields of the real Wan2.1 transformers (diffusers' Wan-AI/Wan2.1-*-Diffusers transformer configs).
WAN21_COMMON = {
    "_class_name": WAN_CLASS,
    "patch_size": (1, 2, 2),
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
}

# Tiny random-init models for tests and CPU smoke runs: same code paths as the real ones, ~25-400K params.
TINY_WAN = {
    "_class_name": WAN_CLASS,
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 12,  # rope splits head_dim into t/h/w parts: 12 -> 4/4/4
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 32,
    "freq_dim": 32,
    "ffn_dim": 48,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 64,
}


def wan_forward_flops(config: dict, latent_shape, text_len: int = 512, image_len: int = 0) -> int:
    """Closed-form matmul FLOPs of one ``WanTransformer3DModel`` forward for one sample.

    With width ``d = heads * head_dim``, ``N`` patch tokens, ``L`` text and ``Li`` image tokens:
    patch embed ``2 N (C_in P) d``; time embed ``2 (freq d + d^2 + 6 d^2)``; text embed
    ``2 L (text_dim d + d^2)``; image embed ``2 Li (image_dim^2 + image_dim d)``; per block:
    self-attention projections ``8 N d^2`` + scores/values ``4 N^2 d``, cross-attention ``4 N d^2`` +
    ``4 L d^2`` + ``4 N L d`` (+ ``4 Li added_kv d + 4 N Li d`` for I2V), FFN ``4 N d ffn``;
    output projection ``2 N d (C_out P)``. Norms, RoPE and elementwise ops are not counted.
    """
    f, h, w = (int(s) for s in tuple(latent_shape)[-3:])
    pt, ph, pw = config["patch_size"]
    patch = pt * ph * pw
    n = (f // pt) * (h // ph) * (w // pw)
    d = config["num_attention_heads"] * config["attention_head_dim"]
    L, Li = int(text_len), int(image_len) if config.get("image_dim") else 0
    flops = 2 * n * config["in_channels"] * patch * d
    flops += 2 * (config["freq_dim"] * d + d * d + 6 * d * d)
    flops += 2 * L * (config["text_dim"] * d + d * d)
    if Li:
        flops += 2 * Li * (config["image_dim"] ** 2 + config["image_dim"] * d)
    block = 8 * n * d * d + 4 * n * n * d
    block += 4 * n * d * d + 4 * L * d * d + 4 * n * L * d
    if Li:
        block += 4 * Li * (config["added_kv_proj_dim"] or d) * d + 4 * n * Li * d
    block += 4 * n * d * config["ffn_dim"]
    flops += config["num_layers"] * block
    flops += 2 * n * d * config["out_channels"] * patch
    return int(flops)


class WanT2V(ModelSpec):
    """Wan2.1 text-to-video: ``model(hidden_states, timestep, encoder_hidden_states)``, patches of
    ``patch_size`` as tokens, timesteps ``1000 * sigma`` in float, Ulysses sequence parallelism through
    diffusers' ``_cp_plan``."""

    family: ClassVar[str] = "wan-t2v"
    class_name: ClassVar[str] = WAN_CLASS
    subfolder: ClassVar[str] = "transformer"
    pipeline_class: ClassVar[str | None] = "WanPipeline"
    # AutoencoderKLWan: scale_factor_temporal = 4, scale_factor_spatial = 8, causal in time so
    # 4k + 1 frames -> k + 1 latent frames.
    vae_factors: ClassVar[tuple[int, int]] = (4, 8)
    text_dim_key: ClassVar[str] = "text_dim"
    supports_sequence_parallel: ClassVar[bool] = True
    named_configs: ClassVar[dict[str, dict]] = {
        "tiny-wan-t2v": dict(TINY_WAN),
        "wan2.1-t2v-1.3b": {**WAN21_COMMON, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30},
        "wan2.1-t2v-14b": {**WAN21_COMMON, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40},
    }

    @classmethod
    def matches(cls, config: dict) -> bool:
        return super().matches(config) and config["in_channels"] == config["out_channels"]

    # ---- geometry
    def pixel_multiples(self) -> tuple[int, int]:
        _, spatial = self.vae_factors
        _, ph, pw = self.config["patch_size"]
        return spatial * ph, spatial * pw

    def latent_grid_problem(self, f: int, h: int, w: int, what: str) -> str | None:
        pt, ph, pw = self.config["patch_size"]
        if f % pt or h % ph or w % pw:
            return (f"{what} latent size (F, H, W) = {(f, h, w)} is not divisible by the model's patch size "
                    f"{(pt, ph, pw)}")
        return None

    def batch_grid_problem(self, f: int, h: int, w: int, what: str) -> str | None:
        return self.latent_grid_problem(f, h, w, what)  # patching needs whole patches

    def tokens_per_sample(self, latent_shape) -> int:
        """Patches ``(F/pt) (H/ph) (W/pw)`` of a ``[..., F, H, W]`` latent."""
        f, h, w = (int(s) for s in tuple(latent_shape)[-3:])
        pt, ph, pw = self.config["patch_size"]
        return (f // pt) * (h // ph) * (w // pw)

    # ---- the call
    def input_layer(self, model: nn.Module) -> nn.Module:
        return unwrap_model(model).patch_embedding

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(unwrap_model(model).blocks)

    def predict(self, model: nn.Module, noisy: Tensor, timesteps: Tensor, batch: dict, *,
                paired: bool = True) -> Tensor:
        text = self._both(batch["encoder_hidden_states"], noisy, paired)
        return model(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=text,
                     return_dict=False)[0]

    # ---- cost
    def forward_flops_per_sample(self, latent_shape, text_len: int = 512, image_len: int = 257) -> int:
        """Closed form over the linear layers and attention (:func:`wan_forward_flops`)."""
        return wan_forward_flops(self.config, latent_shape, text_len=text_len,
                                 image_len=image_len if self.image_dim else 0)

    def transformer_dims(self) -> dict:
        c = self.config
        return {"dim": c["num_attention_heads"] * c["attention_head_dim"], "ffn_dim": c["ffn_dim"],
                "heads": c["num_attention_heads"]}

    @property
    def attention_heads(self) -> int:
        return self.config["num_attention_heads"]

    # ---- files
    def save_lora(self, folder: str, layers: dict, metadata: dict) -> None:
        from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

        WanLoraLoaderMixin.save_lora_weights(folder, transformer_lora_layers=layers,
                                             transformer_lora_adapter_metadata=metadata)
