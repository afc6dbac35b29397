"""The benchmark cases: named shapes, dtypes, the input maker and the byte floor.

A case is one ``(shape, dtype)``; every shape is the full ``[2B, *S]`` batch (chosen half first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: name -> (shape [2B, *S], what it is). The shapes that matter for the loss's users.
SHAPES: dict[str, tuple[tuple[int, ...], str]] = {
    "cpu-target": ((4, 16, 8, 30, 52), "the CPU target: 2 pairs of a small 16-channel video latent"),
    "wan480": ((2, 16, 21, 60, 104), "Wan2.1 480p x 81 frames latent, 1 pair"),
    "wan720": ((2, 16, 21, 90, 160), "Wan2.1 720p x 81 frames latent, 1 pair"),
    "vc2": ((2, 4, 16, 40, 64), "VideoCrafter2 320x512 x 16 frames latent, 1 pair"),
    "sdxl": ((2, 4, 128, 128), "SDXL 1024x1024 image latent, 1 pair"),
    "ragged": ((6, 3, 13, 37, 41), "ragged: 3 pairs, N = 59163 per sample (odd, no power-of-2 factor)"),
    "tiny-video": ((4, 2, 3, 5, 7), "smoke: 2 pairs of a tiny video latent"),
    "tiny-image": ((2, 3, 9, 11), "smoke: 1 pair of a tiny odd image latent"),
}

#: The default shape sets. Eager PyTorch on a 2-core CPU needs ~0.1-0.3 s per fwd+bwd of a Wan
#: latent, so the CPU default keeps the small shapes (wan480/wan720 can still be asked for by name).
DEFAULT_SHAPES = {
    "cpu": ("cpu-target", "sdxl", "vc2", "ragged"),
    "cuda": ("wan480", "wan720", "vc2", "sdxl", "ragged", "cpu-target"),
}
SMOKE_SHAPES = ("tiny-video", "tiny-image")
#: --smoke without --shapes/--dtypes: both ranks and both common dtypes in two cases (each case costs a
#: torch.compile of several seconds on a small CPU).
SMOKE_CASES = (("tiny-video", "fp32"), ("tiny-image", "bf16"))

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
DEFAULT_DTYPES = ("fp32", "bf16")

#: Floor of each timed pass, in whole-tensor transfers of ``2B * N * itemsize`` bytes. The loss's floor
#: is fwd+bwd = read pred, ref_pred, target once + write the gradient once.
#: The forward alone must read the three inputs. The backward's floor is one read and one write: a
#: gradient computed in the forward only needs scaling (what element weighting does); sample
#: weighting's backward reads pred and target again (and ref_pred where the anchor term needs it), so
#: its time/floor shows that second pass rather than hiding it.
FLOOR_TENSORS = {"fwd": 3, "bwd": 2, "fwdbwd": 4}
PASSES = ("fwd", "bwd", "fwdbwd")


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """A shape name of :data:`SHAPES`, or an explicit ``2Bx...`` like ``4x16x8x30x52``."""
    if text in SHAPES:
        return text, SHAPES[text][0]
    try:
        dims = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        dims = ()
    if len(dims) < 2 or any(d <= 0 for d in dims) or dims[0] % 2:
        raise ValueError(f"unknown shape {text!r}: give a name ({', '.join(SHAPES)}) or dimensions "
                         f"like 4x16x8x30x52 (first dimension 2B: even, chosen half first)")
    return text.lower(), dims


def parse_dtype(text: str) -> torch.dtype:
    if text not in DTYPES:
        raise ValueError(f"unknown dtype {text!r}: choose from {', '.join(DTYPES)}")
    return DTYPES[text]


def make_cases(shapes, dtypes) -> list[Case]:
    """Every (shape, dtype) pair of the given shape names/dimensions and dtype names, shapes outer."""
    parsed = [parse_shape(s) for s in shapes]
    dts = [parse_dtype(d) for d in dtypes]
    if not parsed or not dts:
        raise ValueError("give at least one shape and one dtype")
    return [Case(name, shape, dt) for name, shape in parsed for dt in dts]


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    @property
    def label(self) -> str:
        return f"{self.name} {self.dtype_name}"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def tensor_bytes(self) -> int:
        """Bytes of one ``[2B, *S]`` tensor."""
        return self.numel * self.dtype.itemsize

    def floor_bytes(self, pass_: str) -> int:
        return FLOOR_TENSORS[pass_] * self.tensor_bytes

    def shape_str(self) -> str:
        return "x".join(map(str, self.shape))


def make_inputs(case: Case, device: str | torch.device, seed: int = 0):
    """One input set ``(pred, ref_pred, target)`` of ``case``; ``pred`` requires grad.

    target ~ N(0,1); the reference is off by 0.3 N(0,1); the policy differs from the reference by a
    per-sample scale in [0.02, 0.4] so margins differ across pairs and the ARS/IPR weights are not
    saturated (the regime of early training, where the loss's numerics matter most). Drawn in fp32
    on the CPU (the same values on every device), then cast.
    """
    g = torch.Generator().manual_seed(seed)
    shape = case.shape
    target = torch.randn(shape, generator=g)
    ref = target + 0.3 * torch.randn(shape, generator=g)
    scale = 0.02 + 0.38 * torch.rand((shape[0],) + (1,) * (len(shape) - 1), generator=g)
    pred = ref + scale * torch.randn(shape, generator=g)
    pred, ref, target = (x.to(device=device, dtype=case.dtype) for x in (pred, ref, target))
    return pred.requires_grad_(True), ref, target


def rotation_sets(case: Case, cache_bytes: int, max_bytes: int, max_sets: int = 16) -> int:
    """How many input sets to rotate through so that the sets together exceed twice the last-level
    cache (each repeat then reads from memory, not from the cache), within ``max_bytes``."""
    set_bytes = 3 * case.tensor_bytes
    want = max(2, math.ceil(2 * cache_bytes / set_bytes))
    afford = max(1, max_bytes // set_bytes)
    return int(min(want, afford, max_sets))
