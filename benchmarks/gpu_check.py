"""The first GPU: prove the GPU path correct and measure the paper setting, in one run of under 5 minutes.

    .venv/bin/python benchmarks/gpu_check.py                 # make gpu-check  (a CUDA machine)
    .venv/bin/python benchmarks/gpu_check.py --dry-run       # make gpu-check-dry (any machine: CPU, tiny sizes)

Prints one table (check or measure, device, value, target or tolerance, status) and writes it as JSON to
``--out`` (a ``.json`` file, or a folder that gets ``gpu_check.json``; default ``bench_out/``, gitignored).
Exit status 1 when any row FAILs.

Correctness (the same weights and inputs on both sides of every comparison):

* AMP: one training step (forward, criterion, backward; the criterion's matching, encoding and losses run in
  fp32 whatever autocast says) in fp32, bf16 autocast and fp16 autocast + GradScaler. The fp32 reference runs
  with TF32 off (cuDNN and matmul), so that it is real fp32. Tolerances on the losses, relative to fp32:
  bf16 2e-2, fp16 1e-2. Why: bf16 keeps 8 significant bits (unit roundoff 2^-9 = 2e-3), fp16 11 (2^-12 =
  2.4e-4, 8x finer); the network is ~60 layers deep and every layer rounds its output once, so an activation
  can drift by a few 1e-3 (bf16) after the backbone, while the losses are sums over ~1e5 anchors x 80 classes
  where those errors mostly cancel. 2e-2 / 1e-2 leave 20-30x headroom over the drift seen on the CPU (bf16
  3e-4 to 1e-3, fp16 3e-4) and still catch what matters: a loss computed in the low precision (the focal term of fp16
  logits overflows; bf16 logits lose the small negative-class terms), a wrong scaler, a box decode in bf16.
  The whole gradient must point the same way: cosine to the fp32 gradient >= 0.99.
* ``model.channels_last`` and ``optim.compile`` (torch.compile, default inductor) against the plain model:
  outputs, losses and gradients of an fp32 step (TF32 off), max |diff| / max |ref| <= 1e-3 on the head
  outputs, losses rel <= 1e-3, gradient cosine >= 0.999: same arithmetic, different kernels and summation order.
* The post-processor and the matcher on the GPU against the same call on the CPU: identical labels and
  counts, boxes within 1e-2 px, scores within 1e-5; matcher labels identical on every anchor and matched GT
  identical on every foreground anchor.
* A 1-GPU Ray Train run (``ray_retina.engine.trainer.train``, configs/smoke.yaml, scaling.use_gpu=True,
  backend auto -> NCCL, bf16) of 20 iterations on the synthetic set that ends with an eval: ``val/AP`` reported.

Measures, ours against torchvision's RetinaNet in the same process, same weights (ours loaded from
torchvision's state dict) and inputs, with torchvision's loss settings on both sides (train_step.py's pair):

* images/s of the training step at the paper setting, R50-FPN, batch 2 and 8, bf16 autocast. Input: a COCO
  4:3 image at shorter side 800 (800 x 1067) padded to stride 128 as our pipeline feeds it: 896 x 1152
  (``--height``/``--width``). Timed with ``torch.cuda.synchronize()`` around each step, interleaved (ABBA),
  medians. Also ours with channels_last (is ``model.channels_last`` worth turning on).
* peak GPU memory of a step (``torch.cuda.max_memory_allocated``, less the other model's resident tensors),
* time outside the network (step - forward/backward of backbone, FPN and head alone),
* achieved TFLOP/s of our step (FLOPs counted once with ``torch.utils.flop_counter.FlopCounterMode``)
  against the GPU's dense BF16 peak looked up from the device name (``PEAK_BF16_TFLOPS``),
* decode + augment images/s per CPU core at 800 px: the project's ``augment_batch`` called in a loop in
  this process (one core, no Ray Data transport, so an upper bound per core: on the 2-core machine Ray Data
  spent 1.6-2x the loop's CPU per image, benchmarks/README.md), and from it the CPU cores one GPU needs so
  that it never waits for data = GPU images/s / images/s per core.

Targets: our step >= 1.3x torchvision's images/s at both batch sizes; our images/s per GPU >= detectron2's
published R50-FPN 1x RetinaNet rate (MODEL_ZOO.md: 0.205 s/iter at 16 images per iteration on 8 V100 =
9.76 images/s per GPU).

Time: the wall time counts from the start of the process. Every section checks the time left of ``--budget-s``
(300 s) before it starts and is skipped ("skipped: time budget") when its estimate does not fit; torch.compile,
the least predictable, runs last; the timed repeats stop early on a slower GPU than planned. The JSON is
rewritten after every section, so a run killed at a device time limit keeps the rows it finished. (The dry
run's budget is 600 s: its point is that every path runs; its target, 120 s, is reported as met or not.)

``--dry-run`` runs every code path at tiny sizes on the CPU (ResNet-18, 128 px, 2 iterations of a 1-worker
CPU Ray Train run): the checks that only mean something on a GPU are reported "skipped: no CUDA" with what
their CPU stand-in computed, never PASS; the device-independent ones (AMP on CPU, channels_last, parity with
torchvision) run for real.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

T_START = time.perf_counter()  # the wall time reported includes the imports below
# Ray reads these at import; the tests set the same (see tests/conftest.py).
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
# cuBLAS reads this when its handle is made: the deterministic-mode rows need a fixed workspace
# (torch.use_deterministic_algorithms raises on cuBLAS calls without it). Set for the whole run so that
# both sides of the deterministic on/off comparison use the same workspace.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402
from _common import environment, load_average  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from train_step import make_pair, network_ours, sgd  # noqa: E402  (torchvision pair on the same weights)

from ray_retina.config import Config, apply_overrides, load_config  # noqa: E402
from ray_retina.model import (  # noqa: E402
    AnchorGenerator,
    HeadOutputs,
    Matcher,
    build_criterion,
    build_model,
    build_postprocessor,
)

REPO = Path(__file__).resolve().parent.parent
NUM_CLASSES = 80
STRIDES = (8, 16, 32, 64, 128)

# Dense BF16 tensor-core peak, TFLOP/s, by a substring of torch.cuda.get_device_name() (first match wins, so
# the longer names come first: "H100 NVL" before "H100", "A100" before "A10", "L40S" before "L40" before "L4").
# NVIDIA's datasheets print the peak "with sparsity" (2:4); the dense figure is half of it.
PEAK_BF16_TFLOPS: list[tuple[str, float, str]] = [
    ("H200", 989.4, "NVIDIA H200 datasheet, dense BF16 tensor core (1,979 with sparsity)"),
    ("H100 NVL", 835.5, "NVIDIA H100 NVL datasheet, dense BF16 tensor core (1,671 with sparsity)"),
    ("H100 PCIe", 756.5, "NVIDIA H100 PCIe datasheet, dense BF16 tensor core (1,513 with sparsity)"),
    ("H100", 989.4, "NVIDIA H100 SXM datasheet, dense BF16 tensor core (1,979 with sparsity)"),
    ("A100", 312.0, "NVIDIA A100 datasheet, dense BF16 tensor core (624 with sparsity)"),
    ("L40S", 362.05, "NVIDIA L40S datasheet, dense BF16 tensor core (733 with sparsity)"),
    ("L40", 181.05, "NVIDIA L40 datasheet, dense BF16 tensor core (362.1 with sparsity)"),
    ("L4", 121.0, "NVIDIA L4 datasheet, dense BF16 tensor core (242 with sparsity)"),
    ("A10G", 70.0, "A10G: no NVIDIA datasheet; the figure usually quoted for AWS g5 (unverified)"),
    ("A10", 125.0, "NVIDIA A10 datasheet, dense BF16 tensor core (250 with sparsity)"),
]

# detectron2 MODEL_ZOO.md, retinanet_R_50_FPN_1x (model 190397773): train time 0.205 s/iter, 16 images per
# iteration (IMS_PER_BATCH) on 8 V100 (fp32, PyTorch 1.3 era), train mem 4.1 GB, box AP 37.4.
D2_SECONDS_PER_ITER = 0.205
D2_IMAGES_PER_ITER = 16
D2_GPUS = 8
D2_IMAGES_PER_S_PER_GPU = D2_IMAGES_PER_ITER / D2_SECONDS_PER_ITER / D2_GPUS  # 9.76
D2_TRAIN_MEM_GB = 4.1
SPEEDUP_TARGET = 1.3  # our step vs torchvision's, images/s, paper setting with AMP

# Tolerances (see the module docstring for the why).
AMP_LOSS_RTOL = {"bf16": 2e-2, "fp16": 1e-2}
AMP_GRAD_COS = 0.99
SAME_MATH_RTOL = 1e-3  # channels_last, torch.compile: fp32, different kernels
SAME_MATH_GRAD_COS = 0.999
PP_BOX_ATOL = 1e-2  # px
PP_SCORE_ATOL = 1e-5
AMP_DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}

# Every row the table has, in order: (key, name, GPU-only). GPU-only rows are "skipped: no CUDA" without CUDA
# (with what their CPU stand-in computed); the others run on whatever device there is. The keys b2 / b8 are
# the smaller and the larger batch timed (2 and 8 on the GPU; the names show the sizes of the run).
ROWS: list[tuple[str, str, bool]] = [
    ("parity_torchvision", "ours vs torchvision: same losses, fp32", False),
    ("amp_bf16", "AMP bf16 step vs fp32", False),
    ("amp_fp16", "AMP fp16 + GradScaler step vs fp32", False),
    ("channels_last", "model.channels_last vs plain, fp32 step", False),
    ("postprocess_gpu_cpu", "post-process GPU vs CPU", True),
    ("matcher_gpu_cpu", "matcher GPU vs CPU", True),
    ("step_b2", "train step images/s, batch {b2}, {amp}", True),
    ("step_b8", "train step images/s, batch {b8}, {amp}", True),
    (
        "vs_detectron2",
        "images/s per GPU vs detectron2's published R50-FPN 1x rate (8 V100, not run here)",
        True,
    ),
    ("channels_last_speed", "channels_last step speed-up (ours)", True),
    ("outside_b2", "time outside the network, batch {b2}", True),
    ("outside_b8", "time outside the network, batch {b8}", True),
    ("memory_b2", "peak GPU memory of a step, batch {b2}", True),
    ("memory_b8", "peak GPU memory of a step, batch {b8}", True),
    ("tflops_b2", "achieved TFLOP/s of our step, batch {b2}", True),
    ("tflops_b8", "achieved TFLOP/s of our step, batch {b8}", True),
    ("data_per_core", "decode + augment images/s per CPU core", False),
    ("cores_per_gpu", "CPU cores per GPU so it never waits", True),
    ("deterministic_repeat", "deterministic mode: two steps from the same weights, {amp}", True),
    ("deterministic_cost", "deterministic mode cost, ours images/s, {amp}", True),
    ("ray_train_gpu", "Ray Train, 1 GPU worker, NCCL: val/AP", True),
    ("compile", "optim.compile (torch.compile) vs plain, fp32 step", True),
]
GPU_ONLY = {k for k, _, g in ROWS if g}
# The sections, in the order they run (--only picks some).
SECTIONS = ("correctness", "parity", "steps", "deterministic", "data", "ray", "compile")
# GPU-only rows whose outcome compares a result with a reference (the CPU, the plain model, a bit-identical
# repeat, a finished run): their CPU stand-in runs the same comparison, and a stand-in that disagrees fails
# the dry run. The other GPU-only rows are speeds and sizes, which a CPU at tiny sizes says nothing about.
STANDIN_CHECKS = {
    "postprocess_gpu_cpu",
    "matcher_gpu_cpu",
    "deterministic_repeat",
    "ray_train_gpu",
    "compile",
}


# ----------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """Sizes of one run: the paper setting on a GPU, tiny ones for the dry run."""

    backbone: str  # for the correctness checks and the step timings
    model_overrides: dict[
        str, Any
    ]  # on top of Config() for the correctness checks (AMP, channels_last, compile)
    step_amp: (
        str  # autocast dtype of the timed steps: bf16 on the GPU; fp32 in the dry run (CPU bf16 is emulated)
    )
    height: int
    width: int
    batches: tuple[int, int]  # the two per-GPU batch sizes timed (reported as b2 / b8 rows)
    warmup: int
    repeats: tuple[int, int]  # timed repeats per batch size
    amp_batch: int
    data_images: int
    data_source: tuple[int, int]  # sides of the synthetic source JPEGs, min max
    data_min_size: int  # shorter side after augment
    data_max_size: int
    ray_iters: int
    ray_overrides: dict[str, Any]
    budget_s: float  # sections that would not fit in what is left of it are skipped
    target_s: float  # the wall time the run is meant to take (reported: met / not met)
    # seconds each section is expected to need; a section starts only if that much of the budget is left
    estimates: dict[str, float] = field(default_factory=dict)


def gpu_settings(args: argparse.Namespace) -> Settings:
    return Settings(
        backbone="resnet50",
        model_overrides={},
        step_amp="bf16",
        height=args.height,
        width=args.width,
        batches=(2, 8),
        warmup=3,
        repeats=(10, 6),
        amp_batch=2,
        data_images=64,
        data_source=(480, 640),
        data_min_size=800,
        data_max_size=1333,
        ray_iters=20,
        ray_overrides={
            "data.synth": {
                "num_train": 160,
                "num_val": 16,
                "seed": 0,
                "min_image_size": 128,
                "max_image_size": 192,
                "min_object_size": 12,
                "max_object_size": 64,
                "max_objects": 5,
            },
            "data.batch_size": 8,
            "optim.amp": "bf16",
            "scaling.use_gpu": True,
            "scaling.gpus_per_worker": 1,
            "run.ray_num_cpus": max(4, min(os.cpu_count() or 4, 16)),
        },
        budget_s=args.budget_s or 300.0,
        target_s=300.0,
        estimates={
            "correctness": 40,
            "parity": 15,
            "steps": 70,
            "deterministic": 40,
            "data": 20,
            "ray": 100,
            "compile": 100,
        },
    )


def dry_settings(args: argparse.Namespace) -> Settings:
    return Settings(
        backbone="resnet18",
        model_overrides={"model.fpn_channels": 32, "model.head_convs": 1},
        step_amp="fp32",
        height=128,
        width=128,
        batches=(1, 2),
        warmup=0,
        repeats=(1, 1),
        amp_batch=2,
        data_images=8,
        data_source=(96, 128),
        data_min_size=128,
        data_max_size=160,
        ray_iters=2,
        ray_overrides={
            "data.synth": {
                "num_train": 8,
                "num_val": 4,
                "seed": 1,
                "min_image_size": 64,
                "max_image_size": 96,
                "min_object_size": 16,
                "max_object_size": 48,
                "max_objects": 3,
            },
            "data.rows_per_shard": 4,
            "data.train_min_size": [64, 64],
            "data.test_min_size": 64,
            "data.max_size": 96,
            "data.batch_size": 2,
            "data.size_divisibility": 32,
            "model.fpn_channels": 32,
            "model.head_convs": 1,
            "scaling.use_gpu": False,
            "run.ray_num_cpus": 2,
            "train.threads_per_worker": 1,
        },
        # The dry run's point is that every path executes: its budget only stops a pathological machine.
        budget_s=args.budget_s or 600.0,
        target_s=120.0,
        estimates={
            "correctness": 10,
            "parity": 5,
            "steps": 10,
            "deterministic": 5,
            "data": 5,
            "ray": 30,
            "compile": 5,
        },
    )


# ----------------------------------------------------------------------------------------------- the table


@dataclass
class Row:
    key: str
    name: str
    device: str
    value: str
    target: str
    status: str  # PASS | FAIL | info | skipped: ...
    gpu_only: bool
    data: dict[str, Any]


class Report:
    """The rows, in ``ROWS`` order, and the rule that turns an outcome into a status."""

    def __init__(self, cuda: bool, device: str, s: Settings) -> None:
        self.cuda = cuda
        self.device = device
        self.names = {k: n.format(b2=s.batches[0], b8=s.batches[1], amp=s.step_amp) for k, n, _ in ROWS}
        self.rows: dict[str, Row] = {}

    def add(self, key: str, value: str, target: str, ok: bool | None, **data: Any) -> None:
        """``ok``: True/False for a check or a target, None for a plain measure ("info").

        A GPU-only row without CUDA is never PASS: the value says what its CPU stand-in computed. A stand-in
        of a comparison (``STANDIN_CHECKS``) that disagrees with its reference is FAIL, since the same code
        compares on the GPU; one that agrees is "skipped: no CUDA". A speed or size target is "skipped: no
        CUDA" whatever the stand-in measured (a CPU time says nothing about a GPU target). A stand-in that
        raises fails its rows (``fail``): a broken code path is broken on any device."""
        gpu_only = key in GPU_ONLY
        if gpu_only and not self.cuda:
            value = f"cpu stand-in: {value}"
            if key in STANDIN_CHECKS and ok is False:
                status = "FAIL: the cpu stand-in disagrees with its reference"
            elif key in STANDIN_CHECKS:
                status = "skipped: no CUDA (cpu stand-in agrees)"
            else:
                status = "skipped: no CUDA"
        else:
            status = "info" if ok is None else ("PASS" if ok else "FAIL")
        self.rows[key] = Row(key, self.names[key], self.device, value, target, status, gpu_only, data)

    def fail(self, keys: list[str], err: BaseException) -> None:
        msg = f"{type(err).__name__}: {err}".splitlines()[0][:200]
        for k in keys:
            if k not in self.rows:
                self.rows[k] = Row(
                    k, self.names[k], self.device, msg, "", "FAIL", k in GPU_ONLY, {"error": msg}
                )

    def skip(self, keys: list[str], why: str) -> None:
        for k in keys:
            if k not in self.rows:
                gpu_only = k in GPU_ONLY
                status = f"skipped: no CUDA; {why}" if gpu_only and not self.cuda else f"skipped: {why}"
                self.rows[k] = Row(k, self.names[k], self.device, "", "", status, gpu_only, {})

    def ordered(self) -> list[Row]:
        return [self.rows[k] for k, _, _ in ROWS if k in self.rows]

    def failed(self) -> list[Row]:
        return [r for r in self.ordered() if r.status.startswith("FAIL")]

    def markdown(self) -> str:
        lines = [
            "| check / measure | device | value | target / tolerance | status |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in self.ordered():
            lines.append(f"| {r.name} | {r.device} | {r.value} | {r.target} | {r.status} |")
        return "\n".join(lines)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its waited-for children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class Budget:
    """Seconds left of the run's budget, counted from the start of the process (imports included)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.t0 = T_START

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()


