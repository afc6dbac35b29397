"""Tools on top of the loss library: the benchmark machinery that ``pgdpo demo`` and ``python -m bench``
share (:mod:`pgdpo.tools.benchmark`)."""
