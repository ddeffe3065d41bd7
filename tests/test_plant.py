"""Planted defects (model_audit.core.plant) and the localisation scoring (model_audit.commands.sanity)."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from model_audit.models.checkpoint import load_checkpoint
from model_audit.errors import ConfigError
from model_audit.core.layers import layer_groups
from model_audit.core.calibrate import accuracy, calibrate, changed_tensors
from model_audit.core.plant import DEFECTS, applicable, resolve_defects
from model_audit.io.probe import BatchCache, open_probe
from model_audit.core.scoring import MethodSummary, chance_levels, rank_stats
from model_audit.results.sanity import SanityCase, summarize


@pytest.fixture(scope="module")
def digits():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "samples"
    ckpt = load_checkpoint(root / "digits-sgd.safetensors")
    probe = open_probe(root / "digits-probe.safetensors", channels=1, normalize=ckpt.normalize)
    return ckpt, probe, {g.name: g for g in layer_groups(ckpt.model)}


def _digest(model) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_a_planted_defect_changes_only_its_group_and_never_the_input(digits, defect):
    ckpt, probe, groups = digits
    group = groups["layer2"]
    before = _digest(ckpt.model)
    planted = calibrate(ckpt.model, probe, group, defect, drop=0.10, seed=0)
    assert _digest(ckpt.model) == before, "the caller's model was modified"
    changed = set(changed_tensors(ckpt.model, planted.model))
    own = set(group.parameter_names) | set(group.buffer_names)
    assert changed, "nothing was planted"
    assert changed <= own, f"tensors outside layer2 changed: {sorted(changed - own)}"
    if defect == "bnstats":
        assert all(n.endswith(("running_mean", "running_var")) for n in changed)
    else:
        assert changed <= set(group.parameter_names)
    assert set(planted.result.changed) == changed


@pytest.mark.parametrize("group,defect", [("layer1", "noise"), ("fc", "reinit"),
                                          ("layer3", "labelswap"), ("bn1", "bnstats")])
def test_the_calibration_reaches_its_target(digits, group, defect):
    ckpt, probe, groups = digits
    planted = calibrate(ckpt.model, probe, groups[group], defect, drop=0.10, tolerance=0.01,
                        seed=1)
    r = planted.result
    assert r.reached
    assert abs(r.drop - 0.10) <= 0.01
    # The returned copy really has that accuracy (measured again, independently).
    again = accuracy(planted.model, BatchCache(probe, list(range(len(probe))), 64))
    assert again == pytest.approx(r.accuracy_after)
    assert r.accuracy_before == pytest.approx(accuracy(ckpt.model, BatchCache(
        probe, list(range(len(probe))), 64)))


def test_a_defect_that_cannot_cost_the_drop_is_reported_not_skipped(digits):
    ckpt, probe, groups = digits
    # bn1 holds 16 affine parameters: moving them to a fresh init (1, 0) costs almost nothing.
    r = calibrate(ckpt.model, probe, groups["bn1"], "reinit", drop=0.10).result
    assert not r.reached
    assert r.severity == 1.0
    assert r.drop < 0.05
    assert r.to_dict()["reached"] is False


def test_the_same_seed_plants_the_same_defect(digits):
    ckpt, probe, groups = digits
    a = calibrate(ckpt.model, probe, groups["layer1"], "noise", seed=3)
    b = calibrate(ckpt.model, probe, groups["layer1"], "noise", seed=3)
    c = calibrate(ckpt.model, probe, groups["layer1"], "noise", seed=4)
    assert _digest(a.model) == _digest(b.model)
    assert _digest(a.model) != _digest(c.model)


def test_bad_defects_and_drops_say_what_is_valid(digits):
    ckpt, probe, groups = digits
    with pytest.raises(ConfigError, match=r"unknown defect 'rot'; valid: all or .*noise, "
                                          r"reinit, labelswap, bnstats"):
        resolve_defects("noise,rot")
    with pytest.raises(ConfigError, match=r"drop must be in \(0, 1\), got 1.5"):
        calibrate(ckpt.model, probe, groups["fc"], "noise", drop=1.5)
    assert not applicable(ckpt.model, groups["conv1"], "bnstats")
    with pytest.raises(ConfigError, match="bnstats defect does not apply to group 'conv1'"):
        calibrate(ckpt.model, probe, groups["conv1"], "bnstats")
    assert resolve_defects("all") == tuple(DEFECTS)


# ------------------------------------------------------------------------------------------
# Scoring


def test_rank_stats_on_synthetic_rankings():
    assert rank_stats([0.1, 0.6, 0.3], 1) == (1.0, 1.0, 1.0)
    assert rank_stats([0.1, 0.6, 0.3], 2) == (2.0, 0.0, 0.5)
    assert rank_stats([0.1, 0.6, 0.3], 0) == (3.0, 0.0, pytest.approx(1 / 3))
    # A tie at the top with one other group: half a hit, reciprocal rank (1 + 1/2) / 2.
    assert rank_stats([0.4, 0.4, 0.2], 0) == (1.5, 0.5, 0.75)
    # NaN (a group the method cannot score) ranks last.
    assert rank_stats([float("nan"), 0.4, 0.2], 0)[0] == 3.0


def test_a_constant_ranking_scores_exactly_chance():
    for g in (2, 6, 7):
        top1, mrr = chance_levels(g)
        stats = [rank_stats(np.ones(g), i) for i in range(g)]
        assert np.mean([s[1] for s in stats]) == pytest.approx(top1)
        assert np.mean([s[2] for s in stats]) == pytest.approx(mrr)
    assert chance_levels(7) == (pytest.approx(1 / 7), pytest.approx(363 / 980))


def _case(group, seed, scores, names=("a", "b", "c"), flagged=(), reached=True):
    from model_audit.core.calibrate import PlantResult
    plant = PlantResult(group, "noise", seed, 1.0, 0.1, 0.9, 0.8 if reached else 0.88,
                        reached, 3, ())
    ranks, top1, rr = {}, {}, {}
    for m, v in scores.items():
        ranks[m], top1[m], rr[m] = rank_stats(v, names.index(group))
    return SanityCase(plant, ranks, top1, rr, {}, tuple(flagged),
                      {m: list(v) for m, v in scores.items()}, 0.0)


def test_summary_top1_and_mrr_over_synthetic_cases():
    cases = [
        _case("a", 0, {"replay_reduction": [0.7, 0.2, 0.1]}, flagged=("a",)),   # rank 1
        _case("b", 0, {"replay_reduction": [0.7, 0.2, 0.1]}, flagged=("a",)),   # rank 2
        _case("c", 1, {"replay_reduction": [0.1, 0.2, 0.7]}, flagged=("c", "b")),  # rank 1
        _case("a", 1, {"replay_reduction": [0.1, 0.2, 0.7]}, flagged=("c",)),   # rank 3
        _case("b", 1, {"replay_reduction": [0.1, 0.9, 0.0]}, reached=False),    # not counted
    ]
    s = summarize(cases, ["replay_reduction"])["replay_reduction"]
    assert isinstance(s, MethodSummary)
    assert s.n == 4
    assert s.top1 == pytest.approx(0.5)
    assert s.mrr == pytest.approx((1 + 0.5 + 1 + 1 / 3) / 4)
    # Per-seed means: seed 0 (1, 0.5), seed 1 (1, 1/3); sd over the two seeds.
    assert s.mrr_sd == pytest.approx(np.std([0.75, 2 / 3], ddof=1))
    assert s.flag_hit == pytest.approx(0.5)
    assert s.flagged_size == pytest.approx(1.25)
    assert json.dumps(s.to_dict())


def test_changed_tensors_sees_a_buffer_change(digits):
    import copy

    ckpt, _, _ = digits
    other = copy.deepcopy(ckpt.model)
    with torch.no_grad():
        other.bn1.running_mean.add_(1.0)
    assert changed_tensors(ckpt.model, other) == ("bn1.running_mean",)
