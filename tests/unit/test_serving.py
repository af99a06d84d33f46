"""What a served model runs (ray_retina/serving.py): limits checked from the header before any decode, a tiny
image resized no further than the test size, the per-class operating point, params validated as 400s."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from ray_retina.config import ServeSection
from ray_retina.serving import EVAL_THRESHOLDS, Detector, RequestError, class_thresholds


@pytest.fixture(scope="module")
def state(untrained_checkpoint):
    from ray_retina.checkpoint import load_checkpoint_state

    run, _, _ = untrained_checkpoint
    return load_checkpoint_state(run / "checkpoint_0000010")


@pytest.fixture(scope="module")
def detector(state):
    return Detector(state, "cpu")


def _png_header(width: int, height: int) -> bytes:
    """A 100-byte PNG whose header claims width x height and whose pixel data is a few bytes of a zlib stream:
    it opens but cannot decode, so a refusal naming the pixel limit proves the header was checked first."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    idat = zlib.compress(b"\x00" * 64)[:-4]  # cut short
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _jpeg(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (120, 30, 200)).save(buf, format="JPEG")
    return buf.getvalue()


def test_a_request_error_is_a_400():
    """mlflow models serve answers an MlflowException with its own status: INVALID_PARAMETER_VALUE is 400."""
    assert RequestError("x").get_http_status_code() == 400


def test_a_bomb_is_refused_from_its_header(detector, val_jpegs):
    # 11000 x 11000 (121 MP; Pillow itself only warns below 179 MP): refused, nothing decoded
    with pytest.raises(
        RequestError, match=r"image 1 has 11000 x 11000 = 121000000 pixels: more than serve.max_pixels"
    ):
        detector.frame([val_jpegs[0], _png_header(11000, 11000)])
    with pytest.raises(RequestError, match="image 0 is not an image"):
        detector.frame([b"\x89PNG\r\n\x1a\n"])


def test_limits_from_the_serve_section(state, val_jpegs):
    small = Detector(state, "cpu", limits=ServeSection(max_pixels=64 * 64, max_images=2, max_batch_size=2))
    with pytest.raises(RequestError, match=r"3 images in one request: more than serve.max_images = 2"):
        small.frame(val_jpegs[:3])
    with pytest.raises(
        RequestError, match=r"image 0 has 65 x 64 = 4160 pixels: more than serve.max_pixels = 4096"
    ):
        small.frame([_jpeg(65, 64)])
    assert len(small.frame([_jpeg(64, 64)], {"score_thresh": 0.9})) == 0  # at the limit: served
    for bad in (0, 3):
        with pytest.raises(RequestError, match=r"batch_size must be in \[1, 2\] \(serve.max_batch_size\)"):
            small.frame(val_jpegs[:1], {"batch_size": bad})


@pytest.mark.parametrize(
    "params, match",
    [
        ({"score_thresh": 1.5}, "score_thresh must be in"),
        ({"score_thresh": "high"}, "not a number"),
        ({"detections_per_img": 0}, "detections_per_img must be >= 1"),
        ({"thresholds": "recall"}, r"thresholds must be one of \['eval'\]"),
    ],
)
def test_bad_params_are_refused(detector, params, match):
    with pytest.raises(RequestError, match=match):
        detector.params(params)


def test_a_tiny_image_is_resized_to_the_test_size_only(detector):
    """Shorter side to data.test_min_size (64 here), longer side at most data.max_size (128): a 4 x 4 image
    becomes 64 x 64, a 3000 x 2 strip 128 x 1, never more."""
    cfg = detector.cfg
    square, strip = detector.prepare([_jpeg(4, 4), _jpeg(3000, 2)])
    assert square["image"].shape == (cfg.data.test_min_size, cfg.data.test_min_size, 3)
    assert tuple(square["orig_size"]) == (4, 4)
    assert strip["image"].shape == (1, cfg.data.max_size, 3)
    dets = detector.run([square, strip], [detector.postprocess_key(detector.params())] * 2, 2)
    assert all(np.all(d["boxes"][:, 2] <= 4) for d in dets[:1])  # boxes in the original 4 x 4 pixels


