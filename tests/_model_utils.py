"""Shared helpers of the model tests (small configs, synthetic targets)."""

from __future__ import annotations

import torch

from ray_retina.config import Config, apply_overrides

torch.set_num_threads(2)


def small_cfg(**overrides) -> Config:
    base = {
        "model.backbone": "resnet18",
        "model.fpn_channels": 32,
        "model.head_convs": 1,
    }
    base.update(overrides)
    return apply_overrides(Config(), base)


def boxes_image(b: int = 2, size: int = 128, seed: int = 0):
    """Images with filled bright rectangles on a dark noisy background, and their GT (padded, labels 0..2)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 3, size, size, generator=g) * 40
    gt_boxes = torch.zeros(b, 3, 4)
    gt_labels = torch.full((b, 3), -1, dtype=torch.int64)
    for i in range(b):
        n = 2 + i % 2
        for j in range(n):
            w, h = torch.randint(20, 60, (2,), generator=g).tolist()
            x0 = int(torch.randint(0, size - w, (1,), generator=g))
            y0 = int(torch.randint(0, size - h, (1,), generator=g))
            c = j % 3
            images[i, c, y0 : y0 + h, x0 : x0 + w] = 230.0
            gt_boxes[i, j] = torch.tensor([x0, y0, x0 + w, y0 + h], dtype=torch.float32)
            gt_labels[i, j] = c
    return images, gt_boxes, gt_labels


def reference_records(
    state: dict, images: list[bytes], score_thresh: float, per_image: int | None = None
) -> list[list[dict]]:
    """Per image, predict's COCO records as predict.Predictor makes them for a batch of one image
    (preprocess_batch, then serving.detect_images with predict's score filter); at most ``per_image`` each."""
    import numpy as np

    from ray_retina.data.augment import object_array
    from ray_retina.engine.evaluate import AMP_DTYPES, coco_records
    from ray_retina.engine.restore import model_from_state
    from ray_retina.model import build_postprocessor
    from ray_retina.predict import preprocess_batch
    from ray_retina.serving import detect_images

    model, cfg, cat_ids = model_from_state(state, "cpu")
    out = []
    for i, data in enumerate(images):
        pre = preprocess_batch(
            {"path": np.asarray(["x"]), "bytes": object_array([data])},
            min_size=cfg.data.test_min_size,
            max_size=cfg.data.max_size,
            files={"x": (i, "x", "x.png")},
        )
        d = detect_images(
            model,
            build_postprocessor(cfg),
            cfg,
            pre,
            device=torch.device("cpu"),
            amp_dtype=AMP_DTYPES[cfg.optim.amp],
            cat_ids=np.asarray(cat_ids),
            score_thresh=score_thresh,
        )[0]
        out.append(coco_records(i, d["boxes"], d["scores"], d["category_ids"])[:per_image])
    return out
