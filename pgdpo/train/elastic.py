"""What torchrun tells a worker about an elastic launch (``--max-restarts``), and a process-group store
that keeps a restarted worker group apart from the one before it.

torchrun exports to every worker ``TORCHELASTIC_RESTART_COUNT`` (0 for the first attempt, k after the
k-th restart of this node's worker group), ``TORCHELASTIC_RUN_ID`` (the launch's ``--rdzv-id``; a random
id with ``--standalone``) and ``TORCHELASTIC_USE_AGENT_STORE`` (the workers share the launcher's TCPStore
at ``MASTER_ADDR:MASTER_PORT``). The shared store outlives a restart, so the restarted workers would read
the previous attempt's keys (gloo connecting to a dead worker's address: "Gloo connectFullMesh failed
... Connection refused"); :func:`process_group_store` puts each attempt under a prefix of its own.
docs/resume.md says how the trainer uses these.
"""

from __future__ import annotations

import os
from datetime import timedelta

from torch.distributed import PrefixStore, TCPStore


def restart_count() -> int:
    """``TORCHELASTIC_RESTART_COUNT`` (0 outside torchrun or on a first attempt)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def run_id() -> str | None:
    """``TORCHELASTIC_RUN_ID``: which launch this is (None outside torchrun, or for rdzv id ``none``,
    torchrun's default without ``--standalone``, which names no launch in particular)."""
    value = os.environ.get("TORCHELASTIC_RUN_ID")
    return None if value in (None, "", "none") else value


def process_group_store(world_size: int, timeout: timedelta) -> dict:
    """``init_process_group`` keyword arguments for a restarted attempt that shares the launcher's store:
    ``{"store": <that store under the prefix "pgdpo-restart-<k>">}``; ``{}`` otherwise (env:// as usual)."""
    count = restart_count()
    if count == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                     is_master=False, timeout=timeout)
    return {"store": PrefixStore(f"pgdpo-restart-{count}", store)}
