"""``python -m pgdpo``: the same as the ``pgdpo`` command (:mod:`pgdpo.cli`)."""

import sys

from .cli import main

sys.exit(main())
