"""Stack per-pair tensors into the batch format ``PreferenceStep`` consumes.

Batch format (shared with :class:`pgdpo.train.step.PreferenceStep`)::

    {"chosen": [B, C, F, H, W], "rejected": [B, C, F, H, W], "encoder_hidden_states": [B, L, D]}
    # image-to-video adds
    {"image_condition": [B, 4 + C, F, H, W], "encoder_hidden_states_image": [B, Li, Di]}
"""

from __future__ import annotations

import torch

from .format import I2V_FIELDS, T2V_FIELDS


def collate(samples: list[dict[str, torch.Tensor]], *, dtype: torch.dtype | None = None,
            pin_memory: bool = False) -> dict[str, torch.Tensor]:
    """Stack a list of per-pair dicts (tensors without a batch dimension) into one batch dict.

    Every sample must have the same fields (the t2v or the i2v set) and the same shapes; the error names
    the sample and field that differ. ``dtype`` casts floating tensors; ``pin_memory`` pins the result
    (for asynchronous host-to-GPU copies; ignored without CUDA).
    """
    if not samples:
        raise ValueError("collate: empty list of samples")
    names = tuple(samples[0])
    if set(names) not in (set(T2V_FIELDS), set(I2V_FIELDS)):
        raise ValueError(f"collate: sample 0 has fields {sorted(names)}; expected {list(T2V_FIELDS)} (t2v) "
                         f"or {list(I2V_FIELDS)} (i2v)")
    batch = {}
    for name in (n for n in I2V_FIELDS if n in names):
        first = samples[0][name]
        for i, sample in enumerate(samples):
            if set(sample) != set(names):
                raise ValueError(f"collate: sample {i} has fields {sorted(sample)}, "
                                 f"sample 0 has {sorted(names)}")
            if sample[name].shape != first.shape:
                raise ValueError(f"collate: sample {i} field {name!r} has shape {tuple(sample[name].shape)}, "
                                 f"sample 0 has {tuple(first.shape)}")
        stacked = torch.stack([sample[name] for sample in samples])
        if dtype is not None and stacked.is_floating_point():
            stacked = stacked.to(dtype)
        batch[name] = stacked.pin_memory() if pin_memory and torch.cuda.is_available() else stacked
    return batch
