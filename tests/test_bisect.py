"""Regression bisection between two releases of one architecture (issue #30, part 3).

Releases are built here from the committed digits model: one with noise in a single group, one
fine-tuned with every layer trainable on data with a bug (two classes' labels swapped). Every
count is checked against a second, independent computation: a fresh model built from the two
state dicts merged by hand, evaluated with a plain loop.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from conftest import SAMPLES, save_like, snapshot
from model_audit.cli import cli
from model_audit.commands.bisect import BisectError, bisect
from model_audit.core.layers import layer_groups
from model_audit.core.plant import Planter
from model_audit.io.probe import open_probe
from model_audit.models.checkpoint import load_checkpoint
from model_audit.models.tiny import TinyResNet

SGD = SAMPLES / "digits-sgd.safetensors"
PROBE = SAMPLES / "digits-probe.safetensors"
TRAIN = SAMPLES / "digits-train.safetensors"


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    """(baseline path, {name: candidate path}) of the digits model and two later releases."""
    tmp = tmp_path_factory.mktemp("releases")
    base = load_checkpoint(SGD)
    layer2 = next(g for g in layer_groups(base.model) if g.name == "layer2")
    noisy = Planter(base.model, layer2, "noise", seed=1).apply(0.5)
    # the buggy release: fine-tuned, every layer trainable, on training data with the labels
    # of 3 and 5 swapped
    tuned = copy.deepcopy(base.model).train()
    train = open_probe(TRAIN, channels=1, normalize=base.normalize or "none")
    x, y = train.load(list(range(len(train)))), train.labels.clone()
    y[train.labels == 3], y[train.labels == 5] = 5, 3
    opt = torch.optim.SGD(tuned.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        idx = torch.randint(len(x), (64,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(tuned(x[idx]), y[idx]).backward()
        opt.step()
    return SGD, {"noisy-layer2": save_like(noisy, tmp / "noisy.safetensors"),
                 "swapped-labels": save_like(tuned.eval(), tmp / "swapped.safetensors")}


def _by_hand(baseline, candidate, groups, names, probe):
    """Right/wrong of the candidate with ``names``' tensors from the baseline: a fresh model
    loaded from a hand-merged state dict, a plain loop."""
    a, b = baseline.state_dict(), candidate.state_dict()
    keys = {t for g in groups if g.name in names for t in g.parameter_names + g.buffer_names}
    merged = {k: (a[k] if k in keys else b[k]).clone() for k in b}
    fresh = TinyResNet(num_classes=10, in_channels=1, width=8)
    fresh.load_state_dict(merged)
    fresh.eval()
    with torch.no_grad():
        pred = fresh(probe.load(list(range(len(probe))))).argmax(1)
    return pred == probe.labels


@pytest.mark.parametrize("name", ["noisy-layer2", "swapped-labels"])
def test_every_count_matches_an_independent_computation(releases, name):
    base_path, candidates = releases
    baseline, candidate = load_checkpoint(base_path), load_checkpoint(candidates[name])
    probe = open_probe(PROBE, channels=1, normalize=baseline.normalize or "none")
    groups = layer_groups(candidate.model)
    reg = bisect(baseline.model, candidate.model, groups, probe)
    right_a = _by_hand(baseline.model, candidate.model, groups, [g.name for g in groups], probe)
    right_b = _by_hand(baseline.model, candidate.model, groups, [], probe)
    regressed, fixes = right_a & ~right_b, ~right_a & right_b
    assert reg.regressed == int(regressed.sum()) > 0 and reg.new_fixes == int(fixes.sum())
    assert reg.n == len(probe)
    for swap in reg.groups + reg.pairs:
        right = _by_hand(baseline.model, candidate.model, groups, swap.groups, probe)
        assert swap.recovered == int((regressed & right).sum()), swap
        assert swap.lost_fixes == int((fixes & ~right).sum()), swap
    # the group named first recovers the most (by construction, here checked)
    assert reg.best.recovered == max(s.recovered for s in reg.groups)
    assert [s.recovered for s in reg.groups] == sorted((s.recovered for s in reg.groups),
                                                       reverse=True)
    if name == "noisy-layer2":  # the damaged group: putting it back recovers everything
        assert reg.best.groups == ("layer2",) and reg.best.recovered == reg.regressed
    # the models were not changed
    assert torch.equal(candidate.model.state_dict()["layer2.0.conv1.weight"],
                       load_checkpoint(candidates[name]).model.state_dict()["layer2.0.conv1.weight"])


def test_compare_and_gate_name_the_group_and_its_share(releases, tmp_path):
    base_path, candidates = releases
    noisy = candidates["noisy-layer2"]
    r = CliRunner().invoke(cli, ["compare", str(base_path), str(noisy), "--probe", str(PROBE),
                                 "--out", str(tmp_path / "cmp"), "--resamples", "0", "-q"])
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "cmp/compare.json").read_text())
    reg = data["regression"]
    assert reg["exact"] and reg["regressed"] > 0
    assert reg["groups"][0]["name"] == "layer2" and reg["groups"][0]["recovered"] == reg["regressed"]
    assert [g["recovered"] for g in reg["groups"]] == sorted(
        (g["recovered"] for g in reg["groups"]), reverse=True)
    assert "regression (exact; A = baseline, B = candidate)" in r.output and "100%" in r.output
    # gate --baseline: the baseline's audit.json points at its checkpoint; the summaries say it
    assert CliRunner().invoke(cli, ["scan", str(base_path), "--probe", str(PROBE), "--out",
                                    str(tmp_path / "base"), "-q"]).exit_code == 0
    policy = tmp_path / "policy.toml"
    policy.write_text("[policy]\nmin_accuracy = 0.1\nno_new_flags = false\nmin_overlap = 0.0\n")
    r = CliRunner().invoke(cli, ["gate", str(noisy), "--probe", str(PROBE), "--policy",
                                 str(policy), "--baseline", str(tmp_path / "base/audit.json"),
                                 "--out", str(tmp_path / "gate"), "--summary",
                                 str(tmp_path / "summary.md"), "--junit",
                                 str(tmp_path / "junit.xml"), "-q"])
    assert r.exit_code in (0, 1), r.output
    gate = json.loads((tmp_path / "gate/gate.json").read_text())
    assert gate["comparison"]["regression"]["groups"][0]["name"] == "layer2"
    summary = (tmp_path / "summary.md").read_text()
    assert "Regression bisection against the baseline (exact)" in summary
    assert "putting back the baseline's layer2 recovers" in summary and "(100%)" in summary
    assert 'name="regression_bisection"' in (tmp_path / "junit.xml").read_text()


def test_no_regression_is_said(tmp_path):
    r = CliRunner().invoke(cli, ["compare", str(SGD), str(SGD), "--probe", str(PROBE), "--out",
                                 str(tmp_path / "same"), "--resamples", "0", "-q"])
    assert r.exit_code == 0, r.output
    assert "no regression: every probe image the baseline gets right" in r.output
    reg = json.loads((tmp_path / "same/compare.json").read_text())["regression"]
    assert reg["regressed"] == 0 and reg["groups"] == []


def test_audit_files_say_why_there_is_no_bisection(tmp_path):
    for name in ("a", "b"):
        assert CliRunner().invoke(cli, ["scan", str(SGD), "--probe", str(PROBE), "--out",
                                        str(tmp_path / name), "-q"]).exit_code == 0
    r = CliRunner().invoke(cli, ["compare", str(tmp_path / "a/audit.json"),
                                 str(tmp_path / "b/audit.json"), "--out", str(tmp_path / "c"),
                                 "--resamples", "0"])
    assert r.exit_code == 0 and "regression bisection needs both models" in r.output


def test_checkpoints_of_another_shape_are_refused_and_nothing_written(tmp_path):
    """Same architecture name, groups and keys, another width: no tensor can be swapped."""
    wide = TinyResNet(num_classes=10, in_channels=1, width=16)
    other = tmp_path / "inputs" / "wide.safetensors"
    other.parent.mkdir()
    save_like(wide, other)
    before = snapshot(tmp_path)
    with pytest.raises(BisectError, match="do not share an architecture"):
        bisect(load_checkpoint(SGD).model, wide, layer_groups(wide),
               open_probe(PROBE, channels=1, normalize="none"))
    r = CliRunner().invoke(cli, ["compare", str(SGD), str(other), "--probe", str(PROBE),
                                 "--out", str(tmp_path / "out"), "--resamples", "0"])
    assert r.exit_code == 2, r.output
    assert "do not share an architecture" in r.output and "Traceback" not in r.output
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()
    r = CliRunner().invoke(cli, ["compare", str(SGD), str(other), "--probe", str(PROBE),
                                 "--out", str(tmp_path / "out"), "--resamples", "0",
                                 "--allow-partial"])
    assert r.exit_code == 0 and "no regression bisection" in r.output
