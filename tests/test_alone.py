"""The default metric (group-alone steps, net: ``alone_net``) and the default ranking
(``combined``: with Auto-RGN), on the digits sample."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from model_audit import ScanConfig, scan
from model_audit.core.alone import ALONE_STEPS, alone_step, group_alone_reductions
from model_audit.core.attribution import attribute, combined_scores, net_positions
from model_audit.core.layers import layer_groups
from model_audit.core.replay import detached_params, per_sample_losses
from model_audit.io.probe import BatchCache, open_probe
from model_audit.models.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def digits():
    from conftest import SAMPLES
    ckpt = load_checkpoint(SAMPLES / "digits-sgd.safetensors")
    probe = open_probe(SAMPLES / "digits-probe.safetensors", channels=1,
                       normalize=ckpt.normalize)
    model = ckpt.model.eval()
    with torch.no_grad():
        wrong = torch.nonzero(model(probe.load(range(len(probe)))).argmax(1)
                              != probe.labels).flatten().tolist()
    return model, probe, wrong


def test_each_group_alone_lowers_the_error_loss_and_nothing_else_moves(digits):
    model, probe, wrong = digits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = net_positions(len(probe), wrong, 0)
    groups = layer_groups(model)
    r = group_alone_reductions(model, BatchCache(probe, wrong, 64), BatchCache(probe, rows, 64),
                               groups)
    assert r.matrix.shape == (len(rows), len(groups)) and r.group_names[0] == "conv1"
    is_error = np.isin(rows, wrong)
    # every group's steps remove error loss (the Armijo search accepts only decreases) ...
    assert (r.matrix.numpy()[is_error].mean(axis=0) > 0).all()
    # ... and the correct images pay for it: the net is below the errors' gain
    assert (r.matrix.numpy().mean(axis=0) < r.matrix.numpy()[is_error].mean(axis=0)).all()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert r.backward_images == len(wrong) * ALONE_STEPS * len(groups)


def test_the_step_moves_only_its_group_and_adapts_to_the_loss_scale(digits):
    model, probe, wrong = digits
    big = copy.deepcopy(model)
    with torch.no_grad():  # an error loss near 1e7: the step's length must follow
        big.fc.weight.mul_(1e6)
        big.fc.bias.mul_(1e6)
    errors = BatchCache(probe, wrong, 64)
    for net in (model, big):
        theta = detached_params(net, "cpu")
        base = float(per_sample_losses(net, theta, errors, "cpu")[0].mean())
        moved, lr = alone_step(net, theta, ["layer1.0.conv1.weight"], errors, "cpu", None)
        assert lr is not None and moved is not theta
        assert float(per_sample_losses(net, moved, errors, "cpu")[0].mean()) < base
        changed = [k for k in theta if not torch.equal(theta[k], moved[k])]
        assert changed == ["layer1.0.conv1.weight"]


def test_the_default_scan_ranks_by_the_metric_with_auto_rgn(sgd_checkpoint, digits_probe):
    d = scan(sgd_checkpoint, digits_probe, ScanConfig(bootstrap=50)).to_dict()
    assert d["metric"]["name"] == "alone_net" and d["ranking"]["method"] == "combined"
    layers = d["layers"]
    # the score: the metric's share (from its per-image rows) with Auto-RGN's share
    r = np.array(d["per_image"]["reduction"])
    own = np.clip(r.mean(axis=0), 0, None)
    expected = combined_scores(own, [layer["baselines"]["auto_rgn"] for layer in layers])
    assert [layer["score"] for layer in layers] == pytest.approx(expected.tolist(), abs=1e-6)
    assert [layer["reduction"] for layer in layers] == pytest.approx(r.mean(axis=0), abs=1e-5)
    # rows: the errors and twice as many correct images, as net_positions draws them
    assert d["per_image"]["index"] == net_positions(d["probe"]["n"],
                                                    [m["index"] for m in d["misclassified"]], 0)
    for layer in layers:
        lo, hi = layer["score_interval"]
        assert lo <= layer["score"] + 1e-12 and layer["score"] <= hi + 1e-12
    assert d["ranking"]["order"][0] in d["flagged"]
    # the own metric alone, asked for by name: the metric's shares
    own_scan = scan(sgd_checkpoint, digits_probe, ScanConfig(bootstrap=0, method="own")).to_dict()
    assert [layer["score"] for layer in own_scan["layers"]] == pytest.approx(
        (own / own.sum()).tolist(), abs=1e-6)
    assert "combined_with" not in own_scan["metric"]


def test_without_a_positive_net_the_scores_are_the_errors_shares():
    """An under-trained model: every group's correction costs the correct images more than it
    removes from the errors. The shares fall back to the errors' rows, in the point estimate
    and in every resample alike."""
    from model_audit.core.attribution import GroupReductions
    r = torch.tensor([[1.0, 3.0], [2.0, 2.0], [-4.0, -9.0], [-3.0, -8.0]], dtype=torch.float64)
    red = GroupReductions(r, torch.zeros(4), ("a", "b"), 0)
    a = attribute(red, [0.5, 0.5], probe_size=4, misclassified_positions=[0, 1, 2, 3],
                  resamples=100, error_rows=[True, True, False, False])
    assert (a.reduction < 0).all()
    assert a.scores.tolist() == pytest.approx([3 / 8, 5 / 8])
    assert ((a.score_low >= 0) & (a.score_high <= 1)).all() and a.score_high.sum() > 0
    # without the mask (the replay's metric: errors only) nothing is positive: all zero
    plain = attribute(red, [0.5, 0.5], probe_size=4, misclassified_positions=[0, 1, 2, 3],
                      resamples=0)
    assert plain.scores.tolist() == [0.0, 0.0]
