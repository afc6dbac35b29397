"""``pgdpo train``: preference training of video diffusion models (FSDP2 / DDP, atomic DCP checkpoints).

``config`` (typed YAML config, validated once), ``distributed`` (process group, FSDP2 / DDP wrapping),
``loading`` (meta init, sharding, per-rank sliced safetensors reads), ``export`` (``final/`` and ``pgdpo
export``: diffusers layout or LoRA weights), ``checkpoint`` (atomic sharded checkpoints, ``--resume
latest``), ``metrics`` (metrics.jsonl, trackers), ``plots``,
``sft`` (the SFT baseline step), ``ema`` (moving reference), ``weighting`` (timestep-aware weights),
``trainer`` (the loop), ``cli`` (the command).
"""

from .config import ConfigError, TrainConfig, from_dict, load_config

__all__ = ["TrainConfig", "ConfigError", "load_config", "from_dict", "train"]


def train(config: TrainConfig) -> dict:
    """Run training for ``config`` (collective under torchrun); returns the end-of-run summary."""
    from .trainer import train as _train

    return _train(config)
