"""Preference datasets of precomputed latents: format, writer, streaming loader, and the tools that make them.

- :class:`PreferenceDataset` -- streamed, rank-sharded, per-epoch shuffled, resumable batches;
- :func:`collate` -- per-pair tensors -> the ``PreferenceStep`` batch format;
- :func:`check_compatible` -- dataset meta vs model config, before training;
- :class:`DatasetWriter`, :func:`read_meta`, :func:`read_index`, :func:`validate_dataset` -- the format
  (:mod:`pgdpo.train.data.format` documents the files);
- :func:`make_pairs` (``pgdpo data pairs``), :func:`encode_dataset` (``pgdpo data encode``),
  :func:`synth_dataset` (``pgdpo data synth``); :mod:`.generate` (``pgdpo data generate``: candidates from
  a base pipeline) and :mod:`.score` (``pgdpo data score``: reward hooks) come before them.
"""

from .collate import collate
from .compat import check_compatible
from .dataset import PreferenceDataset
from .encode import encode_dataset, load_encoders
from .format import DataError, DatasetMeta, IndexEntry, read_index, read_meta, validate_dataset
from .pairs import make_pairs, read_pairs, read_scores, write_pairs
from .synth import synth_dataset
from .writer import DatasetWriter

__all__ = [
    "PreferenceDataset", "collate", "check_compatible", "DataError", "DatasetMeta", "IndexEntry",
    "DatasetWriter", "read_meta", "read_index", "validate_dataset", "make_pairs", "read_scores",
    "read_pairs", "write_pairs", "synth_dataset", "encode_dataset", "load_encoders",
]

