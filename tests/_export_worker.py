"""torchrun worker of ``tests/test_train_export.py``'s memory test: load a saved model sharded over every
process (FSDP2, ``pgdpo.train.loading.build_models``), export it with ``export_model`` and report, per
rank, the peak resident memory the export added; then, for comparison, the peak a whole gathered state
dict adds (what an export that gathers everything first would hold), measured the same way."""

import argparse
import json

import safetensors.torch  # noqa: F401 - imported before the measurement
import torch
from _proc import peak_added  # tests/, on a worker's path

from pgdpo.train.config import from_dict
from pgdpo.train.distributed import init_distributed
from pgdpo.train.export import _full, export_model
from pgdpo.train.loading import build_models, pretrained_config


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--path", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--max-shard-size", type=int, required=True)
    p.add_argument("--report", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = from_dict({"model": {"path": args.path, "precision": "fp32"}, "distributed": {"strategy": "fsdp"},
                     "device": "cpu"})
    dist = init_distributed(cfg.distributed, cfg.device)
    model, _ = build_models(cfg, dist, pretrained_config(args.path), with_reference=False)
    export = peak_added(lambda: export_model(model, args.out, dist=dist, max_shard_size=args.max_shard_size))
    dist.barrier()
    whole = peak_added(lambda: [_full(t) for t in model.state_dict().values()])
    sizes = [t.numel() * 4 for t in model.state_dict().values()]
    with open(args.report, "a") as f:
        f.write(json.dumps({"rank": dist.rank, "export": export, "whole": whole, "model_bytes": sum(sizes),
                            "largest_tensor_bytes": max(sizes)}) + "\n")
    dist.shutdown(synchronize=True)


if __name__ == "__main__":
    main()
