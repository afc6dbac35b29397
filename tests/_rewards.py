"""Reward / metric hooks of the pipeline tests (``pgdpo data score --reward tests._rewards:brightness``):
the signature of ``validation.reward``, ``fn(videos [N, F, H, W, 3] in [0, 1], prompts) -> N scores``."""

import torch


def brightness(videos: torch.Tensor, prompts: list) -> torch.Tensor:
    """Mean pixel value of each video."""
    assert videos.ndim == 5 and videos.shape[-1] == 3 and len(prompts) == videos.shape[0]
    return videos.double().mean(dim=(1, 2, 3, 4))


def redness(videos: torch.Tensor, prompts: list) -> list[float]:
    """Mean red minus mean blue (a list, as a hook may return)."""
    return [float(v[..., 0].double().mean() - v[..., 2].double().mean()) for v in videos]


def one_score_too_few(videos: torch.Tensor, prompts: list) -> list[float]:
    return [0.0] * (videos.shape[0] - 1)
