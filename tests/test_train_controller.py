"""The K1/K2 controller in ``pgdpo train`` (``method.k_controller``): recorded, checkpointed, resumed exactly;
the alpha / gamma in-range fractions in metrics.jsonl; the weight-ranges plot."""

import os

import pytest

from pgdpo.train.cli import main
from pgdpo.train.config import ConfigError, from_dict

from .test_train import TIMING, args, data, metrics  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")

OPTS = ("--method.k_controller", "true", "--method.margin", "abs", "--optim.lr", "1e-3")


def test_controller_resume_reproduces_uninterrupted_run(tmp_path, data):  # noqa: F811
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(args(full, data, 4, *OPTS)) == 0
    assert main(args(part, data, 2, *OPTS)) == 0
    assert main(args(part, data, 4, *OPTS, "--resume", "latest")) == 0
    records = metrics(full)
    assert all({"k1", "k2", "alpha_in_range", "gamma_in_range"} <= set(r) for r in records)
    assert all(0 <= r["alpha_in_range"] <= 1 and 0 <= r["gamma_in_range"] <= 1 for r in records)
    # step 1 runs at policy == reference (m = 0: every vote is 0), later steps move K
    assert records[0]["k1"] == 10.0 and any(r["k1"] != 10.0 or r["k2"] != 10.0 for r in records), records
    resumed = metrics(part)
    assert resumed == [dict(r, **{k: resumed[i][k] for k in TIMING}) for i, r in enumerate(records)]


def test_controller_off_by_default_and_plots(tmp_path, data):  # noqa: F811
    out = tmp_path / "plain"
    assert main(args(out, data, 2, "--logging.plots", "true")) == 0
    records = metrics(out)
    assert "k1" not in records[0] and "alpha_in_range" in records[0]
    assert os.path.isfile(out / "weight_ranges.png")
    with pytest.raises(ConfigError, match="method.k_controller steers"):
        from_dict({"method": {"name": "sft", "k_controller": True}})


@pytest.mark.distributed
def test_controller_under_two_process_fsdp(tmp_path):
    """2-process FSDP2 (gloo): the margins are gathered over both ranks and the run steers and finishes."""
    from pgdpo.train.data.synth import synth_dataset

    from .test_train_distributed import command, records, run

    path = tmp_path / "pairs"
    synth_dataset(path, pairs=16, latent_shape=(16, 3, 8, 8), text_len=16, text_dim=32, progress=False)
    out = tmp_path / "fsdp"
    proc = run(command(out, str(path), 3, *OPTS))
    assert "strategy fsdp" in proc.stderr
    rs = records(out)
    assert [r["step"] for r in rs] == [1, 2, 3] and all("k1" in r and "alpha_in_range" in r for r in rs)
    assert rs[0]["k1"] == 10.0 and (rs[-1]["k1"] != 10.0 or rs[-1]["k2"] != 10.0)
