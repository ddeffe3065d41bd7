"""Scan, replay and attribution on the committed digits models (real models, real data)."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import without_timing
from model_audit import AuditOptions, ReplayConfig, ScanConfig, load_checkpoint, open_probe, scan
from model_audit.core.attribution import attribute, flag_rule, group_reductions, scores_from_reductions
from model_audit.errors import ReplayError
from model_audit.core.layers import layer_groups
from model_audit.io.probe import BatchCache
from model_audit.core.replay import replay
FAST = ScanConfig(bootstrap=50)


def _state_bytes(model):
    return {k: v.detach().clone().contiguous().numpy().tobytes() for k, v in model.state_dict().items()}


def _no_hooks(model):
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
        assert not m._backward_hooks and not getattr(m, "_backward_pre_hooks", {})




def test_scan_result_and_audit_schema(sgd_checkpoint, digits_probe):
    result = scan(sgd_checkpoint, digits_probe, FAST)
    d = result.to_dict()
    for key in ("schema_version", "model", "probe", "layers", "flagged", "damping", "timing", "seed"):
        assert key in d
    assert d["model"]["arch"] == "tiny-resnet" and len(d["model"]["sha256"]) == 64
    assert d["probe"]["n"] == 540
    assert d["probe"]["misclassified"] == len(d["misclassified"]) == 540 - d["probe"]["correct"]
    names = [layer["name"] for layer in d["layers"]]
    assert names == ["conv1", "bn1", "layer1", "layer2", "layer3", "fc"]
    assert sum(layer["params"] for layer in d["layers"]) == d["model"]["parameters"]
    scores = [layer["score"] for layer in d["layers"]]
    assert all(0 <= s <= 1 for s in scores) and sum(scores) == pytest.approx(1.0)
    for layer in d["layers"]:
        assert set(layer) >= {"name", "params", "score", "flag_frequency", "flagged"}
        assert 0.0 <= layer["flag_frequency"] <= 1.0
        lo, hi = layer["score_interval"]
        assert lo <= hi
    assert d["flagged"] == [layer["name"] for layer in d["layers"] if layer["flagged"]]
    assert d["flagged"], "a model with errors flags at least one group"
    # one damping record per replay step, the beta schedule is critically damped
    assert len(d["damping"]) == ReplayConfig().steps
    assert {s["regime"] for s in d["damping"]} == {"critical"}
    assert d["replay"]["final_loss"] < d["replay"]["initial_loss"]


def test_flag_rule_is_the_documented_one(sgd_checkpoint, digits_probe):
    d = scan(sgd_checkpoint, digits_probe, FAST).to_dict()
    g = len(d["layers"])
    top = max(layer["score"] for layer in d["layers"])
    for layer in d["layers"]:
        assert layer["flagged"] == (layer["score"] > max(layer["share"], 1 / g)
                                    or (layer["score"] == top and top > 0))


def test_scan_leaves_model_untouched_and_no_hooks(sgd_checkpoint, digits_probe):
    ckpt = load_checkpoint(sgd_checkpoint)
    ckpt.model.train()  # a model handed over in train mode is audited in eval mode
    before = _state_bytes(ckpt.model)
    result = scan(ckpt, digits_probe, FAST)
    assert _state_bytes(ckpt.model) == before
    assert ckpt.model.training, "the caller's train/eval mode is restored"
    _no_hooks(ckpt.model)
    # audited in eval mode: the same accuracy as a plain eval-mode pass
    ckpt.model.eval()
    probe = open_probe(digits_probe, channels=1, normalize=ckpt.normalize)
    with torch.no_grad():
        x = probe.load(range(len(probe)))
        acc = float((ckpt.model(x).argmax(1) == probe.labels).float().mean())
    assert result.evaluation.accuracy == pytest.approx(acc)


def test_model_untouched_when_an_error_is_raised_midway(sgd_checkpoint, digits_probe, monkeypatch):
    ckpt = load_checkpoint(sgd_checkpoint)
    before = _state_bytes(ckpt.model)

    def boom(*args, **kwargs):
        raise ReplayError("injected failure")

    import importlib

    monkeypatch.setattr(importlib.import_module("model_audit.commands.scan"), "group_alone_reductions", boom)
    with pytest.raises(ReplayError, match="injected"):
        scan(ckpt, digits_probe, FAST)
    assert _state_bytes(ckpt.model) == before
    assert not ckpt.model.training
    _no_hooks(ckpt.model)


def test_same_seed_same_audit(sgd_checkpoint, digits_probe):
    a = scan(sgd_checkpoint, digits_probe, FAST).to_dict()
    b = scan(sgd_checkpoint, digits_probe, FAST).to_dict()
    assert without_timing(a) == without_timing(b)
    c = scan(sgd_checkpoint, digits_probe, ScanConfig(AuditOptions(seed=1), bootstrap=50)).to_dict()
    assert [x["flag_frequency"] for x in a["layers"]] != [x["flag_frequency"] for x in c["layers"]] \
        or a["probe"] == c["probe"]


def test_group_reductions_match_direct_computation(sgd_checkpoint, digits_probe):
    """r[i, g] equals the loss change of a model copy whose group g alone was moved."""
    ckpt = load_checkpoint(sgd_checkpoint)
    model = ckpt.model
    probe = open_probe(digits_probe, channels=1, normalize=ckpt.normalize)
    with torch.no_grad():
        x = probe.load(range(len(probe)))
        wrong = torch.nonzero(model(x).argmax(1) != probe.labels).flatten().tolist()
    cache = BatchCache(probe, wrong, 7)  # odd batch size: gradients accumulate over batches
    rep = replay(model, cache, config=ReplayConfig(steps=3))
    groups = layer_groups(model)
    red = group_reductions(model, cache, rep.displacement, groups)
    xw, yw = probe.load(wrong), probe.labels[wrong]
    with torch.no_grad():
        base = F.cross_entropy(model(xw), yw, reduction="none")
        for j, group in enumerate(groups):
            moved = copy.deepcopy(model)
            params = dict(moved.named_parameters())
            for name in group.parameter_names:
                params[name].add_(rep.displacement[name])
            direct = base - F.cross_entropy(moved(xw), yw, reduction="none")
            assert torch.allclose(red.matrix[:, j].float(), direct, atol=1e-5)


def test_replay_steps_follow_the_cosine_rate_and_the_beta_momentum(sgd_checkpoint, digits_probe):
    """Each step's rate is the cosine from the chosen peak, its momentum 1 - 2 sqrt(rate),
    and the first step lowers the error loss (the Armijo check held)."""
    from model_audit.core.schedules import beta_momentum, cosine_lr
    ckpt = load_checkpoint(sgd_checkpoint)
    probe = open_probe(digits_probe, channels=1, normalize=ckpt.normalize)
    cfg = ReplayConfig(steps=4)
    rep = replay(ckpt.model, BatchCache(probe, list(range(0, 540, 9)), 16), config=cfg)
    for t, step in enumerate(rep.steps):
        lr = cosine_lr(t, cfg.steps, rep.peak_lr, rep.peak_lr * cfg.lr_min_ratio)
        assert step.record.lr == pytest.approx(lr)
        assert step.record.momentum == pytest.approx(beta_momentum(lr))
    assert rep.lr_check_passed and rep.steps[1].loss < rep.steps[0].loss
    assert rep.forward_images == 60 * (cfg.steps + rep.lr_trials + 1)
    assert rep.backward_images == 60 * cfg.steps


def test_constant_schedule_records_its_regimes(sgd_checkpoint, digits_probe):
    cfg = ScanConfig(replay=ReplayConfig(schedule="constant", lr=0.02, steps=3), bootstrap=0)
    d = scan(sgd_checkpoint, digits_probe, cfg).to_dict()
    assert [s["momentum"] for s in d["damping"]] == [0.9] * 3
    assert d["damping"][0]["regime"] == "underdamped"


def test_a_perturbed_group_gains_responsibility(sgd_checkpoint, digits_probe):
    base = scan(sgd_checkpoint, digits_probe, FAST)
    ckpt = load_checkpoint(sgd_checkpoint)
    torch.manual_seed(1)
    with torch.no_grad():
        w = ckpt.model.conv1.weight
        w.add_(torch.randn_like(w) * w.std() * 0.3)
    hurt = scan(ckpt, digits_probe, FAST)
    assert hurt.evaluation.accuracy < base.evaluation.accuracy
    score = {layer.name: layer.score for layer in hurt.layers}
    before = {layer.name: layer.score for layer in base.layers}
    assert max(score, key=score.get) == "conv1" != max(before, key=before.get)  # now first
    # conv1 gains the most responsibility of all groups, in absolute and in relative terms
    gain = {n: score[n] - before[n] for n in score}
    assert max(gain, key=gain.get) == "conv1"
    assert max(score, key=lambda n: score[n] / before[n]) == "conv1"


def test_no_errors_flags_nothing(sgd_checkpoint, digits_probe):
    ckpt = load_checkpoint(sgd_checkpoint)
    probe = open_probe(digits_probe, channels=1, normalize=ckpt.normalize)
    with torch.no_grad():
        right = torch.nonzero(ckpt.model(probe.load(range(len(probe)))).argmax(1) == probe.labels)
    result = scan(ckpt, probe.subset(right.flatten().tolist()[:50]), FAST)
    assert result.flagged == () and result.replay is None
    assert any("no errors" in w for w in result.warnings)


def test_bootstrap_helpers_on_hand_checked_numbers():
    assert np.allclose(scores_from_reductions(np.array([2.0, -1.0, 2.0])), [0.5, 0.0, 0.5])
    assert np.allclose(scores_from_reductions(np.array([-1.0, 0.0])), [0.0, 0.0])
    # three groups: bound = max(share, 1/3)
    flags = flag_rule(np.array([0.5, 0.3, 0.2]), np.array([0.1, 0.1, 0.8]))
    assert flags.tolist() == [True, False, False]
    # a group holding most of the parameters is flagged when it ranks first
    flags = flag_rule(np.array([0.1, 0.3, 0.6]), np.array([0.1, 0.1, 0.8]))
    assert flags.tolist() == [False, False, True]
    # a stack of score vectors (the bootstrap) is flagged row by row; all zeros flags nothing
    flags = flag_rule(np.array([[0.1, 0.3, 0.6], [0.0, 0.0, 0.0]]), np.array([0.1, 0.1, 0.8]))
    assert flags.tolist() == [[False, False, True], [False, False, False]]
    from model_audit.core.attribution import GroupReductions
    red = GroupReductions(torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64),
                          torch.zeros(2), ("a", "b"), 0)
    attr = attribute(red, [0.5, 0.5], probe_size=10, misclassified_positions=[3, 7],
                     resamples=20, seed=0)
    assert attr.flagged.tolist() == [True, False]
    # every resample that holds an error flags "a"; one with none flags nothing
    assert 0.8 <= attr.flag_frequency[0] <= 1.0 and attr.flag_frequency[1] == 0.0


def test_diverging_replay_says_what_to_do(sgd_checkpoint, digits_probe):
    cfg = ScanConfig(replay=ReplayConfig(schedule="constant", lr=1.0, steps=5, lr_search=False),
                     bootstrap=0)
    with pytest.raises(ReplayError, match="diverged.*--replay-lr"):
        scan(sgd_checkpoint, digits_probe, cfg)


def test_nan_weights_are_named(sgd_checkpoint, digits_probe, tmp_path):
    from model_audit.io.tensors import read_tensors
    from model_audit.models.checkpoint import save_checkpoint
    state, meta = read_tensors(sgd_checkpoint)
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_checkpoint(state, bad, metadata=meta)
    with pytest.raises(ReplayError, match="layer2.0.conv1.weight"):
        scan(bad, digits_probe, FAST)


def test_default_baselines_sit_beside_the_own_metric(sgd_checkpoint, digits_probe):
    d = scan(sgd_checkpoint, digits_probe, FAST).to_dict()
    assert set(d["agreement"]) == {"grad_x_activation", "auto_rgn"}
    for name, a in d["agreement"].items():
        assert -1 <= a["spearman"] <= 1 and -1 <= a["kendall"] <= 1
        assert 1 <= a["k"] <= len(d["layers"])  # the metric's own flags (not combined)
    for layer in d["layers"]:
        assert set(layer["baselines"]) == {"grad_x_activation", "auto_rgn"}
    for name in ("grad_x_activation", "auto_rgn"):
        shares = [layer["baselines"][name] for layer in d["layers"]]
        assert sum(shares) == pytest.approx(1.0)
        assert d["cost"][name]["seconds"] > 0
    # grad x activation takes one pass; Auto-RGN takes the replay's first-step gradient
    assert d["cost"]["grad_x_activation"]["forward_images"] == d["probe"]["misclassified"]
    assert d["cost"]["auto_rgn"]["forward_images"] == 0
    assert d["cost"]["auto_rgn"]["backward_images"] == 0
    # the own metric's passes: the replay's steps and the group-alone steps on the errors
    groups_with_steps = len(d["layers"])
    assert d["cost"]["alone_net"]["backward_images"] == (
        ReplayConfig().steps + 3 * groups_with_steps) * d["probe"]["misclassified"]


def test_auto_rgn_from_the_replay_gradient_equals_its_own_pass(sgd_checkpoint, digits_probe):
    from model_audit.baselines import compute_baselines
    from model_audit.core.layers import layer_groups
    from model_audit.io.probe import BatchCache
    result = scan(sgd_checkpoint, digits_probe, FAST)
    model = result.checkpoint.model.eval()
    cache = BatchCache(result.probe, result.evaluation.misclassified, 16)
    own = compute_baselines(model, cache, layer_groups(model), ["auto_rgn"])["auto_rgn"]
    assert own.forward_images == len(result.evaluation.misclassified)
    shared = [layer.baselines["auto_rgn"] for layer in result.layers]
    assert shared == pytest.approx(own.scores.tolist(), rel=1e-5)
    assert result.baselines["auto_rgn"].settings["gradient"].startswith("the replay's")


def test_baselines_none_and_unknown(sgd_checkpoint, digits_probe):
    from model_audit.errors import ConfigError

    d = scan(sgd_checkpoint, digits_probe, ScanConfig(bootstrap=0, baselines=(),
                                                      method="own")).to_dict()
    assert d["agreement"] == {} and d["layers"][0]["baselines"] == {}
    # the default ranking combines with Auto-RGN: it computes it (free) even when not asked
    d = scan(sgd_checkpoint, digits_probe, ScanConfig(bootstrap=0, baselines=())).to_dict()
    assert set(d["agreement"]) == {"auto_rgn"} and d["ranking"]["method"] == "combined"
    with pytest.raises(ConfigError, match="conductance"):
        scan(sgd_checkpoint, digits_probe, ScanConfig(baselines=("gradcam",)))


def test_step_size_search_adapts_to_the_loss_scale(sgd_checkpoint, digits_probe, tmp_path):
    """A head scaled by 1e6 puts the error loss near 1e7: the rates that could pass lie far
    below ten halvings of the default; the search skips to the loss-scale bound, passes, and
    the scan runs without a manual --replay-lr (issue #30, part 4)."""
    import copy

    from conftest import save_like

    ckpt = load_checkpoint(sgd_checkpoint)
    model = copy.deepcopy(ckpt.model)
    with torch.no_grad():
        model.fc.weight.mul_(1e6)
        model.fc.bias.mul_(1e6)
    probe = open_probe(digits_probe, channels=1, normalize=ckpt.normalize)
    with torch.no_grad():
        wrong = torch.nonzero(model(probe.load(range(len(probe)))).argmax(1)
                              != probe.labels).flatten().tolist()
    rep = replay(model.eval(), BatchCache(probe, wrong, 64))
    assert rep.initial_loss > 1e5
    assert rep.lr_check_passed and rep.lr_skipped > 10 and rep.lr_trials <= 11
    assert rep.peak_lr < 0.01 / 2 ** 10  # out of reach of ten halvings
    assert rep.peak_lr == pytest.approx(0.01 / 2 ** (rep.lr_skipped + rep.lr_trials - 1))
    assert rep.final_loss < rep.initial_loss
    # the bound skips only rates that cannot pass: the default model is searched as before
    plain = replay(ckpt.model.eval(), BatchCache(probe, wrong, 64))
    assert plain.lr_skipped == 0
    scaled = save_like(model, tmp_path / "scaled.safetensors")
    d = scan(scaled, digits_probe, ScanConfig(bootstrap=0, baselines=())).to_dict()
    assert d["replay"]["lr_check_passed"] and d["replay"]["lr_halvings_skipped"] > 10
    assert not any("replay" in w for w in d["warnings"])


def test_step_size_check_halves_a_too_large_rate(sgd_checkpoint, digits_probe):
    """An overshooting first step is caught by the Armijo check and the rate halved."""
    ckpt = load_checkpoint(sgd_checkpoint)
    probe = open_probe(digits_probe, channels=1, normalize=ckpt.normalize)
    with torch.no_grad():
        wrong = torch.nonzero(ckpt.model(probe.load(range(len(probe)))).argmax(1)
                              != probe.labels).flatten().tolist()
    cache = BatchCache(probe, wrong, 64)
    big = replay(ckpt.model, cache, config=ReplayConfig(lr=0.64))
    assert big.lr_check_passed and big.peak_lr < 0.64 and big.lr_trials > 1
    assert big.peak_lr == pytest.approx(0.64 / 2 ** (big.lr_trials - 1 + big.lr_skipped))
    assert big.final_loss < big.initial_loss
    assert big.steps[0].record.lr == pytest.approx(big.peak_lr)
    # the accepted rate satisfies the documented check; twice that rate did not
    from model_audit.core.replay import ARMIJO, _mean_loss, detached_params
    theta0 = detached_params(ckpt.model, "cpu")
    g0_sq = big.steps[0].grad_norm ** 2
    loss0 = big.steps[0].loss
    params = dict(ckpt.model.named_parameters())
    grads = {}
    x, y = probe.load(wrong), probe.labels[wrong]
    loss = F.cross_entropy(ckpt.model(x), y)
    for k, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
        grads[k] = g
    ok = _mean_loss(ckpt.model, {k: theta0[k] - big.peak_lr * grads[k] for k in theta0}, cache, "cpu")
    assert ok <= loss0 - ARMIJO * big.peak_lr * g0_sq + 1e-6
    # a rate the check accepts at once is left alone
    small = replay(ckpt.model, cache, config=ReplayConfig(lr=0.001))
    assert small.peak_lr == 0.001 and small.lr_trials == 1
    # per-image losses at theta_0 come from the first pass
    assert torch.allclose(small.initial_losses, F.cross_entropy(ckpt.model(x), y, reduction="none"),
                          atol=1e-5)


def test_channels_last_is_opt_in_and_kept_off_the_onednn_6035_path(monkeypatch):
    import torch
    from model_audit.core.evaluate import fast_layout, onednn_6035_convolutions
    from model_audit.models.registry import build_model

    model = build_model("tiny-resnet", 10)
    conv = model.conv1.weight
    monkeypatch.delenv("MODEL_AUDIT_CHANNELS_LAST", raising=False)
    with fast_layout(model, "cpu"):  # off by default
        assert conv.is_contiguous()
    monkeypatch.setenv("MODEL_AUDIT_CHANNELS_LAST", "1")
    with fast_layout(model, "cpu"):
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert conv.is_contiguous()
    assert onednn_6035_convolutions(model) == []  # its 1x1 stride-2 convs see >= 16 channels
    # the convolution that crashed timm's repvgg_a2: 1x1, stride 2, 3 input channels
    risky = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 1, 1), torch.nn.Conv2d(3, 8, 1, 2))
    assert onednn_6035_convolutions(risky) == ["1"]
    with fast_layout(risky, "cpu"):
        assert all(p.is_contiguous() for p in risky.parameters())
    monkeypatch.setenv("MODEL_AUDIT_CHANNELS_LAST", "0")
    with fast_layout(model, "cpu"):
        assert conv.is_contiguous()
