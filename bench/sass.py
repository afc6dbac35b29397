"""SASS audit of the fused loss's Triton kernels, compiled for a GPU without one.

``python -m bench.sass`` replays the launcher (``pgdpo.kernels.pgdpo_loss.forward`` / ``backward``) on
meta tensors for each benchmark shape class, dtype combination, weighting and option set, with the
multiprocessor count of each target GPU, and records every kernel launch it would make: grid, arguments,
constexprs and ``num_warps``. Each launch is then specialised exactly as Triton's launcher would
(``create_function_from_signature`` + ``JITFunction._pack_args``: integers equal to 1 become constexprs,
pointers and integers divisible by 16 get ``tt.divisibility``), compiled with ``triton.compile`` for an
explicit ``GPUTarget`` (no GPU, no CUDA driver) and disassembled with the ``cuobjdump`` that Triton's
wheel bundles. So the audit cannot drift from what runs: it compiles what the launcher launches.

Per compiled variant: registers, spill stores / loads (``STL`` / ``LDL``), stack and shared memory, and
the width of every global load and store in the element loop (LDG.128 / .64 / .32 / .U16). Per launch
and GPU: occupancy (by registers, warps, shared memory) and waves of the grid. Findings:

- error: any spill on sm_90 (inside a loop or a value parked once outside them); an element load of
  the streaming kernels narrower than the layout allows (``min(128, elements per thread * element
  bits)``) where ``N`` is 16-aligned.
- warning: a spill on another architecture; occupancy below 50%; a last wave under half full where
  that idles over 10% of the waves; element loads at element width because ``N`` is not 16-aligned
  (row starts then are not 16-byte aligned).

The audit also writes the time model of ``bench/NOTES.md``: per shape, dtype and weighting,
bytes / achievable bandwidth with the wave tail and one launch gap per kernel, for H100, H200 and H20,
next to the one-pass floor. Results: ``bench/results/sass/sass.{md,json}``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":  # the audit compiles for a GPU: the interpreter must be off
    raise SystemExit("bench.sass: unset TRITON_INTERPRET (the audit compiles real GPU code)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from pgdpo.kernels import pgdpo_loss as K  # noqa: E402
from pgdpo.loss.op import pack_flags  # noqa: E402
from pgdpo.tools.benchmark.cases import SHAPES  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "sass"
TOOLS = Path(triton.__file__).resolve().parent / "backends" / "nvidia" / "bin"

# ---------------------------------------------------------------------------------------------------
# What is audited
# ---------------------------------------------------------------------------------------------------

#: The GPUs the audit models: compute capability, multiprocessors, the per-SM limits occupancy uses,
#: HBM bandwidth (spec) and the achievable fraction of it a streaming kernel gets (copy rates measured
#: on this workplace's H100 / H200: ~3.0 / ~4.3 TB/s read+written, the lent machines' description).
@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str
    arch: int
    sms: int
    hbm_tb_s: float
    achievable: float
    regs_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    smem_per_sm: int = 228 * 1024


GPUS = {
    "H100": Gpu("H100", 90, 132, 3.35, 0.90),
    "H200": Gpu("H200", 90, 132, 4.8, 0.90),
    "H20": Gpu("H20", 90, 78, 4.0, 0.85),
    "A100": Gpu("A100", 80, 108, 2.0, 0.85, smem_per_sm=164 * 1024),
}
#: Time one launch adds when kernels are queued back to back on the GPU (the host runs ahead; see
#: bench/NOTES.md on the GPU timer), and the latency of a one-program epilogue over a few partials.
LAUNCH_GAP_US = 2.0
EPILOGUE_US = 3.0

#: The shape classes (bench suite names) and the batch of 8 Wan pairs.
SHAPE_CLASSES = {name: SHAPES[name][0] for name in ("sdxl", "vc2", "wan480", "wan720", "ragged")}
SHAPE_CLASSES["wan480x8"] = (16,) + SHAPES["wan480"][0][1:]

#: dtype combinations (pred, ref_pred, target).
DTYPES = {
    "fp32": (torch.float32,) * 3,
    "bf16": (torch.bfloat16,) * 3,
    "fp16": (torch.float16,) * 3,
    "mixed": (torch.bfloat16, torch.bfloat16, torch.float32),
}

#: Option sets that change the compiled code (keyword arguments of pack_flags plus the scalars).
OPTIONS = {
    "default": dict(flags=dict(ars=True, ipr=True, anchor=True, detach=True, reduction=1, need_stats=False),
                    k2=10.0, eps_rel=0.0, weight=False),
    "stats": dict(flags=dict(ars=True, ipr=True, anchor=True, detach=True, reduction=1, need_stats=True),
                  k2=10.0, eps_rel=0.0, weight=False),
    "reward": dict(flags=dict(ars=True, ipr=True, anchor=False, detach=True, reduction=1, need_stats=True),
                   k2=10.0, eps_rel=0.0, weight=False),
    "abs-margin": dict(flags=dict(ars=True, ipr=True, anchor=True, detach=False, reduction=2,
                                  abs_margin=True, need_stats=True), k2=5.0, eps_rel=0.1, weight=False),
    "per-pair": dict(flags=dict(ars=True, ipr=False, anchor=True, detach=True, reduction=0, need_stats=True),
                     k2=10.0, eps_rel=0.0, weight=True),
}
WEIGHTINGS = ("sample", "element")

#: The kernels that stream the [2B, N] tensors, and which of their pointers carry elements.
STREAMING = {
    "_sample_partial_kernel": ("p_ptr", "r_ptr", "t_ptr"),
    "_sample_backward_kernel": ("p_ptr", "r_ptr", "t_ptr"),
    "_element_fused_kernel": ("p_ptr", "r_ptr", "t_ptr"),
    "_scale_rows_kernel": ("saved_ptr",),
}
_BITS = {"fp32": 32, "bf16": 16, "fp16": 16, "fp64": 64, "i32": 32}


# ---------------------------------------------------------------------------------------------------
# Replaying the launcher
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    kernel: str
    fn: object  # the JITFunction
    grid: tuple
    args: tuple
    kwargs: dict


class _Recorder:
    def __init__(self, fn, launches):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(Launch(self.fn.fn.__name__, self.fn, tuple(grid), args, kwargs))
        return launch


_KERNELS = ("_sample_partial_kernel", "_sample_epilogue_kernel", "_sample_backward_kernel",
            "_element_fused_kernel", "_element_epilogue_kernel", "_scale_rows_kernel")


@contextlib.contextmanager
def _replaying(sm_count: int, launches: list):
    """The launcher's module with meta tensors allowed, ``sm_count`` multiprocessors and every kernel
    launch recorded instead of run."""
    saved = {name: getattr(K, name) for name in _KERNELS + ("_sm_count", "_check_device", "_on_device")}
    try:
        for name in _KERNELS:
            setattr(K, name, _Recorder(saved[name], launches))
        K._sm_count = lambda device: sm_count
        K._check_device = lambda t: None
        K._on_device = lambda t: contextlib.nullcontext()
        yield
    finally:
        for name, value in saved.items():
            setattr(K, name, value)


def record(shape, dtypes, weighting, option, sm_count) -> list[Launch]:
    """The launches of one forward + backward of the fused loss, as the launcher makes them."""
    if K.INTERPRET:
        raise RuntimeError("bench.sass: pgdpo.kernels was imported with TRITON_INTERPRET=1")
    two_b, n = shape[0], math.prod(shape[1:])
    opt = OPTIONS[option]
    pred, ref, target = (torch.empty(two_b, n, dtype=d, device="meta") for d in dtypes)
    weight = torch.empty(two_b // 2, device="meta") if opt["weight"] else None
    flags = pack_flags(element=weighting == "element", need_grad=True, **opt["flags"])
    launches: list[Launch] = []
    with _replaying(sm_count, launches):
        loss, _, saved = K.forward(pred, ref, target, weight, (100.0, 10.0, opt["k2"], 1e-6, opt["eps_rel"]),
                                   flags)
        grad_loss = torch.empty_like(loss)
        K.backward(grad_loss, pred, ref, target, saved, weighting == "element", pred.dtype)
    return launches


# ---------------------------------------------------------------------------------------------------
# Compiling and reading the SASS
# ---------------------------------------------------------------------------------------------------

_binders: dict = {}


def specialise(launch: Launch, arch: int):
    """(signature, constexprs, attrs, options) as Triton's launcher derives them from the arguments."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    key = (launch.kernel, arch)
    if key not in _binders:
        _binders[key] = create_function_from_signature(launch.fn.signature, launch.fn.params, backend)
    bound, spec, options = _binders[key](*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = launch.fn._pack_args(backend, launch.kwargs, bound, spec, options)
    return target, signature, constexprs, attrs, options


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRA = re.compile(r"\bBRA\b.*?0x([0-9a-f]+)")


def _width(opcode: str) -> int:
    parts = opcode.split(".")
    for token, bits in (("128", 128), ("64", 64), ("U16", 16), ("S16", 16), ("U8", 8), ("S8", 8)):
        if token in parts[1:]:
            return bits
    return 32


def read_sass(sass: str) -> dict:
    """Instructions, loops (backward branches), global loads / stores with width, predicate and whether
    they sit in a loop, and local-memory (spill) traffic."""
    instrs = []
    for match in _INSTR.finditer(sass):
        instrs.append((int(match.group(1), 16), match.group(2)))
    loops = []
    for addr, text in instrs:
        branch = _BRA.search(text)
        if branch and int(branch.group(1), 16) < addr:  # (not the trailing `BRA self`)
            loops.append((int(branch.group(1), 16), addr))
    memory = []
    spill_st = spill_ld = spill_bytes = spill_loop_bytes = 0
    for addr, text in instrs:
        predicated = text.startswith("@")
        opcode = text.split()[1] if predicated else text.split()[0]
        base = opcode.split(".")[0]
        if base in ("LDG", "STG"):
            memory.append(dict(op=base, width=_width(opcode), predicated=predicated,
                               in_loop=any(lo <= addr <= hi for lo, hi in loops)))
        elif base in ("STL", "LDL"):
            spill_bytes += _width(opcode) // 8
            if any(lo <= addr <= hi for lo, hi in loops):
                spill_loop_bytes += _width(opcode) // 8
            if base == "STL":
                spill_st += 1
            else:
                spill_ld += 1
    return dict(n_instr=len(instrs), loops=len(loops), memory=memory, spill_stores=spill_st,
                spill_loads=spill_ld, spill_bytes=spill_bytes, spill_loop_bytes=spill_loop_bytes)


def _tool(name: str) -> str:
    path = TOOLS / name
    if not path.exists():
        raise FileNotFoundError(f"bench.sass: {path} is missing (Triton's NVIDIA backend tools; the wheel "
                                f"for Linux x86-64 ships them)")
    return str(path)


def compile_variant(launch: Launch, arch: int) -> dict:
    target, signature, constexprs, attrs, options = specialise(launch, arch)
    start = time.perf_counter()
    kernel = triton.compile(ASTSource(launch.fn, signature, constexprs, attrs), target=target,
                            options=options.__dict__)
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                               check=True).stdout
    res = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    info = read_sass(sass)
    info.update(registers=res.get("REG", 0), stack=res.get("STACK", 0), local=res.get("LOCAL", 0),
                shared=max(res.get("SHARED", 0), kernel.metadata.shared), num_warps=options.num_warps,
                compile_s=round(seconds, 2))
    info["signature"] = {k: str(v) for k, v in signature.items()}
    info["constexprs"] = {launch.fn.arg_names[p[0]]: str(v) for p, v in constexprs.items()}
    info["divisible16"] = sorted(launch.fn.arg_names[p[0]] for p, a in attrs.items() if a)
    return info


