"""Every torchvision classifier family loads and scans from a state dict saved at its defaults.

One variant per family (the smallest; for VGG vgg11_bn, whose BatchNorm layers vgg11 lacks),
random weights with BatchNorm statistics from a few
training-mode passes (an untrained network in eval mode would only blow its activations up),
saved as safetensors exactly as ``model.state_dict()`` gives it: auxiliary heads included
(googlenet, inception_v3), and no module versions (MNASNet checks its own). The larger variants
of each family share these code paths; ``python -m bench`` is the place for their cost.
"""
import json

import pytest
import torch
import torchvision.models as tvm
from click.testing import CliRunner
from safetensors.torch import save_file

from model_audit.cli import cli

#: family -> (smallest variant, input size it can take)
FAMILIES = {
    "alexnet": ("alexnet", 64), "convnext": ("convnext_tiny", 32),
    "densenet": ("densenet121", 32), "efficientnet": ("efficientnet_b0", 32),
    "efficientnet_v2": ("efficientnet_v2_s", 32), "googlenet": ("googlenet", 32),
    "inception": ("inception_v3", 80), "maxvit": ("maxvit_t", 224),
    "mnasnet": ("mnasnet0_5", 32), "mobilenet_v2": ("mobilenet_v2", 32),
    "mobilenet_v3": ("mobilenet_v3_small", 32), "regnet_x": ("regnet_x_400mf", 32),
    "regnet_y": ("regnet_y_400mf", 32), "resnet": ("resnet18", 32),
    "resnext": ("resnext50_32x4d", 32), "shufflenet": ("shufflenet_v2_x0_5", 32),
    "squeezenet": ("squeezenet1_0", 48), "swin": ("swin_t", 32), "swin_v2": ("swin_v2_t", 32),
    "vgg": ("vgg11_bn", 32), "vit": ("vit_b_32", 224),
    "wide_resnet": ("wide_resnet50_2", 32),
}


def test_every_torchvision_family_is_listed():
    """A new torchvision family fails here until it is added above (and so tested)."""
    def module(name):  # torchvision defines each family in a module of its own
        return tvm.get_model_builder(name).__module__

    covered = {module(name) for name, _ in FAMILIES.values()}
    missing = sorted({module(n) for n in tvm.list_models(module=tvm)} - covered)
    assert not missing, f"families without a test: {missing}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_loads_and_scans(family, tmp_path):
    name, size = FAMILIES[family]
    torch.manual_seed(0)
    model = tvm.get_model(name, weights=None, num_classes=10)
    aux = getattr(model, "AuxLogits", None)  # inception's aux head needs 299-pixel images
    if aux is not None:
        model.AuxLogits = None
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(4, 3, size, size))
    if aux is not None:
        model.AuxLogits = aux
    ckpt = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    probe = tmp_path / "probe.safetensors"
    n = 2 if size >= 224 else 6  # the two families that need 224 pixels: fewer images
    save_file({"images": torch.rand(n, 3, size, size), "labels": torch.arange(n) % 10},
              str(probe))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["scan", str(ckpt), "--arch", name, "--probe", str(probe),
                                      "--out", str(out), "--bootstrap", "0", "--replay-steps",
                                      "1", "--baselines", "none"])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    audit = json.loads((out / "audit.json").read_text())
    assert audit["model"]["arch"] == name and audit["probe"]["n"] == n
    assert len(audit["layers"]) >= 2
    if name in ("googlenet", "inception_v3"):
        assert "auxiliary heads" in result.output  # left out, and said so
    if family in ("googlenet", "regnet_x", "mnasnet", "resnet"):  # no --arch: the keys say it
        guess = CliRunner().invoke(cli, ["scan", str(ckpt), "--probe", str(probe), "--out",
                                         str(tmp_path / "guess"), "--bootstrap", "0",
                                         "--replay-steps", "1", "--baselines", "none"])
        assert guess.exit_code == 0, guess.output
        assert f"match {name} only" in guess.output


def test_images_too_small_for_the_model_are_a_clear_error(tmp_path):
    model = tvm.get_model("inception_v3", weights=None, num_classes=10, aux_logits=False,
                          init_weights=False)
    ckpt = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    probe = tmp_path / "probe.safetensors"
    save_file({"images": torch.rand(4, 3, 32, 32), "labels": torch.arange(4)}, str(probe))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["scan", str(ckpt), "--arch", "inception_v3", "--probe",
                                      str(probe), "--out", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "the model cannot run on the probe's images (3x32x32)" in result.output
    assert "--resize" in result.output and not out.exists()
