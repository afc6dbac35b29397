"""Attention backend selection for training, through diffusers' attention dispatcher.

diffusers (>= 0.35) routes every attention call of its models through ``attention_dispatch``;
``ModelMixin.set_attention_backend(name)`` picks the kernel. This module only adds what training
needs on top: backends without a backward are refused, hub-downloaded kernels are refused (no
network at run time), and a missing package is reported by its pip name before diffusers fails
deep inside a forward.
"""

from __future__ import annotations

import importlib.util

from torch import nn

from .wrappers import unwrap_model

#: Backends usable for training -> the pip package they need (None: PyTorch's own SDPA kernels).
TRAINING_BACKENDS: dict[str, str | None] = {
    "native": None,  # torch SDPA, dispatcher picks the kernel
    "_native_flash": None,  # torch SDPA restricted to its flash kernel (the H200 choice without flash-attn)
    "_native_efficient": None,
    "_native_cudnn": None,
    "_native_math": None,
    "flash": "flash-attn",  # flash-attn 2
    "flash_varlen": "flash-attn",
    "xformers": "xformers",
}
_IMPORT_NAMES = {"flash-attn": "flash_attn", "xformers": "xformers"}

#: Backends diffusers registers without a backward pass (or with one that raises): inference only.
NO_BACKWARD = {
    "_flash_3": "diffusers' flash-attn 3 backend has no backward pass",
    "_flash_varlen_3": "diffusers' flash-attn 3 backend has no backward pass",
    "sage": "SageAttention has no backward pass in diffusers",
    "sage_varlen": "SageAttention has no backward pass in diffusers",
    "_native_npu": "the NPU fusion attention backward is not implemented in diffusers",
}


def check_training_backend(backend: str) -> None:
    """Raise a clear error unless ``backend`` can run a training step here."""
    if not isinstance(backend, str):
        raise TypeError(f"attention_backend must be a string, got {type(backend).__name__}")
    name = backend.lower()
    if name in NO_BACKWARD:
        raise ValueError(f"attention_backend={backend!r} cannot be used for training: {NO_BACKWARD[name]}; "
                         f"use one of {sorted(TRAINING_BACKENDS)}")
    if name not in TRAINING_BACKENDS:
        why = ("it downloads its kernel from the Hugging Face Hub, and nothing is fetched at run time"
               if name.endswith("_hub") or "_hub" in name else "it is not a training backend pgdpo supports")
        raise ValueError(f"attention_backend={backend!r} is not allowed: {why}; "
                         f"use one of {sorted(TRAINING_BACKENDS)}")
    package = TRAINING_BACKENDS[name]
    if package is not None and importlib.util.find_spec(_IMPORT_NAMES[package]) is None:
        raise ImportError(f"attention_backend={backend!r} needs the '{package}' package, which is not "
                          f"installed (`pip install {package}`); on GPUs without it use '_native_flash' "
                          "(PyTorch SDPA's flash kernel)")


def set_attention_backend(model: nn.Module, backend: str) -> None:
    """Check ``backend`` for training, then set it on ``model`` (a diffusers model, or peft / DDP-wrapped)."""
    check_training_backend(backend)
    base = unwrap_model(model)
    if not hasattr(base, "set_attention_backend"):
        raise TypeError(f"{type(base).__name__} has no set_attention_backend: attention backends need a "
                        "diffusers ModelMixin (diffusers >= 0.35)")
    name = backend.lower()
    processors = [m.processor for m in base.modules() if getattr(m, "processor", None) is not None]
    if name != "native" and not any(hasattr(p, "_attention_backend") for p in processors):
        # e.g. UNet3DConditionModel: its AttnProcessor2_0 calls torch SDPA directly, so the dispatcher
        # setting would be silently ignored.
        raise ValueError(f"attention_backend={backend!r} has no effect on {type(base).__name__}: its "
                         "attention processors call PyTorch SDPA directly instead of diffusers' "
                         "dispatcher; use 'native'")
    # diffusers also makes the backend the process-wide default; keep it scoped to this model (its
    # processors carry it), so other models in the process are not switched behind their back. The
    # registry is private diffusers API: where it is missing, the process-wide switch stays.
    from diffusers.models import attention_dispatch

    registry = getattr(attention_dispatch, "_AttentionBackendRegistry", None)
    active = getattr(registry, "_active_backend", None)
    try:
        base.set_attention_backend(name)
    finally:
        if active is not None and hasattr(registry, "set_active_backend"):
            registry.set_active_backend(active)
