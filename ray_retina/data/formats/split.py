"""A deterministic train/val split for sources that have none."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def split_keys(keys: Sequence[str], val_fraction: float, seed: int) -> dict[str, list[str]]:
    """``{"train": [...], "val": [...]}``: disjoint, together all ``keys``, each in the order given.

    The keys are ranked by SHA-256 of ``(seed, key)`` and the first ``round(val_fraction * n)`` go to
    val (at least one and at most ``n - 1`` when ``n >= 2``). So the split depends on the set of keys
    and the seed only (not on listing order or the machine), the val size is exact, and adding images
    to a source moves few of the old ones across (only those ranked near the cut).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(set(keys)) != len(keys):
        raise ValueError("keys must be unique")
    n = len(keys)
    n_val = round(val_fraction * n)
    if n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    ranked = sorted(keys, key=lambda k: hashlib.sha256(f"{seed}\0{k}".encode()).digest())
    val = set(ranked[:n_val])
    return {"train": [k for k in keys if k not in val], "val": [k for k in keys if k in val]}
