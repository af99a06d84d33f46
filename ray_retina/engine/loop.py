"""The training and evaluation core, plain PyTorch (no Ray): optimizer, schedule, one step, detections.

`worker.py` adapts this to Ray Train (device, DDP, dataset shards, report, checkpoints); tests drive it
directly. A batch is the dict `RetinaCollate` produces: ``images`` uint8 (B,3,H,W), ``image_sizes`` (B,2),
``gt_boxes`` (B,G,4) XYXY, ``gt_labels`` (B,G) with -1 padding, ``gt_crowd`` (B,G), ``image_id`` (B,),
``scale`` (B,) = resized / original.
"""

from __future__ import annotations

import contextlib
import math
import random
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ray_retina.config import Config
from ray_retina.engine.evaluate import amp_context, detect, detections_to_coco, model_inputs
from ray_retina.engine.restore import AMP_DTYPES


class NonFiniteLossError(FloatingPointError):
    """Raised when more non-finite steps happened than `train.max_bad_steps` allows."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's random state (Python, numpy, torch CPU and CUDA), as tensors/ints/floats so that a
    checkpoint holding it still loads with ``torch.load(weights_only=True)``."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [int(version), torch.tensor(mt, dtype=torch.int64), gauss],
        "numpy": [
            str(kind),
            torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved (CUDA only when this process has the same devices)."""
    version, mt, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in mt.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DDP / compile wrapper."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (paper) or AdamW over trainable params; no weight decay on biases and norm weights (1-d params)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optim.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.optim.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_factor(cfg: Config) -> Callable[[int], float]:
    """Multiplier of the base lr at an iteration: linear warm-up from `warmup_factor`, then the schedule."""
    o = cfg.optim

    def factor(it: int) -> float:
        if o.schedule == "step":
            f = o.step_gamma ** sum(it >= s for s in o.steps)
        elif o.schedule == "cosine":
            f = 0.5 * (1.0 + math.cos(math.pi * min(it, o.max_iters) / o.max_iters))
        else:
            f = 1.0
        if it < o.warmup_iters:
            alpha = it / o.warmup_iters
            f *= o.warmup_factor * (1.0 - alpha) + alpha
        return f

    return factor


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))


