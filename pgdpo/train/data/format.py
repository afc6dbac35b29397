"""On-disk format of a preference dataset, and the readers that validate it.

A dataset is a folder::

    DIR/dataset.json              meta: format version, task, latent/text/image shapes, dtype, pair count
    DIR/index.jsonl               one JSON object per pair (below), in pair order
    DIR/shard-00000.safetensors   the tensors of up to ``shard_size`` consecutive pairs
    DIR/shard-00001.safetensors   ...

``dataset.json``::

    {"format": "pgdpo-preference-latents", "format_version": 1, "task": "t2v" | "i2v",
     "latent_shape": [C, F, H, W], "latent_channels": C, "text_len": L, "text_dim": D,
     "image_condition_shape": [4 + C, F, H, W] | null, "image_embed_shape": [Li, Di] | null,
     "dtype": "bfloat16", "num_pairs": N, "num_shards": S, "index": "index.jsonl", "source": {...},
     "checksums": {"shard-00000.safetensors": "blake2b:<hex>", ...}}

``checksums`` (written by :class:`~pgdpo.train.data.writer.DatasetWriter` since pgdpo 0.1; absent in older
datasets, which still load with a warning) holds each shard file's checksum (:mod:`pgdpo.train.integrity`):
``pgdpo data check`` verifies every shard, and training verifies each shard the first time it opens it,
so flipped bytes inside a tensor payload (with the safetensors header intact) are refused by name.

One ``index.jsonl`` line::

    {"pair": 7, "shard": "shard-00000.safetensors",
     "keys": {"chosen": "00000007.chosen", "rejected": "00000007.rejected",
              "encoder_hidden_states": "00000007.encoder_hidden_states", ...},
     "shapes": {"chosen": [C, F, H, W], ...}, "dtype": "bfloat16",
     "prompt_id": "p7", "prompt": "...", "score_chosen": 0.8, "score_rejected": 0.1, "margin": 0.7}

Tensors are per pair (no batch dimension): ``chosen`` / ``rejected`` ``[C, F, H, W]`` (normalised VAE
latents), ``encoder_hidden_states`` ``[L, D]`` (text encoder output, zero past the prompt's tokens),
and for image-to-video ``image_condition`` ``[4 + C, F, H, W]`` (4 mask + C first-frame latent channels,
Wan2.1 I2V layout) and ``encoder_hidden_states_image`` ``[Li, Di]`` (CLIP image tokens).

Only safetensors and JSON are read: nothing here can execute code from a data file.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..integrity import checksum_matches

FORMAT_NAME = "pgdpo-preference-latents"
FORMAT_VERSION = 1
META_FILE = "dataset.json"
INDEX_FILE = "index.jsonl"
TASKS = ("t2v", "i2v")
T2V_FIELDS = ("chosen", "rejected", "encoder_hidden_states")
I2V_FIELDS = T2V_FIELDS + ("image_condition", "encoder_hidden_states_image")
#: Channels Wan2.1 I2V puts in front of the first-frame latent in ``image_condition``: the frame mask.
MASK_CHANNELS = 4

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
#: safetensors dtype names (the format's header) -> torch dtypes (also what pgdpo.train.loading reads)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
#: safetensors header dtype names -> the names of DTYPES (the floating dtypes a dataset may hold)
_SAFETENSORS_DTYPES = {key: name for key, dt in SAFETENSORS_DTYPES.items() for name, ours in DTYPES.items()
                       if dt == ours}


class DataError(ValueError):
    """A dataset file is missing, corrupt, or disagrees with the dataset's meta; the message names it."""


def dtype_name(dtype: torch.dtype | str) -> str:
    """Canonical dtype name (``"bfloat16"``) of a torch dtype or a name; error for unsupported ones."""
    if isinstance(dtype, str):
        name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                "float": "float32", "fp64": "float64", "double": "float64"}.get(dtype, dtype)
        if name not in DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; expected one of {sorted(DTYPES)}")
        return name
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported dtype {dtype}; expected one of {sorted(DTYPES)}")


