"""The console of a training run: one line per log period and the AP table per eval, from rank 0.

[train] iter   40/200  loss_cls 0.5123  loss_box 0.3011  lr 1.00e-02  11.8 img/s  data 0.4 s  ETA 2m15s
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import TextIO

from ray_retina.engine.evaluate import STAT_NAMES

PREFIX = "[train]"


def format_eta(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


def format_progress_line(
    iteration: int,
    max_iters: int,
    *,
    loss_cls: float,
    loss_box: float,
    lr: float,
    images_per_s: float,
    data_wait_s: float,
    eta_s: float | None,
) -> str:
    """One progress line: iteration / max, both losses, lr, images/s over all workers, seconds spent
    waiting for data in the period, ETA."""
    width = len(str(max_iters))
    eta = format_eta(eta_s) if eta_s is not None else "--"
    return (
        f"{PREFIX} iter {iteration:>{width}}/{max_iters}  loss_cls {loss_cls:.4f}  loss_box {loss_box:.4f}  "
        f"lr {lr:.2e}  {images_per_s:.1f} img/s  data {data_wait_s:.1f} s  ETA {eta}"
    )


def format_eval_lines(iteration: int, metrics: Mapping[str, float]) -> list[str]:
    """The eval table: the 6 AP stats on one line, then AP / AP50 per class when present."""
    ap = "  ".join(f"{k} {_pct(metrics[f'val/{k}'])}" for k in STAT_NAMES[:6] if f"val/{k}" in metrics)
    lines = [f"[eval]  iter {iteration}  {ap}  ({int(metrics.get('val/num_images', 0))} images)"]
    skipped = int(metrics.get("val/skipped_images", 0))
    if skipped:
        lines[0] += f"  {skipped} did not decode (counted with no detections)"
    names = [k[len("val/AP/") :] for k in metrics if k.startswith("val/AP/")]
    if names:
        width = max(len(n) for n in names)
        lines.append(f"[eval]    {'class':<{width}}  {'AP':>5}  {'AP50':>5}")
        for n in names:
            cells = [metrics[f"val/{k}/{n}"] for k in ("AP", "AP50")]
            shown = [f"{_pct(c):>5}" for c in cells]
            lines.append(f"[eval]    {n:<{width}}  {shown[0]}  {shown[1]}")
    return lines


def _pct(v: float) -> str:
    """A COCO stat in percent; COCO's -1 (no ground truth of that kind) as n/a."""
    return f"{100 * v:.1f}" if v >= 0 else "n/a"


class ProgressPrinter:
    """Prints progress lines when ``enabled``: written to stdout directly and flushed (Ray forwards worker
    stdout line by line; Ray Train's patched ``print`` would also log each line a second time)."""

    def __init__(
        self,
        max_iters: int,
        *,
        start: int = 0,
        enabled: bool = True,
        stream: TextIO | None = None,
        tag: str | None = None,
    ) -> None:
        """``tag``: named in every line's prefix (``[train <tag>]``, ``[eval <tag>]``): a sweep's trial id, so
        that the lines of trials running side by side can be told apart."""
        self.max_iters = max_iters
        self.enabled = enabled
        self.stream = stream
        self.tag = tag
        self._t0 = time.perf_counter()
        self._it0 = start

    def line(self, iteration: int, **values: float) -> None:
        if not self.enabled:
            return
        done = iteration - self._it0
        elapsed = time.perf_counter() - self._t0
        eta = elapsed / done * (self.max_iters - iteration) if done > 0 else None
        self._write([format_progress_line(iteration, self.max_iters, eta_s=eta, **values)])

    def eval_table(self, iteration: int, metrics: Mapping[str, float]) -> None:
        if self.enabled:
            self._write(format_eval_lines(iteration, metrics))

    def _write(self, lines: list[str]) -> None:
        stream = self.stream or sys.stdout
        if self.tag:  # "[train] ..." -> "[train <tag>] ..."
            lines = [line.replace("]", f" {self.tag}]", 1) for line in lines]
        stream.write("".join(line + "\n" for line in lines))
        stream.flush()
