"""Policy and reference that never exist in full on one rank: meta init, FSDP2 sharding, sliced reads.

The models are built in four steps (the torchtitan recipe, with diffusers folders as the source):

1. **Meta**: the diffusers class is built from its ``config.json`` (or a named config) under
   ``accelerate.init_empty_weights(include_buffers=False)``: parameters on the meta device (no memory),
   buffers real (Wan's rotary tables ``freqs_cos`` / ``freqs_sin`` are non-persistent: no state dict and
   no file holds them, so they are computed here, at construction, and kept). LoRA adapters are added on
   meta too, dtypes set (``pgdpo.train.models.cast_weights``: ``_keep_in_fp32_modules`` stay fp32).
2. **Shard**: :func:`pgdpo.train.distributed.wrap_model` (``fully_shard`` per block and at the root).
3. **Materialise**: ``to_empty`` on the device (uninitialised memory for this rank's shards only), then
   the buffers saved in step 1 are put back.
4. **Fill**: every rank reads only its own rows (FSDP2 shards dim 0) of each tensor from the folder's
   safetensors files, by byte range (:class:`SafetensorsFolder`), and copies them into its shard. No
   communication, no rank ever holds more than its shards plus one slice in flight, and the reading is
   split over the ranks. A frozen copy reference is filled from the policy's shards (same layout): the
   same read, cast to its dtype, no second pass over the files. Random init (no ``model.path``) takes the
   same path with the tensors of a seeded CPU build (equal on every rank; small models only).

Why not ``torch.distributed.checkpoint.HuggingFaceStorageReader`` (what torchtitan uses): it reads through
safetensors' memory map, whose touched pages count in each rank's resident memory until the file is
closed, so a rank's peak is its shards twice over; positional reads go through the page cache instead.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from .config import ConfigError
from .data.format import SAFETENSORS_DTYPES
from .distributed import mixed_precision_dtype, wrap_model
from .layout import pretrained_config  # noqa: F401 - the home of model.path's config.json is layout
from .models import _model_class, adapter_for, build_model, cast_weights, find_model_folder, resolve_config

#: diffusers' weight file names (``save_pretrained``: one file, or shards listed in the index)
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


class LoadError(ConfigError):
    """Weights that cannot be read or do not fit the model; the message names the file or tensor."""


# ------------------------------------------------------------------------------------------ sources


class SafetensorsFolder:
    """The tensors of a folder's ``*.safetensors`` files, read by rows without a memory map.

    A safetensors file is an 8-byte little-endian header length, a JSON header (``name -> dtype, shape,
    data_offsets``) and the row-major tensor bytes; rows ``[a, b)`` of dim 0 are one contiguous byte
    range, read with one positional read into a buffer of exactly that size.
    """

    def __init__(self, folder: str):
        self.folder = folder
        index = os.path.join(folder, INDEX_NAME)
        if os.path.isfile(index):  # sharded save_pretrained: the files its index names
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.isfile(os.path.join(folder, WEIGHTS_NAME)):  # one file (variants such as .fp16 aside)
            files = [WEIGHTS_NAME]
        else:
            files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        if not files:
            raise LoadError(f"model.path: no .safetensors weights in {folder} (pgdpo reads safetensors "
                            "only; re-save a .bin checkpoint with save_pretrained(safe_serialization=True))")
        self.entries: dict[str, tuple[str, torch.dtype, tuple[int, ...], int, int]] = {}
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) != 8:
                    raise LoadError(f"{path}: not a safetensors file (shorter than its header length)")
                n = int.from_bytes(head, "little")
                try:
                    header = json.loads(f.read(n))
                except (ValueError, UnicodeDecodeError) as exc:
                    raise LoadError(f"{path}: damaged safetensors header ({exc})") from None
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                if info["dtype"] not in SAFETENSORS_DTYPES:
                    raise LoadError(f"{path}: tensor {key} has unsupported dtype {info['dtype']}")
                begin, end = info["data_offsets"]
                if key in self.entries:
                    raise LoadError(f"{folder}: tensor {key} is in both {self.entries[key][0]} and {path}")
                self.entries[key] = (path, SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]),
                                     8 + n + begin, 8 + n + end)
        self._handles: dict[str, object] = {}

    def keys(self) -> set[str]:
        return set(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][2]

    def read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of dim 0 of tensor ``key`` (the whole tensor for a 0-d one)."""
        path, dtype, shape, begin, end = self.entries[key]
        if not shape:
            start, stop, row = 0, 1, end - begin
        else:
            row = (end - begin) // shape[0] if shape[0] else 0
        out_shape = (stop - start, *shape[1:]) if shape else ()
        count = (stop - start) * row
        if count == 0:
            return torch.empty(out_shape, dtype=dtype)
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = open(path, "rb")  # noqa: SIM115 - closed in close()
        buf = bytearray(count)
        handle.seek(begin + start * row)
        if handle.readinto(buf) != count:
            raise LoadError(f"{path}: truncated (tensor {key} ends past the end of the file)")
        return torch.frombuffer(buf, dtype=dtype).reshape(out_shape)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


