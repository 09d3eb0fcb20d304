"""Checks every config group shares."""

from __future__ import annotations

import math
from dataclasses import fields


def check_finite(config, group: str) -> None:
    """ValueError naming the first float field of `config` that is NaN or infinite (`training.lr=inf`).

    Runs before a group's range checks: NaN compares False with every bound, so `weight_decay < 0` lets
    it through, and an infinite lr passes `lr > 0`."""
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{group}.{f.name}={value} must be a finite number; set a real value")
