"""The model config registry: named Wan2.1 / UNet3D configs and the diffusers class each one builds.

The models are diffusers' own classes, configured (never subclassed):

- ``WanTransformer3DModel`` -- Wan2.1 text-to-video (16 latent channels) and image-to-video (36 input
  channels = 16 noisy + 4 mask + 16 first-frame latent channels, plus CLIP image tokens),
  as in diffusers' Wan I2V pipeline.
- ``UNet3DConditionModel`` -- VideoCrafter2 / ModelScope-style video UNet on ``[B, C, F, H, W]`` latents.
"""

from __future__ import annotations

import copy

WAN_CLASS = "WanTransformer3DModel"
UNET3D_CLASS = "UNet3DConditionModel"
_CLASSES = (WAN_CLASS, UNET3D_CLASS)

# Shared fields of the real Wan2.1 transformers (diffusers' Wan-AI/Wan2.1-*-Diffusers transformer configs).
_WAN21_COMMON = {
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
_TINY_WAN = {
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

#: Named model configs. ``_class_name`` picks the diffusers class; the rest are its constructor arguments.
MODEL_CONFIGS: dict[str, dict] = {
    "tiny-wan-t2v": dict(_TINY_WAN),
    # I2V: 36 input channels; CLIP tokens of width image_dim are projected to the model width
    # (24 = 2 heads x 12), which is what the added k/v projections read (added_kv_proj_dim = width).
    "tiny-wan-i2v": {**_TINY_WAN, "in_channels": 36, "image_dim": 24, "added_kv_proj_dim": 24},
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
    "wan2.1-t2v-1.3b": {**_WAN21_COMMON, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30},
    "wan2.1-t2v-14b": {**_WAN21_COMMON, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40},
    "wan2.1-i2v-14b": {**_WAN21_COMMON, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40,
                       "in_channels": 36, "image_dim": 1280, "added_kv_proj_dim": 5120},
}


def _model_class(name: str):
    import diffusers

    if name not in _CLASSES:
        raise ValueError(f"model config '_class_name' must be one of {list(_CLASSES)}, got {name!r}")
    return getattr(diffusers, name)


def resolve_config(name_or_config: str | dict) -> dict:
    """A copy of the named config (a key of ``MODEL_CONFIGS``) or of a config dict with ``_class_name``."""
    if isinstance(name_or_config, str):
        if name_or_config not in MODEL_CONFIGS:
            raise ValueError(f"unknown model name {name_or_config!r}; expected one of "
                             f"{sorted(MODEL_CONFIGS)} or a config dict with a '_class_name' key")
        return copy.deepcopy(MODEL_CONFIGS[name_or_config])
    if isinstance(name_or_config, dict):
        if "_class_name" not in name_or_config:
            raise ValueError(f"model config dict needs a '_class_name' key (one of {list(_CLASSES)}); "
                             f"got keys {sorted(name_or_config)}")
        _model_class(name_or_config["_class_name"])
        return copy.deepcopy(dict(name_or_config))
    raise TypeError("name_or_config must be a model name or a config dict, got "
                    f"{type(name_or_config).__name__}")
