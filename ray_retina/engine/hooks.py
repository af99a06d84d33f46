"""The training loop as a step plus hooks, without Ray: :func:`run_loop` pulls a step's micro-batches, calls
:meth:`Engine.run_step <ray_retina.engine.loop.Engine.run_step>`, then every hook's ``after_step``
(detectron2's ``HookBase``: ``before_train`` / ``after_step`` / ``after_train``).

Here: the metric windows (:class:`MetricWindow`, torchvision's ``SmoothedValue`` idea as plain sums), the
progress line and per-step tracking (:class:`ProgressHook`), early stopping (:class:`EarlyStopping`, the
policy the eval hook consults) and test fault injection (:class:`ExitOnceAt`, installed from an environment
variable at set-up, never a branch of the loop). The eval + report + checkpoint hook is Ray's, in
``worker.py``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from ray_retina.engine.loop import Engine, NonFiniteLossError
from ray_retina.engine.progress import ProgressPrinter

logger = logging.getLogger(__name__)

# Test fault injection: "RANK:ITERATION" makes that rank's process exit once when it reaches that iteration
# (a marker file under the run's storage keeps the restarted worker from dying again). Never set in real runs.
FAIL_ENV = "RAY_RETINA_TEST_FAIL_AT"

Batch = dict[str, torch.Tensor]


class Tracker(Protocol):
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...


@dataclass
class LoopState:
    """What the loop and its hooks share: the last step (its output, images, seconds waited for data),
    the last eval's metrics, the last checkpoint reported, and the stop flag a hook may raise."""

    engine: Engine
    world: int = 1
    step_output: dict[str, float] | None = None
    step_images: int = 0
    step_wait_s: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    last_checkpoint: str | None = None
    stop: bool = False


class HookBase:
    """A hook of :func:`run_loop`; every method is optional."""

    def before_train(self, state: LoopState) -> None:
        pass

    def before_step(self, state: LoopState) -> None:
        pass

    def after_step(self, state: LoopState) -> None:
        pass

    def after_train(self, state: LoopState) -> None:
        pass


def run_loop(
    state: LoopState, steps: Iterator[tuple[Sequence[Batch], float]], hooks: Sequence[HookBase]
) -> None:
    """Optimizer steps until ``optim.max_iters`` or a hook sets ``state.stop``. ``steps`` yields each step's
    micro-batches (``optim.accumulate`` of them) and the seconds spent waiting for them."""
    engine = state.engine
    for h in hooks:
        h.before_train(state)
    while engine.iteration < engine.cfg.optim.max_iters and not state.stop:
        for h in hooks:
            h.before_step(state)
        batches, waited = next(steps)
        try:
            state.step_output = engine.run_step(batches)
        except NonFiniteLossError as err:
            where = state.last_checkpoint or "none (no eval period finished yet)"
            raise NonFiniteLossError(f"{err}; last good checkpoint: {where}") from None
        state.step_images = sum(int(b["images"].shape[0]) for b in batches)
        state.step_wait_s = waited
        for h in hooks:
            h.after_step(state)
    for h in hooks:
        h.after_train(state)


