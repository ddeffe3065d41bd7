"""Factories of non-image classifiers for the tests (``--arch nonimage_models:make_mlp``)."""
import torch
from torch import nn


class MLP(nn.Module):
    """A tabular classifier: 64 features (scikit-learn's digits as rows) -> classes."""

    def __init__(self, num_classes: int, features: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(features, 64)
        self.fc2 = nn.Linear(64, 32)
        self.fc3 = nn.Linear(32, 32)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.head(torch.relu(self.fc3(x)))


class BagOfTokens(nn.Module):
    """A token-sequence classifier: int64 token ids (N, L) -> classes."""

    def __init__(self, num_classes: int, vocabulary: int = 40) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, 16)
        self.mix = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.relu(self.mix(self.embed(tokens).mean(1)))))


def make_mlp(num_classes: int) -> nn.Module:
    """``--arch nonimage_models:make_mlp``: the MLP on 64 features."""
    return MLP(num_classes)


def make_bag(num_classes: int) -> nn.Module:
    """``--arch nonimage_models:make_bag``: the bag of tokens on a vocabulary of 40."""
    return BagOfTokens(num_classes)
