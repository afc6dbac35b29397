"""The training stack (needs the ``train`` extra: diffusers, peft, accelerate): models, schedules, the
preference step, diagnostics, datasets, and ``pgdpo train`` (FSDP2 / DDP, atomic DCP checkpoints).

Pieces, one job each: ``models/`` (configs, building and loading, per-family adapters, latent shape, FLOPs,
switches), ``data/`` (the dataset format, writer, loader, tools), ``diffusion`` (schedules and noising),
``step`` (``DiffusionStep``, ``PreferenceStep``), ``sft`` (the SFT step), ``diagnostics`` (likelihood probe,
Gamma, weight ranges, K1/K2 controller), ``gamma`` (Gamma under DDP / FSDP2), ``config`` (typed YAML config,
validated once), ``distributed`` (process group, FSDP2 / DDP wrapping), ``parallel`` (sequence parallel),
``loading`` (meta init, sharding, per-rank sliced safetensors reads), ``export`` (``final/`` and ``pgdpo
export``), ``checkpoint`` (atomic sharded checkpoints, ``--resume latest``), ``metrics`` (metrics.jsonl,
trackers), ``plots``, ``validation`` (samples), ``compare``, ``ema`` (moving reference), ``weighting``
(timestep-aware weights), ``integrity`` (checksums), ``preview`` (latent-to-RGB), ``trainer`` (the loop),
``cli`` (the command).
"""

from .config import ConfigError, TrainConfig, from_dict, load_config
from .trainer import train

__all__ = ["TrainConfig", "ConfigError", "load_config", "from_dict", "train"]

