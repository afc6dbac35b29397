"""Building and loading models: random init from a registry config, or a local pretrained diffusers folder.

Also the one home of model-folder discovery (:func:`find_model_folder`): a model folder holds
``config.json`` itself, a pipeline folder holds it in its ``transformer/`` or ``unet/`` subfolder.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from .precision import cast_weights
from .registry import MODEL_SUBFOLDERS, _model_class, resolve_config


def find_model_folder(path: str | os.PathLike, *, what: str = "model folder",
                      subfolders: tuple[str, ...] = MODEL_SUBFOLDERS) -> str:
    """The folder with the model's ``config.json``: ``path`` itself, or one of its ``subfolders`` (default
    ``transformer/`` / ``unet/``: a pipeline folder; ``("vae",)`` for a pipeline's VAE). Raises
    ``FileNotFoundError`` naming ``what`` (e.g. ``"model.path"``) and ``path`` when none has one; nothing is
    fetched from a hub."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: {path!r} is not a local directory (only local folders are loaded; "
                                "nothing is fetched from a hub)")
    for folder in (path, *(os.path.join(path, sub) for sub in subfolders)):
        if os.path.isfile(os.path.join(folder, "config.json")):
            return folder
    subs = " or ".join(f"{sub}/" for sub in subfolders)
    raise FileNotFoundError(f"{what}: no config.json in {path!r} nor in its {subs} subfolder")


def read_model_config(path: str | os.PathLike, *, what: str = "model folder") -> dict:
    """The ``config.json`` of the diffusers model at ``path`` (a model or pipeline folder)."""
    file = os.path.join(find_model_folder(path, what=what), "config.json")
    try:
        with open(file) as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what}: {file} is not valid JSON ({exc})") from None


def build_model(name_or_config: str | dict, *, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, seed: int | None = None) -> nn.Module:
    """Randomly initialised diffusers model from a name in ``MODEL_CONFIGS`` or a config dict.

    ``device="meta"`` allocates nothing: use it for exact parameter counts and FLOP counting of the
    real 1.3B/14B models. ``seed`` makes the random init reproducible without touching the global RNG.
    In low-precision ``dtype`` the modules in the class's ``_keep_in_fp32_modules`` stay fp32.
    """
    config = resolve_config(name_or_config)
    cls = _model_class(config.pop("_class_name"))
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        # Build directly on the target device: no CPU copy of a 14B model, and meta allocates nothing.
        with torch.device(device):
            model = cls.from_config(config)
    return cast_weights(model, dtype)


def load_model(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu") -> nn.Module:
    """Load a diffusers model from a local folder (``config.json`` + weights); never touches a hub.

    ``path`` is the model folder itself or a pipeline folder holding a ``transformer/`` or ``unet/``
    subfolder (:func:`find_model_folder`). The class comes from ``_class_name`` in ``config.json``.
    """
    folder = find_model_folder(path, what="load_model")
    cls = _model_class(read_model_config(folder, what="load_model").get("_class_name"))
    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    model = cls.from_pretrained(folder, **kwargs)
    return model.to(device)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in model.parameters())
