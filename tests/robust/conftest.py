"""Digits as images in [0, 1] for the robustness-patch tests: the method tests' small CNN
(`tests/digits_helpers.py`), trained here on all ten classes, and a held-out split."""

from __future__ import annotations

import copy

import pytest
import torch
from digits_helpers import DigitsCNN, fit, shuffled_digits
from torch import nn

TRAIN_ROWS = 1200  # of 1797; the other 597 are held out


@pytest.fixture(scope="session")
def trained_digits() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """A CNN trained on 1200 digits (about 0.9 held-out accuracy), the training and the held-out
    (inputs, labels). Never modify the model: tests take a copy through `digits_cnn`."""
    x, y = shuffled_digits()
    torch.manual_seed(0)
    model = DigitsCNN(classes=10)
    fit(model, list(model.parameters()), x[:TRAIN_ROWS], y[:TRAIN_ROWS], epochs=15)
    return model, (x[:TRAIN_ROWS], y[:TRAIN_ROWS]), (x[TRAIN_ROWS:], y[TRAIN_ROWS:])


@pytest.fixture
def digits_cnn(trained_digits) -> nn.Module:
    return copy.deepcopy(trained_digits[0])
