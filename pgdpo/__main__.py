"""``python -m pgdpo``: the ``pgdpo`` command (and what ``torchrun -m pgdpo`` runs in each worker)."""

import os
import sys

from .cli import main

code = main()
if code == 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
    from .train.distributed import leave_finished_worker  # (the training stack only for a torchrun worker)

    leave_finished_worker()
sys.exit(code)