class ModuleSource:
    """The same interface over the state dict of a model in memory (random init: a seeded CPU build)."""

    def __init__(self, model: nn.Module):
        self.state = model.state_dict()

    def keys(self) -> set[str]:
        return set(self.state)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.state[key].shape)

    def read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        t = self.state[key]
        return t if t.dim() == 0 else t[start:stop]

    def close(self) -> None:
        self.state = {}


def weights_folder(path: str) -> str:
    """The model folder of ``path``: itself, or its ``transformer/`` / ``unet/`` subfolder (a pipeline);
    :func:`pgdpo.train.models.find_model_folder`, its error a ``ConfigError`` naming ``model.path``."""
    try:
        return find_model_folder(path, what="model.path")
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None


# ------------------------------------------------------------------------------------------ build


def meta_model(arch: dict, dtype: torch.dtype, *, lora=None) -> nn.Module:
    """The diffusers model of config ``arch`` with parameters on meta and real buffers, in ``dtype``
    (fp32-kept modules in fp32); with ``lora`` (a peft ``LoraConfig``) adapters added, frozen base,
    trainable fp32 adapters."""
    from accelerate import init_empty_weights

    config = resolve_config(arch)
    cls = _model_class(config.pop("_class_name"))
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(config)
        cast_weights(model, dtype)
        if lora is not None:
            model.requires_grad_(False)
            model.add_adapter(lora)
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.data = p.data.float()
                    p.requires_grad_(True)
    return model


def materialize(model: nn.Module, device: torch.device, *, offload: bool = False) -> None:
    """``to_empty`` on ``device`` (this rank's shards only), keeping the buffers computed at construction.

    ``offload`` (FSDP2 ``CPUOffloadPolicy``): the sharded parameters go to host memory, the rest (the
    replicated fp32-kept parameters and the buffers, used as they are in the forward) to ``device``."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    meta = [name for name, b in buffers.items() if b.is_meta]
    if meta:
        raise LoadError(f"buffers {meta[:3]} are on the meta device: build the model with real buffers")
    model.to_empty(device=torch.device("cpu") if offload else device)
    if offload and device.type != "cpu":
        with torch.no_grad():
            for p in model.parameters():
                if not hasattr(p, "placements"):
                    p.data = torch.empty_like(p.data, device=device)
            for module in model.modules():
                for name, b in module._buffers.items():
                    if b is not None:
                        module._buffers[name] = b.to(device)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _rows(name: str, tensor: torch.Tensor) -> tuple[int, int]:
    """Global rows ``[start, stop)`` of dim 0 this rank holds of ``tensor`` (a DTensor shard or all).

    FSDP2's placements: ``(Shard(0),)`` on a 1-D mesh, ``(Replicate(), Shard(0))`` on HSDP's 2-D
    ``(replicate, shard)`` mesh (each replica group holds the whole tensor, sharded over its ranks); a
    replicated parameter (all ``Replicate()``) is read whole."""
    if not hasattr(tensor, "placements"):
        return 0, (tensor.shape[0] if tensor.dim() else 1)

    placements = tuple(tensor.placements)
    mesh = tensor.device_mesh
    n = tensor.shape[0]
    sharded = [i for i, p in enumerate(placements) if not p.is_replicate()]
    if not sharded:
        return 0, n
    if len(sharded) > 1 or not isinstance(placements[sharded[0]], Shard) or placements[sharded[0]].dim != 0:
        raise LoadError(f"{name}: placements {placements} on a {mesh.ndim}-d mesh; FSDP2's Shard(0) on one "
                        "mesh dim (replicated on the others) expected")
    dim = sharded[0]
    # FSDP2 shards dim 0 as torch.chunk does: ceil(n / ranks) rows per rank, the last ranks may get fewer.
    chunk = math.ceil(n / mesh.size(dim))
    start = min(n, mesh.get_local_rank(dim) * chunk)
    stop = min(n, start + chunk)
    if _local(tensor).shape[0] != stop - start:
        raise LoadError(f"{name}: local shard has {_local(tensor).shape[0]} rows, expected {stop - start} "
                        f"(rows [{start}, {stop}) of {n})")
    return start, stop


def _filled_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers (what a state dict and a weights file hold), by name."""
    yield from model.named_parameters()
    for module_name, module in model.named_modules():
        for name, b in module._buffers.items():
            if b is not None and name not in module._non_persistent_buffers_set:
                yield (f"{module_name}.{name}" if module_name else name), b


def file_key(name: str) -> str:
    """The weights-file name of a parameter: peft wraps each LoRA-targeted layer as ``base_layer``."""
    return name.replace(".base_layer.", ".")


