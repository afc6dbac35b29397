"""Tests of ``pgdpo toy``: the quick run writes a well-formed summary and plots; the pair sets are what
they claim to be."""

import json
import math
import os

import pytest
import torch

from pgdpo import cli, toy

METHODS = ("dpo", "ars", "ipr", "pgdpo")
PER_METHOD_KEYS = ("chosen_logp_change", "rejected_logp_change", "gamma_positive_fraction", "alpha", "gamma",
                   "grad_norm_vs_margin", "curves", "own_step_chosen_up_fraction")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    assert cli.main(["toy", "--out", str(out), "--quick", "--no-progress"]) == 0
    with open(out / "summary.json") as f:
        return out, json.load(f)


def numbers(x):
    if isinstance(x, dict):
        for v in x.values():
            yield from numbers(v)
    elif isinstance(x, list):
        for v in x:
            yield from numbers(v)
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield x


def test_quick_summary_is_well_formed(quick):
    out, s = quick
    assert s["schema"] == "pgdpo.toy/1"
    assert all(math.isfinite(v) for v in numbers(s))
    assert set(s["methods"]) == set(METHODS)
    assert set(s["pair_sets"]) == {"near", "far"}
    for where in [s["methods"]] + [ps["methods"] for ps in s["pair_sets"].values()]:
        for name in METHODS:
            m = where[name]
            for key in PER_METHOD_KEYS:
                assert key in m, (name, key)
            assert isinstance(m["chosen_logp_change"], float)
            assert isinstance(m["rejected_logp_change"], float)
            c = m["curves"]
            assert len(c["step"]) == len(c["chosen_logp_change"]) == len(c["rejected_logp_change"]) >= 2
            assert c["step"][0] == 0 and c["step"][-1] == s["settings"]["steps"]
            assert c["chosen_logp_change"][0] == 0.0  # changes are relative to the start (the reference)
            assert c["chosen_logp_change"][-1] == pytest.approx(m["chosen_logp_change"])
    dpo, pg = s["methods"]["dpo"], s["methods"]["pgdpo"]
    assert dpo["gamma_positive_fraction"] is None and dpo["alpha"] is None and dpo["gamma"] is None
    assert 0.0 <= pg["gamma_positive_fraction"] <= 1.0
    assert 0.0 <= pg["alpha"]["min"] <= pg["alpha"]["mean"] <= pg["alpha"]["max"] <= 1.0
    assert pg["alpha"]["target_range"] == [0.5, 0.8] and pg["gamma"]["target_range"] == [0.0, 0.5]
    assert s["methods"]["ars"]["gamma"] is None and s["methods"]["ipr"]["alpha"] is None
    assert s["findings"] and all(isinstance(x, str) and x for x in s["findings"])
    assert s["verdict"] and all(isinstance(v, bool) for v in s["verdict"].values())
    for name in ("fig2_likelihood.png", "fig1a_gradnorm_margin.png", "weight_ranges.png", "gamma_statistic.png"):
        path = out / name
        assert path.is_file() and path.stat().st_size > 1000
        assert name in s["plots"]
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_quick_top_level_averages_the_pair_sets(quick):
    _, s = quick
    for name in METHODS:
        per_set = [s["pair_sets"][p]["methods"][name]["chosen_logp_change"] for p in ("near", "far")]
        assert s["methods"][name]["chosen_logp_change"] == pytest.approx(sum(per_set) / 2)


def test_pair_sets_prefer_the_upper_sample_and_differ_in_separation():
    cfg = toy.ToyConfig(pairs=256)
    near_w, near_l = toy.make_pairs("near", cfg, torch.Generator().manual_seed(0))
    far_w, far_l = toy.make_pairs("far", cfg, torch.Generator().manual_seed(0))
    assert bool((near_w[:, 1] >= near_l[:, 1]).all()) and bool((far_w[:, 1] > far_l[:, 1]).all())
    near_d = (near_w - near_l).norm(dim=1).mean()
    far_d = (far_w - far_l).norm(dim=1).mean()
    assert near_d < cfg.mode_std  # closer than the spread of one mode: near-identical
    assert far_d > cfg.radius  # across the ring: well separated


def test_help_and_bad_arguments(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        toy.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--quick" in text and "summary.json" in text
    with pytest.raises(SystemExit, match="unknown pair set"):
        toy.main(["--out", str(tmp_path), "--quick", "--pair-sets", "nope", "--no-progress"])
    assert not os.path.exists(tmp_path / "summary.json")
