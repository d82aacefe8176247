"""Shared pytest fixtures for the numerics tests (keep this file small)."""

from __future__ import annotations

import os

import pytest
import torch

# Triton picks compiled vs interpreted mode when it is first imported, and in one pytest process
# some other import may load it before the kernel tests run: on a machine without a GPU, decide
# for the interpreter up front (quantlab.kernels.w4a16.load_triton does the same in a notebook).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
