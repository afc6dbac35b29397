"""Fast latent-to-RGB previews: a fixed linear projection of the latent channels, no VAE.

``rgb = latent^T F + b`` per pixel, then ``(rgb + 1) / 2`` clamped to ``[0, 1]``: what latent previews
commonly do (ComfyUI's ``latent_rgb_factors``). The factors act on the normalised latents the models see
(for Wan2.1 after ``(z - latents_mean) / latents_std``; for Stable-Diffusion-family VAEs after
``z * scaling_factor``), which is what the datasets store.

- 16 channels: Wan2.1's public latent-RGB factors and bias (ComfyUI ``latent_formats.Wan21``).
- 4 channels: Stable Diffusion 1.x factors (ComfyUI ``latent_formats.SD15``), for VideoCrafter2-style UNets.
- other channel counts: the first three channels, as a rough picture.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: [16, 3] Wan2.1 latent -> RGB (in [-1, 1]) factors and their [3] bias
WAN21_LATENT_RGB_FACTORS = [
    [-0.1299, -0.1692, 0.2932],
    [0.0671, 0.0406, 0.0442],
    [0.3568, 0.2548, 0.1747],
    [0.0372, 0.2344, 0.1420],
    [0.0313, 0.0189, -0.0328],
    [0.0296, -0.0956, -0.0665],
    [-0.3477, -0.4059, -0.2925],
    [0.0166, 0.1902, 0.1975],
    [-0.0412, 0.0267, -0.1364],
    [-0.1293, 0.0740, 0.1636],
    [0.0680, 0.3019, 0.1128],
    [0.0032, 0.0581, 0.0639],
    [-0.1251, 0.0927, 0.1699],
    [0.0060, -0.0633, 0.0005],
    [0.3477, 0.2275, 0.2950],
    [0.1984, 0.0913, 0.1861],
]
WAN21_LATENT_RGB_BIAS = [-0.1835, -0.0868, -0.3360]
#: [4, 3] Stable Diffusion 1.x latent -> RGB factors (no bias)
SD15_LATENT_RGB_FACTORS = [
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
]


def latent_rgb_factors(channels: int) -> tuple[Tensor, Tensor]:
    """``([C, 3] factors, [3] bias)`` of the preview for ``channels`` latent channels."""
    if channels == 16:
        return torch.tensor(WAN21_LATENT_RGB_FACTORS), torch.tensor(WAN21_LATENT_RGB_BIAS)
    if channels == 4:
        return torch.tensor(SD15_LATENT_RGB_FACTORS), torch.zeros(3)
    factors = torch.zeros(channels, 3)
    for i in range(min(3, channels)):
        factors[i, i] = 1.0
    return factors, torch.zeros(3)


def latent_to_rgb(latents: Tensor) -> Tensor:
    """``[..., C, F, H, W]`` latents -> ``[..., F, H, W, 3]`` RGB in ``[0, 1]`` (float32)."""
    factors, bias = latent_rgb_factors(latents.shape[-4])
    x = latents.detach().float().cpu().movedim(-4, -1)  # [..., F, H, W, C]
    rgb = x @ factors + bias
    return ((rgb + 1.0) / 2.0).clamp_(0.0, 1.0)


def rgb_to_latent(rgb: Tensor, channels: int) -> Tensor:
    """The smallest-norm ``[C]`` latent vector whose preview is ``rgb`` (``[3]`` in ``[0, 1]``).

    Used to draw synthetic latents that look like something in the preview (the demo's coloured blob).
    """
    factors, bias = latent_rgb_factors(channels)
    target = rgb.float() * 2.0 - 1.0 - bias
    return factors @ torch.linalg.solve(factors.T @ factors, target)
