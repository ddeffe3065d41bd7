"""``python -m bench vgg``: a fourth architecture for the localisation goals, not a ResNet.

A VGG-style CNN (``bench.vgg_bench:make_vgg``: four 3x3 convolutions, each followed by its
BatchNorm, two max-pools, two linear layers; ten layer groups, three of them BatchNorms of
0.1-0.2% of the parameters) is trained on the digits sample's training split with SGD, the
beta momentum schedule and a cosine learning rate, and saved with the tool's metadata (the
factory as its architecture, the sample's normalisation) to
``--out`` (default ``~/.cache/model-audit-bench/vgg-digits-sgd.safetensors``). Its planted-fault
localisation is then measured with the same bench as the other models::

    python -m bench localize --checkpoint PATH --probe samples/digits-probe.safetensors \\
        --seeds 3 --parts planted --candidates alone
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterator, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import _common as common

FACTORY = "bench.vgg_bench:make_vgg"
SAMPLES = common.ROOT / "samples"


class DigitsVGG(nn.Module):
    """1x8x8 -> [conv-bn-relu]x2 -> pool -> [conv-bn-relu]x2 -> pool -> fc1 -> fc2."""

    def __init__(self, num_classes: int, width: int = 16) -> None:
        super().__init__()
        w = width
        self.conv1, self.bn1 = nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w)
        self.conv2, self.bn2 = nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w)
        self.conv3, self.bn3 = nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w)
        self.conv4, self.bn4 = (nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False),
                                nn.BatchNorm2d(2 * w))
        self.fc1, self.fc2 = nn.Linear(2 * w * 2 * 2, 64), nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        x = F.max_pool2d(x, 2)
        x = F.relu(self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x))))))
        x = F.max_pool2d(x, 2).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


def make_vgg(num_classes: int) -> nn.Module:
    return DigitsVGG(num_classes)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None,
                        help="checkpoint to write [default: the bench cache's "
                             "vgg-digits-sgd.safetensors]")
    parser.add_argument("--epochs", type=int, default=6, help="[default: 6]")
    parser.add_argument("--seed", type=int, default=0, help="[default: 0]")


def run(args: argparse.Namespace) -> int:
    from model_audit.io.tensors import read_tensors
    from model_audit.models.checkpoint import audit_metadata, load_checkpoint, save_checkpoint

    train, _ = read_tensors(SAMPLES / "digits-train.safetensors")
    probe, meta = read_tensors(SAMPLES / "digits-probe.safetensors")
    normalize = load_checkpoint(SAMPLES / "digits-sgd.safetensors").normalize
    mean, std = (float(v) for v in str(normalize).split(","))
    prep = lambda t: (t.float() / 255.0 - mean) / std  # noqa: E731
    x, y = prep(train["images"]), train["labels"]
    torch.manual_seed(args.seed)
    model = DigitsVGG(10)
    batch = 64
    steps = args.epochs * ((len(x) + batch - 1) // batch)
    opt, momentum = common.make_optimizer("beta", model.parameters(), 0.05, 0.0, 5e-4)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    gen = torch.Generator().manual_seed(args.seed)

    def epochs() -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:  # shuffled, without replacement
        for _ in range(args.epochs):
            order = torch.randperm(len(x), generator=gen)
            for start in range(0, len(order), batch):
                idx = order[start:start + batch]
                yield x[idx], y[idx]

    common.train_steps(model, epochs(), opt, cosine, momentum)
    model.eval()
    with torch.no_grad():
        acc = float((model(prep(probe["images"])).argmax(1) == probe["labels"]).float().mean())
    out = args.out or common.default_cache_dir() / "vgg-digits-sgd.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    classes = json.loads(meta["classes"]) if "classes" in meta else [str(i) for i in range(10)]
    save_checkpoint(model.state_dict(), out,
                    metadata=audit_metadata(FACTORY, 10, normalize=normalize, classes=classes))
    print(f"{out}: {sum(p.numel() for p in model.parameters()):,} parameters, probe accuracy "
          f"{100 * acc:.2f}% ({args.epochs} epochs, seed {args.seed})")
    return 0
