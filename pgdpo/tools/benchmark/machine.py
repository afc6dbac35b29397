"""What the figures were measured on: machine, cache sizes, versions, git commit, load."""

from __future__ import annotations

import os
import platform
import re
import socket
import subprocess
import sys
from pathlib import Path

import torch

# pgdpo/tools/benchmark/machine.py -> the repository (or, installed, the folder above the package)
REPO = Path(__file__).resolve().parents[3]


def resolve_device(text: str) -> torch.device:
    """``auto`` (CUDA when torch sees a GPU, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``; a clear
    error for anything else, or for CUDA where this torch sees none."""
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this torch sees no CUDA device "
                         f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})")
    return device


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", text, re.I)
    if not m:
        return 0
    return int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2).upper()]


def cpu_llc_bytes() -> int:
    """Size of the largest CPU cache (the last level), from sysfs; 32 MiB when unknown."""
    best = 0
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in root.glob("index*"):
        try:
            best = max(best, _size((index / "size").read_text()))
        except OSError:
            continue
    return best or 32 << 20


def gpu_l2_bytes(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or 64 << 20)


def cache_bytes(device: torch.device) -> int:
    return gpu_l2_bytes(device) if device.type == "cuda" else cpu_llc_bytes()


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def git_info() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None, "error": head.stderr.strip()}
        # dirty: tracked files modified, or source files not in the commit (untracked, not ignored)
        changed = git("status", "--porcelain").stdout.splitlines()
        return {"commit": head.stdout.strip(), "dirty": bool(changed), "changed_files": len(changed)}
    except (OSError, subprocess.SubprocessError) as exc:
        return {"commit": None, "dirty": None, "error": str(exc)}


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "triton": None, "pgdpo": None}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        import pgdpo

        out["pgdpo"] = pgdpo.__version__
    except ImportError:
        pass
    return out


def machine_info(device: torch.device) -> dict:
    info = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_available": available_cpus(),
        "cpu_llc_bytes": cpu_llc_bytes(),
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": _total_memory(),
        "device": str(device),
        "python_executable": portable_path(sys.executable),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu_model=props.name, gpu_count=torch.cuda.device_count(),
                    gpu_memory_bytes=props.total_memory, gpu_l2_bytes=gpu_l2_bytes(device),
                    gpu_sm_count=props.multi_processor_count)
    return info


def _total_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def slug(device: torch.device) -> str:
    """A short machine name for the default results folder, e.g. ``cpu-amd-epyc-2c`` or ``nvidia-h200``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_properties(device).name
    else:
        model = re.sub(r"\(.*?\)|@.*$|\b(cpu|processor)\b", " ", cpu_model(), flags=re.I)
        name = f"cpu-{model}-{available_cpus()}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:48] or "machine"


def portable_path(path) -> str:
    """``path`` relative to the repository, or with the home directory as ``~``: records name no
    user's machine layout."""
    text = str(path)
    for root, shown in ((str(REPO), "."), (str(Path.home()), "~")):
        if text == root or text.startswith(root + "/"):
            return shown + text[len(root):]
    return text
