"""Shared pytest fixtures for the numerics tests (keep this file small)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def gen() -> torch.Generator:
    """A freshly seeded CPU generator, so every test draws the same numbers on every run."""
    return torch.Generator().manual_seed(0)


@pytest.fixture
def weight(gen: torch.Generator) -> torch.Tensor:
    """A small ``(out, in) = (8, 64)`` float32 weight with a few outliers, like a real linear layer."""
    w = torch.randn(8, 64, generator=gen) * 0.05
    w[2, 5] = 0.9  # an outlier column entry
    w[6, 40] = -0.7
    return w
