"""The contract of a model family: everything the training stack needs to know about one kind of model.

A :class:`ModelSpec` is one family (Wan T2V, Wan I2V, UNet3D: one file each under
:mod:`~pgdpo.train.models.families`) bound to one model's config. It owns what differs between families,
so that no other room asks which family it holds:

- loading: the diffusers class (:attr:`class_name`, :meth:`model_class`), the pipeline subfolder that holds
  the denoiser (:attr:`subfolder`), building on any device (:meth:`build`);
- the call: :meth:`predict` (how the ``[2B]`` input is assembled), :attr:`condition_keys` and
  :meth:`condition_shapes` (the per-pair conditions), :meth:`model_timesteps`, :meth:`input_layer`;
- geometry: :attr:`vae_factors`, :meth:`latent_shape`, :meth:`latent_grid_problem`,
  :meth:`tokens_per_sample`;
- cost: :meth:`forward_flops_per_sample` (closed form or counted on meta), :meth:`transformer_dims`;
- structure: :meth:`blocks` (activation checkpointing, regional compile and FSDP2 units);
- what it supports: :attr:`supports_sequence_parallel`, the data :attr:`task`;
- files: :meth:`save_lora` (the diffusers LoRA layout of the family); :meth:`synthetic_extras` (what a
  synthetic dataset needs beyond latents and text).

A new family is one file with a subclass and one line in :data:`pgdpo.train.models.registry.FAMILIES`
(in the manner of finetrainers' ``ModelSpecification`` and torchtitan's ``ModelSpec``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from .latents import latent_shape
from .precision import cast_weights
from .wrappers import unwrap_model


@dataclass(frozen=True)
class ModelSpec:
    """One model family, bound to one model's ``config`` (constructor defaults filled in, ``_class_name``).

    Class attributes (the family's facts):
        family: the family's name, as the logs print it (``"wan-t2v"``, ``"wan-i2v"``, ``"unet3d"``).
        class_name: the diffusers class the family is built from.
        subfolder: the folder of a diffusers pipeline that holds the denoiser (``transformer``, ``unet``).
        task: the kind of data it trains on (``"t2v"`` or ``"i2v"``, as in ``dataset.json``).
        condition_keys: batch keys with per-pair conditions (each ``[B, ...]``, shared by chosen/rejected).
        vae_factors: ``(temporal, spatial)`` compression of the VAE the family is trained with.
        text_dim_key: the config key of the text embedding width.
        supports_sequence_parallel: whether Ulysses sequence parallelism is implemented for it.
        named_configs: the family's named configs (tiny test models and the real ones).
    """

    config: dict

    family: ClassVar[str]
    class_name: ClassVar[str]
    subfolder: ClassVar[str]
    task: ClassVar[str] = "t2v"
    condition_keys: ClassVar[tuple[str, ...]] = ("encoder_hidden_states",)
    vae_factors: ClassVar[tuple[int, int]]
    text_dim_key: ClassVar[str]
    supports_sequence_parallel: ClassVar[bool] = False
    #: the diffusers pipeline that samples videos with this family's model (``pgdpo data generate`` /
    #: ``pgdpo eval``); None where pgdpo does not drive one
    pipeline_class: ClassVar[str | None] = None
    named_configs: ClassVar[dict[str, dict]] = {}

    # ------------------------------------------------------------------------------------------ identity

    @classmethod
    def matches(cls, config: dict) -> bool:
        """Whether a full config (``_class_name`` and constructor arguments) is of this family."""
        return config.get("_class_name") == cls.class_name

    @classmethod
    def model_class(cls) -> type[nn.Module]:
        """The diffusers class (diffusers is imported here: importing pgdpo.train.models needs torch only)."""
        import diffusers

        return getattr(diffusers, cls.class_name)

    def build(self, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
        """A randomly initialised model of this config on ``device`` (``"meta"``: nothing allocated), with
        the fp32-only modules kept in fp32 in a low-precision ``dtype``."""
        init = {k: v for k, v in self.config.items() if not k.startswith("_")}
        with torch.device(device):
            model = self.model_class().from_config(init)
        return cast_weights(model, dtype)

    # ------------------------------------------------------------------------------------------ shapes

    @property
    def latent_channels(self) -> int:
        """Channels ``C`` of the latents ``[B, C, F, H, W]`` (and of the model's output)."""
        return self.config["out_channels"]

    @property
    def text_dim(self) -> int:
        """Width ``D`` of ``batch["encoder_hidden_states"]`` ``[B, L, D]``."""
        return self.config[self.text_dim_key]

    @property
    def image_dim(self) -> int | None:
        """Width of ``batch["encoder_hidden_states_image"]`` (image tokens), or None without them."""
        return None

    @property
    def image_condition_channels(self) -> int:
        """Channels of ``batch["image_condition"]`` (0 without one)."""
        return 0

    def condition_shapes(self, batch: int, frames: int, height: int, width: int, *, text_len: int,
                         image_len: int = 0) -> dict[str, tuple[int, ...]]:
        """Shape of each condition of :attr:`condition_keys` for ``batch`` pairs of latent grid
        ``frames x height x width`` (``text_len`` text tokens, ``image_len`` image tokens)."""
        return {"encoder_hidden_states": (batch, text_len, self.text_dim)}

    def latent_shape(self, frames: int, height: int, width: int, *,
                     strict: bool = False) -> tuple[int, int, int, int]:
        """Latent ``(C, F', H', W')`` of a ``frames x height x width`` video for this model
        (:func:`pgdpo.train.models.latent_shape` with ``C = out_channels`` and the family's VAE factors)."""
        temporal, spatial = self.vae_factors
        return latent_shape(frames, height, width, channels=self.latent_channels, temporal_factor=temporal,
                            spatial_factor=spatial, strict=strict)

    def pixel_multiples(self) -> tuple[int, int]:
        """``(height, width)`` multiples a video must have for its latent grid to fit the model whole."""
        raise NotImplementedError

    def latent_grid_problem(self, f: int, h: int, w: int, what: str) -> str | None:
        """Why a latent grid ``(F, H, W)`` does not fit the model, or None; ``what`` names the latent."""
        raise NotImplementedError

    def batch_grid_problem(self, f: int, h: int, w: int, what: str) -> str | None:
        """Why a batch's latent grid cannot run at all (stricter families only), or None."""
        return None

    def tokens_per_sample(self, latent_shape) -> int:
        """Sequence length the model processes for one ``[C, F, H, W]`` (or ``[B, C, F, H, W]``) latent."""
        raise NotImplementedError

    def synthetic_extras(self) -> dict:
        """Keyword arguments a synthetic dataset of this family needs beyond latents and text
        (:func:`pgdpo.train.data.synth.synth_dataset`)."""
        return {}

    # ------------------------------------------------------------------------------------------ the call

    def model_timesteps(self, timesteps: Tensor) -> Tensor:
        """``timesteps`` as the model's forward takes them (by default as the schedule gives them)."""
        return timesteps

    def input_layer(self, model: nn.Module) -> nn.Module:
        """The model's input layer (its weight dtype is the dtype the model's input must have)."""
        raise NotImplementedError

    def input_dtype(self, model: nn.Module) -> torch.dtype:
        """dtype the model's input layer expects (its weight dtype; fp32-kept modules aside)."""
        return self.input_layer(unwrap_model(model)).weight.dtype

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The repeated blocks (activation checkpointing / regional compile / FSDP2 units), in forward
        order."""
        raise NotImplementedError

    def predict(self, model: nn.Module, noisy: Tensor, timesteps: Tensor, batch: dict, *,
                paired: bool = True) -> Tensor:
        """Model output ``[2B, C, F, H, W]`` for noisy latents ``[2B, C, F, H, W]``.

        ``timesteps``: ``[2B]`` in the model's own units (``1000 * sigma`` for flow matching, a step
        index for DDPM). ``batch`` holds the ``[B, ...]`` conditions; they are repeated so chosen and
        rejected of a pair see the same prompt (and image), and cast to ``noisy``'s dtype.
        ``paired=False``: ``noisy`` is ``[B, ...]`` (one half, e.g. supervised fine-tuning on the chosen
        samples) and the conditions are used as they are.
        """
        raise NotImplementedError

    @staticmethod
    def _both(x: Tensor, like: Tensor, paired: bool) -> Tensor:
        """A ``[B, ...]`` condition for a ``[2B]`` input (``paired``), in ``like``'s dtype."""
        return (torch.cat([x, x], dim=0) if paired else x).to(like.dtype)

    # ------------------------------------------------------------------------------------------ cost

    def forward_flops_per_sample(self, latent_shape, text_len: int = 512, image_len: int = 257) -> int:
        """Matmul FLOPs (2 per multiply-add) of one forward for one sample, without recompute.

        By default counted by ``torch.utils.flop_counter`` on a meta-device copy (no memory, no compute);
        a family with a closed form overrides it. Training (forward + backward) is about 3x this; with
        full activation checkpointing, 4x.
        """
        return self.counted_forward_flops(latent_shape, text_len=text_len, image_len=image_len)

    def counted_forward_flops(self, latent_shape, text_len: int = 512, image_len: int = 257) -> int:
        """FLOPs of one forward of one sample as counted by ``torch.utils.flop_counter.FlopCounterMode``.

        Runs the model on the meta device: exact for the matmuls/convolutions/attention torch counts, and
        free in memory and time.
        """
        model = self.build(device="meta")
        f, h, w = (int(s) for s in tuple(latent_shape)[-3:])
        with torch.device("meta"):
            shapes = self.condition_shapes(1, f, h, w, text_len=text_len, image_len=image_len)
            batch = {key: torch.empty(shape) for key, shape in shapes.items()}
            noisy = torch.empty(2, self.latent_channels, f, h, w)
            t = self.model_timesteps(torch.full((2,), 500.0))
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                self.predict(model, noisy, t, batch)
        return int(counter.get_total_flops()) // 2  # predict runs the [2B] = 2-sample batch

    def transformer_dims(self) -> dict | None:
        """``{"dim", "ffn_dim", "heads"}`` of a transformer family (the planner's memory model), or None
        for a family the planner does not model."""
        return None

    @property
    def attention_heads(self) -> int | None:
        """Attention heads of each block (what sequence parallelism splits), or None."""
        return None

    # ------------------------------------------------------------------------------------------ files

    def save_lora(self, folder: str, layers: dict, metadata: dict) -> None:
        """Write LoRA ``layers`` (peft state dict) in the family's diffusers LoRA layout to ``folder``."""
        raise NotImplementedError
