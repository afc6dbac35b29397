"""pgdpo.train.prepare: one ordered preparation of a model, the trained one and a frozen reference alike."""

from __future__ import annotations

import torch
from torch import nn

from pgdpo.train.models import build_model, keep_fp32_names, spec_for
from pgdpo.train.prepare import PrepareOptions, prepare


def test_prepare_applies_dtype_dropout_and_checkpointing_to_the_trained_model_only():
    policy, reference = build_model("tiny-unet3d", seed=0), build_model("tiny-unet3d", seed=0)
    active = [m for m in policy.modules() if isinstance(m, nn.Dropout) and m.p > 0]
    assert active  # diffusers' UNet3D temporal convolutions carry dropout 0.1
    options = PrepareOptions(weights_dtype=torch.bfloat16, checkpoint_every=2)
    prepared = prepare(policy, options)
    frozen = prepare(reference, options, trainable=False)
    blocks = spec_for(policy).blocks(policy)
    assert prepared.module is policy and prepared.checkpointed_blocks == list(range(0, len(blocks), 2))
    assert frozen.module is reference and frozen.checkpointed_blocks == []
    for model in (policy, reference):
        assert all(m.p == 0 for m in model.modules() if isinstance(m, nn.Dropout))
        kept = set(keep_fp32_names(model))
        for name, p in model.named_parameters():
            assert p.dtype == (torch.float32 if name in kept else torch.bfloat16), name

