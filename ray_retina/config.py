"""One validated config object for a run.

Every section is a frozen pydantic model with ``extra="forbid"``: an unknown key or a bad value fails at
load time with a message naming the dotted key. The same dotted keys serve the CLI (``--set optim.lr=0.02``),
the Tune search space (``loss.gamma``) and MLflow params, through :func:`flatten` and :func:`apply_overrides`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# The paper's reference batch for its learning rate: lr 0.01 for 16 images (Lin et al. 2017, section 4.1).
PAPER_BATCH = 16
PAPER_LR = 0.01


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SynthSection(_Section):
    """Synthetic COCO-format data set made on demand when the shards are absent (demo and tests)."""

    num_train: int = Field(400, ge=1)
    num_val: int = Field(100, ge=1)
    seed: int = 0
    min_image_size: int = Field(160, ge=32)
    max_image_size: int = Field(320, ge=32)
    min_object_size: int = Field(8, ge=2)
    max_object_size: int = Field(96, ge=4)
    max_objects: int = Field(6, ge=1)
    class_weights: list[float] | None = None
    """Relative frequency of rectangle, ellipse, triangle (None: equal): ``[1, 1, 0.1]`` makes a rare class."""


class PhotometricSection(_Section):
    """Colour jitter of training images (``augment.photometric``): with probability ``prob``, factors drawn
    uniformly from [max(0, 1 - x), 1 + x] for brightness, contrast and saturation and from [-hue, hue] turns
    for the hue, applied as one colour matrix (``ray_retina.data.augment.photometric``)."""

    prob: float = Field(0.0, ge=0.0, le=1.0)
    brightness: float = Field(0.0, ge=0.0)
    contrast: float = Field(0.0, ge=0.0)
    saturation: float = Field(0.0, ge=0.0)
    hue: float = Field(0.0, ge=0.0, le=0.5)


class CropSection(_Section):
    """Random crop that keeps boxes (``augment.crop``): with probability ``prob``, a window with sides of
    [min_scale, 1] x the image's; boxes clipped to it, dropped when less than ``min_visible`` of their area
    stays; never drops every box of an image that has some (``ray_retina.data.augment.augment_batch``)."""

    prob: float = Field(0.0, ge=0.0, le=1.0)
    min_scale: float = Field(0.3, gt=0.0, le=1.0)
    min_visible: float = Field(0.5, gt=0.0, le=1.0)


class ZoomOutSection(_Section):
    """Zoom-out (``augment.zoom_out``): with probability ``prob``, the image placed at a random spot of a
    canvas 1..``max_ratio`` times its size filled with ``fill`` (RGB levels: keep it at model.pixel_mean,
    so the canvas normalises to 0); smaller objects for a data set that lacks them."""

    prob: float = Field(0.0, ge=0.0, le=1.0)
    max_ratio: float = Field(2.0, ge=1.0, le=16.0)
    fill: list[int] = Field(default_factory=lambda: [124, 116, 104])

    @field_validator("fill")
    @classmethod
    def _levels(cls, v: list[int]) -> list[int]:
        if len(v) != 3 or not all(0 <= x <= 255 for x in v):
            raise ValueError(f"must be 3 levels (R, G, B) in [0, 255], got {v}")
        return v


class AugmentSection(_Section):
    """Training augmentation for small sets of real photos, all off by default (the paper uses only the flip
    and scale jitter). Order per image: crop -> zoom-out -> resize -> photometric -> flip."""

    photometric: PhotometricSection = PhotometricSection()
    crop: CropSection = CropSection()
    zoom_out: ZoomOutSection = ZoomOutSection()


class DataSection(_Section):
    root: str = "data/synth"
    """Where the COCO-format source lives (images + annotations/instances_{train,val}.json)."""
    train_shards: str = "data/synth/shards/train"
    val_shards: str = "data/synth/shards/val"
    synth: SynthSection | None = None
    """When set and the shards are absent, make the synthetic set under `root` and prepare it."""
    rows_per_shard: int = Field(64, ge=1)
    train_min_size: list[int] = Field(default_factory=lambda: [800, 800])
    """[lo, hi]: shorter side drawn uniformly per image in training (paper jitter: [640, 800])."""
    test_min_size: int = Field(800, ge=16)
    max_size: int = Field(1333, ge=16)
    hflip_prob: float = Field(0.5, ge=0.0, le=1.0)
    batch_size: int = Field(2, ge=1)
    """Images per worker per step; the global batch is batch_size x the number of workers that run
    (scaling.num_workers, or fewer in an elastic run: see :func:`resolve`)."""
    size_divisibility: int = Field(128, ge=1)
    """Pad to a multiple of the coarsest stride (P7 = 128) so every level has whole cells."""
    map_num_cpus: float = Field(1.0, gt=0)
    """Logical CPUs each Ray Data decode/augment task asks for. Together with scaling.cpus_per_worker it
    decides whether data tasks can be scheduled at all: train workers x cpus_per_worker + map_num_cpus
    must fit in the cluster's CPUs or the run waits forever for a data task."""
    map_batch_size: int = Field(8, ge=1)
    """Rows per augment call of the ``read_parquet`` reader; the default ``row_groups`` reader augments
    one whole Parquet row group (``shards.ROW_GROUP_SIZE`` images) per call and task."""
    prefetch_batches: int = Field(2, ge=0)
    shuffle_buffer: int = Field(0, ge=0)
    """Local shuffle buffer in rows for training (0: only the file order is shuffled per epoch)."""
    deterministic: bool = True
    """Deliver the training rows in the seeded order (Ray Data ``preserve_order``) instead of the order the
    decode tasks finish in, so that the same config, seed and world size train on the same batches: on CPU
    the same losses and AP to the last bit. On by default (``benchmarks/determinism.py``: about 3 % of a demo
    run's wall time, inside its run-to-run spread); ``false`` lets a fast task overtake a slow one when
    decoding is the bottleneck."""
    val_max_images: int | None = None
    """Evaluate on the first N val images only (None: all)."""
    augment: AugmentSection = AugmentSection()
    """Photometric jitter, crop, zoom-out of training images (see :class:`AugmentSection`); off by default."""

    @field_validator("train_min_size")
    @classmethod
    def _range(cls, v: list[int]) -> list[int]:
        if len(v) != 2 or v[0] > v[1] or v[0] < 16:
            raise ValueError(f"must be [lo, hi] with 16 <= lo <= hi, got {v}")
        return v