@contextlib.contextmanager
def section(report: Report, budget: Budget, name: str, keys: list[str], estimate: float) -> Iterator[bool]:
    """Run a section if its estimate fits in the time left; an exception fails the section's unfilled rows."""
    left = budget.left()
    if left < estimate:
        print(
            f"[gpu-check] {name}: skipped, {left:.0f} s left of the budget, needs ~{estimate:.0f} s",
            flush=True,
        )
        report.skip(keys, f"time budget ({left:.0f} s left, needs ~{estimate:.0f} s)")
        yield False
        return
    t0, c0 = time.perf_counter(), cpu_seconds()
    print(f"[gpu-check] {name} ...", flush=True)
    try:
        yield True
    except Exception as err:  # a broken section fails its rows and the run goes on
        traceback.print_exc()
        report.fail(keys, err)
    finally:
        print(
            f"[gpu-check] {name}: {time.perf_counter() - t0:.1f} s ({cpu_seconds() - c0:.1f} CPU s)",
            flush=True,
        )


# ----------------------------------------------------------------------------------------------- helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def true_fp32() -> Iterator[None]:
    """TF32 off (cuDNN convolutions and matmuls): the fp32 references are then real fp32."""
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def make_batch(b: int, h: int, w: int, seed: int = 0):
    """Images (B, 3, H, W) 0..255 and 1-13 GT boxes per image: padded (gt_boxes, gt_labels with -1) for ours,
    a list of dicts for torchvision. As train_step.make_batch, for any H x W."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 3, h, w, generator=g) * 255
    counts = torch.randint(1, 14, (b,), generator=g).tolist()
    gt_boxes = torch.zeros(b, max(counts), 4)
    gt_labels = torch.full((b, max(counts)), -1, dtype=torch.int64)
    targets = []
    size = torch.tensor([w, h], dtype=torch.float32)
    for i, n in enumerate(counts):
        xy = torch.rand(n, 2, generator=g) * size * 0.8
        wh = size * (0.05 + torch.rand(n, 2, generator=g) * 0.4)
        boxes = torch.cat([xy, torch.minimum(xy + wh, size)], 1)
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
        gt_boxes[i, :n], gt_labels[i, :n] = boxes, labels
        targets.append({"boxes": boxes, "labels": labels})
    return images, gt_boxes, gt_labels, targets


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: a size-free measure of how far two outputs are apart."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def train_step_result(
    model: nn.Module,
    criterion: nn.Module,
    images: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    device: torch.device,
    amp: torch.dtype | None,
) -> dict[str, Any]:
    """One training step as ``Engine.train_step`` runs it (autocast around the model, criterion in fp32,
    GradScaler for fp16), with lr 0 so that the weights stay put. Returns losses, head outputs, the whole
    gradient as one fp32 vector and how many steps the fp16 scaler skipped for non-finite gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
    skipped = 0
    for _ in range(8):
        opt.zero_grad(set_to_none=True)
        with autocast(device, amp):
            out = model(images)
        losses = criterion(out, gt_boxes, gt_labels)
        scaler.scale(losses["loss_cls"] + losses["loss_box"]).backward()
        scaler.unscale_(opt)
        grad = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).float().flatten() for p in params]
        )
        finite = bool(torch.isfinite(grad).all())
        scaler.step(opt)  # lr 0: the weights do not move; skipped by the scaler on inf/NaN
        scaler.update()
        if finite:
            break
        skipped += 1
    opt.zero_grad(set_to_none=True)
    return {
        "loss_cls": float(losses["loss_cls"].detach()),
        "loss_box": float(losses["loss_box"].detach()),
        "cls_logits": out.cls_logits.detach(),
        "box_deltas": out.box_deltas.detach(),
        "grad": grad,
        "scaler_skips": skipped,
        "finite": finite,
        "out_dtype": str(out.cls_logits.dtype).replace("torch.", ""),
    }


