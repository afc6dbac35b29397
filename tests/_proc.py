"""Resident-memory probes for the tests' torchrun workers (run as scripts: this folder is on their path)."""

import gc


def status_bytes(field: str) -> int:
    """A size field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> int:
    """Reset VmHWM to VmRSS (``/proc/self/clear_refs`` 5) and return VmRSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_bytes("VmRSS")


def peak_added(fn) -> int:
    """Peak resident memory ``fn()`` adds above the resident memory before it."""
    gc.collect()
    before = reset_peak()
    fn()
    return status_bytes("VmHWM") - before
