"""Attribution baselines (captum layer methods and Auto-RGN) beside the own metric."""
import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from model_audit import load_checkpoint, open_probe
from model_audit.baselines import (
    BASELINES, DEFAULT_BASELINES, Agreement, BaselineError, BaselineResult, agreement,
    compute_baselines, resolve_baselines)
from model_audit.models.registry import build_model
from model_audit.errors import AuditError, ConfigError, ReplayError
from model_audit.core.layers import layer_groups
from model_audit.io.probe import BatchCache
LAYER_METHODS = ("grad_x_activation", "activation", "conductance", "integrated_gradients",
                 "internal_influence")


@pytest.fixture(autouse=True)
def _one_thread(_threads):
    """One intra-op thread: these runs are many small ops on tiny batches, where a second
    OpenMP thread gains little and, when another job shares the two cores, costs 10-20x in
    spinning barriers."""
    torch.set_num_threads(1)
    yield


def _state_bytes(model):
    return {k: v.detach().clone().contiguous().numpy().tobytes()
            for k, v in model.state_dict().items()}


def _no_hooks(model):
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
        assert not m._backward_hooks and not getattr(m, "_backward_pre_hooks", {})


@pytest.fixture(scope="module")
def digits():
    """The committed digits model, its misclassified probe images as batches, its groups."""
    from pathlib import Path

    samples = Path(__file__).resolve().parent.parent / "samples"
    ckpt = load_checkpoint(samples / "digits-sgd.safetensors")
    probe = open_probe(samples / "digits-probe.safetensors", channels=1, normalize=ckpt.normalize)
    with torch.no_grad():
        pred = ckpt.model(probe.load(range(len(probe)))).argmax(1)
    wrong = torch.nonzero(pred != probe.labels).flatten().tolist()
    assert len(wrong) > 5
    return ckpt, BatchCache(probe, wrong, 8), layer_groups(ckpt.model)


# ------------------------------------------------------------------------------------------
# Registry


def test_registry_and_resolve():
    assert set(BASELINES) >= {"grad_x_activation", "activation", "conductance",
                              "integrated_gradients", "internal_influence", "auto_rgn"}
    assert all(BASELINES[n].cheap for n in DEFAULT_BASELINES)
    assert set(DEFAULT_BASELINES) == {"grad_x_activation", "auto_rgn"}
    assert not any(BASELINES[n].cheap for n in ("conductance", "integrated_gradients",
                                                 "internal_influence"))
    assert BASELINES["auto_rgn"].captum_class is None
    assert resolve_baselines("all") == tuple(BASELINES)
    assert resolve_baselines("none") == () == resolve_baselines("") == resolve_baselines(None)
    assert resolve_baselines("default") == DEFAULT_BASELINES
    assert resolve_baselines("conductance, auto_rgn") == ("conductance", "auto_rgn")
    assert resolve_baselines("Integrated-Gradients,default,auto_rgn") == \
        ("grad_x_activation", "integrated_gradients", "auto_rgn")
    assert resolve_baselines(["activation"]) == ("activation",)
    with pytest.raises(ConfigError) as err:
        resolve_baselines("grad_x_activation,smoothgrad")
    msg = str(err.value)
    assert "smoothgrad" in msg
    for name in list(BASELINES) + ["all", "none", "default"]:
        assert name in msg
    assert issubclass(BaselineError, ReplayError) and issubclass(BaselineError, AuditError)


# ------------------------------------------------------------------------------------------
# Every baseline on a real model


def test_every_baseline_on_the_digits_errors(digits):
    ckpt, cache, groups = digits
    n = len(cache.positions)
    results = compute_baselines(ckpt.model, cache, groups, "all", n_steps=4)
    assert list(results) == list(BASELINES)
    for name, res in results.items():
        assert isinstance(res, BaselineResult) and res.name == name
        assert res.scores.shape == (len(groups),)
        assert np.isfinite(res.scores).all(), name
        assert (res.scores >= 0).all() and res.scores.sum() == pytest.approx(1.0)
        assert np.isfinite(res.raw).all() and (res.raw >= 0).all()
        assert res.forward_images >= n and res.seconds >= 0
        assert res.backward_images == 0 if name == "activation" else res.backward_images >= n
        assert {"target", "reduction", "n_steps", "baseline_input"} <= set(res.settings)
        d = res.to_dict()
        json.dumps(d, allow_nan=False)
        assert d["scores"] == pytest.approx(res.scores.tolist())
    # pass counts: the cheap methods take one pass over the errors, the path methods n_steps
    assert results["grad_x_activation"].forward_images == n
    assert results["grad_x_activation"].backward_images == n
    assert results["activation"].forward_images == n
    assert results["auto_rgn"].forward_images == results["auto_rgn"].backward_images == n
    g = len(groups)
    # conductance and influence: every group from one pass per path point (the default
    # internal batch, the cache's batch size, holds whole paths: no chunk overlaps)
    assert results["conductance"].forward_images == (4 + 1) * n
    assert results["conductance"].backward_images == (4 + 1) * n
    assert results["internal_influence"].forward_images == 4 * n
    assert results["internal_influence"].backward_images == 4 * n
    # layer IG also evaluates the layer at the inputs and at the baseline once
    assert results["integrated_gradients"].forward_images == g * (4 + 2) * n
    assert results["integrated_gradients"].settings["n_steps"] == 4
    assert results["grad_x_activation"].settings["n_steps"] is None


