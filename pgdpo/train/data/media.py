"""Read videos and images from simple local files (no decoders, no network).

Videos (``[F, H, W, 3]`` RGB frames):

- ``.npy``: a numpy array, ``uint8`` in 0..255 or floating in 0..1 (read with ``allow_pickle=False``);
- ``.safetensors``: one tensor (or the tensor named ``video``/``frames``), same layout and ranges;
- a folder of image files (``.png``/``.jpg``/``.jpeg``/``.webp``/``.bmp``), one frame each, in name order.

Decode other containers (mp4, ...) to one of these first, e.g. ``ffmpeg -i x.mp4 frames/%05d.png``.
Images (the first frame for image-to-video): ``.npy``/``.safetensors`` ``[H, W, 3]`` as above, or an
image file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _load_array(path: Path, what: str) -> np.ndarray:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as exc:  # object arrays need pickle: refused
            raise ValueError(f"{path}: cannot read {what} without pickle ({exc})") from None
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except SafetensorError as exc:
            raise ValueError(f"{path}: corrupt safetensors file ({exc})") from None
        named = [key for key in ("video", "frames", "image") if key in tensors]
        if not named and len(tensors) != 1:
            raise ValueError(f"{path}: expected one tensor or one named 'video'/'frames'/'image', found "
                             f"{sorted(tensors)}")
        tensor = tensors[named[0]] if named else next(iter(tensors.values()))
        return tensor.float().numpy() if tensor.is_floating_point() else tensor.numpy()
    if suffix in IMAGE_SUFFIXES:
        from PIL import Image

        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    raise ValueError(f"{path}: unsupported {what} file type {suffix!r} (use .npy, .safetensors, "
                     f"an image file, or for videos a folder of frames)")


def _to_unit_float(array: np.ndarray, path: Path) -> torch.Tensor:
    """uint8 0..255 or float 0..1 -> float32 tensor in [-1, 1]."""
    if array.dtype == np.uint8:
        tensor = torch.from_numpy(np.ascontiguousarray(array)).float() / 255.0
    elif np.issubdtype(array.dtype, np.floating):
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: has NaN or Inf values")
        if tensor.min() < -1e-3 or tensor.max() > 1 + 1e-3:
            raise ValueError(f"{path}: floating frames must be in [0, 1], got range "
                             f"[{tensor.min():.3g}, {tensor.max():.3g}] (store uint8 0..255 or floats 0..1)")
    else:
        raise ValueError(f"{path}: frames must be uint8 or floating, got {array.dtype}")
    return tensor.clamp(0, 1) * 2 - 1


def read_video(path: str | os.PathLike) -> torch.Tensor:
    """A video as float32 ``[3, F, H, W]`` in ``[-1, 1]``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: video file not found")
    if path.is_dir():
        frames = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not frames:
            raise ValueError(f"{path}: folder has no image frames ({', '.join(IMAGE_SUFFIXES)})")
        arrays = [_load_array(p, "frame") for p in frames]
        if len({a.shape for a in arrays}) != 1:
            raise ValueError(f"{path}: frames have different sizes {sorted({a.shape for a in arrays})}")
        array = np.stack(arrays)
    else:
        array = _load_array(path, "video")
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"{path}: a video must be [frames, height, width, 3] RGB, "
                         f"got shape {list(array.shape)}")
    return _to_unit_float(array, path).permute(3, 0, 1, 2).contiguous()


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """An image as float32 ``[3, H, W]`` in ``[-1, 1]``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file not found")
    array = _load_array(path, "image")
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"{path}: an image must be [height, width, 3] RGB, got shape {list(array.shape)}")
    return _to_unit_float(array, path).permute(2, 0, 1).contiguous()


def fit_video(video: torch.Tensor, *, frames: int | None = None, height: int | None = None,
              width: int | None = None) -> torch.Tensor:
    """Keep the first ``frames`` frames and resize (bilinear, antialiased) to ``height x width``."""
    if frames is not None:
        if video.shape[1] < frames:
            raise ValueError(f"video has {video.shape[1]} frames, fewer than the requested {frames}")
        video = video[:, :frames]
    if height is not None and width is not None and tuple(video.shape[-2:]) != (height, width):
        video = F.interpolate(video.transpose(0, 1), size=(height, width), mode="bilinear",
                              antialias=True, align_corners=False).transpose(0, 1).clamp(-1, 1)
    return video.contiguous()
