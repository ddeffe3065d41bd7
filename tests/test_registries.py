"""Where the code extends: a defect and a baseline are each one registered function, with
their properties declared once (what they apply to, whether they are cheap or scale the
input), and every part of the tool (resolve, plant, compute, the outputs) picks them up."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model_audit.baselines import BASELINES, compute_baselines, resolve_baselines
from model_audit.baselines.registry import register_baseline
from model_audit.core import plant
from model_audit.core.layers import layer_groups
from model_audit.models.tiny import TinyResNet


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TinyResNet(10).eval()


def test_a_defect_is_one_registered_function(model):
    @plant.register_defect("zero", bounded=True, start=1.0,
                           description="the group's weights moved toward zero")
    def _zero(case):
        base = case.floats()
        return plant.Damage(base, {p: -t0 for p, t0 in base.items()})

    try:
        assert plant.resolve_defects("all")[-1] == "zero"
        group = next(g for g in layer_groups(model) if g.name == "fc")
        planter = plant.Planter(model, group, "zero", seed=0)
        damaged = planter.apply(1.0)
        assert torch.count_nonzero(damaged.fc.weight) == 0
        assert torch.count_nonzero(model.fc.weight) > 0  # the caller's model is untouched
        assert planter.max_severity == 1.0
    finally:
        del plant.DEFECTS["zero"]


def test_where_a_defect_applies_is_declared_with_it(model):
    groups = {g.name: g for g in layer_groups(model)}
    assert plant.DEFECTS["bnstats"].needs == "BatchNorm layer"
    assert not plant.applicable(model, groups["fc"], "bnstats")
    assert plant.applicable(model, groups["bn1"], "bnstats")
    with pytest.raises(Exception, match="does not apply to group 'fc' \\(it has no BatchNorm"):
        plant.Planter(model, groups["fc"], "bnstats")


def test_a_baseline_is_one_registered_function(model):
    @register_baseline("weight_norm", "Weight norm", cheap=True, uses_steps=False,
                       captum_class=None, description="the norm of each group's weights")
    def _weight_norm(net, groups, batches, device, counter, n, progress, grad_sq=None):
        params = dict(net.named_parameters())
        return np.array([sum(float(params[p].detach().norm()) for p in g.parameter_names)
                         for g in groups])

    try:
        assert "weight_norm" in resolve_baselines("all")
        groups = layer_groups(model)
        x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
        result = compute_baselines(model, [([0, 1, 2, 3], x, y)], groups, ["weight_norm"])
        scores = result["weight_norm"].scores
        assert len(scores) == len(groups) and abs(float(sum(scores)) - 1.0) < 1e-6
    finally:
        del BASELINES["weight_norm"]


def test_the_registries_keep_their_order_and_properties():
    assert list(BASELINES) == ["grad_x_activation", "activation", "conductance",
                               "integrated_gradients", "internal_influence", "auto_rgn"]
    assert {n for n, b in BASELINES.items() if b.scales_input} == {"conductance",
                                                                    "internal_influence"}
    assert {n for n, b in BASELINES.items() if b.cheap} == {"grad_x_activation", "activation",
                                                            "auto_rgn"}
    assert list(plant.DEFECTS) == ["noise", "reinit", "labelswap", "bnstats"]