class ModelSection(_Section):
    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnext101_32x8d"] = "resnet50"
    backbone_weights: str | None = None
    """The backbone's start: a local torchvision-format ResNet state dict, or a torchvision weights name
    (``ResNet50_Weights.IMAGENET1K_V2``) taken from torch's hub cache (``$TORCH_HOME/hub/checkpoints``) or
    downloaded into it when online; None: random init. Superseded by ``init_from``, which loads every layer."""
    init_from: str | None = None
    """Fine-tune from these weights (loaded on every rank before DDP; a resumed run's own checkpoint wins):
    a torchvision RetinaNet state dict file (``retinanet_resnet50_fpn_coco-eeacb38b.pth``), a torchvision
    weights name (``RetinaNet_ResNet50_FPN_Weights.COCO_V1``), or one of our checkpoints (``checkpoint.pt``,
    its directory, or a run directory: its best); a local path or a URI. Classes are mapped by name (COCO's
    80 for torchvision's weights); classes without a match start from the prior init. The model config must
    match the weights' (checked at start-up: see ``engine/restore.py`` ``check_init``)."""
    torchvision_anchors: bool = False
    """torchvision's anchors (integer sizes, rounded corners), the ones its RetinaNet weights were trained
    with: set it with an ``init_from`` of torchvision weights. False: the paper's exact anchor sizes."""
    fpn_channels: int = Field(256, ge=8)
    head_convs: int = Field(4, ge=0)
    head_norm: Literal["none", "gn"] = "none"
    prior: float = Field(0.01, gt=0.0, lt=1.0)
    """pi: the classifier's initial foreground probability; last cls bias = -log((1 - pi) / pi)."""
    p6_from: Literal["c5", "p5"] = "c5"
    anchor_sizes: list[int] = Field(default_factory=lambda: [32, 64, 128, 256, 512])
    anchor_scales_per_octave: int = Field(3, ge=1)
    anchor_aspect_ratios: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0])
    frozen_bn: bool = True
    freeze_at: int = Field(2, ge=0, le=5)
    pixel_mean: list[float] = Field(default_factory=lambda: [123.675, 116.28, 103.53])
    pixel_std: list[float] = Field(default_factory=lambda: [58.395, 57.12, 57.375])
    channels_last: bool = False

    @field_validator("anchor_sizes")
    @classmethod
    def _five_levels(cls, v: list[int]) -> list[int]:
        if len(v) != 5:
            raise ValueError(f"needs one size per level P3..P7 (5), got {len(v)}")
        return v


