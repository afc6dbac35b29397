"""torchrun worker of ``tests/test_train_export.py``: ``pgdpo train`` (arguments as for the command),
then the trained policy's output on a fixed probe, written by rank 0 to ``<output_dir>/probe.safetensors``
(and a check that the parameters FSDP2 leaves replicated are equal on every rank)."""

import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from _load_worker import probe_inputs  # noqa: E402

from pgdpo.train.cli import resolve  # noqa: E402
from pgdpo.train.distributed import leave_finished_worker  # noqa: E402
from pgdpo.train.models import adapter_for  # noqa: E402
from pgdpo.train.trainer import Trainer  # noqa: E402


def main():
    torch.set_num_threads(1)
    cfg, _ = resolve(sys.argv[1:])
    trainer = Trainer(cfg)
    try:
        trainer.train()
        model = trainer.model
        replicated = [p.detach() for p in model.parameters() if not hasattr(p, "placements")]
        if dist.is_initialized() and replicated:
            flat = torch.cat([p.flatten() for p in replicated])
            copies = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
            dist.all_gather(copies, flat)
            assert all(torch.equal(c, flat) for c in copies), "replicated parameters differ between ranks"
        noisy, t, batch = probe_inputs(adapter_for(model), seed=1)
        with torch.no_grad():
            out = adapter_for(model).predict(model.eval(), noisy, t, batch)
        if trainer.is_main:
            save_file({"output": out.contiguous(), "replicated": torch.tensor(len(replicated))},
                      os.path.join(cfg.output_dir, "probe.safetensors"))
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
    leave_finished_worker()  # as `python -m pgdpo` does under torchrun
