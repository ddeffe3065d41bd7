"""End to end on real data: train a small ResNet on a CIFAR-10 subset, then scan it via the CLI.

The model is trained here (120 SGD steps with the beta momentum schedule and a cosine learning
rate on 1,000 images, width 8: about 6 s on one core, 34% test accuracy), saved with the tool's
metadata and scanned on 500 CIFAR-10 test images through ``model-audit scan``. The data comes from
``../shared/data/cifar10-jpeg.tar.gz``; when that archive is absent the tests are skipped.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from model_audit.models.tiny import TinyResNet

from model_audit.models.checkpoint import audit_metadata, save_checkpoint
from model_audit.cli import cli
from model_audit.core.replay import ReplayConfig
from model_audit.core.schedules import REGIMES, MomentumScheduler, beta_momentum
from bench.cifar import (CIFAR10_CLASSES, CIFAR_TARBALL, cifar_subset, load_images,
                         missing_data_message)

pytestmark = pytest.mark.slow

TRAIN_PER_CLASS = 100
TEST_PER_CLASS = 50
TRAIN_STEPS = 120
BATCH = 64
PEAK_LR = 0.05
WIDTH = 8
GROUPS = ["conv1", "bn1", "layer1", "layer2", "layer3", "fc"]


@pytest.fixture(scope="session")
def cifar_cache(tmp_path_factory) -> Path:
    if not CIFAR_TARBALL.is_file():
        pytest.skip(missing_data_message(CIFAR_TARBALL))
    return tmp_path_factory.mktemp("cifar10-subsets")


@pytest.fixture(scope="session")
def cifar_train_dir(cifar_cache) -> Path:
    return cifar_subset(cifar_cache, "train", TRAIN_PER_CLASS)


@pytest.fixture(scope="session")
def cifar_test_dir(cifar_cache) -> Path:
    return cifar_subset(cifar_cache, "test", TEST_PER_CLASS)


def _train_tiny_resnet(train_dir: Path) -> TinyResNet:
    """Heavy-ball SGD, beta momentum schedule over a cosine learning rate, random flips."""
    x, y, classes = load_images(train_dir, normalize="cifar10", classes=CIFAR10_CLASSES)
    assert list(classes) == sorted(CIFAR10_CLASSES)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = TinyResNet(num_classes=10, in_channels=3, width=WIDTH)
    opt = torch.optim.SGD(model.parameters(), lr=PEAK_LR, momentum=0.0, weight_decay=5e-4)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=TRAIN_STEPS)
    momentum = MomentumScheduler(opt, "beta")
    model.train()
    for _ in range(TRAIN_STEPS):
        idx = torch.randint(0, len(x), (BATCH,), generator=gen)
        xb, yb = x[idx], y[idx]
        flip = torch.rand(BATCH, generator=gen) < 0.5
        xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(3), xb)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        cosine.step()
        momentum.step()
    assert math.isfinite(float(loss.detach()))
    # The schedule really followed the learning rate: critically damped where not clipped.
    assert momentum.history[0].momentum == pytest.approx(beta_momentum(PEAK_LR))
    assert all(r.momentum == pytest.approx(beta_momentum(r.lr)) for r in momentum.history)
    return model.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cifar_train_dir):
    model = _train_tiny_resnet(cifar_train_dir)
    path = tmp_path_factory.mktemp("cifar-model") / "tiny-resnet-cifar.safetensors"
    save_checkpoint(model.state_dict(), path,
                    metadata=audit_metadata("tiny-resnet", 10, normalize="cifar10",
                                            classes=sorted(CIFAR10_CLASSES)))
    return path, sum(p.numel() for p in model.parameters())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run_scan(ckpt: Path, probe: Path, out: Path, *extra: str) -> dict:
    runner = CliRunner()
    before = ckpt.read_bytes()
    # A clean working directory: no pyproject.toml / model-audit.toml defaults apply.
    cwd = out.parent / f"cwd-{out.name}"
    cwd.mkdir()
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        result = runner.invoke(cli, ["scan", str(ckpt), "--probe", str(probe), "--out", str(out),
                                     "--seed", "0", "--quiet", *extra])
    finally:
        os.chdir(previous)
    assert result.exit_code == 0, (result.output, result.exception)
    assert ckpt.read_bytes() == before, "the scan changed the checkpoint file"
    assert (out / "report.html").is_file()
    audit = json.loads((out / "audit.json").read_text())
    assert "flagged:" in result.output
    return audit


def _check_audit(audit: dict, ckpt: Path, probe: Path, n_params: int) -> None:
    assert audit["schema_version"] >= 1
    model = audit["model"]
    assert model["sha256"] == _sha256(ckpt)
    assert model["arch"] == "tiny-resnet"
    assert model["num_classes"] == 10
    assert model["parameters"] == n_params

    ev = audit["probe"]
    assert ev["n"] == 10 * TEST_PER_CLASS == 500
    assert ev["classes"] == sorted(CIFAR10_CLASSES)
    assert ev["normalize"] == "cifar10"
    assert Path(ev["source"]) == probe
    # The model learned something: clearly above the 10% of chance.
    assert ev["accuracy"] > 0.25, f"accuracy {ev['accuracy']:.3f}: the model did not learn"
    assert ev["misclassified"] == ev["n"] - ev["correct"] > 0
    assert len(audit["misclassified"]) == ev["misclassified"]

    layers = audit["layers"]
    assert [layer["name"] for layer in layers] == GROUPS
    assert sum(layer["params"] for layer in layers) == n_params
    assert sum(layer["share"] for layer in layers) == pytest.approx(1.0)
    scores = [layer["score"] for layer in layers]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert sum(scores) == pytest.approx(1.0, abs=1e-6)
    for layer in layers:
        assert 0.0 <= layer["flag_frequency"] <= 1.0
        lo, hi = layer["score_interval"]
        assert 0.0 <= lo <= hi <= 1.0
        assert layer["flagged"] == (layer["name"] in audit["flagged"])
    assert len(audit["flagged"]) >= 1
    assert set(audit["flagged"]) <= set(GROUPS)

    replay = audit["replay"]
    steps = ReplayConfig().steps
    assert replay["n"] == ev["misclassified"]
    assert len(replay["steps"]) == steps
    damping = audit["damping"]
    assert len(damping) == steps  # one damping record per replay step
    assert [d["step"] for d in damping] == list(range(steps))
    for record in damping:
        assert record["regime"] in REGIMES
        assert math.isfinite(record["loss"])
        if replay["schedule"] == "beta":
            # Critically damped by construction (the momentum is far from its clip here).
            assert record["momentum"] == pytest.approx(beta_momentum(record["lr"]))
            assert record["regime"] == "critical"
    assert audit["passes"]["backward_images"] > 0


@pytest.fixture(scope="module")
def scanned(trained, cifar_test_dir, tmp_path_factory) -> dict:
    """The CLI scan with the architecture read from the checkpoint's metadata."""
    ckpt, _ = trained
    return _run_scan(ckpt, cifar_test_dir, tmp_path_factory.mktemp("scan") / "out")


def test_scan_trained_cifar_model(trained, scanned, cifar_test_dir):
    ckpt, n_params = trained
    _check_audit(scanned, ckpt, cifar_test_dir, n_params)
    assert scanned["options"]["arch"] is None  # taken from the metadata


def test_scan_with_explicit_arch_matches_metadata(trained, scanned, cifar_test_dir, tmp_path):
    ckpt, n_params = trained
    from_meta = scanned
    explicit = _run_scan(ckpt, cifar_test_dir, tmp_path / "explicit", "--arch", "tiny-resnet")
    _check_audit(explicit, ckpt, cifar_test_dir, n_params)
    assert explicit["options"]["arch"] == "tiny-resnet"
    assert explicit["probe"]["accuracy"] == from_meta["probe"]["accuracy"]
    assert explicit["flagged"] == from_meta["flagged"]
    for a, b in zip(explicit["layers"], from_meta["layers"]):
        assert a["score"] == pytest.approx(b["score"], rel=1e-5, abs=1e-9)