class LossSection(_Section):
    gamma: float = Field(2.0, ge=0.0)
    alpha: float = 0.25
    """alpha < 0 disables the alpha weighting (torchvision semantics)."""
    box_loss: Literal["smooth_l1", "l1"] = "smooth_l1"
    smooth_l1_beta: float = Field(0.1, ge=0.0)
    fg_iou_thresh: float = Field(0.5, gt=0.0, le=1.0)
    bg_iou_thresh: float = Field(0.4, ge=0.0, le=1.0)
    allow_low_quality_matches: bool = True
    normalizer: Literal["global", "per_image", "ema"] = "global"
    ema_momentum: float = Field(0.9, ge=0.0, lt=1.0)
    box_coder_weights: list[float] = Field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, v: float) -> float:
        if v > 1.0:
            raise ValueError(f"must be <= 1 (or < 0 to disable), got {v}")
        return v

    @model_validator(mode="after")
    def _thresholds(self) -> LossSection:
        if self.bg_iou_thresh > self.fg_iou_thresh:
            raise ValueError("loss.bg_iou_thresh must be <= loss.fg_iou_thresh")
        return self


class PostprocessSection(_Section):
    score_thresh: float = Field(0.05, ge=0.0, le=1.0)
    topk_candidates: int = Field(1000, ge=1)
    nms_thresh: float = Field(0.5, gt=0.0, le=1.0)
    detections_per_img: int = Field(100, ge=1)


class TTASection(_Section):
    """Test-time augmentation (``eval.tta``; ``ray-retina predict --tta``): each image is also run
    horizontally flipped and at each of ``scales`` (factors of the test size), and the candidates of every
    view, mapped back to the original image, go through ONE per-class NMS (``engine/tta.py``). Applies to
    training eval, ``ray-retina eval``, ``predict``, the MLflow model and Ray Serve; not to the ONNX graph."""

    enabled: bool = False
    flip: bool = True
    scales: list[float] = Field(default_factory=lambda: [1.0])
    """Factors of the test size (data.test_min_size and data.max_size); 1.0 is the plain view."""

    @field_validator("scales")
    @classmethod
    def _scales(cls, v: list[float]) -> list[float]:
        if not v or not all(0.1 <= s <= 4.0 for s in v) or len(set(v)) != len(v):
            raise ValueError(f"must be distinct factors in [0.1, 4], at least one, got {v}")
        return v


class EvalSection(_Section):
    """How a model is evaluated and run at test time (beyond ``postprocess``)."""

    tta: TTASection = TTASection()
    precision_target: float = Field(0.9, gt=0.0, le=1.0)
    """Each eval also picks, per class, the lowest score threshold whose val precision (IoU 0.5) reaches
    this (checkpoint ``thresholds["precision"]``), beside the F1-optimal one (``thresholds["f1"]``)."""


