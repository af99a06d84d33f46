"""RetinaNet (Lin et al. 2017): the network, its training criterion, and the one place they are built.

Three separate objects, as in DETR: ``RetinaNet`` (images -> ``HeadOutputs``), ``RetinaNetLoss``
(outputs + padded targets -> losses) and ``PostProcessor`` (outputs -> detections). Only the ``build_*``
functions at the bottom read the config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..losses import box_regression_loss, focal_loss_from_labels
from .anchors import AnchorGenerator
from .backbone import BackboneWithFPN
from .box_coder import BoxCoder
from .head import RetinaNetHead
from .matcher import BACKGROUND, FOREGROUND, Matcher
from .postprocess import PostProcessor

if TYPE_CHECKING:  # the config is only read here, never imported at run time: the model stays config-free
    from ray_retina.config import Config


class HeadOutputs(NamedTuple):
    """What ``RetinaNet.forward`` returns.

    cls_logits: (B, R, K) classification logits (sigmoid -> per-class probability).
    box_deltas: (B, R, 4) encoded box deltas (tx, ty, tw, th), class-agnostic.
    anchors: (R, 4) XYXY anchors in input pixels, shared by the batch (same padded size).
    num_anchors_per_level: R_l for P3..P7; R = sum(R_l). Order over R: level, y, x, anchor.
    """

    cls_logits: Tensor
    box_deltas: Tensor
    anchors: Tensor
    num_anchors_per_level: list[int]


class RetinaNet(nn.Module):
    """Backbone + FPN + shared heads. ``forward(images (B, 3, H, W) float RGB 0..255 or uint8)``.

    Normalisation with ``pixel_mean`` / ``pixel_std`` (buffers) happens here; resizing and padding do not:
    the data pipeline hands over a padded batch (H, W multiples of 128, so every level has whole cells).
    """

    def __init__(
        self,
        *,
        backbone: BackboneWithFPN,
        head: RetinaNetHead,
        anchor_generator: AnchorGenerator,
        pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53),
        pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375),
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.anchor_generator = anchor_generator
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(1, 3, 1, 1))
        self.channels_last = channels_last
        self.num_classes = head.classification_head.num_classes

    def forward(self, images: Tensor) -> HeadOutputs:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        x = (images.float() - self.pixel_mean) / self.pixel_std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        features = self.backbone(x)
        cls_logits, box_deltas = self.head(features)
        anchors, num_anchors_per_level = self.anchor_generator(features)
        return HeadOutputs(cls_logits, box_deltas, anchors, num_anchors_per_level)


def _check_finite(name: str, t: Tensor) -> None:
    # One reduction instead of isfinite().all() (which writes a bool tensor: ~10x slower on CPU): a sum
    # is finite unless some element is NaN or inf (or the sum overflows, which the exact test rules out).
    if bool(torch.isfinite(t.sum(dtype=torch.float32))):
        return
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise FloatingPointError(
            f"{name} has {bad} non-finite values (NaN or inf): the network diverged "
            "(lower the learning rate, lengthen the warm-up, or check the input images)"
        )


class RetinaNetLoss(nn.Module):
    """Focal loss + box loss for a batch, computed for all images at once.

    ``forward(outputs, gt_boxes (B, G, 4) XYXY, gt_labels (B, G) int64 with -1 padding, gt_crowd (B, G)
    bool or None) -> {"loss_cls", "loss_box", "num_fg"}`` (float32 scalars, also under autocast).

    Normaliser (``normalizer``):
      * "global" (paper, default): the number of foreground anchors of the *global* batch. Each DDP worker
        all-reduces its num_fg and divides its loss sum by max(sum_fg, 1) / world_size; DDP then averages
        the gradients over the workers, which gives sum over all anchors of all workers / max(sum_fg, 1).
      * "per_image": torchvision's, mean over the images of (image's loss sum / max(image's num_fg, 1)).
      * "ema": detectron2's, an exponential moving average of max(batch num_fg, 1) (starting at 100,
        updated in training mode only), less noisy than the batch count.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        matcher: Matcher,
        box_coder: BoxCoder,
        alpha: float = 0.25,
        gamma: float = 2.0,
        box_loss: str = "smooth_l1",
        smooth_l1_beta: float = 0.1,
        normalizer: str = "global",
        ema_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        if normalizer not in ("global", "per_image", "ema"):
            raise ValueError(f"normalizer must be 'global', 'per_image' or 'ema', got {normalizer!r}")
        if box_loss not in ("smooth_l1", "l1"):
            raise ValueError(f"box_loss must be 'smooth_l1' or 'l1', got {box_loss!r}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.box_coder = box_coder
        self.alpha = alpha
        self.gamma = gamma
        self.box_loss = box_loss
        self.smooth_l1_beta = smooth_l1_beta
        self.normalizer = normalizer
        self.ema_momentum = ema_momentum
        self.register_buffer("loss_normalizer", torch.tensor(100.0))

    @torch.no_grad()
    def assign(
        self, anchors: Tensor, gt_boxes: Tensor, gt_labels: Tensor, gt_crowd: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-anchor training labels for the batch.

        Returns ``cls_labels`` (B, R) in {-1 ignore, 0..K-1 class, K background}, ``matched_idxs``
        (B, R) the matched GT column, and ``fg`` (B, R) bool.
        """
        gt_valid = gt_labels >= 0
        matched_idxs, match_labels = self.matcher(anchors, gt_boxes, gt_valid, gt_crowd)
        fg = match_labels == FOREGROUND
        if gt_labels.shape[1] > 0:
            matched_cls = torch.gather(gt_labels, 1, matched_idxs)
        else:
            matched_cls = torch.zeros_like(matched_idxs)
        cls_labels = torch.where(
            fg,
            matched_cls,
            torch.where(
                match_labels == BACKGROUND,
                torch.full_like(matched_cls, self.num_classes),
                torch.full_like(matched_cls, -1),
            ),
        )
        return cls_labels, matched_idxs, fg

    def forward(
        self,
        outputs: HeadOutputs,
        gt_boxes: Tensor,
        gt_labels: Tensor,
        gt_crowd: Tensor | None = None,
        *,
        divide_by: Tensor | float | None = None,
    ) -> dict[str, Tensor]:
        """``divide_by``: divide both loss sums by this instead of the configured normaliser (no collective,
        no normaliser state change): gradient accumulation passes the foreground count of the whole optimizer
        step over all ranks / world size; evaluation passes 1 to get the sums."""
        logits, deltas, anchors = outputs.cls_logits, outputs.box_deltas, outputs.anchors
        b = logits.shape[0]
        if gt_boxes.shape[0] != b or gt_labels.shape[0] != b:
            raise ValueError(f"targets are for {gt_boxes.shape[0]} images, outputs for {b}")
        device = logits.device
        gt_boxes = gt_boxes.to(device)
        gt_labels = gt_labels.to(device)
        gt_crowd = gt_crowd.to(device) if gt_crowd is not None else None
        _check_finite("cls_logits", logits)
        _check_finite("box_deltas", deltas)

        # The loss runs in float32 whatever autocast says: the focal term of fp16 logits overflows.
        with torch.autocast(device_type=device.type, enabled=False):
            cls_labels, matched_idxs, fg = self.assign(anchors, gt_boxes, gt_labels, gt_crowd)
            num_fg_per_image = fg.sum(dim=1).float()
            num_fg = num_fg_per_image.sum()

            fg_b, fg_r = fg.nonzero(as_tuple=True)
            target = self.box_coder.encode(gt_boxes[fg_b, matched_idxs[fg_b, fg_r]], anchors[fg_r])
            box_per_anchor = box_regression_loss(
                # at least fp32 (fp16 deltas under autocast), fp64 kept (exact checks in float64)
                deltas[fg_b, fg_r].to(torch.promote_types(deltas.dtype, torch.float32)),
                target,
                kind=self.box_loss,
                beta=self.smooth_l1_beta,
            )

            if divide_by is not None:
                loss_cls = focal_loss_from_labels(logits, cls_labels, self.alpha, self.gamma) / divide_by
                loss_box = box_per_anchor.sum() / divide_by
            elif self.normalizer == "per_image":
                w_img = 1.0 / (num_fg_per_image.clamp(min=1.0) * b)  # (B,)
                loss_cls = focal_loss_from_labels(
                    logits, cls_labels, self.alpha, self.gamma, weights=w_img[:, None].expand_as(cls_labels)
                )
                loss_box = (box_per_anchor * w_img[fg_b]).sum()
            else:
                norm = self._normaliser(num_fg)
                loss_cls = focal_loss_from_labels(logits, cls_labels, self.alpha, self.gamma) / norm
                loss_box = box_per_anchor.sum() / norm
        return {"loss_cls": loss_cls, "loss_box": loss_box, "num_fg": num_fg}

    def _normaliser(self, num_fg: Tensor) -> Tensor:
        """What this rank divides its loss sums by ("global" and "ema"; "per_image" weights per row)."""
        if self.normalizer == "global":
            # DDP averages the gradients over the W ranks, so rank r's loss_r / (N / W) averages to
            # sum_r loss_r / N: the global batch's loss sum over its N foreground anchors. The clamp goes on
            # the all-reduced count N, before dividing by W: clamping the per-rank mean N / W instead
            # turns 3 foregrounds over 8 ranks into max(3 / 8, 1) = 1, i.e. a global normaliser of 8.
            n = num_fg.detach().clone()
            world = 1
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(n)
                world = dist.get_world_size()
            return n.clamp(min=1.0) / world
        # ema
        if self.loss_normalizer.device != num_fg.device:
            self.loss_normalizer = self.loss_normalizer.to(num_fg.device)
        if self.training:
            m = self.ema_momentum
            self.loss_normalizer = m * self.loss_normalizer + (1 - m) * num_fg.detach().clamp(min=1.0)
        return self.loss_normalizer


# --------------------------------------------------------------------------------------------------------
# The one place that reads the config.


def build_model(cfg: Config, num_classes: int = 80) -> RetinaNet:
    """RetinaNet for ``num_classes`` contiguous classes from ``cfg.model`` (a ``ray_retina.config.Config``)."""
    m = cfg.model
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    backbone = BackboneWithFPN(
        name=m.backbone,
        out_channels=m.fpn_channels,
        p6_from=m.p6_from,
        frozen_bn=m.frozen_bn,
        freeze_at=m.freeze_at,
        weights_path=m.backbone_weights,
    )
    anchor_generator = AnchorGenerator(
        sizes=m.anchor_sizes,
        scales_per_octave=m.anchor_scales_per_octave,
        aspect_ratios=m.anchor_aspect_ratios,
        strides=backbone.strides,
        torchvision_compat=m.torchvision_anchors,  # see load_torchvision_retinanet
    )
    head = RetinaNetHead(
        in_channels=m.fpn_channels,
        num_anchors=anchor_generator.num_anchors_per_location,
        num_classes=num_classes,
        prior=m.prior,
        num_convs=m.head_convs,
        norm=m.head_norm,
    )
    model = RetinaNet(
        backbone=backbone,
        head=head,
        anchor_generator=anchor_generator,
        pixel_mean=tuple(m.pixel_mean),
        pixel_std=tuple(m.pixel_std),
        channels_last=m.channels_last,
    )
    if m.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def build_box_coder(cfg: Config) -> BoxCoder:
    return BoxCoder(weights=tuple(cfg.loss.box_coder_weights))


def build_criterion(cfg: Config, num_classes: int = 80) -> RetinaNetLoss:
    lc = cfg.loss
    return RetinaNetLoss(
        num_classes=num_classes,
        matcher=Matcher(
            fg_iou_thresh=lc.fg_iou_thresh,
            bg_iou_thresh=lc.bg_iou_thresh,
            allow_low_quality_matches=lc.allow_low_quality_matches,
        ),
        box_coder=build_box_coder(cfg),
        alpha=lc.alpha,
        gamma=lc.gamma,
        box_loss=lc.box_loss,
        smooth_l1_beta=lc.smooth_l1_beta,
        normalizer=lc.normalizer,
        ema_momentum=lc.ema_momentum,
    )


def build_postprocessor(cfg: Config) -> PostProcessor:
    pc = cfg.postprocess
    return PostProcessor(
        score_thresh=pc.score_thresh,
        topk_candidates=pc.topk_candidates,
        nms_thresh=pc.nms_thresh,
        detections_per_img=pc.detections_per_img,
        box_coder=build_box_coder(cfg),
    )
