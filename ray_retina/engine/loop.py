"""The training and evaluation core, plain PyTorch (no Ray): optimizer, schedule, one optimizer step
(:meth:`Engine.run_step`, over ``optim.accumulate`` micro-batches), EMA weights, detections and val loss.

`worker.py` adapts this to Ray Train (device, DDP, dataset shards, report, checkpoints) and drives it with
the hooks of `hooks.py`; tests drive it directly. A batch is the dict `RetinaCollate` produces: ``images`` uint8 (B,3,H,W), ``image_sizes`` (B,2),
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
from ray_retina.engine.ema import ModelEMA
from ray_retina.engine.evaluate import AMP_DTYPES, amp_context, detect, detections_to_coco, model_inputs


class NonFiniteLossError(FloatingPointError):
    """Raised when more non-finite steps happened than `train.max_bad_steps` allows."""


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and every CUDA device) in this process."""
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
    """The lr schedule of :func:`lr_factor`, stepped once per optimizer step (skipped steps included)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_true(flag: bool, device: torch.device) -> bool:
    """True on every rank only if `flag` is true on every rank (so that all ranks skip a step together)."""
    if not _distributed():
        return flag
    t = torch.tensor([1 if flag else 0], device=device, dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _halved(n: int, times: int) -> int:
    """A feature-map side after ``times`` stride-2 layers (3x3 or 7x7 conv / 3x3 max-pool with 'same' padding:
    ceil(n / 2) each)."""
    for _ in range(times):
        n = -(-n // 2)
    return n


class Engine:
    """Owns model, criterion, post-process, optimizer, schedule, AMP state and EMA weights for one worker.

    `model` may be DDP-wrapped; evaluation always runs the unwrapped module (or the EMA copy), so that ranks
    with different numbers of val batches never wait on a DDP collective.
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
        e = cfg.optim.ema
        self.ema = ModelEMA(unwrap(model), decay=e.decay, tau=e.tau) if e.enabled else None
        self.iteration = 0
        self.epoch = 0
        self.bad_steps = 0
        # Val loss sums of the eval pass in progress: focal sum, box sum, foreground anchors (this rank's).
        self.val_loss_sums = torch.zeros(3, dtype=torch.float64)

    # ---- training -------------------------------------------------------------------------------------
    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        out["images"] = model_inputs(batch["images"], self.device, self.cfg.model.channels_last)
        return out

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float] | None:
        """:meth:`run_step` on a single batch (``optim.accumulate`` 1)."""
        return self.run_step([batch])

    def run_step(self, batches: Sequence[dict[str, torch.Tensor]]) -> dict[str, float] | None:
        """One optimizer step over ``optim.accumulate`` collated micro-batches: forward, loss, backward each
        (DDP syncs gradients on the last one only), then one clipped, AMP-scaled optimizer step, schedule
        step and EMA update. The losses are those of the whole step (normalised by its foreground count
        over all micro-batches and ranks), so k micro-batches of b images give the loss and gradients of
        one batch of k x b. Returns ``{"loss_cls", "loss_box", "lr"}``, or None when the step was skipped
        because a loss was not finite on some rank (counted; past ``train.max_bad_steps`` it raises)."""
        k = self.cfg.optim.accumulate
        if len(batches) != k:
            raise ValueError(f"run_step needs optim.accumulate={k} micro-batches, got {len(batches)}")
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        divide_by, scale = self._step_normaliser(batches)
        sums = torch.zeros(2, dtype=torch.float64)
        for i, batch in enumerate(batches):
            with self._grad_sync(last=i == k - 1):
                losses = self._micro_batch_losses(self.to_device(batch), divide_by)
                if losses is None:
                    return self._skip_step()
                self.scaler.scale((losses["loss_cls"] + losses["loss_box"]) * scale).backward()
            sums += (
                torch.stack([losses["loss_cls"].detach(), losses["loss_box"].detach()]).double().cpu() * scale
            )
        if self.cfg.optim.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.iteration += 1
        if self.ema is not None:
            self.ema.update(unwrap(self.model))
        return {"loss_cls": float(sums[0]), "loss_box": float(sums[1]), "lr": float(lr)}

    def _micro_batch_losses(
        self, b: dict[str, torch.Tensor], divide_by: torch.Tensor | None
    ) -> dict[str, torch.Tensor] | None:
        """Forward and criterion of one micro-batch on the device; None when some rank saw a non-finite
        output or loss. Finiteness is agreed on by all ranks before the criterion (whose num_fg all-reduce
        every rank must join) and again on the loss, so that every rank skips the same steps."""
        with amp_context(self.device, self.amp_dtype):
            outputs = self.model(b["images"])
        finite = bool(torch.isfinite(outputs.cls_logits).all()) and bool(
            torch.isfinite(outputs.box_deltas).all()
        )
        if not _all_true(finite, self.device):
            return None
        # The criterion runs its math in fp32 whatever the autocast state.
        losses = self.criterion(outputs, b["gt_boxes"], b["gt_labels"], b["gt_crowd"], divide_by=divide_by)
        if not _all_true(bool(torch.isfinite(losses["loss_cls"] + losses["loss_box"]).item()), self.device):
            return None
        return losses

    def _step_normaliser(
        self, batches: Sequence[dict[str, torch.Tensor]]
    ) -> tuple[torch.Tensor | None, float]:
        """What each micro-batch's loss sums are divided by, and a factor on its loss.

        One micro-batch: (None, 1), the criterion's own normaliser. Several, with the "global" normaliser:
        the foreground anchors of the whole step (every micro-batch of every rank, counted by matching before
        any forward, one all-reduce), clamped to 1, over the world size (DDP averages the ranks' gradients),
        as :class:`~ray_retina.model.retinanet.RetinaNetLoss` does for one batch. "per_image": factor 1/k
        (a mean over the step's images, exact). "ema": factor 1/k on the criterion's running normaliser of
        micro-batch counts (k times smaller than a full batch's), equal only on average."""
        k = len(batches)
        if k == 1:
            return None, 1.0
        if getattr(self.criterion, "normalizer", "global") != "global":
            return None, 1.0 / k
        num_fg = torch.zeros((), device=self.device)
        for batch in batches:
            num_fg += self._count_foreground(batch)
        world = 1
        if _distributed():
            dist.all_reduce(num_fg)
            world = dist.get_world_size()
        return num_fg.clamp(min=1.0) / world, 1.0

    @torch.no_grad()
    def _count_foreground(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Foreground anchors of a collated batch, by the criterion's own matching on the anchors the model
        builds for that padded size (the same cached tensor its forward returns)."""
        gen = unwrap(self.model).anchor_generator
        h, w = batch["images"].shape[-2:]
        sizes = [
            (_halved(int(h), s.bit_length() - 1), _halved(int(w), s.bit_length() - 1)) for s in gen.strides
        ]
        anchors = gen.grid_anchors(sizes, self.device)
        boxes, labels, crowd = (batch[key].to(self.device) for key in ("gt_boxes", "gt_labels", "gt_crowd"))
        _, _, fg = self.criterion.assign(anchors, boxes, labels, crowd)
        return fg.sum().float()

    def _grad_sync(self, *, last: bool) -> contextlib.AbstractContextManager[Any]:
        """DDP's ``no_sync`` on every micro-batch but the last: gradients accumulate locally and are
        all-reduced once per optimizer step."""
        ddp = getattr(self.model, "_orig_mod", self.model)
        if last or not isinstance(ddp, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return ddp.no_sync()

    def _skip_step(self) -> None:
        """A step with a non-finite loss on some rank: no update, counted; the schedule still advances."""
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

    # ---- evaluation -----------------------------------------------------------------------------------
    @property
    def eval_model(self) -> nn.Module:
        """The network evaluation runs: the EMA weights when ``optim.ema`` is on, else the plain model."""
        return self.ema.module if self.ema is not None else unwrap(self.model)

    def predict(self, batch: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        """Detections of a batch in the COCO results format (original category ids, original pixels, XYWH),
        through the one detection path of ``engine/evaluate.py`` (with the config's ``eval.tta``). When the
        batch carries GT (val batches do), the training criterion's loss sums on the plain view are added to
        :attr:`val_loss_sums`."""
        model = self.eval_model
        tta = self.cfg.eval.tta
        outputs: list[Any] = []
        # Without TTA the forward of `detect` is the one whose outputs the loss needs: a hook catches them
        # instead of a second forward or a second detection path. With TTA the plain view runs once more.
        handle = model.register_forward_hook(lambda _m, _i, out: outputs.append(out))
        try:
            dets = detect(
                model,
                self.postprocessor,
                batch,
                device=self.device,
                amp_dtype=self.amp_dtype,
                channels_last=self.cfg.model.channels_last,
                tta=tta,
                size_divisibility=self.cfg.data.size_divisibility,
            )
        finally:
            handle.remove()
        if "gt_boxes" in batch:
            if tta.enabled:
                with torch.no_grad(), amp_context(self.device, self.amp_dtype):
                    outputs = [
                        model(model_inputs(batch["images"], self.device, self.cfg.model.channels_last))
                    ]
            self._add_val_loss(outputs[0], batch)
        return detections_to_coco(dets, [int(i) for i in batch["image_id"]], self.cat_ids.tolist())

    @torch.no_grad()
    def _add_val_loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> None:
        gt = [batch[k].to(self.device) for k in ("gt_boxes", "gt_labels")]
        crowd = batch["gt_crowd"].to(self.device) if "gt_crowd" in batch else None
        try:
            losses = self.criterion(outputs, *gt, crowd, divide_by=1.0)  # sums: no collective, no state
        except FloatingPointError:  # non-finite outputs: the val loss of this eval is NaN
            self.val_loss_sums[:2] = float("nan")
            return
        self.val_loss_sums += (
            torch.stack([losses["loss_cls"], losses["loss_box"], losses["num_fg"]]).double().cpu()
        )

    def predict_all(
        self, batches: Iterable[dict[str, torch.Tensor]]
    ) -> tuple[list[dict[str, Any]], list[int]]:
        dets: list[dict[str, Any]] = []
        image_ids: list[int] = []
        for batch in batches:
            dets.extend(self.predict(batch))
            image_ids.extend(int(i) for i in batch["image_id"])
        return dets, image_ids

    def take_val_loss(self) -> dict[str, float]:
        """``val/loss_cls`` and ``val/loss_box`` of the eval pass since the last call: the training loss of the
        whole val set as one batch (loss sums over all ranks / its foreground anchors). A collective when
        distributed: every rank calls it once per eval. Resets the sums."""
        sums = self.val_loss_sums.to(self.device)
        if _distributed():
            dist.all_reduce(sums)
        self.val_loss_sums = torch.zeros(3, dtype=torch.float64)
        cls_sum, box_sum, num_fg = (float(x) for x in sums.cpu())
        norm = max(num_fg, 1.0)
        return {"val/loss_cls": cls_sum / norm, "val/loss_box": box_sum / norm}

    # ---- checkpoint state -----------------------------------------------------------------------------
    def state_dict(self, rng_per_rank: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Everything needed to resume; loadable with ``torch.load(weights_only=True)``. With EMA on, the
        key "ema" holds ``{"state_dict": EMA weights, "updates": int}`` beside the raw weights ("model").

        ``rng_per_rank``: every rank's :func:`rng_state`, in rank order (the worker gathers them to rank 0);
        default this process's only."""
        state = {
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
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any], rank: int = 0) -> None:
        """Restore a :meth:`state_dict`; ``rank`` picks this process's own saved random state (a run resumed
        on fewer or more ranks than saved it: rank r takes saved rank r mod the saved count). EMA on and a
        checkpoint without EMA weights: the average starts from the restored weights."""
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.iteration = int(state["iteration"])
        self.epoch = int(state["epoch"])
        self.bad_steps = int(state.get("bad_steps", 0))
        if self.ema is not None:
            if "ema" in state:
                self.ema.load_state_dict(state["ema"])
            else:
                e = self.cfg.optim.ema
                self.ema = ModelEMA(unwrap(self.model), decay=e.decay, tau=e.tau)
        saved = state["rng_per_rank"]
        set_rng_state(saved[rank % len(saved)])
