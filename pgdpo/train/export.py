"""A trained model users can load: diffusers ``save_pretrained`` layout, or diffusers LoRA weights.

- Full fine-tuning: ``config.json`` and ``diffusion_pytorch_model[-0000k-of-0000n].safetensors`` (+ the
  ``.index.json`` when sharded), what ``WanTransformer3DModel.from_pretrained(folder)`` reads.
- LoRA: ``pytorch_lora_weights.safetensors`` written by diffusers' ``save_lora_weights`` (keys prefixed
  ``transformer.`` / ``unet.``, the adapter config in its metadata), which
  ``model.load_lora_adapter(folder)`` and ``pipe.load_lora_weights(folder)`` read.

Written shard by shard: each tensor is gathered (``DTensor.full_tensor``, collective) and moved to rank
0's CPU, which writes a file whenever ``max_shard_size`` bytes are pending; no rank ever holds more than
its shards plus one output file's worth. Everything goes to ``<out>.tmp`` first, renamed when complete.

``pgdpo export --checkpoint DIR --out DIR`` does the same for any checkpoint of a run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)

from .checkpoint import CheckpointError, is_complete, list_checkpoints
from .config import ConfigError, load_config
from .data.format import DataError
from .distributed import init_distributed
from .layout import model_architecture
from .loading import INDEX_NAME, WEIGHTS_NAME, _filled_tensors, build_models, file_key
from .models import spec_for, unwrap_model
from .step import has_adapters

#: bytes per output safetensors file (diffusers' save_pretrained default is 10 GB; 5 GB as the Hub's)
MAX_SHARD_SIZE = 5 * 1024 ** 3


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on CPU (collective for a DTensor: every rank calls it, in the same order)."""
    t = tensor.detach()
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.cpu()


def _diffusers_config(model: nn.Module) -> dict:
    base = unwrap_model(model)
    config = json.loads(base.to_json_string())
    # FSDP2 swaps the class for FSDP<Name>: record the diffusers class from_pretrained must build.
    config["_class_name"] = spec_for(base).class_name
    return config


def _plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Keys grouped into consecutive files of at most ``max_bytes`` (a larger tensor gets a file alone)."""
    shards, size = [[]], 0
    for key, n in sizes:
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
    return shards


def _write_pretrained(model: nn.Module, tmp: str, is_main: bool, max_shard_size: int,
                      dtype: torch.dtype | None) -> None:
    from safetensors.torch import save_file

    tensors = [(file_key(n), t) for n, t in _filled_tensors(model)]
    if any(".lora_" in k for k, _ in tensors):
        raise ValueError("export: a LoRA model is exported as LoRA weights")

    def out_dtype(t):
        return dtype if dtype is not None and t.is_floating_point() else t.dtype

    sizes = [(k, t.numel() * torch.empty((), dtype=out_dtype(t)).element_size()) for k, t in tensors]
    plan = _plan_shards(sizes, max_shard_size)
    n = len(plan)
    names = [WEIGHTS_NAME] if n == 1 else [f"diffusion_pytorch_model-{i:05d}-of-{n:05d}.safetensors"
                                          for i in range(1, n + 1)]
    by_key = dict(tensors)
    weight_map, total = {}, 0
    for name, keys in zip(names, plan):
        pending = {}
        for key in keys:
            t = _full(by_key[key])
            if is_main:
                pending[key] = t.to(out_dtype(t)).contiguous()
                weight_map[key] = name
                total += pending[key].numel() * pending[key].element_size()
        if is_main:
            save_file(pending, os.path.join(tmp, name), metadata={"format": "pt"})
    if is_main:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(_diffusers_config(model), f, indent=2, sort_keys=True)
        if len(names) > 1:
            with open(os.path.join(tmp, INDEX_NAME), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2,
                          sort_keys=True)


def _write_lora(model: nn.Module, tmp: str, is_main: bool) -> None:
    from peft.utils import get_peft_model_state_dict

    base = unwrap_model(model)
    gathered = {}
    for name, t in base.named_parameters():
        if ".lora_" in name:
            full = _full(t)
            if is_main:
                gathered[name] = full.contiguous()
    if not is_main:
        return
    layers = get_peft_model_state_dict(base, state_dict=gathered, adapter_name="default")
    metadata = base.peft_config["default"].to_dict()
    spec_for(base).save_lora(tmp, layers, metadata)  # the family's diffusers LoRA layout
    with open(os.path.join(tmp, "config.json"), "w") as f:  # the base architecture the adapters fit
        json.dump(_diffusers_config(model), f, indent=2, sort_keys=True)


def export_model(model: nn.Module, out: str, *, dist, max_shard_size: int = MAX_SHARD_SIZE,
                 dtype: torch.dtype | None = None) -> str:
    """Write ``model`` (the trained policy, sharded or not) to ``out`` (collective: every rank calls it).

    A model with LoRA adapters is written as diffusers LoRA weights (adapters only, fp32); otherwise in
    ``save_pretrained`` layout, in the policy's dtype (fp32 master weights) or ``dtype``. ``out`` is
    replaced atomically. Returns ``out``.
    """
    tmp = out.rstrip(os.sep) + ".tmp"
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    if has_adapters(model):
        _write_lora(model, tmp, dist.is_main)
    else:
        _write_pretrained(model, tmp, dist.is_main, max_shard_size, dtype)
    dist.barrier()
    if dist.is_main:
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    dist.barrier()
    return out


# ------------------------------------------------------------------------------------------ command


DESCRIPTION = """\
Write a checkpoint of `pgdpo train` as a model diffusers loads: the trained transformer in
save_pretrained layout (full fine-tuning; config.json + safetensors shards) or diffusers LoRA weights
(LoRA runs; pytorch_lora_weights.safetensors, for load_lora_adapter / pipe.load_lora_weights).

  pgdpo export --checkpoint runs/demo/checkpoint-100 --out runs/demo/exported
  torchrun --nproc_per_node 8 -m pgdpo export --checkpoint ... --out ...   (sharded: no full copy per rank)