class EmaSection(_Section):
    """An exponential moving average of the weights (``optim.ema``), as Ultralytics and timm keep it: fp32
    copies beside the model, updated after every optimizer step with the decay
    ``decay x (1 - exp(-updates / tau))`` (small at first, so early weights fade fast), used for eval, saved
    in checkpoints beside the raw weights, and what export / predict / eval load by default."""

    enabled: bool = False
    decay: float = Field(0.9999, gt=0.0, lt=1.0)
    tau: float = Field(2000.0, gt=0.0)
    """Warm-up of the decay, in optimizer steps (the decay reaches 63% of ``decay`` after tau steps)."""


class OptimSection(_Section):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float | None = Field(None, gt=0.0)
    """None: the paper's 0.01 per 16 images scaled linearly to the global batch. Set: the lr as given, or,
    when reference_batch is set, the lr for reference_batch images, scaled linearly to the global batch."""
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    schedule: Literal["step", "cosine", "constant"] = "step"
    max_iters: int = Field(90_000, ge=1)
    steps: list[int] = Field(default_factory=lambda: [60_000, 80_000])
    step_gamma: float = Field(0.1, gt=0.0, le=1.0)
    warmup_iters: int = Field(500, ge=0)
    warmup_factor: float = Field(0.001, gt=0.0, le=1.0)
    reference_batch: int | None = Field(None, ge=1)
    """When set, lr / max_iters / steps / warmup_iters are given for this global batch (the paper's 16) and
    are rescaled to the actual global batch at run time (linear scaling rule: lr x global / reference, the
    iterations x reference / global, so the same number of images is seen). See :func:`resolve`."""
    clip_grad_norm: float | None = None
    accumulate: int = Field(1, ge=1)
    """Micro-batches per optimizer step: each step sees data.batch_size x workers x accumulate images (the
    global batch of the lr rule and of reference_batch). Exact: the focal normaliser is the foreground count
    of the whole step over all ranks, DDP syncs gradients on the last micro-batch only. Not exact for a
    BatchNorm in training mode (model.frozen_bn false): its batch statistics are per micro-batch."""
    ema: EmaSection = EmaSection()
    """EMA weights (see :class:`EmaSection`); off by default."""
    amp: Literal["none", "bf16", "fp16"] = "none"
    compile: bool = False
    """torch.compile the model (GPU runs; same code path otherwise)."""

    @model_validator(mode="after")
    def _steps(self) -> OptimSection:
        if any(s <= 0 or s > self.max_iters for s in self.steps) or self.steps != sorted(self.steps):
            raise ValueError(f"optim.steps must be increasing and within (0, max_iters], got {self.steps}")
        return self


class EarlyStopSection(_Section):
    """Early stopping (``train.early_stop``): the run ends after ``patience`` eval periods in a row without
    an improvement of ``metric`` (by more than ``min_delta``); its best checkpoint by val/AP is what the run
    reports as best (Ray keeps it). ``patience`` None: off."""

    patience: int | None = Field(None, ge=1)
    metric: str = "val/AP"
    mode: Literal["max", "min"] = "max"
    min_delta: float = Field(0.0, ge=0.0)


class TrainSection(_Section):
    eval_period: int = Field(500, ge=1)
    """Iterations between evaluations; each eval period ends with one ray.train.report(metrics, checkpoint)."""
    log_period: int = Field(20, ge=1)
    threads_per_worker: int | None = None
    """torch.set_num_threads in each train worker (None: Ray's default, OMP_NUM_THREADS = CPUs asked)."""
    max_bad_steps: int = Field(10, ge=0)
    """Non-finite losses tolerated (step skipped) before the run stops with an error."""
    deterministic: bool = False
    """Deterministic kernels: ``torch.use_deterministic_algorithms`` and cuDNN's deterministic, non-benchmark
    mode (on GPU, where kernels otherwise pick atomics and autotuned algorithms). CPU training is already
    reproducible with ``data.deterministic`` (the default); a sweep turns both on for its trials."""
    eval_backend: Literal["faster_coco_eval", "pycocotools"] = "faster_coco_eval"
    """faster_coco_eval: same 12 stats as pycocotools (tested), about 10x faster on COCO val."""
    early_stop: EarlyStopSection = EarlyStopSection()
    """End the run when the metric stops improving (see :class:`EarlyStopSection`); off by default."""