def test_auto_rgn_is_the_group_relative_gradient_norm(digits):
    ckpt, cache, groups = digits
    model = copy.deepcopy(ckpt.model).eval()
    x = torch.cat([b[1] for b in cache])
    y = torch.cat([b[2] for b in cache])
    loss = torch.nn.functional.cross_entropy(model(x), y)
    grads = dict(zip([n for n, _ in model.named_parameters()],
                     torch.autograd.grad(loss, list(model.parameters()))))
    params = {k: v.detach() for k, v in model.named_parameters()}
    expected = np.array([
        float(torch.sqrt(sum(grads[p].pow(2).sum() for p in g.parameter_names))
              / torch.sqrt(sum(params[p].pow(2).sum() for p in g.parameter_names)))
        for g in groups])
    res = compute_baselines(ckpt.model, cache, groups, "auto_rgn")["auto_rgn"]
    assert np.allclose(res.raw, expected, rtol=1e-4)
    assert np.allclose(res.scores, expected / expected.sum(), rtol=1e-4)


def test_model_untouched_mode_restored_no_hooks(digits):
    ckpt, cache, groups = digits
    model = ckpt.model
    model.train()
    model.fc.bias.requires_grad_(False)
    try:
        before = _state_bytes(model)
        compute_baselines(model, cache, groups, "all", n_steps=2)
        assert _state_bytes(model) == before
        assert model.training and all(m.training for m in model.modules())
        assert not model.fc.bias.requires_grad and model.fc.weight.requires_grad
        _no_hooks(model)
        model.eval()
        compute_baselines(model, cache, groups, "default")
        assert not any(m.training for m in model.modules())
        assert _state_bytes(model) == before
        _no_hooks(model)
    finally:
        model.fc.bias.requires_grad_(True)
        model.eval()


