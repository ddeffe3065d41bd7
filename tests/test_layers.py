import pytest
import torch
from torch import nn

from model_audit.models.tiny import TinyResNet

from model_audit.models.registry import build_model
from model_audit.errors import ConfigError
from model_audit.core.layers import layer_groups
def _partition_ok(model, groups):
    names = sorted(n for g in groups for n in g.parameter_names)
    assert names == sorted(n for n, _ in model.named_parameters())
    assert sum(g.params for g in groups) == sum(p.numel() for p in model.parameters())
    assert sum(g.share for g in groups) == pytest.approx(1.0)


def test_resnet18_cifar_has_the_papers_seven_groups():
    model = build_model("resnet18-cifar", 10)
    groups = layer_groups(model)
    # Parameter counts of the CIFAR ResNet-18 (see shared/PAPER.md).
    assert [(g.name, g.params) for g in groups] == [
        ("conv1", 1728), ("bn1", 128), ("layer1", 147968), ("layer2", 525568),
        ("layer3", 2099712), ("layer4", 8393728), ("fc", 5130)]
    _partition_ok(model, groups)
    assert groups[4].share == pytest.approx(0.188, abs=0.001)
    # BatchNorm buffers travel with their group.
    assert "bn1.running_mean" in groups[1].buffer_names
    assert "layer1.0.bn1.running_var" in groups[2].buffer_names


def test_containers_of_many_blocks_are_expanded():
    with torch.device("meta"):
        vgg = build_model("vgg11", 10)
        mobile = build_model("mobilenet_v3_small", 10)
    vgg_groups = [g.name for g in layer_groups(vgg)]
    assert vgg_groups[0] == "features.0" and vgg_groups[-1] == "classifier.6"
    assert len(vgg_groups) == 11  # 8 convs + 3 linear layers
    mobile_groups = layer_groups(mobile)
    assert [g.name for g in mobile_groups][:2] == ["features.0", "features.1"]
    _partition_ok(mobile, mobile_groups)


def test_block_and_module_granularity():
    model = TinyResNet(10, 3, 8)
    blocks = layer_groups(model, "block")
    assert [g.name for g in blocks] == ["conv1", "bn1", "layer1.0", "layer1.1", "layer2.0",
                                        "layer2.1", "layer3.0", "layer3.1", "fc"]
    _partition_ok(model, blocks)
    modules = layer_groups(model, "module")
    assert "layer2.0.downsample.0" in [g.name for g in modules]
    assert all(len({n.rsplit(".", 1)[0] for n in g.parameter_names}) == 1 for g in modules)
    _partition_ok(model, modules)


def test_root_parameters_get_their_own_group():
    class WithToken(nn.Module):
        def __init__(self):
            super().__init__()
            self.token = nn.Parameter(torch.zeros(4))
            self.body = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

    groups = layer_groups(WithToken())
    assert [g.name for g in groups] == ["token", "body", "head"]


def test_bad_granularity_and_parameterless_model():
    with pytest.raises(ConfigError, match="group, block, module"):
        layer_groups(TinyResNet(), "layer")
    with pytest.raises(ConfigError, match="no parameters"):
        layer_groups(nn.ReLU())
