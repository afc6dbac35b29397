"""pgdpo.train.log: the training stack logs through `logging`, in pgdpo's words, with rank 0 the only writer."""

from __future__ import annotations

import io

from pgdpo.train.log import logger, setup_logging


def test_rank0_writes_each_message_once_and_other_ranks_nothing():
    main, other = io.StringIO(), io.StringIO()
    setup_logging(False, other).info("not from rank 1")
    assert other.getvalue() == ""
    setup_logging(True, main)
    setup_logging(True, main)  # a second Trainer in the process replaces the handler, never stacks it
    logger.info("resumed from x")
    assert main.getvalue() == "pgdpo train: resumed from x\n"
    setup_logging(False, other)
    logger.warning("a warning on rank 1")
    assert other.getvalue() == "" and main.getvalue() == "pgdpo train: resumed from x\n"
