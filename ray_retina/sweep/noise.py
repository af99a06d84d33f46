"""The sweep's noise floor and the rankings it allows.

The noise floor of a round is the sample standard deviation (ddof 1) of a metric over the base config trained
``tune.noise_repeats`` times with different seeds (initialisation, data order, augmentation draws), under
the same schedule and eval rounds as the searched trials. A difference between two single runs has a
standard deviation of sqrt(2) times that; we call two trials **tied within noise** when their gap is at most
``TIE_SIGMAS`` floors (2 floors = 1.4 standard deviations of a two-run difference: two runs of one config
that differ only in the seed are that far apart about one time in six).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

TIE_SIGMAS = 2.0


@dataclass
class NoiseFloor:
    """Per round (Tune's ``training_iteration``, 1-based): the repeats' mean and std of ``val/AP`` and of
    each class's AP. Rounds with fewer than two repeats reporting have no std."""

    repeats: int
    mean: dict[int, float] = field(default_factory=dict)
    std: dict[int, float] = field(default_factory=dict)
    class_std: dict[str, dict[int, float]] = field(default_factory=dict)
    """class name -> round -> std of ``val/AP/<class>`` (classes without GT, COCO's -1, left out)."""
    iteration: dict[int, int] = field(default_factory=dict)
    """round -> training iteration of that eval (the MLflow step)."""

    def at(self, round_: int) -> float | None:
        """The floor at ``round_``, or at the nearest measured round below it (None: none measured)."""
        known = [r for r in self.std if r <= round_]
        return self.std[max(known)] if known else None

    def threshold(self, round_: int) -> float | None:
        """The largest gap still tied within noise at ``round_``."""
        s = self.at(round_)
        return None if s is None else TIE_SIGMAS * s


def noise_floor(
    histories: Iterable[Mapping[int, Mapping[str, float]]], repeats: int, metric: str = "val/AP"
) -> NoiseFloor:
    """The floor from the repeats' histories: each ``round -> reported metrics`` (``metric``,
    ``<metric>/<class>``, ``iteration``)."""
    by_round: dict[int, list[Mapping[str, float]]] = {}
    for h in histories:
        for r, m in h.items():
            by_round.setdefault(int(r), []).append(m)
    floor = NoiseFloor(repeats=repeats)
    prefix = metric + "/"
    for r, ms in sorted(by_round.items()):
        values = [float(m[metric]) for m in ms if _finite(m.get(metric))]
        if values:
            floor.mean[r] = float(np.mean(values))
        if len(values) >= 2:
            floor.std[r] = float(np.std(values, ddof=1))
        its = [int(m["iteration"]) for m in ms if _finite(m.get("iteration"))]
        if its:
            floor.iteration[r] = max(its)
        classes = {k[len(prefix) :] for m in ms for k in m if k.startswith(prefix)}
        for c in sorted(classes):
            v = [float(m[prefix + c]) for m in ms if _finite(m.get(prefix + c)) and m[prefix + c] >= 0]
            if len(v) >= 2:
                floor.class_std.setdefault(c, {})[r] = float(np.std(v, ddof=1))
    return floor


def _finite(v: object) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def tied(gap: float, threshold: float | None) -> bool | None:
    """``gap`` (best minus this, >= 0) within noise; None when no floor was measured."""
    return None if threshold is None else gap <= threshold


def versus_default(value: float, floor: NoiseFloor, round_: int) -> tuple[float, bool] | None:
    """``value`` at ``round_`` minus the base config's mean there, and whether the difference is beyond
    noise (more than the tie threshold); None without a floor at that round."""
    t = floor.threshold(round_)
    mean = floor.mean.get(round_)
    if t is None or mean is None:
        return None
    d = value - mean
    return d, abs(d) > t


def beyond_default(value: float, floor: NoiseFloor, round_: int) -> str:
    """How ``value`` at ``round_`` compares with the base config's mean there: ``+1.2 (beyond noise)``,
    ``-0.3 (within noise)`` in AP points, or ``n/a`` without a floor."""
    vs = versus_default(value, floor, round_)
    if vs is None:
        return "n/a"
    return f"{100 * vs[0]:+.1f} ({'beyond' if vs[1] else 'within'} noise)"


def default_verdict(diff: float, beyond: bool) -> str:
    """One sentence on the best trial against the base config (the noise repeats' mean at its round)."""
    points = f"{100 * diff:+.1f} AP points against the base config's repeats"
    if not beyond:
        return f"the best trial is {points}, within noise: no trial beat the base config beyond noise"
    if diff > 0:
        return f"the best trial is {points}, beyond noise: it beat the base config"
    return (
        f"the best trial is {points}, beyond noise: the base config (the defaults the sweep started from) beat "
        "every trial; shipping a trial would ship a worse model"
    )
