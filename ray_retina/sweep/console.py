"""The console of a sweep, on the driver: a header line, a ``[tune]`` line per trial per eval round, one when
a trial ends, the noise floor, and the closing table. Tune's own status table is off unless ``--verbose``.

    [tune] gamma=2 alpha=0.25 pi=0.01 lr=0.001 [00003]  round 3/8  AP 30.1  AP50 72.3  | best AP 33.5: ...
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ray.tune import Callback

from ray_retina.sweep.noise import default_verdict
from ray_retina.sweep.space import trial_label, trial_overrides

TUNE_PREFIX = "[tune]"


def pct(v: float) -> str:
    """A COCO stat in percent; COCO's -1 (no ground truth of that kind) as n/a."""
    return f"{100 * v:.1f}" if v >= 0 else "n/a"


def format_trial_round(
    label: str, round_: int, rounds: int, metrics: Mapping[str, float], best: tuple[str, float] | None = None
) -> str:
    """A sweep's line per trial per eval round: the trial (its parameters and id), the round, AP and AP50,
    and the best trial so far when there is one.

        [tune] gamma=2 alpha=0.25 pi=0.01 lr=0.001 [00003]  round 3/8  AP 30.1  AP50 72.3  | best AP 33.5: ...
    """
    ap = "  ".join(f"{k} {pct(metrics[f'val/{k}'])}" for k in ("AP", "AP50") if f"val/{k}" in metrics)
    line = f"{TUNE_PREFIX} {label}  round {round_}/{rounds}  {ap}".rstrip()
    if best is not None:
        line += f"  | best AP {pct(best[1])}: {best[0]}"
    return line


def format_trial_end(
    label: str, *, rounds_done: int, rounds: int, ap: float | None, error: str | None = None
) -> str:
    """A sweep's line when a trial ends: finished, stopped early by the scheduler (ASHA), or failed."""
    shown = f"AP {pct(ap)}" if ap is not None else "no AP reported"
    if error is not None:
        return f"{TUNE_PREFIX} {label}  FAILED after round {rounds_done}/{rounds}: {error}"
    if rounds_done < rounds:
        return f"{TUNE_PREFIX} {label}  stopped by the scheduler after round {rounds_done}/{rounds} ({shown})"
    return f"{TUNE_PREFIX} {label}  finished {rounds_done}/{rounds} rounds ({shown})"


def format_noise_floor(std_by_round: Mapping[int, float], repeats: int, metric: str = "val/AP") -> str:
    """The noise floor line: the standard deviation of ``metric`` over the base config's seeds, per round.

    [tune] noise floor (std of val/AP over 3 seeds of the base config, AP points): round 1 0.8  round 2 1.1
    """
    if not std_by_round:
        return f"{TUNE_PREFIX} noise floor: not measured (tune.noise_repeats {repeats}; at least 2 give one)"
    cells = "  ".join(f"round {r} {100 * s:.2f}" for r, s in sorted(std_by_round.items()) if math.isfinite(s))
    return f"{TUNE_PREFIX} noise floor (std of {metric} over {repeats} seeds of the base config, AP points): {cells}"


def format_ranking(
    rows: Sequence[Any], best_label: str | None, vs_default: tuple[float, bool] | None = None
) -> list[str]:
    """Closing lines: the best trial, the trials tied with it within the noise floor, and (with a floor) the
    best trial against the base config's repeats (``vs_default``: difference, beyond noise)."""
    tied = [r for r in rows if getattr(r, "tied", False) and r.label != best_label]
    if best_label is None:
        return [f"{TUNE_PREFIX} no trial reported a metric"]
    line = f"{TUNE_PREFIX} best: {best_label}"
    if tied:
        line += f"; tied within noise with {len(tied)}: " + ", ".join(r.label for r in tied)
    lines = [line]
    if vs_default is not None:
        lines.append(f"{TUNE_PREFIX} {default_verdict(*vs_default)}")
    return lines


class SweepProgress(Callback):
    """The console of a sweep, on the driver: a line per trial per eval round (its AP and the best trial so
    far) and one when a trial ends (finished, stopped by ASHA, failed). It replaces Tune's status table;
    ``--verbose`` brings Tune's table back beside these lines.

    Plain data only: Tune pickles it with the sweep's state (``Tuner.restore`` brings it back)."""

    def __init__(self, rounds: int, metric: str = "val/AP", mode: str = "max") -> None:
        self.rounds, self.metric, self.sign = rounds, metric, 1.0 if mode == "max" else -1.0
        self.latest: dict[str, tuple[str, float]] = {}  # trial id -> (label, its last metric value)

    @staticmethod
    def label(trial: Any) -> str:
        return trial_label(trial_overrides(dict(trial.config or {})), trial.trial_id)

    def best(self) -> tuple[str, float] | None:
        if not self.latest:
            return None
        return max(self.latest.values(), key=lambda t: self.sign * t[1])

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        value = result.get(self.metric)
        if isinstance(value, int | float) and math.isfinite(value):
            self.latest[trial.trial_id] = (self.label(trial), float(value))
        print(
            format_trial_round(
                self.label(trial), int(result.get("training_iteration", 0)), self.rounds, result, self.best()
            ),
            flush=True,
        )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        print(
            format_trial_end(
                self.label(trial),
                rounds_done=int(last.get("training_iteration", 0)),
                rounds=self.rounds,
                ap=last.get(self.metric),
            ),
            flush=True,
        )

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        error = trial.get_error()
        reason = str(error).strip().splitlines()[-1][:200] if error is not None else "see error.txt"
        print(
            format_trial_end(
                self.label(trial),
                rounds_done=int(last.get("training_iteration", 0)),
                rounds=self.rounds,
                ap=last.get(self.metric),
                error=f"{reason} (trial folder: {trial.path})",
            ),
            flush=True,
        )