def element_widths(kernel: str, info: dict) -> dict:
    """The streaming kernels' element loads / stores (in the loop, or the predicated ones of a loop-free
    kernel) by width, and the load width the layout allows."""
    if kernel not in STREAMING:
        return {}
    hot = [m for m in info["memory"] if (m["in_loop"] if info["loops"] else m["predicated"])]
    loads = sorted({m["width"] for m in hot if m["op"] == "LDG"})
    stores = sorted({m["width"] for m in hot if m["op"] == "STG"})
    block = int(info["constexprs"]["BLOCK"])
    per_thread = block // (32 * info["num_warps"])
    bits = [_BITS[info["signature"][p].lstrip("*")] for p in STREAMING[kernel]]
    aligned = "N" in info["divisible16"] or info["constexprs"].get("N") is not None
    allowed = min(min(128, per_thread * b) for b in bits) if aligned else min(bits)
    return dict(loads=loads, stores=stores, allowed_load=allowed, aligned=aligned,
                n_loads=sum(m["op"] == "LDG" for m in hot), n_stores=sum(m["op"] == "STG" for m in hot))


def occupancy(info: dict, gpu: Gpu, programs: int) -> dict:
    warps = info["num_warps"]
    regs = max(info["registers"], 1)
    regs_per_warp = math.ceil(regs * 32 / 256) * 256  # allocation unit: 256 registers per warp
    by_regs = (gpu.regs_per_sm // regs_per_warp) // warps
    by_warps = gpu.max_warps_per_sm // warps
    by_smem = gpu.smem_per_sm // (info["shared"] + 1024) if info["shared"] else gpu.max_blocks_per_sm
    blocks = max(0, min(by_regs, by_warps, by_smem, gpu.max_blocks_per_sm))
    limiter = min((by_regs, "registers"), (by_warps, "warps"), (by_smem, "shared"),
                  (gpu.max_blocks_per_sm, "blocks"))[1]
    waves = programs / (blocks * gpu.sms) if blocks else math.inf
    last = waves - math.floor(waves) if waves > 1 else 1.0
    return dict(blocks_per_sm=blocks, occupancy=round(blocks * warps / gpu.max_warps_per_sm, 3),
                limiter=limiter, programs=programs, waves=round(waves, 3),
                last_wave_fill=round(last if last > 0 else 1.0, 3))


# ---------------------------------------------------------------------------------------------------
# The audit
# ---------------------------------------------------------------------------------------------------


def variants(shapes, dtypes, weightings, options):
    for shape_name in shapes:
        for dtype_name in dtypes:
            for weighting in weightings:
                for option in options:
                    yield shape_name, dtype_name, weighting, option


def _grid_programs(grid) -> int:
    return math.prod(int(g) for g in grid)


def launch_bytes(launch: Launch, option: str) -> int:
    """Bytes a launch moves at the ideal (each element read / written once by the kernel)."""
    a = launch.args
    name = launch.kernel
    if name == "_sample_partial_kernel":
        return sum(t.numel() * t.element_size() for t in a[:3])
    if name == "_sample_backward_kernel":
        pred, ref, target, out = a[1], a[2], a[3], a[5]
        rows_with_ref = pred.shape[0] // 2 if OPTIONS[option]["flags"]["anchor"] else 0
        per_row = pred.shape[1]
        return (pred.numel() * pred.element_size() + target.numel() * target.element_size()
                + rows_with_ref * per_row * ref.element_size() + out.numel() * out.element_size())
    if name == "_element_fused_kernel":
        grad = a[4]
        return sum(t.numel() * t.element_size() for t in a[:3]) + grad.numel() * grad.element_size()
    if name == "_scale_rows_kernel":
        return a[1].numel() * a[1].element_size() + a[2].numel() * a[2].element_size()
    return 0


def audit(archs, shapes, dtypes, weightings, options, gpus, progress=True):
    compiled: dict = {}  # compile key -> info
    rows = []
    findings = []
    model = []
    total = len(list(variants(shapes, dtypes, weightings, options)))
    for i, (shape_name, dtype_name, weighting, option) in enumerate(
            variants(shapes, dtypes, weightings, options)):
        shape = SHAPE_CLASSES[shape_name]
        per_gpu_time = {}
        for gpu_name in gpus:
            gpu = GPUS[gpu_name]
            if gpu.arch not in archs:
                continue
            launches = record(shape, DTYPES[dtype_name], weighting, option, gpu.sms)
            seconds = 0.0
            for launch in launches:
                target, signature, constexprs, attrs, opts = specialise(launch, gpu.arch)
                key = (launch.kernel, gpu.arch, repr(signature), repr(constexprs), repr(attrs), repr(opts))
                if key not in compiled:
                    compiled[key] = compile_variant(launch, gpu.arch)
                    compiled[key]["id"] = len(compiled)
                    compiled[key]["element"] = element_widths(launch.kernel, compiled[key])
                info = compiled[key]
                occ = occupancy(info, gpu, _grid_programs(launch.grid))
                widths = info["element"]
                row = dict(shape=shape_name, dtype=dtype_name, weighting=weighting, option=option,
                           gpu=gpu_name, arch=gpu.arch, kernel=launch.kernel, variant=info["id"],
                           grid=list(launch.grid),
                           block=info["constexprs"].get("BLOCK"), num_warps=info["num_warps"],
                           registers=info["registers"], spill_stores=info["spill_stores"],
                           spill_loads=info["spill_loads"], spill_bytes=info["spill_bytes"],
                           spill_loop_bytes=info["spill_loop_bytes"],
                           stack=info["stack"], shared=info["shared"], **occ, **{"element_" + k: v
                                                                                 for k, v in widths.items()})
                rows.append(row)
                findings += judge(row)
                nbytes = launch_bytes(launch, option)
                if nbytes:
                    bw = gpu.hbm_tb_s * gpu.achievable * 1e6  # bytes per us
                    tail = math.ceil(occ["waves"]) / occ["waves"] if occ["waves"] > 1 else 1.0
                    seconds += nbytes / bw * tail + LAUNCH_GAP_US
                else:
                    seconds += EPILOGUE_US + LAUNCH_GAP_US
            floor_bytes = floor(shape, DTYPES[dtype_name])
            bandwidth = gpu.hbm_tb_s * gpu.achievable * 1e6
            per_gpu_time[gpu_name] = dict(
                model_us=round(seconds, 2), floor_us=round(floor_bytes / bandwidth, 2),
                launches=len(launches), bytes=sum(launch_bytes(la, option) for la in launches),
                floor_bytes=floor_bytes)
        if option == "default":
            model.append(dict(shape=shape_name, dtype=dtype_name, weighting=weighting, **{
                g: v for g, v in per_gpu_time.items()}))
        if progress:
            print(f"\r[{i + 1}/{total}] {shape_name} {dtype_name} {weighting} {option}: "
                  f"{len(compiled)} compiled", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    # One finding per (kernel variant, gpu, message): the same code launched for several shapes is
    # reported once, with the shapes that launch it.
    merged: dict = {}
    for f in findings:
        key = (f["level"], f["kernel"], f["variant"], f["message"])
        merged.setdefault(key, dict(f, shapes=[], gpus=[]))
        for field, value in (("shapes", f["shape"]), ("gpus", f["gpu"])):
            if value not in merged[key][field]:
                merged[key][field].append(value)
    findings = [dict({k: v for k, v in f.items() if k not in ("shape", "gpu")}) for f in merged.values()]
    kernels = [dict(id=info["id"], kernel=key[0], arch=key[1], **{k: v for k, v in info.items()
                                                                   if k not in ("memory", "id")})
               for key, info in compiled.items()]
    return dict(rows=rows, findings=findings, kernels=kernels, model=model)


def floor(shape, dtypes) -> int:
    """One-pass floor of forward + backward: read pred, ref_pred, target once, write the gradient once."""
    n = math.prod(shape)
    return n * (sum(torch.empty(0, dtype=d).element_size() for d in dtypes)
                + torch.empty(0, dtype=dtypes[0]).element_size())


def judge(row) -> list[dict]:
    out = []

    def add(level, message):
        out.append(dict(level=level, kernel=row["kernel"], variant=row["variant"], gpu=row["gpu"],
                        shape=row["shape"], message=message))

    # Any spill on sm_90 is an error, also a value ptxas parks once per thread outside the loops (seen:
    # the thread index, kept for the reductions after the loop, at 128 registers): the kernels have been
    # brought to none, so a new one means a change pushed register pressure over the edge.
    level = "error" if row["arch"] == 90 else "warning"
    if row["spill_loop_bytes"]:
        add(level, f"spills in a loop: {row['spill_loop_bytes']} B of {row['spill_stores']} STL / "
                   f"{row['spill_loads']} LDL, {row['registers']} registers")
    elif row["spill_stores"] or row["spill_loads"]:
        add(level, f"spill outside the loops: {row['spill_stores']} STL / {row['spill_loads']} LDL "
                   f"({row['spill_bytes']} B per thread, once), {row['registers']} registers")
    if "element_loads" in row:
        loads, allowed = row["element_loads"], row["element_allowed_load"]
        narrow = [w for w in loads if w < allowed]
        if narrow:
            add("error", f"element loads of {narrow} bits where the layout allows {allowed}")
        elif not row["element_aligned"] and loads and max(loads) < 64:
            add("warning", f"N not 16-aligned: element loads of {loads} bits (row starts are not 16-byte "
                           f"aligned)")
    if row["programs"] >= row["blocks_per_sm"] * GPUS[row["gpu"]].sms // 2 and row["programs"] > 1:
        if row["occupancy"] < 0.5:
            add("warning", f"occupancy {row['occupancy']:.2f} (limited by {row['limiter']}, "
                           f"{row['registers']} registers)")
        # a last wave under half full, where it costs more than 10% of the kernel's waves
        tail_cost = (1 - row["last_wave_fill"]) / math.ceil(row["waves"]) if row["waves"] > 1 else 0.0
        if row["last_wave_fill"] < 0.5 and tail_cost > 0.1:
            add("warning", f"{row['waves']:.2f} waves: last wave {row['last_wave_fill']:.0%} full "
                           f"({tail_cost:.0%} of the waves idle)")
    return out


# ---------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------


def _commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "kernels", "bench/sass.py"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [f"# SASS audit of the fused loss kernels ({meta['date']})", "",
             f"Triton {meta['triton']}, torch {meta['torch']}, commit `{meta['commit']}`, archs "
             f"{meta['archs']}, GPUs {', '.join(meta['gpus'])}. `python -m bench.sass` regenerates this page "
             f"(compiled with no GPU: `triton.compile` for an explicit target, the launcher's own "
             f"configuration and specialisation, the wheel's `cuobjdump -sass`).", ""]
    errors = [f for f in result["findings"] if f["level"] == "error"]
    warnings = [f for f in result["findings"] if f["level"] == "warning"]
    lines += [f"## Findings: {len(errors)} errors, {len(warnings)} warnings", ""]
    if result["findings"]:
        lines += ["| level | kernel | variant | gpu | shapes | finding |", "|---|---|---|---|---|---|"]
        for f in sorted(result["findings"], key=lambda f: (f["level"], f["kernel"], f["variant"])):
            lines.append(f"| {f['level']} | {f['kernel']} | {f['variant']} | {', '.join(f['gpus'])} | "
                         f"{', '.join(f['shapes'])} | {f['message']} |")
        lines.append("")
    lines += ["## Compiled variants", "",
              "| id | kernel | sm | warps | BLOCK | regs | spill B (in loop) | stack | smem | "
              "element loads (bits) | allowed | stores | N aligned | constexprs |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in result["kernels"]:
        widths = k.get("element", {})
        const = ", ".join(f"{n}={v}" for n, v in k["constexprs"].items()
                          if n not in ("ACC", "BLOCK", "EMULATE_RTNE"))
        lines.append(f"| {k['id']} | {k['kernel']} | {k['arch']} | {k['num_warps']} | "
                     f"{k['constexprs'].get('BLOCK', '')} | {k['registers']} | "
                     f"{k['spill_bytes']} ({k['spill_loop_bytes']}) | "
                     f"{k['stack']} | "
                     f"{k['shared']} | {widths.get('loads', '')} | {widths.get('allowed_load', '')} | "
                     f"{widths.get('stores', '')} | {widths.get('aligned', '')} | {const} |")
    lines += ["", "## Launches (default options)", "",
              "| shape | dtype | weighting | gpu | kernel | variant | grid | regs | occupancy | limiter | "
              "waves | last wave |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["option"] == "default":
            lines.append(f"| {r['shape']} | {r['dtype']} | {r['weighting']} | {r['gpu']} | {r['kernel']} | "
                         f"{r['variant']} | {'x'.join(map(str, r['grid']))} | {r['registers']} | "
                         f"{r['occupancy']:.2f} | {r['limiter']} | {r['waves']:.2f} | "
                         f"{r['last_wave_fill']:.0%} |")
    if result["model"]:
        gpus = [g for g in meta["gpus"] if g in result["model"][0]]
        lines += ["", "## Time model, forward + backward (default options)", "",
                  "time = sum over launches of bytes / (HBM x achievable fraction) x (ceil(waves) / waves) + "
                  f"{LAUNCH_GAP_US} us launch gap, one-program epilogues {EPILOGUE_US} us; floor = one pass "
                  "(read pred, ref_pred, target, write the gradient) at the same bandwidth. Bandwidths: " +
                  ", ".join(f"{g} {GPUS[g].hbm_tb_s} TB/s x {GPUS[g].achievable}" for g in gpus) + ".", "",
                  "| shape | dtype | weighting | MB moved | floor MB | " +
                  " | ".join(f"{g} model us | {g} floor us" for g in gpus) + " |",
                  "|---|---|---|---|---|" + "---|---|" * len(gpus)]
        for m in result["model"]:
            first = m[gpus[0]]
            lines.append(f"| {m['shape']} | {m['dtype']} | {m['weighting']} | {first['bytes'] / 1e6:.2f} | "
                         f"{first['floor_bytes'] / 1e6:.2f} | " +
                         " | ".join(f"{m[g]['model_us']:.1f} | {m[g]['floor_us']:.1f}" for g in gpus) + " |")
    return "\n".join(lines) + "\n"


def run(archs=(90, 80), shapes=None, dtypes=None, weightings=None, options=None, gpus=None, progress=True):
    shapes = list(shapes or SHAPE_CLASSES)
    dtypes = list(dtypes or DTYPES)
    weightings = list(weightings or WEIGHTINGS)
    options = list(options or OPTIONS)
    gpus = [g for g in (gpus or GPUS) if GPUS[g].arch in archs]
    start = time.perf_counter()
    result = audit(archs, shapes, dtypes, weightings, options, gpus, progress)
    result["meta"] = dict(date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                          triton=triton.__version__, torch=torch.__version__, commit=_commit(),
                          archs=list(archs), gpus=gpus, shapes=shapes, dtypes=dtypes, weightings=weightings,
                          options=options, seconds=round(time.perf_counter() - start, 1))
    return result


def _json_lines(result: dict) -> str:
    """JSON with one list item per line (~4000 launch rows: indented, the file would be 2.6 MB)."""
    parts = []
    for key, value in result.items():
        if isinstance(value, list):
            items = ",\n".join(json.dumps(v, separators=(",", ":"), default=str) for v in value)
            parts.append(f"{json.dumps(key)}: [\n{items}\n]")
        else:
            parts.append(f"{json.dumps(key)}: {json.dumps(value, default=str)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.sass", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Findings: error = any spill on sm_90 or narrower element loads "
                                       "than the layout allows; warning = occupancy < 50%, a last wave that "
                                       "leaves over 10% of the waves idle, scalar loads forced by an "
                                       "unaligned N. Exit status 1 when an error is found.")
    csv = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--arch", type=csv, default=["90", "80"], help="compute capabilities (default 90,80)")
    p.add_argument("--shapes", type=csv, help=f"shape classes (default all: {', '.join(SHAPE_CLASSES)})")
    p.add_argument("--dtypes", type=csv, help=f"dtype combinations (default all: {', '.join(DTYPES)})")
    p.add_argument("--weightings", type=csv, help="sample,element (default both)")
    p.add_argument("--options", type=csv, help=f"option sets (default all: {', '.join(OPTIONS)})")
    p.add_argument("--gpus", type=csv, help=f"GPUs modelled (default all: {', '.join(GPUS)})")
    p.add_argument("--json", type=Path, help="JSON output (default bench/results/sass/sass.json)")
    p.add_argument("--markdown", type=Path, help="markdown output (default next to the JSON, .md)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    args = p.parse_args(argv)
    for name, values, known in (("--shapes", args.shapes, SHAPE_CLASSES), ("--dtypes", args.dtypes, DTYPES),
                                ("--weightings", args.weightings, WEIGHTINGS),
                                ("--options", args.options, OPTIONS), ("--gpus", args.gpus, GPUS)):
        bad = [v for v in values or () if v not in known]
        if bad:
            p.error(f"{name}: unknown {bad}; known: {', '.join(known)}")
    try:
        args.arch = [int(a) for a in args.arch]
    except ValueError:
        p.error(f"--arch takes compute capabilities like 90,80, got {args.arch}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    _tool("cuobjdump")
    result = run(tuple(args.arch), args.shapes, args.dtypes, args.weightings, args.options, args.gpus,
                 progress=not args.quiet)
    json_path = args.json or RESULTS / "sass.json"
    md_path = args.markdown or json_path.with_suffix(".md")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    # launch rows without what their compiled variant (``kernels``, by ``variant`` id) already says
    per_variant = {"arch", "block", "num_warps", "registers", "spill_stores", "spill_loads", "spill_bytes",
                   "spill_loop_bytes", "stack", "shared"}
    rows = [{k: v for k, v in r.items() if k not in per_variant and not k.startswith("element_")}
            for r in result["rows"]]
    json_path.write_text(_json_lines({**result, "rows": rows}))
    md_path.write_text(markdown(result))
    errors = [f for f in result["findings"] if f["level"] == "error"]
    print(f"{len(result['kernels'])} kernel variants compiled in {result['meta']['seconds']} s; "
          f"{len(errors)} errors, {len(result['findings']) - len(errors)} warnings -> {json_path}, {md_path}")
    for f in errors:
        where = f"variant {f['variant']}, {', '.join(f['gpus'])}, {', '.join(f['shapes'])}"
        print(f"error: {f['kernel']} ({where}): {f['message']}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
