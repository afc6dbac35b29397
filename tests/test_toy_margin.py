"""``pgdpo toy --margin abs``: on well-separated pairs alpha and gamma sit on the paper's side of 1/2."""

import json

from pgdpo import cli


def test_abs_margin_far_pairs_paper_side(tmp_path):
    out = tmp_path / "toy"
    assert cli.main(["toy", "--out", str(out), "--quick", "--no-progress", "--no-plots", "--margin", "abs",
                     "--eps-rel", "0.01", "--pair-sets", "far", "--methods", "dpo,pgdpo"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert (s["settings"]["margin"], s["settings"]["eps_rel"]) == ("abs", 0.01)
    pg = s["pair_sets"]["far"]["methods"]["pgdpo"]
    assert pg["alpha"]["mean"] > 0.5 and pg["gamma"]["mean"] < 0.5, (pg["alpha"], pg["gamma"])
    assert pg["margin_positive_fraction"] > 0.5
    assert any("(d_l - d_w)/(|d_l| + e)" in line for line in s["findings"])
