"""Deprecated path of :mod:`pgdpo.models.attention` (attention backend selection for training).

Kept so that ``from pgdpo.attention import set_attention_backend`` keeps working for one release; new
code imports from ``pgdpo.models``.
"""

from .models.attention import NO_BACKWARD, TRAINING_BACKENDS, check_training_backend, set_attention_backend

__all__ = ["NO_BACKWARD", "TRAINING_BACKENDS", "check_training_backend", "set_attention_backend"]
