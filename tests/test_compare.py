"""compare: overlap, rank correlation, bootstrap intervals and chance level of two scans."""
import json

import pytest
import torch
from click.testing import CliRunner

from conftest import snapshot
from model_audit import AuditOptions, ScanConfig, load_checkpoint, scan
from model_audit.cli import cli
from model_audit.commands.compare import CompareError, compare
from model_audit.results.compare import CompareConfig
from model_audit.core.stats import hypergeom_sf, kendall_tau_b, spearman
FAST = ScanConfig(bootstrap=20)


@pytest.fixture(scope="module")
def sgd_audit():
    from conftest import SAMPLES

    return scan(SAMPLES / "digits-sgd.safetensors", SAMPLES / "digits-probe.safetensors", FAST).to_dict()


def test_identical_scans_agree_fully(sgd_audit):
    result = compare(sgd_audit, sgd_audit, CompareConfig(resamples=100))
    d = result.to_dict()
    assert d["jaccard"] == 1.0 and d["overlap_coefficient"] == 1.0
    # scipy.stats computes them: 1 within the last digit
    assert d["correlation"]["score"] == {"spearman": pytest.approx(1.0),
                                                    "kendall": pytest.approx(1.0)}
    assert all(v == 1.0 for v in d["top_k_overlap"].values())
    assert d["intervals"]["paired"] is True
    assert d["intervals"]["jaccard"] == [1.0, 1.0] and d["intervals"]["spearman"] == pytest.approx([1.0, 1.0])
    assert d["flagged"]["a"] == d["flagged"]["b"] == sgd_audit["flagged"]


def test_a_perturbed_group_shifts_that_group(sgd_audit):
    from conftest import SAMPLES

    ckpt = load_checkpoint(SAMPLES / "digits-sgd.safetensors")
    torch.manual_seed(1)
    with torch.no_grad():
        w = ckpt.model.conv1.weight
        w.add_(torch.randn_like(w) * w.std() * 0.3)
    hurt = scan(ckpt, SAMPLES / "digits-probe.safetensors", FAST).to_dict()
    d = compare(sgd_audit, hurt, CompareConfig(resamples=50)).to_dict()
    rows = {s["name"]: s for s in d["scores"]}
    shift = {n: rows[n]["score_b"] - rows[n]["score_a"] for n in rows}
    assert max(shift, key=shift.get) == "conv1"
    assert max(rows, key=lambda n: rows[n]["score_b"]) == "conv1"  # now ranked first
    assert max(rows, key=lambda n: rows[n]["score_a"]) != "conv1"
    assert d["correlation"]["score"]["spearman"] < 1.0


def test_chance_level_against_hand_checked_numbers():
    # 7 groups, both flag 3, all 3 shared: P = 1 / C(7, 3) = 1/35
    assert hypergeom_sf(3, 7, 3, 3) == pytest.approx(1 / 35)
    # P(X >= 1) = 1 - C(4,3)/C(7,3) = 1 - 4/35
    assert hypergeom_sf(1, 7, 3, 3) == pytest.approx(31 / 35)
    assert hypergeom_sf(0, 7, 3, 3) == pytest.approx(1.0)


def _fake_audit(scores, flagged, arch="tiny-resnet"):
    names = [f"g{i}" for i in range(len(scores))]
    return {"schema_version": 1, "model": {"arch": arch, "path": "x"},
            "probe": {"source": "p", "n": 10}, "granularity": "group",
            "layers": [{"name": n, "params": 10, "share": 1 / len(scores), "score": s,
                        "flag_frequency": 1.0 if n in flagged else 0.0} for n, s in zip(names, scores)],
            "flagged": flagged}