class ScalingSection(_Section):
    num_workers: int = Field(2, ge=0)
    """0 runs the training function in the driver process (fast unit tests)."""
    min_workers: int | None = Field(None, ge=1)
    """Elastic training: run with anywhere from min_workers to num_workers workers (Ray Train V2)."""
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    gpus_per_worker: float = Field(1.0, ge=0.0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """auto: NCCL with GPUs, gloo on CPU."""


class RunSection(_Section):
    storage_path: str = "runs"
    """Checkpoints and Ray results; must be shared storage (NFS, s3://, gs://) on a multi-node cluster."""
    name: str | None = None
    """Ray run (and MLflow run) name; a name that already ran in this storage is refused unless resumed
    (``train --resume NAME``). None: config name + time to the millisecond + a random suffix."""
    max_failures: int = Field(3, ge=-1)
    """Worker-group restarts from the last checkpoint after a lost worker or node (-1: unlimited)."""
    keep_checkpoints: int = Field(2, ge=1)
    ray_num_cpus: int | None = None
    """num_cpus for a local ray.init when no cluster is running (logical CPUs may exceed the physical)."""


class TrackingSection(_Section):
    enabled: bool = True
    tracking_uri: str | None = None
    """None: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory."""
    experiment: str | None = None
    """None: the config name (one experiment per config)."""


class ServeSection(_Section):
    """The served model (``ray-retina serve``, and the limits the exported MLflow model carries).

    Limits: a request over one is answered 400 naming it; every image's size is read from its header
    before any pixel is decoded."""

    max_pixels: int = Field(25_000_000, ge=1, le=89_478_485)
    """Pixels (height x width) an image may have: 25 MP holds a 6000 x 4000 photo and stays far under
    Pillow's decompression-bomb limit (89.5 MP warns, 179 MP refuses)."""
    max_images: int = Field(16, ge=1)
    """Images per request."""
    max_batch_size: int = Field(8, ge=1)
    """Images per forward pass: the Ray Serve batcher's size, and the upper end of the MLflow model's
    ``batch_size`` param ([1, max_batch_size])."""
    batch_wait_timeout_s: float = Field(0.01, ge=0.0)
    """How long the Ray Serve batcher waits for a batch to fill."""
    num_replicas: int = Field(1, ge=1)
    """Replicas when autoscaling is off."""
    min_replicas: int | None = Field(None, ge=0)
    """With max_replicas: autoscaling between the two on ongoing requests per replica."""
    max_replicas: int | None = Field(None, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0.0)
    num_cpus: float = Field(1.0, gt=0.0)
    """CPUs per replica (decoding and, without a GPU, the network)."""
    num_gpus: float = Field(0.0, ge=0.0, le=1.0)
    """GPU per replica; a fraction shares one GPU between replicas."""
    amp: Literal["none", "bf16", "fp16"] | None = None
    """Autocast on a GPU replica; None: the checkpoint's ``optim.amp``."""
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)

    @model_validator(mode="after")
    def _replicas(self) -> ServeSection:
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("serve.min_replicas and serve.max_replicas go together (autoscaling)")
        if self.min_replicas is not None and self.min_replicas > self.max_replicas:  # type: ignore[operator]
            raise ValueError("serve.min_replicas must be <= serve.max_replicas")
        return self


