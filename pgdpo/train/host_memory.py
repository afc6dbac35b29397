"""Host memory of a run on CPU: give the heap's freed chunks back to the OS before each transformer block.

On a CPU device every tensor comes from glibc's ``malloc``. Allocations below the mmap threshold (128 KiB
by default, raised by glibc up to 32 MiB as large buffers are freed; 1 MiB in ``bench/run_memory.py``)
come from the heap, and a freed chunk with live ones above it stays resident: the heap only shrinks from
its top. A transformer block's activations are such chunks (at 80 tokens, ``[2, 80, 1536]`` fp32 is
just under 1 MiB), interleaved with what outlives the block (its output, the checkpointed inputs), so
every block leaves free but resident pages behind. Measured on the bench's 304M Wan (2 processes, LoRA,
activation checkpointing): 0.10-0.15x of the fp32 model resident as free heap during a step, on top of
live memory, growing by ~0.02x per block in the forward.

``malloc_trim(0)`` returns every free page of every arena to the OS (``madvise``), not only the top.
Called before each block's forward (and recompute), it keeps the resident heap at what is in use: the
bench's step peak went from 1.10-1.12x to 1.00-1.02x of the fp32 model, for 24 calls a step of ~2.5 ms
each (under 1% of that step). glibc only: elsewhere (musl, macOS) nothing is registered. GPU runs do
not need it (the CUDA caching allocator holds device memory; host memory is small there).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

from torch import nn


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def trim_heap() -> bool:
    """Return the heap's free pages to the OS now (``malloc_trim(0)``); False where there is no glibc."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def _trim_before_block(module: nn.Module, inputs) -> None:
    trim_heap()


def trim_heap_before_blocks(blocks: list[nn.Module]) -> int:
    """Register :func:`trim_heap` as a forward pre-hook of each block (it runs before the block's forward,
    its no-grad forward and its recompute in the backward). Returns the number of blocks hooked: 0
    without glibc. Not for blocks that are then ``torch.compile``-d (the call would break the graph)."""
    if _malloc_trim() is None:
        return 0
    for block in blocks:  # first of the block's pre-hooks: before FSDP2 all-gathers its parameters
        block.register_forward_pre_hook(_trim_before_block, prepend=True)
    return len(blocks)
