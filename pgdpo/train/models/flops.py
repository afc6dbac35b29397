"""FLOP counting of one model forward: a closed form for Wan, ``FlopCounterMode`` on meta for any model.

Used for MFU in the training metrics and for step-time estimates in the planner (``pgdpo plan``).
"""

from __future__ import annotations

import torch

from .adapters import adapter_for
from .build import build_model
from .registry import resolve_config


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


def counted_forward_flops(name_or_config: str | dict, latent_shape, text_len: int = 512,
                          image_len: int = 257) -> int:
    """FLOPs of one forward of one sample as counted by ``torch.utils.flop_counter.FlopCounterMode``.

    Runs the model on the meta device: exact for the matmuls/convolutions/attention torch counts, and
    free in memory and time. Used for UNet3D (no closed form) and to check :func:`wan_forward_flops`.
    """
    from torch.utils.flop_counter import FlopCounterMode

    config = resolve_config(name_or_config)
    adapter = adapter_for(config)
    model = build_model(config, device="meta")
    c, f, h, w = adapter.latent_channels, *(int(s) for s in tuple(latent_shape)[-3:])
    with torch.device("meta"):
        batch = {"encoder_hidden_states": torch.empty(1, text_len, adapter.text_dim)}
        if adapter.family == "wan-i2v":
            batch["image_condition"] = torch.empty(1, adapter.image_condition_channels, f, h, w)
            batch["encoder_hidden_states_image"] = torch.empty(1, image_len, adapter.config["image_dim"])
        noisy = torch.empty(2, c, f, h, w)
        t = torch.full((2,), 500.0) if adapter.is_wan else torch.full((2,), 500, dtype=torch.long)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            adapter.predict(model, noisy, t, batch)
    return int(counter.get_total_flops()) // 2  # predict runs the [2B] = 2-sample batch


def model_flops_per_sample(model_or_config, latent_shape, text_len: int = 512, image_len: int = 257) -> int:
    """Forward FLOPs per sample of a model, name or config (:meth:`ModelAdapter.forward_flops_per_sample`)."""
    return adapter_for(model_or_config).forward_flops_per_sample(latent_shape, text_len, image_len)
