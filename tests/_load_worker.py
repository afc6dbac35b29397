"""torchrun worker of ``tests/test_train_loading.py``: load policy and reference with
``pgdpo.train.loading.build_models`` (FSDP2 over every process) and write what they hold to ``--out``:
the gathered full state dicts (rank 0), each rank's buffers (rotary tables included) and a forward.
"""

import argparse
import json
import os

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from pgdpo.train.config import from_dict
from pgdpo.train.distributed import init_distributed, leave_finished_worker
from pgdpo.train.loading import build_models, pretrained_config
from pgdpo.train.models import adapter_for
from pgdpo.train.step import adapters_disabled


def probe_inputs(adapter, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = {"encoder_hidden_states": torch.randn(1, 7, adapter.text_dim, generator=g)}
    noisy = torch.randn(2, adapter.latent_channels, 3, 8, 8, generator=g)
    return noisy, torch.tensor([250.0, 750.0]), batch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--path", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--cases", required=True, help="JSON list of [lora_rank, reference]")
    args = p.parse_args()
    torch.set_num_threads(1)
    dist = None
    for i, (lora_rank, reference) in enumerate(json.loads(args.cases)):
        cfg = from_dict({"model": {"path": args.path, "lora_rank": lora_rank, "precision": "fp32"},
                         "method": {"reference": reference}, "distributed": {"strategy": "fsdp"},
                         "device": "cpu"})
        dist = dist or init_distributed(cfg.distributed, cfg.device)
        model, ref = build_models(cfg, dist, pretrained_config(args.path), with_reference=reference == "copy")
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        states = {"policy": get_model_state_dict(model, options=opts)}
        if ref is not None:
            states["reference"] = get_model_state_dict(ref, options=opts)
        noisy, t, batch = probe_inputs(adapter_for(model))
        with torch.no_grad():
            outputs = {"policy": adapter_for(model).predict(model, noisy, t, batch)}
            if ref is not None:
                outputs["reference"] = adapter_for(ref).predict(ref, noisy, t, batch)
            else:
                with adapters_disabled(model):
                    outputs["reference"] = adapter_for(model).predict(model, noisy, t, batch)
        prefix = os.path.join(args.out, f"case{i}")
        if dist.rank == 0:
            for name, sd in states.items():
                save_file({k: v.contiguous() for k, v in sd.items()}, f"{prefix}-{name}.safetensors")
        buffers = {f"policy.{k}": v for k, v in model.named_buffers()}
        if ref is not None:
            buffers.update({f"reference.{k}": v for k, v in ref.named_buffers()})
        buffers.update({f"output.{k}": v for k, v in outputs.items()})
        save_file({k: v.detach().contiguous() for k, v in buffers.items()},
                  f"{prefix}-rank{dist.rank}.safetensors")
    dist.shutdown(synchronize=True)  # rank 0 may still be writing: no rank tears gloo down under it


if __name__ == "__main__":
    main()
    leave_finished_worker()  # as `python -m pgdpo` does under torchrun
