"""``python -m bench rescore`` scores rankings combined from a localize run's per-case scores:
checked on two hand-made cases whose answers are known."""
from __future__ import annotations

import json

import pytest

from bench import rescore_bench


def _case(group, own, rgn, reached=True):
    scores = {"replay_reduction": own, "auto_rgn": rgn, "net_reduction": own}
    return {"group": group, "reached": reached, "scores": scores}


def test_rescore_ranks_each_candidate_and_scores_it(tmp_path):
    data = {"planted": {"model": "m", "probe": 10, "groups": ["a", "b", "c"],
                        "shares": [0.1, 0.3, 0.6], "chance": [1 / 3, 0.61],
                        "cases": [_case("a", [0.2, 0.5, 0.3], [0.9, 0.05, 0.05]),
                                  _case("c", [0.1, 0.2, 0.7], [0.2, 0.5, 0.3]),
                                  _case("b", [0.0, 1.0, 0.0], [0.0, 1.0, 0.0], reached=False)]}}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(data))
    run = rescore_bench.score_run(path)
    assert run["cases"] == 2  # the unreached case is left out
    table = run["table"]
    assert table["own metric"]["top1"] == 0.5 and table["own metric"]["by_group"] == {
        "a": 0.0, "c": 1.0}
    assert table["auto_rgn"]["top1"] == 0.5 and table["auto_rgn"]["by_group"]["a"] == 1.0
    # a: own 0.2*rgn 0.9 = 0.18 beats b's 0.5*0.05 and c's 0.3*0.05; c: 0.7*0.3 > 0.2*0.5
    assert table["combined: geometric mean (own, rgn)"]["top1"] == 1.0
    assert table["own metric"]["mrr"] == pytest.approx((1 / 3 + 1) / 2)
    out = tmp_path / "log.md"
    args = rescore_bench.argparse.Namespace(json=str(path), out=out)
    assert rescore_bench.run(args) == 0
    assert "| combined: geometric mean (own, rgn) | 1.00 / 1.00 |" in out.read_text()


def test_rescore_without_a_file_says_how_to_make_one(tmp_path):
    from model_audit.errors import ConfigError
    args = rescore_bench.argparse.Namespace(json=str(tmp_path / "none.json"), out=tmp_path / "o")
    with pytest.raises(ConfigError, match="python -m bench localize --parts planted --json"):
        rescore_bench.run(args)
    assert not (tmp_path / "o").exists()
