"""Which focal parameter matters: a least-squares regression of the metric on the swept parameters, with
95 % confidence intervals, set against the noise floor.

Why a regression and not Optuna's fANOVA or PED-ANOVA: a sweep here has 8 to 30 trials. fANOVA fits a random
forest and PED-ANOVA splits trials at a quantile; both give a share of variance with no uncertainty, and
with a dozen points that share is itself noise. A linear model on the parameters as Tune samples them
(gamma and alpha as they are, log10 of pi and lr) gives a signed effect with a confidence interval, and the
noise repeats (the base config under other seeds) enter as rows of their own, so the residual variance, and
with it the intervals, knows the seed-to-seed noise. The effect reported is the change in the metric across
the searched range of the parameter (coefficient x (max - min) of the transformed values).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from ray_retina.sweep.noise import TIE_SIGMAS

LOG_KEYS = ("model.prior", "optim.lr")  # sampled log-uniformly: their effect is per decade


@dataclass
class Importance:
    key: str
    transform: str
    """``x`` or ``log10 x``."""
    effect: float
    """Change of the metric across the searched range of the (transformed) parameter, at fixed others."""
    ci95: float
    """Half-width of the 95 % confidence interval of ``effect``."""
    noise: float | None
    """``TIE_SIGMAS`` x the noise floor at the round fitted (None: no floor)."""

    @property
    def verdict(self) -> str:
        significant = abs(self.effect) > self.ci95
        if not significant:
            return "within its uncertainty"
        if self.noise is not None and abs(self.effect) <= self.noise:
            return "significant, but within the noise floor"
        return "matters"


@dataclass
class ImportanceFit:
    round: int
    rows: int
    dof: int
    residual_std: float
    params: list[Importance]


def fit_importance(
    points: Sequence[Mapping[str, float]],
    keys: Sequence[str],
    metric: str = "val/AP",
    *,
    round_: int,
    noise_floor: float | None = None,
) -> ImportanceFit | None:
    """Fit ``metric ~ 1 + sum_k b_k t_k(param_k)`` by least squares over ``points`` (one per trial, at the same
    round ``round_``: a trial's values and its metric). Keys that do not vary are left out. None when there
    are fewer rows than parameters + 2 (no degree of freedom for the residual)."""
    rows = [p for p in points if isinstance(p.get(metric), int | float) and math.isfinite(p[metric])]
    varying = [k for k in keys if len({round(float(p[k]), 12) for p in rows if k in p}) > 1]
    rows = [p for p in rows if all(k in p for k in varying)]
    n, q = len(rows), len(varying)
    if not varying or n < q + 2:
        return None
    x = np.array([[_transform(k, float(p[k])) for k in varying] for p in rows], dtype=np.float64)
    y = np.array([float(p[metric]) for p in rows], dtype=np.float64)
    design = np.column_stack([np.ones(n), x])
    beta, *_ = np.linalg.lstsq(design, y, rcond=None)
    dof = n - q - 1
    resid = y - design @ beta
    sigma2 = float(resid @ resid) / dof
    cov = sigma2 * np.linalg.pinv(design.T @ design)
    t = float(stats.t.ppf(0.975, dof))
    span = x.max(axis=0) - x.min(axis=0)
    noise = None if noise_floor is None else TIE_SIGMAS * noise_floor
    params = [
        Importance(
            key=k,
            transform="log10 x" if k in LOG_KEYS else "x",
            effect=float(beta[i + 1] * span[i]),
            ci95=float(t * math.sqrt(max(cov[i + 1, i + 1], 0.0)) * span[i]),
            noise=noise,
        )
        for i, k in enumerate(varying)
    ]
    params.sort(key=lambda p: -abs(p.effect))
    return ImportanceFit(round=round_, rows=n, dof=dof, residual_std=math.sqrt(sigma2), params=params)


def _transform(key: str, value: float) -> float:
    return math.log10(value) if key in LOG_KEYS else value


def importance_table(fit: ImportanceFit | None, floor: float | None) -> str:
    """Markdown: one row per parameter, its effect across the searched range (AP points) with its 95 %
    interval, and the verdict against the noise floor."""
    if fit is None:
        return "Parameter importance: too few trials at a common round for a fit (need parameters + 2)."
    head = (
        f"Parameter importance (least squares on the {fit.rows} trials at round {fit.round}, {fit.dof} degrees "
        f"of freedom, residual std {100 * fit.residual_std:.2f} AP points"
        + (
            ""
            if floor is None
            else f"; noise floor {100 * floor:.2f}, tied within {100 * TIE_SIGMAS * floor:.2f}"
        )
        + "):\n\n| parameter | as | effect across the range (AP points) | 95 % interval | verdict |\n|---|---|---|---|---|"
    )
    lines = [head]
    for p in fit.params:
        lines.append(
            f"| {p.key} | {p.transform} | {100 * p.effect:+.2f} | ±{100 * p.ci95:.2f} | {p.verdict} |"
        )
    return "\n".join(lines)