def _all_true(flag: bool, device: torch.device) -> bool:
    """True on every rank only if `flag` is true on every rank (so that all ranks skip a step together)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1 if flag else 0], device=device, dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


class Engine:
    """Owns model, criterion, post-process, optimizer, schedule and AMP state for one worker.

    `model` may be DDP-wrapped; evaluation always runs the unwrapped module, so that ranks with different
    numbers of val batches never wait on a DDP collective.
    """

    def __init__(
        self,
        cfg: Config,
        model: nn.Module,
        criterion: Callable[..., dict[str, torch.Tensor]],
        postprocessor: Callable[..., list[dict[str, torch.Tensor]]],
        device: torch.device,
        cat_ids: list[int],
        cat_names: list[str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.criterion = criterion
        self.postprocessor = postprocessor
        self.device = device
        self.cat_ids = torch.as_tensor(cat_ids, dtype=torch.int64)
        # The class names of labels 0..K-1, saved with checkpoints so that a later model.init_from maps classes
        # by name (None: unknown; then by category id).
        self.cat_names = list(cat_names) if cat_names is not None else None
        self.optimizer = build_optimizer(cfg, model)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.amp_dtype = AMP_DTYPES[cfg.optim.amp]
        # A grad scaler only for fp16 (bf16 has fp32's exponent range); disabled it is a no-op.
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype is torch.float16)
        self.iteration = 0
        self.epoch = 0
        self.bad_steps = 0

    # ---- training -------------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        return amp_context(self.device, self.amp_dtype)

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        out["images"] = model_inputs(batch["images"], self.device, self.cfg.model.channels_last)
        return out

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float] | None:
        """One SGD step on a collated batch. Returns the losses, or None when the step was skipped because a
        loss was not finite on some rank (counted; past `train.max_bad_steps` it raises)."""
        self.model.train()
        b = self.to_device(batch)
        with self._autocast():
            outputs = self.model(b["images"])
        # Finiteness is agreed on by all ranks before the criterion (whose num_fg all-reduce every rank
        # must join) and again on the loss, so that every rank skips the same steps.
        finite = bool(torch.isfinite(outputs.cls_logits).all()) and bool(
            torch.isfinite(outputs.box_deltas).all()
        )
        losses: dict[str, torch.Tensor] | None = None
        if _all_true(finite, self.device):
            # The criterion runs its math in fp32 whatever the autocast state.
            losses = self.criterion(outputs, b["gt_boxes"], b["gt_labels"], b["gt_crowd"])
            total = losses["loss_cls"] + losses["loss_box"]
            if not _all_true(bool(torch.isfinite(total).item()), self.device):
                losses = None
        if losses is None:
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_steps += 1
            if self.bad_steps > self.cfg.train.max_bad_steps:
                raise NonFiniteLossError(
                    f"non-finite loss at iteration {self.iteration}: {self.bad_steps} bad steps exceed "
                    f"train.max_bad_steps={self.cfg.train.max_bad_steps}; resume from the last checkpoint "
                    "with a lower optim.lr or gradient clipping (optim.clip_grad_norm)"
                )
            self.iteration += 1
            with warnings.catch_warnings():  # the schedule follows the iteration, stepped or skipped
                warnings.simplefilter("ignore", UserWarning)
                self.scheduler.step()
            return None
        assert losses is not None
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.cfg.optim.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.iteration += 1
        return {
            "loss_cls": float(losses["loss_cls"].detach()),
            "loss_box": float(losses["loss_box"].detach()),
            "lr": float(lr),
        }

    # ---- evaluation -----------------------------------------------------------------------------------
    def predict(self, batch: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        """Detections of a batch in the COCO results format (original category ids, original pixels, XYWH),
        through the one detection path of ``engine/evaluate.py``."""
        dets = detect(
            unwrap(self.model),
            self.postprocessor,
            batch,
            device=self.device,
            amp_dtype=self.amp_dtype,
            channels_last=self.cfg.model.channels_last,
            tta=self.cfg.eval.tta,
            size_divisibility=self.cfg.data.size_divisibility,
        )
        return detections_to_coco(dets, [int(i) for i in batch["image_id"]], self.cat_ids.tolist())

    def predict_all(
        self, batches: Iterable[dict[str, torch.Tensor]]
    ) -> tuple[list[dict[str, Any]], list[int]]:
        dets: list[dict[str, Any]] = []
        image_ids: list[int] = []
        for batch in batches:
            dets.extend(self.predict(batch))
            image_ids.extend(int(i) for i in batch["image_id"])
        return dets, image_ids

    # ---- checkpoint state -----------------------------------------------------------------------------
    def state_dict(self, rng_per_rank: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Everything needed to resume; loadable with ``torch.load(weights_only=True)``.

        ``rng_per_rank``: every rank's :func:`rng_state`, in rank order (the worker gathers them to rank 0);
        default this process's only."""
        return {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iteration": self.iteration,
            "epoch": self.epoch,
            "bad_steps": self.bad_steps,
            "rng_per_rank": list(rng_per_rank) if rng_per_rank is not None else [rng_state()],
            "config": self.cfg.model_dump(mode="json"),
            "cat_ids": self.cat_ids.tolist(),
            "cat_names": self.cat_names,
        }

    def load_state_dict(self, state: dict[str, Any], rank: int = 0) -> None:
        """Restore a :meth:`state_dict`; ``rank`` picks this process's own saved random state (a run resumed
        on fewer or more ranks than saved it: rank r takes saved rank r mod the saved count)."""
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.iteration = int(state["iteration"])
        self.epoch = int(state["epoch"])
        self.bad_steps = int(state.get("bad_steps", 0))
        if "rng_per_rank" in state:
            saved = state["rng_per_rank"]
            set_rng_state(saved[rank % len(saved)])
        elif "torch_rng" in state:  # checkpoints written before per-rank states: torch's only
            torch.set_rng_state(state["torch_rng"])