def compare_steps(
    ref: dict[str, Any], got: dict[str, Any], *, loss_rtol: float, grad_cos: float, out_rtol: float | None
) -> tuple[bool, str, dict[str, float]]:
    d = {
        "loss_cls_rel": rel(got["loss_cls"], ref["loss_cls"]),
        "loss_box_rel": rel(got["loss_box"], ref["loss_box"]),
        "grad_cos": cosine(got["grad"], ref["grad"]),
        "loss_cls": got["loss_cls"],
        "loss_box": got["loss_box"],
        "ref_loss_cls": ref["loss_cls"],
        "ref_loss_box": ref["loss_box"],
    }
    ok = (
        got["finite"]
        and d["loss_cls_rel"] <= loss_rtol
        and d["loss_box_rel"] <= loss_rtol
        and d["grad_cos"] >= grad_cos
    )
    text = f"loss rel cls {d['loss_cls_rel']:.1e} box {d['loss_box_rel']:.1e}, grad cos {d['grad_cos']:.5f}"
    if out_rtol is not None:
        d["cls_logits_rel"] = max_rel_diff(got["cls_logits"], ref["cls_logits"])
        d["box_deltas_rel"] = max_rel_diff(got["box_deltas"], ref["box_deltas"])
        ok = ok and d["cls_logits_rel"] <= out_rtol and d["box_deltas_rel"] <= out_rtol
        text = f"outputs {max(d['cls_logits_rel'], d['box_deltas_rel']):.1e}, " + text
    if not got["finite"]:
        text += ", NON-FINITE gradient"
    return ok, text, d