def fill_(model: nn.Module, source, *, seed: int, where: str) -> None:
    """Copy this rank's rows of every tensor of ``source`` into ``model``'s shards; LoRA adapters get
    peft's default init (A: kaiming-uniform, B: zero) from a generator seeded by ``seed``, equal on
    every rank. Every model tensor must be found, every source tensor used (else a LoadError)."""
    expected = source.keys()
    used: set[str] = set()
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for name, tensor in _filled_tensors(model):
            local = _local(tensor)
            start, stop = _rows(name, tensor) if tensor.dim() else (0, 1)
            if ".lora_" in name:
                # peft LoraLayer.reset_lora_parameters(init_lora_weights=True), on the full tensor so that
                # every world size gets the same values.
                full = torch.zeros(tensor.shape, dtype=torch.float32)
                if ".lora_A." in name:
                    nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=gen)
                local.copy_(full[start:stop])
                continue
            key = file_key(name)
            if key not in expected:
                raise LoadError(f"{where}: has no tensor {key!r}, which the model needs")
            if tuple(source.shape(key)) != tuple(tensor.shape):
                raise LoadError(f"{where}: tensor {key!r} has shape {list(source.shape(key))}, the model's "
                                f"is {list(tensor.shape)} (config.json does not match the weights?)")
            part = source.read_rows(key, start, stop)
            local.copy_(part.reshape(local.shape))
            used.add(key)
    unused = sorted(expected - used)
    if unused:
        raise LoadError(f"{where}: tensors {unused[:5]} match no parameter of the model (config.json does "
                        "not match the weights?)")


def is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "placements")


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded one (all-gathered on the compute device, also when offloaded)."""
    local = t.to_local()
    if local.device.type != t.device_mesh.device_type:  # CPU-offloaded shard of a GPU mesh
        local = local.to(t.device_mesh.device_type)
    whole = DTensor.from_local(local, t.device_mesh, t.placements, shape=t.shape, stride=t.stride())
    return whole.full_tensor()


def copy_weights_(dst: nn.Module, src: nn.Module) -> None:
    """``dst``'s shards from ``src``'s (same architecture and sharding; ``src`` may carry LoRA adapters,
    whose base layers are copied), cast to ``dst``'s dtypes: a frozen reference from the loaded policy.
    A replicated ``dst`` (``distributed.reference_sharded: false``) gets each sharded tensor all-gathered,
    one at a time."""
    source = {file_key(n): t for n, t in _filled_tensors(src) if ".lora_" not in n}
    with torch.no_grad():
        for name, tensor in _filled_tensors(dst):
            other = source.get(name)
            if other is None or tuple(other.shape) != tuple(tensor.shape):
                raise LoadError(f"reference tensor {name} has no counterpart of the same shape in the policy")
            gather = is_dtensor(other) and not is_dtensor(tensor)
            _local(tensor).copy_(_full(other) if gather else _local(other))


def open_source(path: str | None, arch: dict, seed: int):
    """Where the initial weights come from: the folder's safetensors, or a seeded random CPU build."""
    if path:
        return SafetensorsFolder(weights_folder(path))

    return ModuleSource(build_model(arch, seed=seed, dtype=torch.float32))


def lora_config(model_cfg):
    """The peft ``LoraConfig`` of a ``model`` config section (None for full fine-tuning)."""
    if not model_cfg.lora_rank:
        return None
    from peft import LoraConfig

    return LoraConfig(r=model_cfg.lora_rank, lora_alpha=model_cfg.lora_alpha or model_cfg.lora_rank,
                      target_modules=list(model_cfg.lora_targets), init_lora_weights=True)


def build_models(cfg, dist, arch: dict, *, with_reference: bool,
                 fill: bool = True) -> tuple[nn.Module, nn.Module | None]:
    """The policy and (``with_reference``) a frozen copy reference of a :class:`TrainConfig`, loaded.

    FSDP2: both are sharded on meta, so each rank only ever allocates its shards. The policy is fp32
    (LoRA: frozen base in the compute dtype, fp32 adapters); a frozen reference is in the compute dtype,
    an EMA one (``method.ref_ema_every > 0``) in fp32. DDP / one process: the same steps unsharded (the
    caller wraps DDP). ``fill=False``: materialised but not filled (every parameter is about to be
    loaded from a checkpoint; buffers are set).
    """
    m = cfg.model
    compute = mixed_precision_dtype(m.precision, dist.device) or torch.float32
    lora = lora_config(m)
    model = meta_model(arch, compute if lora is not None else torch.float32, lora=lora)
    reference = None
    if with_reference:
        reference = meta_model(arch, torch.float32 if cfg.method.ref_ema_every else compute)
        reference.requires_grad_(False).eval()

    adapter = adapter_for(model)
    d = cfg.distributed
    offload = dist.strategy == "fsdp" and d.cpu_offload
    if dist.strategy == "fsdp":
        sharded = [model] + ([reference] if reference is not None and d.reference_sharded else [])
        for net in sharded:
            wrap_model(net, adapter.blocks(net), dist, precision=m.precision,
                       reshard_after_forward=d.reshard_after_forward, trainable=net is model,
                       cpu_offload=offload and net is model)
    materialize(model, dist.device, offload=offload)
    if fill:
        source = open_source(m.path, arch, cfg.seed)
        try:
            fill_(model, source, seed=cfg.seed, where=m.path or f"model.name {m.name}")
        finally:
            source.close()
    if reference is not None:
        materialize(reference, dist.device)
        copy_weights_(reference, model)
    return model, reference