class TuneSection(_Section):
    search_space: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Dotted key -> {"type": uniform|loguniform|choice|grid, "low", "high" | "values"}."""
    num_samples: int = Field(4, ge=1)
    max_concurrent_trials: int | None = None
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1.0)
    max_t: int | None = None
    """Eval rounds a trial may run (None: max_iters / eval_period)."""
    metric: str = "val/AP"
    mode: Literal["max", "min"] = "max"
    search_alg: Literal["random", "optuna"] = "random"
    noise_repeats: int = Field(0, ge=0)
    """Also train the base config this many times with seeds ``seed``, ``seed + 1``, ... to the last round (no
    early stop): the standard deviation of the metric per round over them is the sweep's noise floor, beside
    which trials are ranked (0: no repeats, no noise floor). At least 2 give a floor."""


class Config(_Section):
    name: str = "retinanet"
    seed: int = 0
    data: DataSection = DataSection()
    model: ModelSection = ModelSection()
    loss: LossSection = LossSection()
    postprocess: PostprocessSection = PostprocessSection()
    optim: OptimSection = OptimSection()
    train: TrainSection = TrainSection()
    scaling: ScalingSection = ScalingSection()
    run: RunSection = RunSection()
    tracking: TrackingSection = TrackingSection()
    tune: TuneSection = TuneSection()
    serve: ServeSection = ServeSection()
    eval: EvalSection = EvalSection()

    @property
    def global_batch(self) -> int:
        """Images per optimizer step with scaling.num_workers workers (0 runs in the driver: one worker):
        data.batch_size x workers x optim.accumulate."""
        return self.data.batch_size * max(1, self.scaling.num_workers) * self.optim.accumulate

    @property
    def lr(self) -> float:
        """The learning rate in force with scaling.num_workers workers, ``resolve(self).optim.lr``."""
        return _scaled_lr(self.optim, self.global_batch)


class ConfigError(ValueError):
    """A config that cannot be loaded; the message names the file and the dotted key."""


def _format_validation(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def _scaled_lr(o: OptimSection, global_batch: int) -> float:
    if o.lr is None:
        return PAPER_LR * global_batch / PAPER_BATCH
    if o.reference_batch is None:
        return o.lr
    return o.lr * global_batch / o.reference_batch


def resolve(cfg: Config, world_size: int | None = None) -> Config:
    """The config as it runs on ``world_size`` workers: lr explicit and the schedule in iterations of that
    global batch. Logged and checkpointed.

    The global batch is ``data.batch_size x world_size x optim.accumulate`` (images per optimizer step; the
    schedule counts optimizer steps); world_size None means scaling.num_workers (at least 1: 0 runs in the
    driver). An elastic run passes the number of workers actually running.

    * lr: ``optim.lr`` None gives the paper's 0.01 per 16 images scaled linearly to the global batch. An
      explicit ``optim.lr`` is kept as given, unless ``optim.reference_batch`` is set: then it is the lr
      for reference_batch images and is scaled by global / reference_batch.
    * schedule: with ``optim.reference_batch`` set, max_iters / steps / warmup_iters are scaled by
      reference_batch / global (rounded; the same number of images seen); otherwise kept as given.

    Contract: the result has an explicit lr and ``optim.reference_batch`` None, so it is pinned: resolving
    it again returns it unchanged, whatever the world size. To resolve for another world size (an elastic
    run that restarts with fewer or more workers), call this on the config as loaded, never on its
    resolved form. ``scaling`` is not changed, so the result's ``global_batch`` still reads
    scaling.num_workers.
    """
    if world_size is None:
        global_batch = cfg.global_batch
    elif world_size < 1:
        raise ValueError(f"world_size must be >= 1 (None: scaling.num_workers), got {world_size!r}")
    else:
        global_batch = cfg.data.batch_size * int(world_size) * cfg.optim.accumulate
    o = cfg.optim
    upd: dict[str, Any] = {"optim.lr": _scaled_lr(o, global_batch)}
    if o.reference_batch is not None:
        f = o.reference_batch / global_batch
        upd.update(
            {
                "optim.max_iters": max(1, round(o.max_iters * f)),
                "optim.steps": [max(1, round(s * f)) for s in o.steps],
                "optim.warmup_iters": round(o.warmup_iters * f),
                "optim.reference_batch": None,
            }
        )
    return apply_overrides(cfg, upd)


def config_from_dict(d: dict[str, Any], source: str = "<dict>") -> Config:
    try:
        return Config.model_validate(d)
    except ValidationError as err:
        raise ConfigError(_format_validation(err, source)) from None


def parse_value(text: str) -> Any:
    """A CLI override value: YAML scalars and lists (`0.01`, `true`, `[640, 800]`, `null`)."""
    return yaml.safe_load(text)


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = d
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = {}
            node[p] = nxt
        if not isinstance(nxt, dict):
            raise ConfigError(f"cannot set {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = nxt
    node[parts[-1]] = value


def apply_overrides(cfg: Config, overrides: dict[str, Any] | list[str], source: str = "overrides") -> Config:
    """A new Config with dotted keys replaced. `overrides` is a mapping or a list of ``key=value`` strings."""
    if isinstance(overrides, list):
        pairs: dict[str, Any] = {}
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not key=value")
            k, v = item.split("=", 1)
            pairs[k.strip()] = parse_value(v)
        overrides = pairs
    d = cfg.model_dump(mode="json")
    for k, v in overrides.items():
        _set_dotted(d, k, v)
    return config_from_dict(d, source)


BASE_KEY = "_base_"
"""Top-level YAML key naming the config(s) a file extends: a path relative to the file, or a list of them."""


def _read_yaml(p: Path) -> dict[str, Any]:
    """One YAML file's top-level mapping (``_base_`` not followed); errors name the file and line."""
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{p}:{where} not valid YAML ({getattr(err, 'problem', None) or err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    return raw


def merge_config_dicts(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: mappings merge key by key (recursively), any other value (a scalar, a
    list, null) replaces the base's. Neither input is changed."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_config_dicts(out[k], v)
        else:
            out[k] = v
    return out


def load_config_dict(path: str | os.PathLike[str], _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping of a YAML config with its ``_base_`` chain resolved (not yet validated).

    ``_base_`` is a path relative to the file or a list of them; bases merge in list order (a later base
    overrides an earlier one), then the file's own keys override them all (:func:`merge_config_dicts`).
    A base may have bases of its own; a file that is its own base through any chain is an error naming
    the files of the cycle."""
    p = Path(path).resolve()
    if p in _chain:
        cycle = " -> ".join(str(c) for c in (*_chain[_chain.index(p) :], p))
        raise ConfigError(f"config _base_ cycle: {cycle}")
    raw = _read_yaml(p)
    bases = raw.pop(BASE_KEY, None)
    if bases is None:
        return raw
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{p}: {BASE_KEY} must be a path or a list of paths, got {bases!r}")
    merged: dict[str, Any] = {}
    for b in bases:
        bp = p.parent / b
        if not bp.is_file():
            raise ConfigError(f"{p}: {BASE_KEY} {b!r} not found ({bp})")
        merged = merge_config_dicts(merged, load_config_dict(bp, (*_chain, p)))
    return merge_config_dicts(merged, raw)


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: list[str] | dict[str, Any] | None = None
) -> Config:
    """Load a YAML config (None: the package defaults) with its ``_base_`` chain resolved
    (:func:`load_config_dict`), then apply dotted overrides. The result is the fully resolved config: the
    one printed by ``--print-config``, logged (``config.yaml``) and checkpointed."""
    cfg = Config() if path is None else config_from_dict(load_config_dict(path), str(path))
    if overrides:
        cfg = apply_overrides(cfg, overrides, f"{path or 'defaults'} + overrides")
    return cfg


def flatten(cfg: Config | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys -> leaf values (lists kept as values), the form of MLflow params and Tune keys."""
    d = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else cfg
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not (key == "tune.search_space"):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def to_json(cfg: Config) -> str:
    return json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
