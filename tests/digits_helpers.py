"""Digits as images in [0, 1] and a small CNN: the conv adapter tests (a CNN trained on 0-4, and
5-9 to adapt to) and the robustness-patch tests (all ten classes) share them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import logits
from sklearn.datasets import load_digits
from torch import nn


class DigitsCNN(nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv3(F.relu(self.conv2(F.relu(self.conv1(x))))))
        return self.head(x.mean((-2, -1)))


def fit(model: nn.Module, params: list[nn.Parameter], x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    order = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=order).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (logits(model, x).argmax(-1) == y).float().mean().item()


def shuffled_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's 1797 8x8 digits as (N, 1, 8, 8) images in [0, 1] and their labels, in one fixed
    shuffled order."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return x[order], y[order]


@pytest.fixture(scope="session")
def digits():
    """A CNN trained on digits 0-4, and digits 5-9 (relabelled 0-4) split into train and test."""
    x, y = shuffled_digits()
    torch.manual_seed(0)
    backbone = DigitsCNN()
    fit(backbone, list(backbone.parameters()), x[y < 5], y[y < 5], epochs=15)
    new_x, new_y = x[y >= 5], y[y >= 5] - 5
    half = len(new_y) // 2
    return backbone.state_dict(), (new_x[:half], new_y[:half]), (new_x[half:], new_y[half:])


def with_fresh_head(state: dict[str, torch.Tensor]) -> DigitsCNN:
    model = DigitsCNN()
    model.load_state_dict(state)
    torch.manual_seed(1)
    model.head = nn.Linear(16, 5)
    return model
