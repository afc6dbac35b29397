"""Latent geometry: how a video's frames x height x width become the latent ``[C, F', H', W']`` a model sees.

The one home of the formula ``F' = (F - 1) / t + 1``, ``H' = H / s``, ``W' = W / s`` with the VAE's
temporal factor ``t`` and spatial factor ``s`` (``t = 1``: a per-frame image VAE, ``F' = F``), used by the
trainer (synthetic datasets, the dataset-size note), the planner and the encoder.
"""

from __future__ import annotations


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def latent_frames(frames: int, temporal_factor: int, *, strict: bool = False) -> int:
    """Latent frames ``(frames - 1) // t + 1`` of ``frames`` video frames (``t = 1``: ``frames``).

    ``strict``: raise unless ``frames = 1 + k t`` (a causal video VAE encodes the first frame alone,
    then ``t`` frames per latent frame); otherwise the trailing frames that do not fill one are dropped.
    """
    _positive_int(frames, "frames")
    t = _positive_int(temporal_factor, "temporal_factor")
    if strict and (frames - 1) % t:
        raise ValueError(f"frames must be 1 + a multiple of the VAE's temporal factor {t} (4k+1 frames for "
                         f"the Wan VAE: 81, 49, 33, ...), got {frames}")
    return (frames - 1) // t + 1


def latent_shape(frames: int, height: int, width: int, *, channels: int, temporal_factor: int,
                 spatial_factor: int, strict: bool = False) -> tuple[int, int, int, int]:
    """The latent ``(C, F', H', W')`` of a ``frames x height x width`` video.

    ``channels``: the latent channels (the model's ``out_channels``); ``temporal_factor`` /
    ``spatial_factor``: the VAE's compression (a family's ``vae_factors``, or a loaded VAE's config).
    ``strict``: raise a ``ValueError`` naming ``frames`` / ``height`` / ``width`` when the VAE would not
    encode the size exactly (instead of flooring, as the encoder does not).
    """
    _positive_int(channels, "channels")
    s = _positive_int(spatial_factor, "spatial_factor")
    for name, value in (("height", height), ("width", width)):
        _positive_int(value, name)
        if strict and value % s:
            raise ValueError(f"{name} must be a multiple of the VAE's spatial factor {s}, got {value}")
    return (channels, latent_frames(frames, temporal_factor, strict=strict), height // s, width // s)
