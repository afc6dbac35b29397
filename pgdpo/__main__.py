"""``python -m pgdpo``: the ``pgdpo`` command (and what ``torchrun -m pgdpo`` runs in each worker)."""

import logging
import os
import sys

from .cli import main

code = main()
if code == 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # A torchrun worker that finished (process group destroyed, files closed, ranks synchronised): leave
    # without the interpreter's teardown. Under load, gloo's threads occasionally aborted a worker during
    # that teardown ("terminate called without an active exception", SIGABRT) after the run had finished,
    # which turned a finished run into a failed launch.
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0)
sys.exit(code)
