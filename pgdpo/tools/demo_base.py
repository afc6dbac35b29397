"""``python -m pgdpo.tools.demo_base``: (re)make the demo's pretrained base model, ``models/demo-base``.

Real preference training starts from a model that already makes videos, and so does the README's demo.
This builds it with our own trainer, in a few minutes on a CPU:

1. a small Wan2.1-shaped transformer (:data:`BASE_ARCH`: 3 blocks, width 64, ~200K parameters, 0.8 MB of
   float32 safetensors), randomly initialised from ``--seed`` and saved as a diffusers folder;
2. ``pgdpo train --config configs/demo-base.yaml`` from it: SFT (``method: sft``) on synthetic clips in
   which an orange blob moves the prompt's way (half of them) or jitters in place (the other half,
   ``data.synth_kind: motion-mix``), so the base model does both;
3. its ``final/`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) copied to ``--out``
   with ``provenance.json`` (the command, config, steps, final loss, validation reward, versions).

``configs/demo.yaml`` (the README's main job) starts from ``models/demo-base``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from ..train.models.families.wan_t2v import TINY_WAN

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "demo-base.yaml"
#: the base model's architecture (diffusers WanTransformer3DModel arguments): the registry's tiny-wan-t2v
#: (2 blocks, width 24, 25K parameters) is too small to draw a blob that stays a blob; this is wider
#: (4 heads x 16) and deeper, still under 1 MB as float32 safetensors
BASE_ARCH = {k: v for k, v in TINY_WAN.items() if k != "_class_name"} | {
    "num_attention_heads": 4, "attention_head_dim": 16,  # rope: 8 / 4 / 4 for t / h / w
    "freq_dim": 64, "ffn_dim": 128, "num_layers": 3}


def init_model(folder: str, seed: int) -> str:
    """Save a randomly initialised (seeded) :data:`BASE_ARCH` transformer as a diffusers folder."""
    import torch
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    WanTransformer3DModel(**BASE_ARCH).save_pretrained(folder)
    return folder


def build(out: str, run_dir: str, *, seed: int = 0, overrides: list[tuple[str, object]] = ()) -> dict:
    """Train the base model (``configs/demo-base.yaml`` from a fresh :func:`init_model`) and copy it to
    ``out``; returns the provenance record."""
    import diffusers
    import torch

    from ..train.config import load_config
    from ..train.trainer import train

    init = init_model(os.path.join(run_dir, "init"), seed)
    config = load_config(CONFIG, [("output_dir", run_dir), ("seed", seed), ("model.path", init),
                                  ("checkpoint.overwrite", True), *overrides])
    summary = train(config)
    os.makedirs(out, exist_ok=True)
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        shutil.copyfile(os.path.join(summary["final"], name), os.path.join(out, name))
    record = {
        "made_by": "python -m pgdpo.tools.demo_base " + " ".join(sys.argv[1:]),
        "config": os.path.relpath(CONFIG, ROOT), "overrides": [list(o) for o in overrides], "seed": seed,
        "method": config.method.name, "steps": summary["steps"], "data": config.data.synth_kind,
        "pairs": config.data.synth_pairs, "final_loss_tail_mean": summary.get("tail_mean", {}).get("loss"),
        "validation_reward": summary.get("validation_reward"), "train_wall_s": round(summary["wall_s"], 1),
        "torch": torch.__version__, "diffusers": diffusers.__version__,
    }
    with open(os.path.join(out, "provenance.json"), "w") as f:
        json.dump(record, f, indent=1)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pgdpo.tools.demo_base", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "models" / "demo-base"),
                        help="where the model folder goes (default: the repository's models/demo-base)")
    parser.add_argument("--run-dir", default="runs/demo-base",
                        help="the SFT run's output folder (checkpoints, metrics, samples)")
    parser.add_argument("--seed", type=int, default=0, help="init and training seed")
    parser.add_argument("--max-steps", type=int, default=None, help="override train.max_steps")
    args, extra = parser.parse_known_args(argv)
    from ..train.cli import parse_overrides

    overrides = [("train.max_steps", args.max_steps)] if args.max_steps else []
    overrides += parse_overrides(extra)  # any other --section.key value of configs/demo-base.yaml
    record = build(args.out, args.run_dir, seed=args.seed, overrides=overrides)
    print(f"wrote {args.out}: {record['steps']} SFT steps, final loss {record['final_loss_tail_mean']:.4f}, "
          f"validation reward {record['validation_reward']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