def test_per_class_thresholds_are_the_default_operating_point(state, val_jpegs):
    """A checkpoint with eval's per-class thresholds ("thresholds": {"f1": {"<category id>": score}}) serves
    at them by default; thresholds="eval" serves the post-process's own; score_thresh is a floor on top."""
    cat_ids = [int(c) for c in state["cat_ids"]]
    det = Detector({**state, "thresholds": {"f1": {}, "precision": {str(c): 0.99 for c in cat_ids}}}, "cpu")
    images = val_jpegs[:2]
    raw = det.run(det.prepare(images), [det.postprocess_key(det.params())] * 2, 1)

    def at(params: dict) -> pd.DataFrame:  # the operating point of `params` on the same network output
        return det.to_frame([det.select(d, det.params(params)) for d in raw])

    plain = at({"thresholds": EVAL_THRESHOLDS})
    # per class: about the median score of that class's detections (the untrained model scores near 0.5)
    f1 = {str(c): float(plain[plain["category_id"] == c]["score"].median()) for c in cat_ids[:2]}
    det.tables["f1"] = class_thresholds({"thresholds": {"f1": f1}}, cat_ids)["f1"]
    assert det.default_table == "f1"
    above = np.asarray([f1.get(str(c), 0.0) for c in plain["category_id"]])
    expected = plain[plain["score"] > above].reset_index(drop=True)
    assert 0 < len(expected) < len(plain)
    pd.testing.assert_frame_equal(det.frame(images), expected)  # the default, end to end
    assert len(at({"thresholds": "precision"})) == 0
    floor = at({"score_thresh": 0.55})
    pd.testing.assert_frame_equal(floor, expected[expected["score"] > 0.55].reset_index(drop=True))


def test_the_exported_model_carries_the_thresholds(state, val_jpegs, tmp_path):
    import mlflow.pyfunc

    from ray_retina.export import save_pyfunc

    cat_ids = [int(c) for c in state["cat_ids"]]
    tables = {"f1": {str(c): 0.52 for c in cat_ids}, "precision": {str(c): 0.8 for c in cat_ids}}
    chosen = {**tables, "precision_target": 0.9}  # what eval stores in a checkpoint
    model = mlflow.pyfunc.load_model(str(save_pyfunc({**state, "thresholds": chosen}, tmp_path / "m")))
    params = {p.name: p.default for p in model.metadata.signature.params.params}
    assert params["thresholds"] == "f1"
    assert model.metadata.metadata["thresholds"] == chosen
    assert model.metadata.metadata["limits"] == {
        "max_pixels": 25_000_000,
        "max_images": 16,
        "max_batch_size": 8,
    }
    df = pd.DataFrame({"image": val_jpegs[:2]})
    served = model.predict(df)
    assert len(served) > 0 and (served["score"] > 0.52).all()
    pd.testing.assert_frame_equal(
        served, model.predict(df, params={"thresholds": "eval", "score_thresh": 0.52})
    )


def test_export_takes_serve_overrides_only(untrained_checkpoint, tmp_path):
    from ray_retina.export import export

    run, _, _ = untrained_checkpoint
    with pytest.raises(ValueError, match=r"serve.\* overrides only"):
        export(str(run), format="onnx", out=tmp_path, serve_overrides=["serve.max_images=4", "loss.gamma=0"])


def test_the_exported_model_holds_the_ema_weights_when_the_checkpoint_has_them(state):
    """With optim.ema on, eval scored the EMA weights: they are what the export ships (the raw weights are not)."""
    from ray_retina.export import slim_state
    from ray_retina.predict import category_names_of

    ema = {k: v + 1.0 if v.is_floating_point() else v for k, v in state["model"].items()}
    slim = slim_state({**state, "ema": {"state_dict": ema, "updates": 7}}, category_names_of(state))
    for k, v in slim["model"].items():
        assert torch.equal(v, ema[k]), k
    assert all(torch.equal(v, state["model"][k]) for k, v in slim_state(state, {})["model"].items())
