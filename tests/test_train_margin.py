"""``method.margin`` and ``method.eps_rel`` in the trainer config reach the loss (docs/margin.md)."""

import math

import pytest

from pgdpo.train.cli import main
from pgdpo.train.config import ConfigError, from_dict

from .test_train import args, data, metrics  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_config_fields_and_errors():
    cfg = from_dict({"method": {"margin": "abs", "eps_rel": "1e-2"}})
    assert (cfg.method.margin, cfg.method.eps_rel) == ("abs", 1e-2)
    assert (from_dict({}).method.margin, from_dict({}).method.eps_rel) == ("signed", 0.0)  # the paper's
    with pytest.raises(ConfigError, match=r"method.margin must be one of .*'abs'.*got 'absolute'"):
        from_dict({"method": {"margin": "absolute"}})
    with pytest.raises(ConfigError, match="method.eps_rel must be >= 0"):
        from_dict({"method": {"eps_rel": -1}})


def test_training_with_abs_margin_and_guard(tmp_path, data):  # noqa: F811
    from pgdpo.train.config import load_config
    from pgdpo.train.trainer import Trainer

    out = tmp_path / "abs"
    assert main(args(out, data, 2, "--method.margin", "abs", "--method.eps_rel", "0.01")) == 0
    records = metrics(out)
    assert len(records) == 2 and all(math.isfinite(r["loss"]) for r in records)
    # policy == reference: m = 0, alpha = gamma = 1/2, L_ipr = 0, so L = log(2) / 2
    assert records[0]["loss"] == pytest.approx(0.5 * math.log(2), rel=1e-5)
    assert records[0]["gamma_mean"] == pytest.approx(0.5) and records[0]["alpha_mean"] == pytest.approx(0.5)
    cfg = load_config(args(out, data, 1)[1], [("output_dir", str(tmp_path / "t")), ("data.path", data),
                                                ("logging.trackers", []), ("logging.progress", False),
                                                ("method.margin", "abs"), ("method.eps_rel", 0.01)])
    trainer = Trainer(cfg)
    try:
        opts = trainer.step_fn.loss.options
        assert (opts.margin, opts.eps_rel) == ("abs", 0.01)
    finally:
        trainer.close()