def peak_bf16(name: str) -> tuple[float | None, str]:
    for key, tflops, source in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tflops, source
    return None, f"no entry for {name!r} in PEAK_BF16_TFLOPS"


# ----------------------------------------------------------------------------------------------- sections


def correctness(report: Report, s: Settings, device: torch.device) -> None:
    """AMP bf16 / fp16 and channels_last against the fp32 step, on the paper model (default Config)."""
    cfg = apply_overrides(Config(), {"model.backbone": s.backbone, **s.model_overrides})
    torch.manual_seed(0)
    model = build_model(cfg, NUM_CLASSES).to(device).train()
    criterion = build_criterion(cfg, NUM_CLASSES).to(device)
    images, gt_boxes, gt_labels, _ = make_batch(s.amp_batch, s.height, s.width, seed=1)
    images, gt_boxes, gt_labels = images.to(device), gt_boxes.to(device), gt_labels.to(device)
    size = f"{s.backbone} {s.amp_batch}x{s.height}x{s.width}"
    with true_fp32():
        ref = train_step_result(model, criterion, images, gt_boxes, gt_labels, device, None)
    for key, dtype in (("amp_bf16", torch.bfloat16), ("amp_fp16", torch.float16)):
        name = key.split("_")[1]
        got = train_step_result(model, criterion, images, gt_boxes, gt_labels, device, dtype)
        ok, text, d = compare_steps(
            ref, got, loss_rtol=AMP_LOSS_RTOL[name], grad_cos=AMP_GRAD_COS, out_rtol=None
        )
        extra = f", head outputs {got['out_dtype']}"
        if got["scaler_skips"]:
            extra += f", scaler skipped {got['scaler_skips']} step(s)"
        report.add(
            key,
            f"{text}{extra} ({size}; fp32 losses {ref['loss_cls']:.4f} / {ref['loss_box']:.4f})",
            f"loss rel <= {AMP_LOSS_RTOL[name]:g}, grad cos >= {AMP_GRAD_COS}",
            ok,
            **d,
        )

    cl = build_model(apply_overrides(cfg, {"model.channels_last": True}), NUM_CLASSES).to(device).train()
    cl.load_state_dict(model.state_dict())
    with true_fp32():
        got = train_step_result(cl, criterion, images, gt_boxes, gt_labels, device, None)
    ok, text, d = compare_steps(
        ref, got, loss_rtol=SAME_MATH_RTOL, grad_cos=SAME_MATH_GRAD_COS, out_rtol=SAME_MATH_RTOL
    )
    report.add(
        "channels_last",
        f"{text} ({size})",
        f"outputs, losses rel <= {SAME_MATH_RTOL:g}, grad cos >= {SAME_MATH_GRAD_COS}",
        ok,
        **d,
    )


