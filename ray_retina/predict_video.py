"""``ray-retina predict`` on a video file: frames decoded with PyAV (FFmpeg), run through the same detection
as images (``serving.detect_images``: test-time resize, the network, the post-process, boxes in original
pixels), drawn and encoded into an annotated video, with a per-frame json.

    summary = predict("runs/smoke-...", "street.mp4", "s3://bucket/out", frame_stride=5, max_frames=200)

A video is one sequential stream, so it runs in ONE Ray task (a GPU when asked) that decodes, detects,
draws, encodes and writes its outputs to the output URI itself: nothing stays on the node that ran it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from fractions import Fraction
from typing import Any

import numpy as np
from PIL import Image

from ray_retina.config import TTASection, config_from_dict
from ray_retina.engine.evaluate import coco_records
from ray_retina.uri import is_uri, join_uri, resolve_uri, write_bytes_atomic

logger = logging.getLogger(__name__)

VIDEO_FILE = "detections.mp4"  # the annotated frames (every frame_stride-th), H.264 when FFmpeg has it
FRAMES_FILE = "frames.json"  # per frame run: index, time, detections
VIDEO_CODECS = ("libx264", "mpeg4")  # first available; mpeg4 is FFmpeg's own encoder, always there


def resized_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(h, w) of a ``height`` x ``width`` image at test size: shorter side ``min_size``, longer side at most
    ``max_size``; the rounding of ``data.augment.augment_batch``, so a frame is resized as an image is."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def resize_frame(rgb: np.ndarray, min_size: int, max_size: int) -> np.ndarray:
    """A decoded frame (H, W, 3) uint8 at test size, bilinear (as augment_batch resizes decoded images)."""
    h, w = resized_size(rgb.shape[0], rgb.shape[1], min_size, max_size)
    return np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))


def iter_frames(
    path: str, frame_stride: int, max_frames: int | None, counts: dict[str, int]
) -> Iterator[tuple[int, float, np.ndarray]]:
    """(frame index, time in seconds, RGB (H, W, 3) uint8) of every ``frame_stride``-th frame of the first
    video stream, at most ``max_frames``. Packets that do not decode are skipped and counted in
    ``counts["unreadable"]``; ``counts["frames"]`` is the number of frames decoded."""
    import av  # PyAV: only this module needs FFmpeg

    with av.open(path) as container:
        stream = container.streams.video[0]
        taken = 0
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.error.FFmpegError as err:  # a corrupt packet: skip it, keep the rest of the video
                counts["unreadable"] += 1
                logger.warning("%s: a packet does not decode, skipped: %s", path, err)
                continue
            for frame in frames:
                index = counts["frames"]
                counts["frames"] += 1
                if index % frame_stride:
                    continue
                if max_frames is not None and taken >= max_frames:
                    return
                taken += 1
                t = float(frame.time) if frame.time is not None else index / float(stream.average_rate or 25)
                yield index, t, frame.to_ndarray(format="rgb24")


class VideoWriter:
    """Annotated frames -> a video file (yuv420p, so the frame is cropped to even sides)."""

    def __init__(self, path: str, rate: Fraction, height: int, width: int) -> None:
        import av

        self.container = av.open(path, "w")
        codec = next(c for c in VIDEO_CODECS if c in av.codecs_available)
        self.stream = self.container.add_stream(codec, rate=rate)
        self.stream.height, self.stream.width = height - height % 2, width - width % 2
        self.stream.pix_fmt = "yuv420p"

    def write(self, rgb: np.ndarray) -> None:
        import av

        rgb = np.ascontiguousarray(rgb[: self.stream.height, : self.stream.width])
        for packet in self.stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
            self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():  # flush the encoder
            self.container.mux(packet)
        self.container.close()


def run_video(
    state: Mapping[str, Any],
    video: str,
    out: str,
    *,
    score_thresh: float,
    batch_size: int,
    use_gpu: bool,
    draw: bool,
    tta: TTASection | None,
    frame_stride: int,
    max_frames: int | None,
) -> dict[str, Any]:
    """The whole video job in this process (a Ray task in :func:`predict_video`): returns the summary it wrote.

    Frames go through ``predict.Predictor.detect`` ``batch_size`` at a time. Writes ``detections.json`` (COCO
    results, ``image_id`` = frame index), ``frames.json`` (``frame``, ``time``, ``detections`` per frame run),
    ``summary.json`` and, with ``draw``, ``detections.mp4`` (at the input's frame rate / ``frame_stride``)."""
    from ray_retina.predict import (
        RESULTS_FILE,
        SUMMARY_FILE,
        Predictor,
        category_names_of,
        draw_detections,
        write_json,
    )

    predictor = Predictor([state], score_thresh=score_thresh, use_gpu=use_gpu, tta=tta)
    cfg = predictor.cfg
    names = category_names_of(state)
    tmp = tempfile.mkdtemp(prefix="ray-retina-video-")
    try:
        local = video
        if is_uri(video):  # FFmpeg reads local files: copy the object down first
            local = os.path.join(tmp, "input" + os.path.splitext(video)[1])
            fs, path = resolve_uri(video)
            with fs.open_input_stream(path) as src, open(local, "wb") as dst:
                shutil.copyfileobj(src, dst)
        counts = {"frames": 0, "unreadable": 0}
        frames: list[dict[str, Any]] = []
        records: list[dict[str, Any]] = []
        writer: VideoWriter | None = None
        rate = _frame_rate(local) / frame_stride
        batch: list[tuple[int, float, np.ndarray]] = []

        def flush() -> None:
            nonlocal writer
            small = [resize_frame(rgb, cfg.data.test_min_size, cfg.data.max_size) for _, _, rgb in batch]
            dets = predictor.detect(small, [rgb.shape[:2] for _, _, rgb in batch])
            for (index, t, rgb), d in zip(batch, dets, strict=True):
                recs = coco_records(index, d["boxes"], d["scores"], d["category_ids"])
                records.extend(recs)
                frames.append({"frame": index, "time": round(t, 4), "detections": recs})
                if draw:
                    if writer is None:
                        writer = VideoWriter(os.path.join(tmp, VIDEO_FILE), rate, *rgb.shape[:2])
                    im = draw_detections(rgb, d["boxes"], d["scores"], d["category_ids"].tolist(), names)
                    writer.write(np.asarray(im))
            batch.clear()

        for item in iter_frames(local, frame_stride, max_frames, counts):
            batch.append(item)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
        if writer is not None:
            writer.close()
            fs, root = resolve_uri(out)
            fs.create_dir(root, recursive=True)
            with open(os.path.join(tmp, VIDEO_FILE), "rb") as f:
                write_bytes_atomic(fs, f"{root.rstrip('/')}/{VIDEO_FILE}", f.read())
        results = write_json(out, RESULTS_FILE, records)
        write_json(out, FRAMES_FILE, frames)
        summary = {
            "input": video,
            "images": len(frames),
            "unreadable": counts["unreadable"],
            "detections": len(records),
            "frames_decoded": counts["frames"],
            "frame_stride": frame_stride,
            "max_frames": max_frames,
            "score_thresh": score_thresh,
            "tta": cfg.eval.tta.model_dump(),
            "video": join_uri(out, VIDEO_FILE) if writer is not None else None,
            "results": results,
        }
        write_json(out, SUMMARY_FILE, summary, indent=1)
        return summary
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _frame_rate(path: str) -> Fraction:
    import av

    with av.open(path) as container:
        rate = container.streams.video[0].average_rate
    return Fraction(rate) if rate else Fraction(25)


def predict_video(
    state: Mapping[str, Any],
    video: str,
    out: str,
    *,
    score_thresh: float,
    batch_size: int,
    use_gpu: bool,
    draw: bool,
    tta: TTASection | None,
    frame_stride: int,
    max_frames: int | None,
) -> Any:
    """:func:`run_video` in one Ray task (one GPU with ``use_gpu``); returns ``predict.PredictSummary``."""
    import ray

    from ray_retina.predict import PredictSummary

    if frame_stride < 1 or (max_frames is not None and max_frames < 1):
        raise ValueError(f"frame_stride and max_frames must be >= 1, got {frame_stride}, {max_frames}")
    config_from_dict(dict(state["config"]), source="checkpoint config")  # a bad config fails here
    if not ray.is_initialized():
        ray.init()
    if use_gpu and ray.cluster_resources().get("GPU", 0) < 1:
        raise ValueError("use_gpu=True but the Ray cluster has no GPU")
    task = ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=1)(run_video)
    s = ray.get(
        task.remote(
            state,
            video,
            out,
            score_thresh=score_thresh,
            batch_size=batch_size,
            use_gpu=use_gpu,
            draw=draw,
            tta=tta,
            frame_stride=frame_stride,
            max_frames=max_frames,
        )
    )
    summary = PredictSummary(out, s["results"], s["images"], s["unreadable"], s["detections"])
    logger.info("%s", summary.line())
    return summary