def fields_for(task: str) -> tuple[str, ...]:
    """The per-pair tensor names a dataset of ``task`` ("t2v" or "i2v") stores."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    return I2V_FIELDS if task == "i2v" else T2V_FIELDS


def _shape(value, what: str, ndim: int) -> list[int]:
    if (not isinstance(value, (list, tuple)) or len(value) != ndim
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise DataError(f"{what} must be a list of {ndim} positive integers, got {value!r}")
    return [int(v) for v in value]


@dataclass
class DatasetMeta:
    """The contents of ``dataset.json``: what every pair's tensors look like."""

    task: str
    latent_shape: list[int]
    text_len: int
    text_dim: int
    dtype: str = "bfloat16"
    image_condition_shape: list[int] | None = None
    image_embed_shape: list[int] | None = None
    num_pairs: int = 0
    num_shards: int = 0
    source: dict = field(default_factory=dict)
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    index: str = INDEX_FILE
    #: shard file name -> ``"blake2b:<hex>"`` (:mod:`pgdpo.train.integrity`); None in datasets written before
    #: checksums existed
    checksums: dict[str, str] | None = None

    def __post_init__(self):
        self.validate()

    @property
    def latent_channels(self) -> int:
        return self.latent_shape[0]

    @property
    def fields(self) -> tuple[str, ...]:
        return fields_for(self.task)

    def field_shapes(self) -> dict[str, list[int]]:
        """The shape every pair's tensor of each field must have."""
        shapes = {"chosen": list(self.latent_shape), "rejected": list(self.latent_shape),
                  "encoder_hidden_states": [self.text_len, self.text_dim]}
        if self.task == "i2v":
            shapes["image_condition"] = list(self.image_condition_shape)
            shapes["encoder_hidden_states_image"] = list(self.image_embed_shape)
        return shapes

    def validate(self, where: str = META_FILE) -> None:
        if self.format != FORMAT_NAME:
            raise DataError(f"{where}: 'format' is {self.format!r}, expected {FORMAT_NAME!r}")
        if self.format_version != FORMAT_VERSION:
            raise DataError(f"{where}: 'format_version' is {self.format_version!r}; this pgdpo reads "
                            f"version {FORMAT_VERSION}")
        if self.task not in TASKS:
            raise DataError(f"{where}: 'task' must be one of {list(TASKS)}, got {self.task!r}")
        self.latent_shape = _shape(self.latent_shape, f"{where}: 'latent_shape' [C, F, H, W]", 4)
        for key in ("text_len", "text_dim"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise DataError(f"{where}: {key!r} must be a positive integer, got {value!r}")
        try:
            self.dtype = dtype_name(self.dtype)
        except ValueError as exc:
            raise DataError(f"{where}: 'dtype': {exc}") from None
        if self.task == "i2v":
            if self.image_condition_shape is None or self.image_embed_shape is None:
                raise DataError(f"{where}: an i2v dataset needs 'image_condition_shape' "
                                f"[{MASK_CHANNELS} + C, F, H, W] and 'image_embed_shape' [tokens, dim]")
            self.image_condition_shape = _shape(self.image_condition_shape,
                                                f"{where}: 'image_condition_shape'", 4)
            self.image_embed_shape = _shape(self.image_embed_shape, f"{where}: 'image_embed_shape'", 2)
            if self.image_condition_shape[1:] != self.latent_shape[1:]:
                raise DataError(f"{where}: 'image_condition_shape' {self.image_condition_shape} must have "
                                f"the latent's F, H, W {self.latent_shape[1:]}")
        elif self.image_condition_shape is not None or self.image_embed_shape is not None:
            raise DataError(f"{where}: a t2v dataset has no image condition; 'image_condition_shape' and "
                            "'image_embed_shape' must be null")
        for key in ("num_pairs", "num_shards"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise DataError(f"{where}: {key!r} must be a non-negative integer, got {value!r}")
        if os.path.basename(self.index) != self.index or self.index in ("", ".", ".."):
            raise DataError(f"{where}: 'index' must be a file name inside the dataset folder, "
                            f"got {self.index!r}")
        if self.checksums is not None:
            items = self.checksums.items() if isinstance(self.checksums, dict) else None
            if items is None or not all(isinstance(k, str) and isinstance(v, str) and ":" in v
                                        for k, v in items):
                raise DataError(f"{where}: 'checksums' must map shard file names to 'algorithm:hex' "
                                "strings")

    def to_json(self) -> dict:
        out = asdict(self)
        out["latent_channels"] = self.latent_channels
        order = ["format", "format_version", "task", "latent_shape", "latent_channels", "text_len",
                 "text_dim", "image_condition_shape", "image_embed_shape", "dtype", "num_pairs", "num_shards",
                 "index", "source"]
        if self.checksums is not None:
            order.append("checksums")
        return {k: out[k] for k in order}

    @classmethod
    def from_json(cls, data: dict, where: str = META_FILE) -> DatasetMeta:
        if not isinstance(data, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(data).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        missing = [k for k in ("task", "latent_shape", "text_len", "text_dim") if k not in data]
        if missing:
            raise DataError(f"{where}: missing key(s) {missing}")
        kwargs = {k: v for k, v in data.items() if k in known}
        if "latent_channels" in data and isinstance(data["latent_shape"], list) and data["latent_shape"] \
                and data["latent_channels"] != data["latent_shape"][0]:
            raise DataError(f"{where}: 'latent_channels' {data['latent_channels']} disagrees with "
                            f"'latent_shape' {data['latent_shape']}")
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise DataError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class IndexEntry:
    """One line of ``index.jsonl``: where one pair's tensors are."""

    pair: int
    shard: str
    keys: dict
    shapes: dict
    dtype: str
    prompt_id: str
    prompt: str | None = None
    score_chosen: float | None = None
    score_rejected: float | None = None
    margin: float | None = None

    def to_json(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if v is not None}
        return out


def iter_jsonl(path: str | os.PathLike, error: type[Exception] = DataError):
    """Yield ``(line_number, where, obj)`` for each non-blank line of a JSONL file (``where = "path:line"``).

    A line that is not valid JSON raises ``error`` naming the file and line.
    """
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                yield number, where, json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{where}: not valid JSON ({exc})") from None


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


def tensor_key(pair: int, name: str) -> str:
    return f"{pair:08d}.{name}"


def read_meta(root: str | os.PathLike) -> DatasetMeta:
    """Read and validate ``DIR/dataset.json``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder {str(root)!r} does not exist (or is not a folder)")
    path = root / META_FILE
    if not path.is_file():
        raise DataError(f"{path}: missing; a dataset folder needs {META_FILE} (written last by the writer: "
                        "its absence usually means the dataset was not finished)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    return DatasetMeta.from_json(data, where=str(path))


def _entry_from_json(data, where: str, meta: DatasetMeta) -> IndexEntry:
    if not isinstance(data, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(data).__name__}")
    missing = [k for k in ("pair", "shard", "keys", "shapes", "dtype", "prompt_id") if k not in data]
    if missing:
        raise DataError(f"{where}: missing key(s) {missing}")
    pair, shard = data["pair"], data["shard"]
    if not isinstance(pair, int) or isinstance(pair, bool) or pair < 0:
        raise DataError(f"{where}: 'pair' must be a non-negative integer, got {pair!r}")
    if (not isinstance(shard, str) or os.path.basename(shard) != shard or shard in ("", ".", "..")
            or not shard.endswith(".safetensors")):
        raise DataError(f"{where}: 'shard' must be a .safetensors file name inside the dataset folder, "
                        f"got {shard!r}")
    keys, shapes = data["keys"], data["shapes"]
    if not isinstance(keys, dict) or not isinstance(shapes, dict):
        raise DataError(f"{where}: 'keys' and 'shapes' must be JSON objects")
    expected = meta.field_shapes()
    for name, shape in expected.items():
        if name not in keys or not isinstance(keys[name], str):
            raise DataError(f"{where}: 'keys' has no tensor name for {name!r} (a {meta.task} dataset stores "
                            f"{list(expected)})")
        if name not in shapes:
            raise DataError(f"{where}: 'shapes' has no entry for {name!r}")
        if list(shapes[name]) != shape:
            raise DataError(f"{where}: shape of {name!r} is {shapes[name]} but {META_FILE} says {shape}")
    extra = sorted(set(keys) - set(expected))
    if extra:
        raise DataError(f"{where}: 'keys' has field(s) {extra} that a {meta.task} dataset does not have")
    if data["dtype"] != meta.dtype:
        raise DataError(f"{where}: dtype {data['dtype']!r} but {META_FILE} says {meta.dtype!r}")
    scores = {}
    for key in ("score_chosen", "score_rejected", "margin"):
        value = data.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                  or not math.isfinite(value)):
            raise DataError(f"{where}: {key!r} must be a finite number, got {value!r}")
        scores[key] = None if value is None else float(value)
    prompt = data.get("prompt")
    return IndexEntry(pair=pair, shard=shard, keys=dict(keys), shapes={k: list(v) for k, v in shapes.items()},
                      dtype=data["dtype"], prompt_id=str(data["prompt_id"]),
                      prompt=None if prompt is None else str(prompt), **scores)


def read_index(root: str | os.PathLike, meta: DatasetMeta | None = None) -> list[IndexEntry]:
    """Read ``index.jsonl`` and check every entry against the meta (fields, shapes, dtype, pair ids)."""
    root = Path(root)
    meta = read_meta(root) if meta is None else meta
    path = root / meta.index
    if not path.is_file():
        raise DataError(f"{path}: missing; {META_FILE} names it as the dataset's index")
    entries: list[IndexEntry] = []
    for _, where, data in iter_jsonl(path):
        entries.append(_entry_from_json(data, where, meta))
    ids = [e.pair for e in entries]
    if ids != list(range(len(entries))):
        raise DataError(f"{path}: pair ids must be 0, 1, 2, ... in order; got {ids[:8]}"
                        f"{' ...' if len(ids) > 8 else ''}")
    if len(entries) != meta.num_pairs:
        raise DataError(f"{path}: has {len(entries)} pairs but {META_FILE} says num_pairs={meta.num_pairs}")
    if not entries:
        raise DataError(f"{path}: the dataset has no pairs")
    shards = {e.shard for e in entries}
    if len(shards) != meta.num_shards:
        raise DataError(f"{path}: references {len(shards)} shard file(s) but {META_FILE} says "
                        f"num_shards={meta.num_shards}")
    return entries


class ShardReader:
    """Lazily opened safetensors shard: reads one tensor at a time (memory-mapped), never the whole file."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import SafetensorError, safe_open

        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: shard file is missing (listed in {INDEX_FILE})")
        try:
            self._file = safe_open(str(self.path), framework="pt", device="cpu")
            self._keys = set(self._file.keys())
        except SafetensorError as exc:
            raise DataError(f"{self.path}: corrupt or truncated safetensors shard ({exc})") from None
        except OSError as exc:
            raise DataError(f"{self.path}: cannot read shard ({exc})") from None

    def keys(self) -> set[str]:
        return set(self._keys)

    def check(self, key: str, shape, dtype: str) -> None:
        """Header-only check that ``key`` exists with ``shape`` and ``dtype``."""
        if key not in self._keys:
            raise DataError(f"{self.path}: tensor {key!r} (listed in {INDEX_FILE}) is not in the shard")
        header = self._file.get_slice(key)
        got_shape, got_dtype = list(header.get_shape()), _SAFETENSORS_DTYPES.get(header.get_dtype(),
                                                                                 header.get_dtype())
        if got_shape != list(shape) or got_dtype != dtype:
            raise DataError(f"{self.path}: tensor {key!r} is {got_dtype} {got_shape} but {INDEX_FILE} says "
                            f"{dtype} {list(shape)}")

    def read(self, key: str, shape, dtype: str) -> torch.Tensor:
        from safetensors import SafetensorError

        self.check(key, shape, dtype)
        try:
            return self._file.get_tensor(key)
        except SafetensorError as exc:
            raise DataError(f"{self.path}: cannot read tensor {key!r} ({exc})") from None


def verify_shard(root: str | os.PathLike, shard: str, meta: DatasetMeta) -> bool:
    """Check ``shard``'s bytes against the checksum in ``dataset.json``; :class:`DataError` naming it if not.

    Returns False (nothing checked) for a dataset without checksums, True when the shard matched. Reads the
    whole file once (a stream; see :mod:`pgdpo.train.integrity` for the cost).
    """
    if meta.checksums is None:
        return False
    path = Path(root) / shard
    expected = meta.checksums.get(shard)
    if expected is None:
        raise DataError(f"{path}: {META_FILE} has checksums but none for this shard (the dataset's files "
                        "do not belong together)")
    if not path.is_file():
        raise DataError(f"{path}: shard file is missing (listed in {INDEX_FILE})")
    try:
        ok, actual = checksum_matches(path, expected)
    except ValueError as exc:
        raise DataError(f"{Path(root) / META_FILE}: shard {shard}: {exc}") from None
    if not ok:
        raise DataError(f"{path}: shard is corrupt: its checksum is {actual} but {META_FILE} recorded "
                        f"{expected} when it was written (bytes changed on disk or in a copy); restore "
                        "the shard from a good copy or re-create the dataset")
    return True


def warn_no_checksums(root: str | os.PathLike) -> None:
    warnings.warn(f"{root}: {META_FILE} has no shard checksums (written before pgdpo recorded them): "
                  "corrupted tensor payloads cannot be detected; re-create the dataset to add them",
                  stacklevel=3)


def read_pair(reader: ShardReader, entry: IndexEntry) -> dict[str, torch.Tensor]:
    """The tensors of one pair, checked against its index entry."""
    return {name: reader.read(key, entry.shapes[name], entry.dtype) for name, key in entry.keys.items()}


def validate_dataset(root: str | os.PathLike, *, deep: bool = False, progress: bool = False) -> DatasetMeta:
    """Check a dataset folder end to end; raise :class:`DataError` naming the first bad file or key.

    Always: ``dataset.json``, every ``index.jsonl`` line, every shard's checksum (datasets without
    checksums: a warning), every shard's header, and that every indexed tensor exists with the indexed
    shape and dtype. ``deep=True`` also reads every tensor and checks it is finite, naming the pair.
    """
    from tqdm.auto import tqdm

    root = Path(root)
    meta = read_meta(root)
    entries = read_index(root, meta)
    by_shard: dict[str, list[IndexEntry]] = {}
    for entry in entries:
        by_shard.setdefault(entry.shard, []).append(entry)
    if meta.checksums is None:
        warn_no_checksums(root)
    for shard, shard_entries in tqdm(by_shard.items(), desc="checking shards", unit="shard",
                                     disable=not progress):
        reader = ShardReader(root / shard)  # a truncated or garbled header is named as such first
        verify_shard(root, shard, meta)
        for entry in shard_entries:
            for name, key in entry.keys.items():
                reader.check(key, entry.shapes[name], entry.dtype)
                if deep:
                    tensor = reader.read(key, entry.shapes[name], entry.dtype)
                    if not torch.isfinite(tensor).all():
                        raise DataError(f"{reader.path}: pair {entry.pair} (prompt_id {entry.prompt_id!r}): "
                                        f"tensor {key!r} has NaN or Inf values")
    return meta