@contextlib.contextmanager
def deterministic_mode(on: bool, *, warn_only: bool = False, benchmark: bool = False) -> Iterator[None]:
    """``on``: PyTorch's deterministic algorithms, ``cudnn.deterministic`` and ``cudnn.benchmark`` off (what a
    reproducible GPU run sets). Off: PyTorch's defaults, with ``cudnn.benchmark`` as given. Restores the
    previous flags on exit."""
    old = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    torch.use_deterministic_algorithms(on, warn_only=warn_only)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = benchmark and not on
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old[0], warn_only=old[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = old[2], old[3]


def deterministic_check(report: Report, s: Settings, device: torch.device) -> None:
    """Deterministic mode on the paper model (default Config, the timed steps' autocast): (1) two steps from
    the same weights and batch give bit-identical losses and gradients with it on (and how far apart they are
    with it off); (2) our step's images/s with it on against PyTorch's defaults and against
    ``cudnn.benchmark``, interleaved, medians, at both batch sizes. An op with no deterministic kernel makes
    the strict mode raise: the row names it and the rest runs with ``warn_only``. The timed "deterministic"
    variant is what ``train.deterministic`` sets (``ray_retina.engine.determinism.set_deterministic``:
    ``warn_only``, cuDNN deterministic, autotuner off, the cuBLAS workspace this script sets at start)."""
    cfg = apply_overrides(Config(), {"model.backbone": s.backbone, **s.model_overrides})
    torch.manual_seed(0)
    model = build_model(cfg, NUM_CLASSES).to(device).train()
    criterion = build_criterion(cfg, NUM_CLASSES).to(device)
    amp = AMP_DTYPES[s.step_amp]
    images, gt_boxes, gt_labels, _ = make_batch(s.batches[0], s.height, s.width, seed=3)
    images, gt_boxes, gt_labels = images.to(device), gt_boxes.to(device), gt_labels.to(device)

    def step_result() -> dict[str, Any]:
        return train_step_result(model, criterion, images, gt_boxes, gt_labels, device, amp)

    warn_only, missing = False, "none"
    try:
        with deterministic_mode(True):
            on1 = step_result()
    except RuntimeError as err:  # an op without a deterministic implementation (PyTorch names it)
        if "deterministic" not in str(err):
            raise
        warn_only, missing = True, str(err).splitlines()[0][:200]
        with deterministic_mode(True, warn_only=True):
            on1 = step_result()
    with deterministic_mode(True, warn_only=warn_only):
        on2 = step_result()
    with deterministic_mode(False):
        off1, off2 = step_result(), step_result()
    same_on = (
        torch.equal(on1["grad"], on2["grad"])
        and on1["loss_cls"] == on2["loss_cls"]
        and on1["loss_box"] == on2["loss_box"]
    )
    on_diff = float((on1["grad"] - on2["grad"]).abs().max())
    off_diff = float((off1["grad"] - off2["grad"]).abs().max())
    report.add(
        "deterministic_repeat",
        f"on: losses and gradient {'bit-identical' if same_on else 'DIFFER'} (max abs grad diff {on_diff:.1e}); "
        f"off: max abs grad diff {off_diff:.1e}; ops without a deterministic kernel: {missing} "
        f"({s.backbone} {s.batches[0]}x{s.height}x{s.width} {s.step_amp})",
        "on: bit-identical",
        same_on,
        on_grad_max_diff=on_diff,
        off_grad_max_diff=off_diff,
        warn_only=warn_only,
        missing=missing,
    )

    # The cost: our training step (fused SGD, as in the step rows) in each mode, rounds in rotating order.
    opt = sgd(model)
    variants = {
        "default": {"on": False},
        "deterministic": {
            "on": True,
            "warn_only": True,
        },  # what train.deterministic sets (engine/determinism.py)
        "cudnn_benchmark": {"on": False, "benchmark": True},
    }
    rates: dict[int, dict[str, float]] = {}
    for b, repeats in zip(s.batches, s.repeats, strict=True):
        x, gb, gl, _ = make_batch(b, s.height, s.width, seed=b)
        x, gb, gl = x.to(device), gb.to(device), gl.to(device)

        def step(x: torch.Tensor = x, gb: torch.Tensor = gb, gl: torch.Tensor = gl) -> None:
            with autocast(device, amp):
                out = model(x)
            losses = criterion(out, gb, gl)
            (losses["loss_cls"] + losses["loss_box"]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        times: dict[str, list[float]] = {k: [] for k in variants}
        for i in range(s.warmup + repeats):
            names = list(variants)
            for k in names[i % 3 :] + names[: i % 3]:
                with deterministic_mode(**variants[k]):
                    sync(device)
                    t0 = time.perf_counter()
                    step()
                    sync(device)
                if i >= s.warmup:
                    times[k].append(time.perf_counter() - t0)
        rates[b] = {k: b / statistics.median(v) for k, v in times.items()}
    text = "; ".join(
        f"batch {b}: default {r['default']:.1f}, deterministic {r['deterministic']:.1f} "
        f"({r['deterministic'] / r['default']:.2f}x), cudnn.benchmark {r['cudnn_benchmark']:.1f} img/s"
        for b, r in rates.items()
    )
    report.add(
        "deterministic_cost",
        f"{text} ({s.backbone} {s.height}x{s.width} {s.step_amp}, medians of {s.repeats})",
        "info (deterministic / default images/s)",
        None,
        images_per_s={str(b): r for b, r in rates.items()},
    )


def compile_check(report: Report, s: Settings, device: torch.device) -> None:
    """torch.compile (what optim.compile does in the worker) against the plain model, one fp32 step.
    Without CUDA the stand-in uses backend="eager" (Dynamo's tracing only: inductor's C++ build would not
    fit the dry run's time)."""
    cfg = apply_overrides(Config(), {"model.backbone": s.backbone, **s.model_overrides})
    torch.manual_seed(0)
    model = build_model(cfg, NUM_CLASSES).to(device).train()
    criterion = build_criterion(cfg, NUM_CLASSES).to(device)
    images, gt_boxes, gt_labels, _ = make_batch(s.amp_batch, s.height, s.width, seed=1)
    images, gt_boxes, gt_labels = images.to(device), gt_boxes.to(device), gt_labels.to(device)
    backend = "inductor" if device.type == "cuda" else "eager"
    with true_fp32():
        ref = train_step_result(model, criterion, images, gt_boxes, gt_labels, device, None)
        compiled = torch.compile(model, backend=backend)
        t0 = time.perf_counter()
        got = train_step_result(compiled, criterion, images, gt_boxes, gt_labels, device, None)
        first = time.perf_counter() - t0
    ok, text, d = compare_steps(
        ref, got, loss_rtol=SAME_MATH_RTOL, grad_cos=SAME_MATH_GRAD_COS, out_rtol=SAME_MATH_RTOL
    )
    d["first_step_s"] = first
    report.add(
        "compile",
        f"{text}; backend {backend}, first step (compile) {first:.0f} s",
        f"outputs, losses rel <= {SAME_MATH_RTOL:g}, grad cos >= {SAME_MATH_GRAD_COS}",
        ok,
        **d,
    )
    torch._dynamo.reset()


def device_parity(report: Report, s: Settings, device: torch.device) -> None:
    """Post-process and matcher: the same call on `device` and on the CPU (the stand-in without CUDA: CPU twice)."""
    cpu = torch.device("cpu")
    h, w = s.height, s.width
    anchors, per_level = AnchorGenerator()([torch.zeros(1, 1, h // st, w // st) for st in STRIDES])
    r = anchors.shape[0]

    # Post-process: logits drawn so that a trained-model-like few thousand scores per image pass 0.05
    # (benchmarks/postprocess.py), deltas N(0, 0.5).
    b = s.batches[0]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(b, r, NUM_CLASSES, generator=g) * 1.5 - 7.0
    deltas = torch.randn(b, r, 4, generator=g) * 0.5
    sizes = torch.tensor([[h, w]] * b)
    pp = build_postprocessor(Config())
    on_cpu = pp(HeadOutputs(logits, deltas, anchors, per_level), sizes)
    on_dev = pp(
        HeadOutputs(logits.to(device), deltas.to(device), anchors.to(device), per_level), sizes.to(device)
    )
    n_cpu = sum(len(d["scores"]) for d in on_cpu)
    same_counts = [len(d["scores"]) for d in on_cpu] == [len(d["scores"]) for d in on_dev]
    box_diff = score_diff = 0.0
    labels_equal = same_counts
    if same_counts:
        for c, d in zip(on_cpu, on_dev, strict=True):
            labels_equal = labels_equal and torch.equal(c["labels"], d["labels"].cpu())
            if len(c["scores"]):
                box_diff = max(box_diff, float((c["boxes"] - d["boxes"].cpu()).abs().max()))
                score_diff = max(score_diff, float((c["scores"] - d["scores"].cpu().float()).abs().max()))
    ok = same_counts and labels_equal and box_diff <= PP_BOX_ATOL and score_diff <= PP_SCORE_ATOL
    report.add(
        "postprocess_gpu_cpu",
        f"{n_cpu} detections ({b} image{'s' if b > 1 else ''}, {r} anchors x {NUM_CLASSES}), counts {'equal' if same_counts else 'DIFFER'}, "
        f"labels {'equal' if labels_equal else 'DIFFER'}, max box diff {box_diff:.1e} px, max score diff {score_diff:.1e}",
        f"same counts and labels, boxes <= {PP_BOX_ATOL:g} px, scores <= {PP_SCORE_ATOL:g}",
        ok,
        detections=n_cpu,
        box_diff=box_diff,
        score_diff=score_diff,
        same_counts=same_counts,
        labels_equal=labels_equal,
    )

    # Matcher: the paper's thresholds with low-quality matches, one crowd box, padded GT.
    _, gt_boxes, gt_labels, _ = make_batch(s.batches[1], h, w, seed=2)
    gt_valid = gt_labels >= 0
    gt_crowd = torch.zeros_like(gt_valid)
    gt_crowd[0, 0] = True
    m = Matcher(fg_iou_thresh=0.5, bg_iou_thresh=0.4, allow_low_quality_matches=True)
    idx_c, lab_c = m(anchors, gt_boxes, gt_valid, gt_crowd)
    idx_d, lab_d = m(anchors.to(device), gt_boxes.to(device), gt_valid.to(device), gt_crowd.to(device))
    idx_d, lab_d = idx_d.to(cpu), lab_d.to(cpu)
    fg = lab_c == 1
    label_mismatch = int((lab_c != lab_d).sum())
    fg_idx_mismatch = int((idx_c[fg] != idx_d[fg]).sum())
    report.add(
        "matcher_gpu_cpu",
        f"{int(fg.sum())} foreground of {lab_c.numel()} anchors; label mismatches {label_mismatch}, "
        f"foreground GT-index mismatches {fg_idx_mismatch}",
        "0 mismatches",
        label_mismatch == 0 and fg_idx_mismatch == 0,
        foreground=int(fg.sum()),
        label_mismatch=label_mismatch,
        fg_idx_mismatch=fg_idx_mismatch,
    )


def resident_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Parameters, buffers and optimizer state of one model: what stays on the GPU between steps."""
    n = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    for st in opt.state.values():
        n += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
    return n


@dataclass
class Pair:
    """ours (plain and channels_last) and torchvision's RetinaNet on the same weights, with their optimizers."""

    tv: nn.Module
    ours: nn.Module
    ours_cl: nn.Module
    crit: nn.Module
    opts: dict[str, torch.optim.Optimizer]


def time_batch(pair: Pair, s: Settings, device: torch.device, b: int, repeats: int) -> dict[str, Any]:
    """Median step times (ours, ours channels_last, torchvision) and network-only times at batch `b`, peak
    memory of a step, FLOPs of our step."""
    amp = AMP_DTYPES[s.step_amp]
    tv, ours, ours_cl, crit, opts = pair.tv, pair.ours, pair.ours_cl, pair.crit, pair.opts
    images, gt_boxes, gt_labels, targets = make_batch(b, s.height, s.width, seed=b)
    images, gt_boxes, gt_labels = images.to(device), gt_boxes.to(device), gt_labels.to(device)
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    images_cl = images.contiguous(memory_format=torch.channels_last)

    def ours_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
        with autocast(device, amp):
            out = model(x)
        losses = crit(out, gt_boxes, gt_labels)  # fp32 inside, whatever autocast says
        (losses["loss_cls"] + losses["loss_box"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def step_tv() -> None:
        with autocast(device, amp):
            losses = tv(list(images), targets)
        (losses["classification"] + losses["bbox_regression"]).backward()
        opts["tv"].step()
        opts["tv"].zero_grad(set_to_none=True)

    def net_ours() -> None:  # the same work as net_tv: normalisation, backbone + FPN, head (no anchors)
        with autocast(device, amp):
            cls_logits, box_deltas = network_ours(ours, images)
            total = cls_logits.float().sum() + box_deltas.float().sum()
        total.backward()
        ours.zero_grad(set_to_none=True)

    def net_tv() -> None:
        with autocast(device, amp):
            x = tv.transform(list(images))[0].tensors
            out = tv.head(list(tv.backbone(x).values()))
            total = out["cls_logits"].float().sum() + out["bbox_regression"].float().sum()
        total.backward()
        tv.zero_grad(set_to_none=True)

    fns: dict[str, Callable[[], None]] = {
        "step_tv": step_tv,
        "step_ours": lambda: ours_step(ours, opts["ours"], images),
        "net_tv": net_tv,
        "net_ours": net_ours,
        "step_ours_cl": lambda: ours_step(ours_cl, opts["ours_cl"], images_cl),
    }
    for _ in range(s.warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    # A slower GPU than planned for must not eat the other sections' time: at least 3 repeats (1 in the dry
    # run), then stop once this batch size has had its share of the section's estimate.
    stop_at = time.perf_counter() + 0.35 * s.estimates["steps"]
    for i in range(repeats):
        if i >= min(3, repeats) and time.perf_counter() > stop_at:
            break
        # ABBA: torchvision first in even repeats, ours first in odd ones (train_step.py)
        order = list(fns) if i % 2 == 0 else ["step_ours", "step_tv", "net_ours", "net_tv", "step_ours_cl"]
        for k in order:
            sync(device)
            t0 = time.perf_counter()
            fns[k]()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    res: dict[str, Any] = {"batch": b, "repeats": len(times["step_ours"]), "raw": times}
    res["median"] = med = {k: statistics.median(v) for k, v in times.items()}
    res["images_per_s"] = {k: b / med[f"step_{k}"] for k in ("tv", "ours", "ours_cl")}
    res["outside_ms"] = {
        k: 1000
        * statistics.median([a - n for a, n in zip(times[f"step_{k}"], times[f"net_{k}"], strict=True)])
        for k in ("tv", "ours")
    }

    # Peak memory of one step of each side as if that model were alone on the GPU: the peak above what was
    # resident before the step, plus the side's own parameters, buffers and optimizer state, plus the batch.
    if device.type == "cuda":
        res["memory_gib"] = {}
        batch_bytes = images.numel() * images.element_size()
        for side, model, fn in (("ours", ours, fns["step_ours"]), ("tv", tv, step_tv)):
            sync(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            sync(device)
            extra = torch.cuda.max_memory_allocated(device) - before
            res["memory_gib"][side] = (extra + resident_bytes(model, opts[side]) + batch_bytes) / 2**30

    # FLOPs of our step (forward + backward + SGD), counted once (the counter slows the step down).
    with FlopCounterMode(display=False) as counter:
        fns["step_ours"]()
    res["flops"] = counter.get_total_flops()
    return res


def step_timings(report: Report, s: Settings, device: torch.device, gpu_name: str) -> dict[str, Any]:
    """Ours vs torchvision at both batch sizes (bf16 autocast on the GPU): images/s, outside time, memory,
    TFLOP/s; first a check that the pair computes the same losses."""
    tv, ours, crit = make_pair(
        s.backbone
    )  # ours loaded from torchvision's state dict, torchvision's loss settings
    tv, ours, crit = tv.to(device).train(), ours.to(device).train(), crit.to(device)
    ours_cl = copy.deepcopy(ours).to(memory_format=torch.channels_last)
    ours_cl.channels_last = True
    peak, peak_source = peak_bf16(gpu_name) if device.type == "cuda" else (None, "no CUDA device")

    # The same losses before any step (fp32, TF32 off).
    images, gt_boxes, gt_labels, targets = make_batch(s.batches[0], s.height, s.width)
    images, gt_boxes, gt_labels = images.to(device), gt_boxes.to(device), gt_labels.to(device)
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    with torch.no_grad(), true_fp32():
        ref = tv(list(images), targets)
        got = crit(ours(images), gt_boxes, gt_labels)
    d_cls = rel(float(got["loss_cls"]), float(ref["classification"]))
    d_box = rel(float(got["loss_box"]), float(ref["bbox_regression"]))
    parity_tol = 1e-4 if device.type == "cpu" else 1e-3  # GPU: cuDNN may pick other algorithms per model
    report.add(
        "parity_torchvision",
        f"loss rel cls {d_cls:.1e} box {d_box:.1e} ({s.backbone} {s.batches[0]}x{s.height}x{s.width}; "
        f"torchvision {float(ref['classification']):.4f} / {float(ref['bbox_regression']):.4f})",
        f"rel <= {parity_tol:g}",
        d_cls <= parity_tol and d_box <= parity_tol,
        loss_cls_rel=d_cls,
        loss_box_rel=d_box,
    )

    pair = Pair(tv, ours, ours_cl, crit, {"tv": sgd(tv), "ours": sgd(ours), "ours_cl": sgd(ours_cl)})
    results: dict[str, dict[str, Any]] = {}
    for key, b, repeats in zip(("b2", "b8"), s.batches, s.repeats, strict=True):
        r = results[key] = time_batch(pair, s, device, b, repeats)
        ips, med, out_ms = r["images_per_s"], r["median"], r["outside_ms"]
        ratio = ips["ours"] / ips["tv"]
        report.add(
            f"step_{key}",
            f"ours {ips['ours']:.1f}, torchvision {ips['tv']:.1f} img/s: {ratio:.2f}x "
            f"({s.backbone} {b}x{s.height}x{s.width} {s.step_amp}, median of {r['repeats']})",
            f">= {SPEEDUP_TARGET}x torchvision",
            ratio >= SPEEDUP_TARGET,
            ours=ips["ours"],
            ours_channels_last=ips["ours_cl"],
            torchvision=ips["tv"],
            ratio=ratio,
            step_s=med["step_ours"],
            step_tv_s=med["step_tv"],
            raw={k: [round(x, 4) for x in v] for k, v in r["raw"].items()},
        )
        report.add(
            f"outside_{key}",
            f"ours {out_ms['ours']:.1f} ms, torchvision {out_ms['tv']:.1f} ms of a {1000 * med['step_ours']:.0f} / "
            f"{1000 * med['step_tv']:.0f} ms step",
            "info (step - network fwd+bwd)",
            None,
            ours_ms=out_ms["ours"],
            torchvision_ms=out_ms["tv"],
        )
        if "memory_gib" in r:
            mem = r["memory_gib"]
            report.add(
                f"memory_{key}",
                f"ours {mem['ours']:.2f} GiB, torchvision {mem['tv']:.2f} GiB",
                f"info (detectron2 R50-FPN 1x: {D2_TRAIN_MEM_GB} GB at 2 images, fp32, V100)",
                None,
                ours_gib=mem["ours"],
                torchvision_gib=mem["tv"],
            )
        else:
            report.add(f"memory_{key}", "n/a without CUDA", "info", None)
        achieved = r["flops"] / med["step_ours"] / 1e12
        frac = f", {100 * achieved / peak:.1f} % of {peak:g} peak" if peak else ""
        report.add(
            f"tflops_{key}",
            f"{achieved:.1f} TFLOP/s ({r['flops'] / 1e12:.3f} TFLOP per step){frac}",
            f"info; peak: {peak_source}",
            None,
            tflops=achieved,
            flops=r["flops"],
            peak_tflops=peak,
            peak_source=peak_source,
        )

    b2, b8 = results["b2"], results["b8"]
    best = max(b8["images_per_s"]["ours"], b8["images_per_s"]["ours_cl"])
    # detectron2 is not run here: its figure is the one MODEL_ZOO.md publishes (8 V100, fp32, its own data
    # loading), so the row compares a rate measured on this GPU with a published one from other hardware.
    report.add(
        "vs_detectron2",
        f"ours {b2['images_per_s']['ours']:.1f} img/s measured here at batch {b2['batch']} (best at batch "
        f"{b8['batch']}: {best:.1f}); detectron2 {D2_IMAGES_PER_S_PER_GPU:.2f} img/s per GPU is a published "
        "figure on other hardware, not run beside it",
        f">= {D2_IMAGES_PER_S_PER_GPU:.2f}, published (detectron2 MODEL_ZOO.md: {D2_SECONDS_PER_ITER} s/iter, "
        f"{D2_IMAGES_PER_ITER} img on {D2_GPUS} V100, fp32)",
        b2["images_per_s"]["ours"] >= D2_IMAGES_PER_S_PER_GPU,
        ours=b2["images_per_s"]["ours"],
        detectron2_published=D2_IMAGES_PER_S_PER_GPU,
        detectron2_source="MODEL_ZOO.md retinanet_R_50_FPN_1x, 8 V100, fp32; not run here",
    )
    speedups = {k: v["images_per_s"]["ours_cl"] / v["images_per_s"]["ours"] for k, v in results.items()}
    report.add(
        "channels_last_speed",
        ", ".join(f"batch {results[k]['batch']}: {x:.2f}x" for k, x in speedups.items()),
        "info (> 1: turn model.channels_last on)",
        None,
        **speedups,
    )
    return {"gpu_images_per_s": best}


def data_per_core(report: Report, s: Settings, tmp: Path) -> dict[str, float]:
    """The project's augment function (decode, resize to the shorter side, flip, boxes) in a loop in this
    process, over synthetic COCO-format JPEGs: images per CPU-second of this process = images/s per core."""
    import numpy as np

    from ray_retina.data.augment import augment_batch
    from ray_retina.data.synthetic import make_synthetic_coco

    lo, hi = s.data_source
    paths = make_synthetic_coco(
        tmp / "augment_src",
        s.data_images,
        0,
        seed=0,
        min_image_size=lo,
        max_image_size=hi,
        max_object_size=min(96, lo),
    )
    coco = json.loads(Path(paths.train_annotations).read_text())
    anns: dict[int, list[dict[str, Any]]] = {}
    for a in coco["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    images = coco["images"]
    rows = {
        "image_id": np.array([im["id"] for im in images], dtype=np.int64),
        "height": np.array([im["height"] for im in images], dtype=np.int64),
        "width": np.array([im["width"] for im in images], dtype=np.int64),
        "image": np.array(
            [(Path(paths.train_images) / im["file_name"]).read_bytes() for im in images], dtype=object
        ),
        "bbox": np.array(
            [[a["bbox"] for a in anns.get(im["id"], [])] for im in images] + [None], dtype=object
        )[:-1],
        "category_id": np.array(
            [[a["category_id"] for a in anns.get(im["id"], [])] for im in images] + [None], dtype=object
        )[:-1],
        "iscrowd": np.array(
            [[a.get("iscrowd", 0) for a in anns.get(im["id"], [])] for im in images] + [None], dtype=object
        )[:-1],
    }
    kwargs = {
        "train": True,
        "min_size_range": [s.data_min_size, s.data_min_size],
        "max_size": s.data_max_size,
        "hflip_prob": 0.5,
        "cat_ids": sorted(c["id"] for c in coco["categories"]),
        "seed": 0,
        "epoch": 0,
    }
    chunk = 16  # one Parquet row group (shards.ROW_GROUP_SIZE): what one Ray Data decode task augments
    n = len(images)

    def run_pass() -> int:
        done = 0
        for i in range(0, n, chunk):
            out = augment_batch({k: v[i : i + chunk] for k, v in rows.items()}, **kwargs)
            done += len(out["image_id"])
        return done

    run_pass()  # warm-up (decoder tables, buffer pool)
    c0, t0 = time.process_time(), time.perf_counter()
    done = run_pass()
    cpu_s, wall_s = time.process_time() - c0, time.perf_counter() - t0
    per_core = done / max(cpu_s, 1e-9)
    report.add(
        "data_per_core",
        f"{per_core:.1f} img per CPU-second ({done / wall_s:.1f} img/s wall), {done} JPEGs of {lo}-{hi} px "
        f"-> shorter side {s.data_min_size}, in-process loop",
        "info (upper bound: no Ray Data transport)",
        None,
        images_per_cpu_s=per_core,
        images_per_s_wall=done / wall_s,
        images=done,
    )
    return {"per_core": per_core}


def ray_train(report: Report, s: Settings, tmp: Path) -> None:
    """`ray_retina.engine.trainer.train` on configs/smoke.yaml with 1 worker: on the GPU (NCCL, bf16), or the
    CPU stand-in. Ray is always shut down afterwards; without Ray installed the row says so."""
    try:
        import ray  # deferred: the GPU machine may have no Ray, and the other sections need none
    except ImportError:
        report.skip(["ray_train_gpu"], "ray not installed on this machine")
        return

    from ray_retina.engine.trainer import train

    over = {
        "name": "gpu_check",
        "data.root": str(tmp / "synth"),
        "data.train_shards": str(tmp / "synth" / "shards" / "train"),
        "data.val_shards": str(tmp / "synth" / "shards" / "val"),
        "scaling.num_workers": 1,
        "scaling.cpus_per_worker": 1,
        "data.map_num_cpus": 1,
        "optim.max_iters": s.ray_iters,
        "optim.steps": [s.ray_iters],
        "optim.warmup_iters": min(5, s.ray_iters - 1),
        "train.eval_period": s.ray_iters,
        "train.log_period": max(1, s.ray_iters // 2),
        "run.storage_path": str(tmp / "runs"),
        "run.keep_checkpoints": 1,
        "tracking.enabled": False,
        **s.ray_overrides,
    }
    cfg = apply_overrides(load_config(REPO / "configs" / "smoke.yaml"), over)
    t0 = time.perf_counter()
    try:
        outcome = train(cfg, run_name="gpu_check")
    finally:
        if ray.is_initialized():
            ray.shutdown()
    seconds = time.perf_counter() - t0
    m = outcome.metrics
    ap = m.get("val/AP")
    it = m.get("iteration")
    ok = (
        outcome.error is None
        and ap is not None
        and math.isfinite(ap)
        and 0.0 <= ap <= 1.0
        and it == s.ray_iters
    )
    backend = (
        cfg.scaling.backend if cfg.scaling.backend != "auto" else ("nccl" if cfg.scaling.use_gpu else "gloo")
    )
    if outcome.error is not None:
        value = f"error: {type(outcome.error).__name__}: {str(outcome.error).splitlines()[0][:160]}"
    else:
        value = (
            f"val/AP {ap:.4f} after {int(it or 0)} iterations, {m.get('train/images_per_s', float('nan')):.1f} img/s, "
            f"backend {backend}, amp {cfg.optim.amp}, {seconds:.0f} s incl. Ray start"
        )
    report.add(
        "ray_train_gpu",
        value,
        f"{s.ray_iters} iterations, finite val/AP reported, no error",
        ok,
        val_AP=ap,
        iteration=it,
        seconds=seconds,
        backend=backend,
        images_per_s=m.get("train/images_per_s"),
    )


# ----------------------------------------------------------------------------------------------- main


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--dry-run", action="store_true", help="every code path at tiny sizes on the CPU (< 2 min)"
    )
    ap.add_argument(
        "--out", default=None, help="JSON file, or a folder for gpu_check.json (default: bench_out/)"
    )
    ap.add_argument("--budget-s", type=float, default=None, help="time budget (default 300 s; dry run 600 s)")
    ap.add_argument(
        "--height", type=int, default=896, help="input height of the paper setting (800 padded to 128)"
    )
    ap.add_argument(
        "--width", type=int, default=1152, help="input width (a 4:3 image at 800: 1067, padded to 128)"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 without CUDA)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temporary data and Ray run folder")
    ap.add_argument(
        "--only",
        default=None,
        help=f"comma-separated sections to run ({', '.join(SECTIONS)}); the others' rows are 'skipped: not selected'",
    )
    return ap.parse_args(argv)


def save(report: Report, meta: dict[str, Any], out: Path) -> None:
    """The JSON of the table so far: written after every section, so that a run killed at its time limit
    still leaves the rows it finished."""
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "wall_s": time.perf_counter() - T_START}
    out.write_text(
        json.dumps({"meta": meta, "rows": [asdict(r) for r in report.ordered()]}, indent=2, default=str)
    )


def _out_path(out: str | None, dry: bool) -> Path:
    name = "gpu_check_dry.json" if dry else "gpu_check.json"
    if out is None:
        return REPO / "bench_out" / name
    p = Path(out)
    return p if p.suffix == ".json" else p / name


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    if os.environ.pop("RAY_ADDRESS", None):
        print(
            "[gpu-check] RAY_ADDRESS ignored: the check starts its own local Ray on this machine", flush=True
        )
    cuda = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda") if cuda else torch.device("cpu")
    s = dry_settings(args) if args.dry_run or not cuda else gpu_settings(args)
    if args.threads or not cuda:
        # One thread on the CPU by default: on a shared 2-core machine two OpenMP threads spin-wait for each
        # other whenever another process holds a core, which made a tiny step 5-10x slower.
        torch.set_num_threads(args.threads or 1)
    gpu_name = torch.cuda.get_device_name(device) if cuda else "none"
    peak, peak_source = peak_bf16(gpu_name) if cuda else (None, "")
    budget = Budget(s.budget_s)
    report = Report(cuda, f"cuda ({gpu_name})" if cuda else "cpu", s)
    meta = {
        "dry_run": args.dry_run,
        "cuda": cuda,
        "gpu": gpu_name,
        "peak_bf16_tflops": peak,
        "peak_source": peak_source,
        "torch": torch.__version__,
        "cuda_version": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "settings": {k: v for k, v in asdict(s).items() if k != "ray_overrides"},
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(
        f"[gpu-check] {'DRY RUN (cpu, tiny sizes)' if args.dry_run else 'device ' + report.device}; torch "
        f"{torch.__version__}, CUDA {torch.version.cuda}; {load_average()}; budget {s.budget_s:.0f} s",
        flush=True,
    )
    if not cuda and not args.dry_run:
        print("[gpu-check] no CUDA device: running the dry-run sizes; GPU-only rows are skipped", flush=True)

    out = _out_path(args.out, args.dry_run)
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    est = s.estimates
    found: dict[str, float] = {}

    def steps() -> None:
        found["gpu_rate"] = step_timings(report, s, device, gpu_name)["gpu_images_per_s"]

    def data() -> None:
        found["per_core"] = data_per_core(report, s, tmp)["per_core"]
        if "gpu_rate" not in found:
            report.skip(["cores_per_gpu"], "needs the training step rows")
            return
        need = found["gpu_rate"] / found["per_core"]
        report.add(
            "cores_per_gpu",
            f"{need:.1f} cores ({found['gpu_rate']:.1f} GPU img/s / {found['per_core']:.1f} img/s per core)",
            "info (lower bound: Ray Data costs 1.6-2x the loop's CPU per image)",
            None,
            cores=need,
            gpu_images_per_s=found["gpu_rate"],
            per_core=found["per_core"],
        )

    sections: list[tuple[str, str, list[str], Callable[[], None]]] = [
        (
            "correctness",
            "AMP and channels_last",
            ["amp_bf16", "amp_fp16", "channels_last"],
            lambda: correctness(report, s, device),
        ),
        (
            "parity",
            "post-process and matcher, device vs CPU",
            ["postprocess_gpu_cpu", "matcher_gpu_cpu"],
            lambda: device_parity(report, s, device),
        ),
        (
            "steps",
            "training step, ours vs torchvision",
            [
                "parity_torchvision",
                "step_b2",
                "step_b8",
                "vs_detectron2",
                "channels_last_speed",
                "outside_b2",
                "outside_b8",
                "memory_b2",
                "memory_b8",
                "tflops_b2",
                "tflops_b8",
            ],
            steps,
        ),
        (
            "deterministic",
            "deterministic mode",
            ["deterministic_repeat", "deterministic_cost"],
            lambda: deterministic_check(report, s, device),
        ),
        ("data", "decode + augment per CPU core", ["data_per_core", "cores_per_gpu"], data),
        ("ray", "Ray Train, 1 worker", ["ray_train_gpu"], lambda: ray_train(report, s, tmp)),
        # last: the least predictable in time (inductor's compile), and skipped first when time runs short
        ("compile", "torch.compile", ["compile"], lambda: compile_check(report, s, device)),
    ]
    assert [sid for sid, *_ in sections] == list(SECTIONS)
    only = set(args.only.split(",")) if args.only else set(SECTIONS)
    if only - set(SECTIONS):
        raise SystemExit(
            f"--only: unknown section(s) {sorted(only - set(SECTIONS))}; known: {list(SECTIONS)}"
        )
    try:
        for sid, name, keys, fn in sections:
            if sid not in only:
                report.skip(keys, "not selected (--only)")
                continue
            with section(report, budget, name, keys, est[sid]) as run:
                if run:
                    fn()
            gc.collect()  # the section's models and batches, before the next one allocates its own
            if cuda:
                torch.cuda.empty_cache()
            save(report, meta, out)
    finally:
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    wall = budget.elapsed()
    print()
    print(
        f"## gpu_check: {report.device}{', dry run' if args.dry_run else ''}, {wall:.0f} s, {time.strftime('%Y-%m-%d %H:%M')}"
    )
    if cuda:
        print(f"peak dense BF16: {peak if peak else 'unknown'} TFLOP/s ({peak_source})")
    print()
    print(report.markdown())
    failed = report.failed()
    print()
    cpu_s = cpu_seconds()
    meta["cpu_s"] = cpu_s
    print(
        f"{len(failed)} FAIL"
        + (f": {', '.join(r.key for r in failed)}" if failed else "")
        + f"; wall {wall:.1f} s (target {s.target_s:.0f} s: {'met' if wall <= s.target_s else 'NOT met'}), "
        f"CPU {cpu_s:.1f} s in this process and its children (Ray's daemons not counted); {load_average()}"
    )
    meta["environment"] = environment()  # read at the end: its load averages cover the run
    save(report, meta, out)
    env = meta["environment"]
    out.with_suffix(".md").write_text(
        f"# gpu_check{' --dry-run' if args.dry_run else ''}: {report.device}, {wall:.0f} s, {env['utc']} UTC\n\n"
        f"commit {env['commit']}; load average {env['load_average_1_5_15']} on {env['cpu_count']} cores "
        f"({env['cpu_model']}); Python {env['python']}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"cuDNN {meta['cudnn']}; "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
        + f"\n\n{report.markdown()}\n\n{len(failed)} FAIL\n"
    )
    print(f"written: {out} (+ .md)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