class MetricWindow:
    """Sums over a window of steps (a log period, an eval period): mean losses of the steps that ran, lr of
    the last, images, seconds waited for data, and the images/s over all workers since :meth:`reset`."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss_cls = self.loss_box = self.wait_s = 0.0
        self.steps = self.images = 0
        self.start = time.perf_counter()

    def add(self, state: LoopState) -> None:
        self.images += state.step_images
        self.wait_s += state.step_wait_s
        if state.step_output is not None:  # a skipped (non-finite) step has no losses
            self.loss_cls += state.step_output["loss_cls"]
            self.loss_box += state.step_output["loss_box"]
            self.steps += 1

    def losses(self) -> dict[str, float]:
        n = max(self.steps, 1)
        return {"loss_cls": self.loss_cls / n, "loss_box": self.loss_box / n}

    def images_per_s(self, world: int) -> float:
        """Over all workers: every rank processes the same number of images per step."""
        return self.images * world / max(time.perf_counter() - self.start, 1e-9)


class ProgressHook(HookBase):
    """Every ``train.log_period`` steps (and the last): the console line (rank 0's printer) and the per-step
    curves ``train/loss_cls``, ``train/loss_box``, ``train/lr`` to the tracker. Keeps the lr of the last
    step that ran in ``self.lr`` (the eval hook reports it)."""

    def __init__(self, printer: ProgressPrinter, tracker: Tracker | None, log_period: int) -> None:
        self.printer = printer
        self.tracker = tracker
        self.log_period = log_period
        self.window = MetricWindow()
        self.lr = math.nan

    def before_train(self, state: LoopState) -> None:
        self.lr = state.engine.optimizer.param_groups[0]["lr"]
        self.window.reset()

    def after_step(self, state: LoopState) -> None:
        self.window.add(state)
        if state.step_output is not None:
            self.lr = state.step_output["lr"]
        it, max_iters = state.engine.iteration, state.engine.cfg.optim.max_iters
        if it % self.log_period and it < max_iters:
            return
        losses = self.window.losses()
        self.printer.line(
            it,
            **losses,
            lr=self.lr,
            images_per_s=self.window.images_per_s(state.world),
            data_wait_s=self.window.wait_s,
        )
        if self.tracker is not None:
            self.tracker.log_metrics(
                {f"train/{k}": v for k, v in losses.items()} | {"train/lr": self.lr}, step=it
            )
        self.window.reset()


class EarlyStopping:
    """``train.early_stop``: stop after ``patience`` evaluations in a row without an improvement of the
    metric by more than ``min_delta`` (``mode`` max: higher is better). ``patience`` None never stops.
    :meth:`update` is called once per eval with the same metrics on every rank, so every rank decides the
    same and they stop after the same report."""

    def __init__(self, patience: int | None, metric: str, mode: str = "max", min_delta: float = 0.0) -> None:
        self.patience = patience
        self.metric = metric
        self.sign = 1.0 if mode == "max" else -1.0
        self.min_delta = min_delta
        self.best: float | None = None
        self.best_iteration: int | None = None
        self.stale = 0

    def update(self, metrics: Mapping[str, float], iteration: int) -> bool:
        """Record one eval's metrics; True when the run should stop now."""
        if self.patience is None:
            return False
        if self.metric not in metrics:
            raise KeyError(f"train.early_stop.metric {self.metric!r} is not among the eval metrics")
        value = float(metrics[self.metric])
        if self.best is None or self.sign * (value - self.best) > self.min_delta:
            self.best, self.best_iteration, self.stale = value, iteration, 0
            return False
        self.stale += 1
        return self.stale >= self.patience


class ExitOnceAt(HookBase):
    """Fault injection for tests: ``rank`` exits (``os._exit(1)``, as a crash) before the step at
    ``iteration``, once per run storage (the marker file ``.failed-once-<rank>-<iteration>``)."""

    def __init__(self, rank: int, want_rank: int, iteration: int, storage: str) -> None:
        self.active = rank == want_rank
        self.iteration = iteration
        self.marker = Path(storage) / f".failed-once-{want_rank}-{iteration}"

    def before_step(self, state: LoopState) -> None:
        if self.active and state.engine.iteration == self.iteration and not self.marker.exists():
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            self.marker.touch()
            logger.error("test hook %s: exiting at iteration %d", FAIL_ENV, self.iteration)
            os._exit(1)


def fault_hooks_from_env(rank: int, storage: str) -> list[HookBase]:
    """The hooks tests ask for through the environment (:data:`FAIL_ENV`), read once at set-up."""
    spec = os.environ.get(FAIL_ENV)
    if not spec:
        return []
    want_rank, iteration = (int(x) for x in spec.split(":"))
    return [ExitOnceAt(rank, want_rank, iteration, storage)]