The checkpoint's config.yaml says how the model was built (model.path / model.name, LoRA); a run that
reaches train.max_steps writes <output_dir>/final/ the same way.
"""


def export_checkpoint(checkpoint: str, out: str, *, dtype: torch.dtype | None = None,
                      max_shard_size: int = MAX_SHARD_SIZE) -> str:
    """Build the policy of ``checkpoint``'s config, load the checkpoint's trained weights into it, export."""
    path = os.path.expanduser(checkpoint)
    if not os.path.isdir(path):
        raise CheckpointError(f"--checkpoint {checkpoint}: no such folder")
    if not is_complete(path) and list_checkpoints(path):
        path = list_checkpoints(path)[-1][1]  # a run's output folder: its newest checkpoint
    if not is_complete(path):
        raise CheckpointError(f"--checkpoint {checkpoint}: neither a complete checkpoint-<step> folder (with "
                              "trainer_state.json and DCP .metadata) nor a run folder holding one")
    config_file = os.path.join(path, "config.yaml")
    if not os.path.isfile(config_file):
        raise CheckpointError(f"{path}: has no config.yaml (not a pgdpo train checkpoint?)")
    cfg = load_config(config_file)
    # the weights do not depend on how the run split its sequences or replicated its shards: export runs
    # with any process count (plain FSDP2 over them)
    cfg.distributed.sp_degree = 1
    cfg.distributed.replicate_degree = 1
    dist = init_distributed(cfg.distributed, "cpu" if not torch.cuda.is_available() else cfg.device)
    finished = False
    try:
        arch = model_architecture(cfg)  # as the run resolved it (pgdpo.train.layout)
        # Full fine-tuning: the checkpoint holds every parameter (DCP raises for one it lacks), so the
        # pretrained weights are not read; LoRA: the frozen base comes from model.path as in training.
        full = not cfg.model.lora_rank
        model, _ = build_models(cfg, dist, arch, with_reference=False, fill=not full)
        options = StateDictOptions(ignore_frozen_params=not full, strict=full)
        state = {"model": get_model_state_dict(model, options=options)}
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
                dcp.load(state, checkpoint_id=path)
        except Exception as exc:  # noqa: BLE001 - DCP raises several types; name the folder
            raise CheckpointError(f"{path}: the trained weights cannot be loaded into the model of its "
                                  f"config.yaml ({type(exc).__name__}: {exc})") from exc
        set_model_state_dict(model, state["model"], options=options)
        written = export_model(model, out, dist=dist, dtype=dtype, max_shard_size=max_shard_size)
        finished = True
        return written
    finally:
        dist.shutdown(synchronize=finished)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pgdpo export", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a checkpoint-<step> folder, or a run's output folder (its newest checkpoint)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (replaced if it exists)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"),
                   help="full fine-tuning: cast the weights (default: as trained, fp32)")
    p.add_argument("--max-shard-size-gb", type=float, default=MAX_SHARD_SIZE / 1024 ** 3,
                   help="bytes per safetensors file, in GiB (default 5)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype)
    try:
        out = export_checkpoint(args.checkpoint, args.out, dtype=dtype,
                                max_shard_size=int(args.max_shard_size_gb * 1024 ** 3))
    except (ConfigError, CheckpointError, DataError) as exc:
        print(f"pgdpo export: error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"pgdpo export: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