def test_compare_on_hand_made_audits():
    a = _fake_audit([0.4, 0.3, 0.2, 0.05, 0.03, 0.01, 0.01], ["g0", "g1", "g2"])
    b = _fake_audit([0.35, 0.05, 0.3, 0.2, 0.05, 0.03, 0.02], ["g0", "g2", "g3"])
    d = compare(a, b, CompareConfig(resamples=0)).to_dict()
    assert d["flagged"]["both"] == ["g0", "g2"]
    assert d["jaccard"] == pytest.approx(2 / 4) and d["overlap_coefficient"] == pytest.approx(2 / 3)
    assert d["chance"]["expected_overlap"] == pytest.approx(9 / 7)
    assert d["chance"]["p_value"] == pytest.approx(hypergeom_sf(2, 7, 3, 3))
    assert d["top_k_overlap"] == {"1": 1.0, "2": 0.5, "3": pytest.approx(2 / 3)}
    sa = [0.4, 0.3, 0.2, 0.05, 0.03, 0.01, 0.01]
    sb = [0.35, 0.05, 0.3, 0.2, 0.05, 0.03, 0.02]
    assert d["correlation"]["score"]["spearman"] == pytest.approx(spearman(sa, sb))
    assert d["correlation"]["score"]["kendall"] == pytest.approx(kendall_tau_b(sa, sb))
    assert d["intervals"]["resamples"] == 0


def test_different_groups_need_allow_partial(sgd_audit):
    from conftest import SAMPLES

    blocks = scan(SAMPLES / "digits-sgd.safetensors", SAMPLES / "digits-probe.safetensors",
                  ScanConfig(AuditOptions(granularity="block"), bootstrap=10)).to_dict()
    with pytest.raises(CompareError, match="different layer groups.*--allow-partial"):
        compare(sgd_audit, blocks)
    d = compare(sgd_audit, blocks, CompareConfig(allow_partial=True, resamples=20)).to_dict()
    assert d["groups"] == ["conv1", "bn1", "fc"]
    assert "layer1" in d["left_out"]["a_only"] and "layer1.0" in d["left_out"]["b_only"]
    other = _fake_audit([0.5, 0.5], ["g0"], arch="resnet18")
    with pytest.raises(CompareError, match="different architectures"):
        compare(sgd_audit, other)


def test_cli_compare_checkpoints_and_audits(tmp_path, sgd_checkpoint, adam_checkpoint, digits_probe):
    runner = CliRunner()
    out = tmp_path / "cmp"
    r = runner.invoke(cli, ["compare", str(sgd_checkpoint), str(adam_checkpoint), "--probe",
                            str(digits_probe), "--out", str(out), "--resamples", "50"])
    assert r.exit_code == 0, r.output
    assert "Jaccard" in r.output and "P(overlap >=" in r.output and "Spearman" in r.output
    data = json.loads((out / "compare.json").read_text())
    assert data["intervals"]["paired"] and data["intervals"]["resamples"] == 50
    assert (out / "report.html").read_text().startswith("<!DOCTYPE html>")
    # from two audit.json files
    for name, ck in (("a", sgd_checkpoint), ("b", adam_checkpoint)):
        assert runner.invoke(cli, ["scan", str(ck), "--probe", str(digits_probe), "--out",
                                   str(tmp_path / name), "--bootstrap", "10", "-q"]).exit_code == 0
    r = runner.invoke(cli, ["compare", str(tmp_path / "a/audit.json"), str(tmp_path / "b/audit.json"),
                            "--out", str(tmp_path / "cmp2"), "--resamples", "50"])
    assert r.exit_code == 0, r.output
    again = json.loads((tmp_path / "cmp2/compare.json").read_text())
    assert again["jaccard"] == data["jaccard"] and again["correlation"] == data["correlation"]


def test_cli_compare_bad_inputs(tmp_path, sgd_checkpoint, digits_probe):
    runner = CliRunner()
    (tmp_path / "bad.json").write_text("[1, 2]")
    before = snapshot(tmp_path)
    r = runner.invoke(cli, ["compare", str(tmp_path / "bad.json"), str(tmp_path / "bad.json"),
                            "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "not an audit.json" in r.output and "Traceback" not in r.output
    r = runner.invoke(cli, ["compare", str(sgd_checkpoint), str(tmp_path / "missing.safetensors"),
                            "--probe", str(digits_probe), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "missing.safetensors' does not exist" in r.output
    assert snapshot(tmp_path) == before
