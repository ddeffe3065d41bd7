"""Build the committed samples: two small real models and a held-out probe set.

Data: scikit-learn's handwritten digits (1,797 8x8 grayscale images, 10 classes), which ships
inside the scikit-learn package, so nothing is downloaded. A stratified, seeded split keeps
30% as the probe set; the models never see it.

Models: ``tiny-resnet`` (conv1, bn1, layer1-3, fc; width 8, about 44k parameters), trained
from the same initialisation for the same number of steps:

* ``digits-sgd.safetensors``: SGD with a cosine learning rate and the beta momentum schedule
  (``model_audit.core.schedules.MomentumScheduler``);
* ``digits-adam.safetensors``: Adam with the same cosine learning-rate shape.

Outputs (in this directory): the two checkpoints (with the tool's metadata: arch, classes,
normalisation), ``digits-probe.safetensors`` (the held-out split: uint8 images, int64 labels,
class names) and ``digits-train.safetensors`` (the training split, repair data for ``fix``).

Run: ``make samples`` (or ``python samples/make_samples.py``). Needs the ``samples`` extra.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save

from model_audit.models.tiny import TinyResNet

from model_audit.io.files import atomic_write_bytes

from model_audit.models.checkpoint import audit_metadata, save_checkpoint
from model_audit.core.schedules import MomentumScheduler
HERE = Path(__file__).resolve().parent
SEED = 0
EPOCHS = 2
BATCH = 64
WIDTH = 8


def load_digits_uint8():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # Pixel values are 0..16; scale to the 0..255 range of an 8-bit image.
    images = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    return train_test_split(images, labels, test_size=0.3, stratify=labels, random_state=SEED)


def train(optimizer_name: str, x: torch.Tensor, y: torch.Tensor, mean: float, std: float):
    torch.manual_seed(SEED)
    model = TinyResNet(num_classes=10, in_channels=1, width=WIDTH)
    steps = EPOCHS * ((len(x) + BATCH - 1) // BATCH)
    if optimizer_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.0, weight_decay=5e-4)
        momentum = MomentumScheduler(opt, "beta")
    else:
        opt = torch.optim.Adam(model.parameters(), lr=0.003, weight_decay=0.0)
        momentum = None
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    gen = torch.Generator().manual_seed(SEED)
    xn = (x - mean) / std
    model.train()
    for _ in range(EPOCHS):
        order = torch.randperm(len(xn), generator=gen)
        for start in range(0, len(order), BATCH):
            idx = order[start:start + BATCH]
            loss = F.cross_entropy(model(xn[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if momentum is not None:
                momentum.step()
    model.eval()
    return model


def main() -> None:
    # One thread: the tensors are bit-for-bit repeatable with the same torch (the header is
    # not: safetensors writes the metadata in hash-map order, so file hashes can differ).
    torch.set_num_threads(1)
    x_train, x_probe, y_train, y_probe = load_digits_uint8()
    xt = torch.from_numpy(x_train).unsqueeze(1).float() / 255.0
    yt = torch.from_numpy(y_train)
    mean, std = float(xt.mean()), float(xt.std())
    normalize = f"{mean:.4f},{std:.4f}"
    classes = [str(i) for i in range(10)]
    xp = torch.from_numpy(x_probe).unsqueeze(1).contiguous()
    yp = torch.from_numpy(y_probe)
    atomic_write_bytes(HERE / "digits-probe.safetensors", save(
        {"images": xp, "labels": yp},
        metadata={"classes": json.dumps(classes),
                  "source": "scikit-learn digits, stratified 30% held out, seed 0"}))
    # The training split too, as repair data for `model-audit fix` (never the probe).
    atomic_write_bytes(HERE / "digits-train.safetensors", save(
        {"images": torch.from_numpy(x_train).unsqueeze(1).contiguous(), "labels": yt},
        metadata={"classes": json.dumps(classes),
                  "source": "scikit-learn digits, the 70% training split, seed 0"}))
    for name in ("sgd", "adam"):
        model = train(name, xt, yt, mean, std)
        with torch.no_grad():
            acc = (model((xp.float() / 255.0 - mean) / std).argmax(1) == yp).float().mean()
        meta = audit_metadata("tiny-resnet", 10, normalize=normalize, classes=classes)
        meta["model_audit.trained_with"] = name
        save_checkpoint(model.state_dict(), HERE / f"digits-{name}.safetensors", metadata=meta)
        print(f"digits-{name}.safetensors: probe accuracy {100 * float(acc):.2f}%")


if __name__ == "__main__":
    main()
