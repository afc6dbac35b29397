"""Video diffusion backbones: named configs, construction, loading, and per-family call adapters.

The models are diffusers' own classes, configured (never subclassed):

- ``WanTransformer3DModel`` -- Wan2.1 text-to-video (16 latent channels) and image-to-video (36 input
  channels = 16 noisy + 4 mask + 16 first-frame latent channels, plus CLIP image tokens),
  as in diffusers' Wan I2V pipeline.
- ``UNet3DConditionModel`` -- VideoCrafter2 / ModelScope-style video UNet on ``[B, C, F, H, W]`` latents.

A :class:`ModelAdapter` knows how one family is called: which batch keys it needs, how the ``[2B]``
model input is assembled from the noisy latents and the ``[B]`` conditions, how many tokens a sample
is, and what one forward costs in FLOPs (for MFU and the memory/throughput planner).
"""

from __future__ import annotations

import copy
import functools
import json
import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

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


def cast_weights(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast to ``dtype`` but keep the modules diffusers marks fp32-only in fp32, as from_pretrained does.

    Uses ``nn.Module.to`` directly: diffusers' ``ModelMixin.to`` warns on any dtype cast because it
    cannot honour ``_keep_in_fp32_modules`` itself; here they are restored right after.
    """
    if dtype == torch.float32:
        return model  # diffusers initialises in fp32 already
    nn.Module.to(model, dtype)
    keep = set(keep_fp32_names(model))
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name in keep:
                tensor.data = tensor.data.float()
    return model


def keep_fp32_names(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers diffusers keeps in fp32 (``_keep_in_fp32_modules``).

    Matched by name component, as ``from_pretrained`` does; this also catches bare Parameters such as
    Wan's per-block ``scale_shift_table``.
    """
    keep = getattr(unwrap_model(model), "_keep_in_fp32_modules", None) or []
    return [name for name, _ in [*model.named_parameters(), *model.named_buffers()]
            if any(k in name.split(".") for k in keep)]


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
    subfolder. The class comes from ``_class_name`` in ``config.json``.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"load_model: {path!r} is not a local directory (only local folders are "
                                "loaded; nothing is fetched from a hub)")
    folder = path
    if not os.path.isfile(os.path.join(folder, "config.json")):
        for sub in ("transformer", "unet"):
            if os.path.isfile(os.path.join(path, sub, "config.json")):
                folder = os.path.join(path, sub)
                break
        else:
            raise FileNotFoundError(f"load_model: no config.json in {path!r} nor in its transformer/ or "
                                    "unet/ subfolder")
    with open(os.path.join(folder, "config.json")) as f:
        class_name = json.load(f).get("_class_name")
    cls = _model_class(class_name)
    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    model = cls.from_pretrained(folder, **kwargs)
    return model.to(device)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The diffusers model inside a peft ``PeftModel`` wrapper (or ``model`` itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------- adapters


@dataclass(frozen=True)
class ModelAdapter:
    """How to call one model family.

    Attributes:
        family: ``"wan-t2v"``, ``"wan-i2v"`` or ``"unet3d"``.
        latent_channels: channels ``C`` of the latents ``[B, C, F, H, W]`` (and of the model's output).
        condition_keys: batch keys with per-pair conditions (each ``[B, ...]``, shared by chosen/rejected).
        integer_timesteps: the model takes DDPM step indices (UNet) rather than ``1000 * sigma`` (Wan).
    """

    family: str
    latent_channels: int
    condition_keys: tuple[str, ...]
    config: dict

    @property
    def is_wan(self) -> bool:
        return self.family.startswith("wan")

    @property
    def image_condition_channels(self) -> int:
        """Channels of ``batch["image_condition"]`` for Wan I2V: 4 mask + 16 first-frame latent = 20."""
        return self.config["in_channels"] - self.config["out_channels"] if self.family == "wan-i2v" else 0

    @property
    def text_dim(self) -> int:
        """Width ``D`` of ``batch["encoder_hidden_states"]`` ``[B, L, D]``."""
        return self.config["text_dim"] if self.is_wan else self.config["cross_attention_dim"]

    @property
    def image_dim(self) -> int | None:
        """Width of ``batch["encoder_hidden_states_image"]`` (CLIP tokens) for Wan I2V, else None."""
        return self.config["image_dim"] if self.family == "wan-i2v" else None

    def input_dtype(self, model: nn.Module) -> torch.dtype:
        """dtype the model's input layer expects (its weight dtype; fp32-kept modules aside)."""
        base = unwrap_model(model)
        return (base.patch_embedding if self.is_wan else base.conv_in).weight.dtype

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The repeated blocks (activation checkpointing / regional compile units), in forward order."""
        base = unwrap_model(model)
        if self.is_wan:
            return list(base.blocks)
        return [*base.down_blocks, base.mid_block, *base.up_blocks]

    def predict(self, model: nn.Module, noisy: Tensor, timesteps: Tensor, batch: dict, *,
                paired: bool = True) -> Tensor:
        """Model output ``[2B, C, F, H, W]`` for noisy latents ``[2B, C, F, H, W]``.

        ``timesteps``: ``[2B]`` in the model's own units (``1000 * sigma`` for Wan, step index for UNet).
        ``batch`` holds the ``[B, ...]`` conditions; they are repeated so chosen and rejected of a pair
        see the same prompt (and image), and cast to ``noisy``'s dtype. ``paired=False``: ``noisy`` is
        ``[B, ...]`` (one half, e.g. supervised fine-tuning on the chosen samples) and the conditions
        are used as they are.
        """
        def both(x: Tensor) -> Tensor:
            return (torch.cat([x, x], dim=0) if paired else x).to(noisy.dtype)

        text = both(batch["encoder_hidden_states"])
        if self.family == "wan-t2v":
            out = model(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=text,
                        return_dict=False)
        elif self.family == "wan-i2v":
            # Wan I2V pipeline layout: cat([noisy 16, mask 4, first-frame latent 16]) along channels.
            hidden = torch.cat([noisy, both(batch["image_condition"])], dim=1)
            out = model(hidden_states=hidden, timestep=timesteps, encoder_hidden_states=text,
                        encoder_hidden_states_image=both(batch["encoder_hidden_states_image"]),
                        return_dict=False)
        else:
            out = model(sample=noisy, timestep=timesteps, encoder_hidden_states=text, return_dict=False)
        return out[0]

    def tokens_per_sample(self, latent_shape) -> int:
        """Sequence length the model processes for one ``[C, F, H, W]`` (or ``[B, C, F, H, W]``) latent.

        Wan: patches, ``(F/pt) (H/ph) (W/pw)``. UNet3D: latent positions ``F H W`` at full resolution.
        """
        f, h, w = (int(s) for s in tuple(latent_shape)[-3:])
        if self.is_wan:
            pt, ph, pw = self.config["patch_size"]
            return (f // pt) * (h // ph) * (w // pw)
        return f * h * w

    def forward_flops_per_sample(self, latent_shape, text_len: int = 512, image_len: int = 257) -> int:
        """Matmul FLOPs (2 per multiply-add) of one forward for one sample, without recompute.

        Wan: closed form over the linear layers and attention (see :func:`wan_forward_flops`).
        UNet3D: counted by ``torch.utils.flop_counter`` on a meta-device copy (no memory, no compute).
        Training (forward + backward) is about 3x this; with full activation checkpointing, 4x.
        """
        if self.is_wan:
            return wan_forward_flops(self.config, latent_shape, text_len=text_len,
                                     image_len=image_len if self.family == "wan-i2v" else 0)
        return counted_forward_flops(self.config, latent_shape, text_len=text_len)


def adapter_for(model_or_config: nn.Module | str | dict) -> ModelAdapter:
    """The :class:`ModelAdapter` of a model (diffusers, or wrapped by peft), a model name, or a config."""
    if isinstance(model_or_config, nn.Module):
        base = unwrap_model(model_or_config)
        # FSDP2 swaps the class for a subclass (FSDPWanTransformer3DModel): look up the diffusers class.
        class_name = next((c.__name__ for c in type(base).__mro__ if c.__name__ in _CLASSES),
                          type(base).__name__)
        if class_name not in _CLASSES:
            raise TypeError(f"unsupported model class {class_name}; expected one of {list(_CLASSES)}")
        config = {"_class_name": class_name, **dict(base.config)}
    else:
        config = resolve_config(model_or_config)
        class_name = config["_class_name"]
        cls = _model_class(class_name)
        # Fill constructor defaults so partial config dicts work.
        config = {"_class_name": class_name, **dict(cls.extract_init_dict(config)[0]), **config}
    if class_name == WAN_CLASS:
        if config["in_channels"] != config["out_channels"]:
            return ModelAdapter("wan-i2v", config["out_channels"],
                                ("encoder_hidden_states", "image_condition", "encoder_hidden_states_image"),
                                config)
        return ModelAdapter("wan-t2v", config["out_channels"], ("encoder_hidden_states",), config)
    return ModelAdapter("unet3d", config["out_channels"], ("encoder_hidden_states",), config)


# ---------------------------------------------------------------------------------------------- FLOPs


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
    text_dim = adapter.config["text_dim"] if adapter.is_wan else adapter.config["cross_attention_dim"]
    with torch.device("meta"):
        batch = {"encoder_hidden_states": torch.empty(1, text_len, text_dim)}
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


def tokens_per_sample(model_or_config, latent_shape) -> int:
    """Tokens per sample of a model, name or config (see :meth:`ModelAdapter.tokens_per_sample`)."""
    return adapter_for(model_or_config).tokens_per_sample(latent_shape)


# ------------------------------------------------------------------------------ checkpointing / compile


def _checkpointed_block_forward(block: nn.Module, *args, **kwargs):
    """The class ``forward`` of ``block``, recomputed in the backward (non-reentrant checkpoint)."""
    from torch.utils.checkpoint import checkpoint

    forward = type(block).forward.__get__(block)
    if torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)  # reference / eval passes keep no activations anyway


def _selective_checkpoint(module: nn.Module, *args):
    """diffusers ``gradient_checkpointing_func`` that recomputes only blocks marked for it."""
    from torch.utils.checkpoint import checkpoint

    if getattr(module, "_pgdpo_checkpoint", False):
        return checkpoint(module.__call__, *args, use_reentrant=False)
    return module(*args)


def enable_checkpointing(model: nn.Module, every: int = 1) -> list[int]:
    """Activation checkpointing of every ``every``-th repeated block (blocks 0, k, 2k, ...).

    Wan (diffusers supports it): ``enable_gradient_checkpointing``, with a checkpoint function that
    recomputes only the marked blocks when ``every > 1``. UNet3D (diffusers' UNet3D blocks have no
    checkpointing): the chosen down/mid/up blocks get an instance ``forward`` that runs the class
    forward under ``torch.utils.checkpoint``. Both survive ``copy.deepcopy`` (no closures over modules).
    Gradients are unchanged; memory drops, compute rises by about one forward of the chosen blocks.
    Returns the indices of the checkpointed blocks.
    """
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"checkpointing every must be an int >= 1 (1 = every block), got {every!r}")
    disable_checkpointing(model)
    base = unwrap_model(model)
    blocks = adapter_for(model).blocks(model)
    chosen = list(range(0, len(blocks), every))
    if getattr(base, "_supports_gradient_checkpointing", False):
        if every == 1:
            base.enable_gradient_checkpointing()
        else:
            for i in chosen:
                blocks[i]._pgdpo_checkpoint = True
            base.enable_gradient_checkpointing(_selective_checkpoint)
    else:
        for i in chosen:
            blocks[i].forward = functools.partial(_checkpointed_block_forward, blocks[i])
    return chosen


def disable_checkpointing(model: nn.Module) -> None:
    """Undo :func:`enable_checkpointing`."""
    base = unwrap_model(model)
    if getattr(base, "_supports_gradient_checkpointing", False):
        base.disable_gradient_checkpointing()
    for block in adapter_for(model).blocks(model):
        block.__dict__.pop("_pgdpo_checkpoint", None)
        forward = block.__dict__.get("forward")
        if isinstance(forward, functools.partial) and forward.func is _checkpointed_block_forward:
            del block.__dict__["forward"]  # back to the class's forward


def disable_dropout(model: nn.Module) -> int:
    """Set ``p = 0`` on every ``nn.Dropout`` of ``model`` (as TRL's DPO trainer does by default).

    Why: the policy runs in train mode and the reference in eval mode, so any active dropout makes
    ``d_w`` / ``d_l`` compare a randomly thinned network with a full one: a bias in the margin and a loss
    that changes from call to call with the same generator. diffusers' ``UNet3DConditionModel`` builds
    its temporal convolutions with dropout 0.1 (hard-coded); it is harmless only while their last
    convolution is still at its zero init. Returns the number of dropout layers that were active.
    """
    active = 0
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            module.p = 0.0
            active += 1
    return active


def compile_blocks(model: nn.Module, **compile_kwargs) -> int:
    """Regional ``torch.compile``: compile each repeated block in place, not the whole model.

    Uses diffusers' ``compile_repeated_blocks`` where the class declares its blocks (Wan), else
    ``nn.Module.compile`` on each down/mid/up block (UNet3D). Identical blocks share one compiled
    graph, so compile time is that of one block. Returns the number of blocks compiled.
    """
    base = unwrap_model(model)
    blocks = adapter_for(model).blocks(model)
    if getattr(base, "_repeated_blocks", None):
        base.compile_repeated_blocks(**compile_kwargs)
    else:
        for block in blocks:
            block.compile(**compile_kwargs)
    return len(blocks)
