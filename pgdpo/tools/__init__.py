"""Tools on top of the two layers: the planner (:mod:`.plan`, ``pgdpo plan``), the demo (:mod:`.demo`,
``pgdpo demo``), the likelihood-displacement lab (:mod:`.toy`, ``pgdpo toy``) and the benchmark machinery that
``pgdpo demo`` and ``python -m bench`` share (:mod:`.benchmark`)."""
