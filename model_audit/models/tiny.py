"""The bundled small model: a ResNet-style CNN with the torchvision ResNets' group structure."""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock


class TinyResNet(nn.Module):
    """A small ResNet-style CNN (conv1, bn1, layer1-3, fc) for tests, samples and quick runs.

    Same group structure as the torchvision ResNets, so every stage of the tool treats it as
    it treats a real ResNet; about 75k parameters at the default width.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()

        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)

        def stage(cin: int, cout: int, stride: int) -> nn.Sequential:
            down = None
            if stride != 1 or cin != cout:
                down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                     nn.BatchNorm2d(cout))
            return nn.Sequential(BasicBlock(cin, cout, stride, down), BasicBlock(cout, cout))

        self.layer1 = stage(width, width, 1)
        self.layer2 = stage(width, 2 * width, 2)
        self.layer3 = stage(2 * width, 4 * width, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))
