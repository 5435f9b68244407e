"""Seeded random weights for encoders built without a checkpoint (the demo's tiny CONCH, benchmarks, tests)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """Build a module with random weights from `seed` without disturbing the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()