def test_model_untouched_when_an_error_is_raised_midway(digits, monkeypatch):
    import captum.attr

    ckpt, cache, groups = digits
    model = ckpt.model
    model.train()
    before = _state_bytes(model)

    def boom(self, *args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(captum.attr.LayerIntegratedGradients, "attribute", boom)
    try:
        with pytest.raises(RuntimeError, match="injected"):
            compute_baselines(model, cache, groups, "all", n_steps=2)
        assert _state_bytes(model) == before
        assert model.training
        _no_hooks(model)
    finally:
        model.eval()


# ------------------------------------------------------------------------------------------
# Real architectures: in-place ops and reused modules


def _shares(model, method, groups, x, y, n_steps, ibs):
    """Naive captum, one layer at a time, on ``model`` as it is: the reference aggregation."""
    import captum.attr as ca

    raw = []
    for g in groups:
        layer = model.get_submodule(g.name)
        b = x.shape[0]
        if method == "grad_x_activation":
            a = ca.LayerGradientXActivation(model, layer).attribute(x, target=y)
        elif method == "activation":
            a = ca.LayerActivation(model, layer).attribute(x)
        elif method == "conductance":
            a = ca.LayerConductance(model, layer).attribute(
                x, target=y, n_steps=n_steps, internal_batch_size=max(ibs, 2 * b))
        elif method == "integrated_gradients":
            a = ca.LayerIntegratedGradients(model, layer).attribute(
                x, target=y, n_steps=n_steps, internal_batch_size=max(ibs, b))
        else:
            a = ca.InternalInfluence(model, layer).attribute(
                x, target=y, n_steps=n_steps, internal_batch_size=max(ibs, b))
        raw.append(float(a.detach().abs().flatten(1).sum(1).double().mean()))
    raw = np.array(raw)
    return raw / raw.sum()


def _safe_resnet(model):
    """The same ResNet with two distinct out-of-place ReLUs per block, ``out = out + identity``."""
    from torchvision.models.resnet import BasicBlock

    class SafeBasicBlock(BasicBlock):
        def forward(self, x):
            identity = x
            out = self.relu_a(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            if self.downsample is not None:
                identity = self.downsample(x)
            out = out + identity
            return self.relu_b(out)

    safe = copy.deepcopy(model)
    for module in safe.modules():
        if isinstance(module, BasicBlock):
            module.__class__ = SafeBasicBlock
            module.relu = None
            module.relu_a, module.relu_b = nn.ReLU(inplace=False), nn.ReLU(inplace=False)
    safe.relu = nn.ReLU(inplace=False)
    safe.load_state_dict(model.state_dict())
    assert not any(getattr(m, "inplace", False) for m in safe.modules())
    return safe.eval()


def _check_equivalent(model, reference, x, y, n_steps):
    groups = layer_groups(model)
    batches = [(list(range(len(y))), x, y)]
    before = _state_bytes(model)
    ours = compute_baselines(model, batches, groups, LAYER_METHODS, n_steps=n_steps)
    assert _state_bytes(model) == before
    _no_hooks(model)
    ibs = len(y)
    for method in LAYER_METHODS:
        expected = _shares(reference, method, groups, x, y, n_steps, ibs)
        assert np.allclose(ours[method].scores, expected, rtol=1e-4, atol=1e-6), method
    return groups, ours


def _trained_looking_resnet18():
    """A seeded CIFAR ResNet-18 whose BatchNorms have non-trivial statistics and affine
    parameters (so every group matters), and its out-of-place twin."""
    torch.manual_seed(0)
    model = build_model("resnet18-cifar", 10).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model, _safe_resnet(model)


def test_resnet18_inplace_relu_and_reused_relu_match_the_out_of_place_model():
    model, reference = _trained_looking_resnet18()
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([0, 3, 5, 9])
    with torch.no_grad():
        assert torch.allclose(model(x), reference(x), atol=1e-5)
    groups, ours = _check_equivalent(model, reference, x, y, n_steps=2)
    assert [g.name for g in groups] == ["conv1", "bn1", "layer1", "layer2", "layer3",
                                        "layer4", "fc"]
    # Naive captum on the in-place model is not equivalent: layer IG substitutes bn1's output
    # by its interpolated (leaf) tensors, which the in-place relu after bn1 then overwrites.
    import captum.attr as ca

    with pytest.raises(RuntimeError, match="in-place"):
        ca.LayerIntegratedGradients(model, model.bn1).attribute(x, target=y, n_steps=2)
    assert np.isfinite(ours["integrated_gradients"].scores[1])


def test_gauss_legendre_points_and_weights_equal_captums():
    """The path methods compute captum's Gauss-Legendre quadrature locally (captum has it only
    in a private module): the numbers must be identical, not just close."""
    approximation = pytest.importorskip("captum.attr._utils.approximation_methods")
    from model_audit.baselines.path import _gauss_legendre_alphas, _gauss_legendre_step_sizes

    step_sizes, alphas = approximation.approximation_parameters("gausslegendre")
    for n in (1, 2, 3, 6, 7, 50, 51, 200):
        assert _gauss_legendre_alphas(n) == alphas(n)
        assert _gauss_legendre_step_sizes(n) == step_sizes(n)


@pytest.mark.parametrize("internal_batch_size,points_per_image", [
    (None, 9),           # default (3 images): 7 points in chunks of 3 sharing one: 0-2, 2-4, 4-6
    (2, 12),             # the smallest conductance chunk: 6 chunks of 2 points
    (5, 8),              # chunks of 5 and 3 points
    (21, 7),             # every whole path in one forward: 3 images x 7 points
])
def test_shared_pass_conductance_and_influence_equal_captum_one_layer_at_a_time(
        internal_batch_size, points_per_image):
    """All groups in one pass per point gives captum's per-layer numbers, chunked or not."""
    import captum.attr as ca

    model, reference = _trained_looking_resnet18()
    x = torch.randn(3, 3, 32, 32)
    y = torch.tensor([0, 3, 9])
    groups = layer_groups(model)
    ours = compute_baselines(model, [([0, 1, 2], x, y)], groups,
                             "conductance,internal_influence", n_steps=6,
                             internal_batch_size=internal_batch_size)
    for name, cls in (("conductance", ca.LayerConductance),
                      ("internal_influence", ca.InternalInfluence)):
        expected = [float(cls(reference, reference.get_submodule(g.name)).attribute(
            x, target=y, n_steps=6).detach().abs().flatten(1).sum(1).double().mean())
            for g in groups]
        assert np.allclose(ours[name].raw, expected, rtol=1e-5, atol=0), name
    # cost: every group together; conductance's chunks share a point, influence's do not
    assert ours["conductance"].forward_images == 3 * points_per_image
    assert ours["conductance"].backward_images == 3 * points_per_image
    assert ours["internal_influence"].forward_images == 3 * 6


def test_mobilenet_v3_inplace_activations_match_the_out_of_place_model():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=10).eval()
    reference = copy.deepcopy(model)
    for m in reference.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    x = torch.randn(4, 3, 64, 64)
    y = torch.tensor([1, 2, 7, 8])
    with torch.no_grad():
        assert torch.allclose(model(x), reference(x), atol=1e-5)
    groups, _ = _check_equivalent(model, reference, x, y, n_steps=2)
    assert groups[-2].name == "classifier.0"
    import captum.attr as ca

    # the in-place Hardswish after classifier.0 breaks naive layer IG on it
    with pytest.raises(RuntimeError, match="in-place"):
        ca.LayerIntegratedGradients(model, model.classifier[0]).attribute(x, target=y, n_steps=2)


def test_module_granularity_inplace_add_matches_the_out_of_place_model(digits):
    """Every conv/bn of the digits ResNet is a group: ``bn2`` feeds ``out += identity`` and
    ``bn1`` the in-place ReLU that the block reuses."""
    ckpt, cache, _ = digits
    model = copy.deepcopy(ckpt.model).eval()
    positions, x, y = next(iter(cache))
    x, y = x[:4], y[:4]
    groups = layer_groups(model, "module")
    assert "layer1.0.bn2" in [g.name for g in groups] and len(groups) > 20
    batches = [(positions[:4], x, y)]
    ours = compute_baselines(model, batches, groups, LAYER_METHODS, n_steps=2)
    reference = _safe_resnet(model)
    for method in LAYER_METHODS:
        expected = _shares(reference, method, groups, x, y, 2, len(y))
        assert np.allclose(ours[method].scores, expected, rtol=1e-4, atol=1e-6), method
    import captum.attr as ca

    with pytest.raises(RuntimeError, match="in-place"):
        ca.LayerIntegratedGradients(model, model.layer1[0].bn2).attribute(x, target=y, n_steps=2)


class _Reused(nn.Module):
    """A block module called twice per forward (weight tying)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(6, 8)
        self.block = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.relu(self.block(h))
        h = torch.relu(self.block(h))
        return self.head(h)


def test_a_reused_group_module_is_refused_by_name():
    import captum.attr as ca

    torch.manual_seed(0)
    model = _Reused().eval()
    x, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 0, 1])
    groups = layer_groups(model)
    assert [g.name for g in groups] == ["stem", "block", "head"]
    before = _state_bytes(model)
    with pytest.raises(BaselineError, match=r"'?block'? \(Linear, called 2 times\)"):
        compute_baselines(model, [([0], x, y)], groups, "grad_x_activation")
    assert _state_bytes(model) == before
    _no_hooks(model)
    # why: naive captum silently attributes to the last call only
    naive = ca.LayerGradientXActivation(model, model.block).attribute(x, target=y)
    first = model.block(torch.relu(model.stem(x)))
    second = model.block(torch.relu(first))
    logit = model.head(torch.relu(second)).gather(1, y[:, None]).sum()
    g_first, g_second = torch.autograd.grad(logit, [first, second])
    assert torch.allclose(naive, (g_second * second).detach(), atol=1e-6)
    assert not torch.allclose(naive, (g_first * first).detach(), atol=1e-3)
    # Auto-RGN needs no layer output: it still runs
    res = compute_baselines(model, [([0], x, y)], groups, "auto_rgn")["auto_rgn"]
    assert np.isfinite(res.scores).all()


class _WithBareParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.full((8,), 0.5))
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.a(x)) * self.scale
        return self.head(torch.relu(self.c(torch.relu(self.b(h)))))


def test_a_bare_parameter_group_gets_nan_from_layer_methods_and_auto_rgn_only():
    torch.manual_seed(0)
    model = _WithBareParameter().eval()
    groups = layer_groups(model)
    assert groups[0].name == "scale"
    x, y = torch.randn(6, 6), torch.tensor([0, 1, 2, 0, 1, 2])
    res = compute_baselines(model, [([0], x, y)], groups, "all", n_steps=3)
    for name in LAYER_METHODS:
        assert np.isnan(res[name].scores[0]) and np.isfinite(res[name].scores[1:]).all()
        assert np.nansum(res[name].scores) == pytest.approx(1.0)
        assert res[name].to_dict()["scores"][0] is None
        assert res[name].settings["groups_without_layer"] == ["scale"]
    assert np.isfinite(res["auto_rgn"].scores).all()
    json.dumps({k: r.to_dict() for k, r in res.items()}, allow_nan=False)
    own = np.array([0.1, 0.4, 0.3, 0.2, 0.0])
    agr = agreement(own, res["grad_x_activation"].scores, own > 0.25)
    assert agr.n == 4 and agr.k == 2


def test_invalid_settings_and_empty_batches(digits):
    ckpt, cache, groups = digits
    with pytest.raises(ConfigError):
        compute_baselines(ckpt.model, cache, groups, "conductance", n_steps=0)
    with pytest.raises(ConfigError):
        compute_baselines(ckpt.model, cache, groups, "bogus")
    with pytest.raises(BaselineError, match="no misclassified"):
        compute_baselines(ckpt.model, [], groups, "default")
    assert compute_baselines(ckpt.model, cache, groups, "none") == {}


# ------------------------------------------------------------------------------------------
# Agreement


def test_rank_correlations_match_scipy_with_ties():
    import scipy.stats as stats

    from model_audit.core.stats import kendall_tau_b, spearman
    rng = np.random.default_rng(0)
    cases = [
        (np.array([0.3, 0.1, 0.1, 0.5, 0.0, 0.0]), np.array([0.2, 0.2, 0.1, 0.4, 0.05, 0.05])),
        (np.array([1.0, 2.0, 3.0, 4.0, 5.0]), np.array([5.0, 6.0, 7.0, 8.0, 7.0])),
        (np.array([0.0, 0.0, 0.0, 1.0]), np.array([1.0, 2.0, 3.0, 4.0])),
        (rng.integers(0, 4, 30).astype(float), rng.integers(0, 5, 30).astype(float)),
        (rng.random(12), rng.random(12)),
    ]
    for x, y in cases:
        assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
        assert kendall_tau_b(x, y) == pytest.approx(stats.kendalltau(x, y)[0], abs=1e-12)
        agr = agreement(x, y, np.zeros(len(x), bool))
        assert agr.spearman == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
        assert agr.kendall == pytest.approx(stats.kendalltau(x, y)[0], abs=1e-12)
        assert agr.topk_overlap is None


def test_agreement_identical_reversed_nan_and_degenerate():
    a = np.array([0.5, 0.2, 0.2, 0.1])
    same = agreement(a, a.copy(), [True, False, False, False])
    assert same.spearman == pytest.approx(1.0) and same.kendall == pytest.approx(1.0)
    assert same.topk_overlap == 1.0
    rev = agreement([1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0], [False] * 4)
    assert rev.spearman == pytest.approx(-1.0) and rev.kendall == pytest.approx(-1.0)
    # NaN dropped pairwise: the remaining three groups agree perfectly
    nan = agreement([0.1, 0.2, 0.3, 0.4], [np.nan, 2.0, 3.0, 4.0], [False] * 4)
    assert nan.n == 3 and nan.spearman == pytest.approx(1.0) and nan.kendall == pytest.approx(1.0)
    # fewer than three valid groups, or a constant vector: undefined
    assert agreement([0.1, 0.2, 0.3], [np.nan, 1.0, 2.0], [False] * 3).spearman is None
    const = agreement([0.25, 0.25, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4], [False] * 4)
    assert const.spearman is None and const.kendall is None
    assert isinstance(same, Agreement)
    json.dumps(same.to_dict())


def test_topk_overlap_on_a_hand_checked_example():
    own = [0.40, 0.05, 0.30, 0.05, 0.20]
    flagged = [True, False, True, False, False]       # k = 2: groups 0 and 2
    other = [0.10, 0.50, 0.25, 0.05, 0.10]           # top-2 by the baseline: groups 1 and 2
    agr = agreement(own, other, flagged)
    assert agr.k == 2 and agr.topk_overlap == pytest.approx(0.5)
    assert agreement(own, [0.5, 0.0, 0.4, 0.0, 0.1], flagged).topk_overlap == 1.0
    assert agreement(own, [0.0, 0.5, 0.0, 0.4, 0.1], flagged).topk_overlap == 0.0
    # a NaN baseline score is never among the top k
    assert agreement(own, [np.nan, 0.5, 0.4, 0.0, 0.1], flagged).topk_overlap == 0.5
    with pytest.raises(ValueError):
        agreement([0.1, 0.2], [0.1], [True, False])
