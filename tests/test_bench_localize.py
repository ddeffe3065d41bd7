"""bench localize: planted defects and shifts with an oracle, end to end on the digits samples."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bench import localize_bench
from bench.__main__ import main as bench_main


def test_localize_end_to_end_on_tiny_data(tmp_path, sgd_checkpoint, digits_probe):
    out = tmp_path / "RESULTS.md"
    dump = tmp_path / "loc.json"
    code = bench_main(["localize", "--checkpoint", str(sgd_checkpoint), "--probe",
                       str(digits_probe), "--seeds", "1", "--groups", "layer1,fc",
                       "--defects", "noise,bnstats", "--shifts", "labels,blur",
                       "--shift-train", "120", "--shift-eval", "120", "--shift-steps", "4",
                       "--shift-lrs", "0.01", "--device", "cpu", "--out", str(out),
                       "--json", str(dump), "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    text = out.read_text()
    assert "localize: planted defects, digits-sgd.safetensors" in text
    assert "localize: shifts with an oracle, digits-sgd.safetensors" in text
    assert "| chance | 0.17 |" in text and "not applicable: fc/bnstats" in text
    data = json.loads(dump.read_text())
    cases = data["planted"]["cases"]
    assert [(c["group"], c["defect"]) for c in cases] == [
        ("layer1", "noise"), ("layer1", "bnstats"), ("fc", "noise")]
    for c in cases:
        for method in ("alone_net", "combined", "replay_reduction", "net_reduction",
                       "auto_rgn", "random",
                       "grad_x_activation_per_unit"):
            assert 1.0 <= c["ranks"][method] <= 6.0
    rules = data["planted"]["rules"]
    assert {"share_and_equal", "share_or_top", "equal", "top1", "above_null"} <= set(
        rules["alone_net"])
    shifts = data["shifts"]
    assert [s["shift"] for s in shifts] == ["labels", "blur"]
    for s in shifts:
        assert set(s["gains"]) >= {"conv1", "bn1", "layer1", "layer2", "layer3", "fc", "all"}
        best = max(s["gains"][g] for g in s["groups"])
        for m in s["methods"].values():
            assert m["regret"] == pytest.approx(best - s["gains"][m["top"]])
        assert s["truth"] and all(s["gains"][g] >= best - s["noise"] for g in s["truth"])
    assert shifts[0]["info"]["permuted"] and len(shifts[0]["info"]["permuted"]) == 3


def test_unknown_parts_and_shifts_are_refused_before_any_work(tmp_path, capsys,
                                                             sgd_checkpoint, digits_probe):
    out = tmp_path / "RESULTS.md"
    for extra, message in ((["--parts", "planted,oracle"], "unknown part oracle"),
                           (["--shifts", "fog"], "unknown shift fog"),
                           (["--defects", "melt"], "unknown defect 'melt'"),
                           (["--drop", "2"], "--drop must be in (0, 1)")):
        assert bench_main(["localize", "--checkpoint", str(sgd_checkpoint), "--probe",
                           str(digits_probe), "--out", str(out), *extra]) == 2
        assert message in capsys.readouterr().err
    assert not out.exists()


def test_corruptions_keep_the_range_and_change_the_images():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((4, 3, 8, 8), generator=gen)
    for shift in ("gaussian_noise", "blur", "contrast", "jpeg"):
        y = localize_bench.corrupt(x, shift, seed=0)
        assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
        assert not torch.allclose(x, y)
    assert torch.equal(localize_bench.corrupt(x, "labels", 0), x)
    labels = torch.arange(10).repeat(3)
    permuted, (a, b, c) = localize_bench.permuted_labels(labels, 10, seed=0)
    assert (permuted[labels == a] == b).all() and (permuted[labels == c] == a).all()
    assert ((permuted != labels).sum()) == 9


def test_flag_rules_on_a_synthetic_score_vector():
    scores = np.array([0.05, 0.5, 0.3, 0.15])
    shares = np.array([0.01, 0.6, 0.2, 0.19])
    rules = localize_bench.flag_rules(scores, shares, np.array([0.1, 0.6, 0.2, 0.1]))
    assert rules["share_and_equal"].tolist() == [False, False, True, False]
    assert rules["share_or_top"].tolist() == [False, True, True, False]
    assert rules["equal"].tolist() == [False, True, True, False]
    assert rules["top1"].tolist() == [False, True, False, False]
    assert rules["above_null"].tolist() == [False, False, True, True]


def test_localize_trust_region_candidates_and_the_report_of_a_run_without_the_replay_metric(
        tmp_path, sgd_checkpoint, digits_probe):
    out, dump = tmp_path / "RESULTS.md", tmp_path / "loc.json"
    code = bench_main(["localize", "--checkpoint", str(sgd_checkpoint), "--probe",
                       str(digits_probe), "--seeds", "1", "--groups", "layer1,fc",
                       "--defects", "noise", "--parts", "planted", "--baselines", "auto_rgn",
                       "--candidates", "kl", "--device", "cpu", "--out", str(out),
                       "--json", str(dump), "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    data = json.loads(dump.read_text())["planted"]
    assert data["metric"] == "alone_net" and "replay_reduction" not in data["methods"]
    # the null line names the scan's own metric (it read replay_reduction, and crashed)
    assert "Null (unmodified model)" in out.read_text()
    for c in data["cases"]:
        for budget in localize_bench.KL_BUDGETS:
            shares = np.array(c["scores"][f"kl_{budget:g}"], dtype=float)
            assert (shares >= 0).all() and shares.sum() == pytest.approx(1.0)
            assert 1.0 <= c["ranks"][f"kl_{budget:g}"] <= 6.0
