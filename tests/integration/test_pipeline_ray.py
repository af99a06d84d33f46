"""The Ray Data pipeline end to end on real shards (the tier's shared cluster): streaming splits, the
deterministic order, the val set against the eval iterator, shards written by Ray tasks, undecodable rows.
The plain functions it maps (decode, augment, collate): tests/unit/test_pipeline.py."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from ray_retina.config import DataSection
from ray_retina.data.collate import RetinaCollate
from ray_retina.data.datasets import build_dataset, iter_eval_batches
from ray_retina.data.shards import prepare_shards, read_shards_table, shard_files, write_shards
from ray_retina.data.synthetic import make_synthetic_coco


def _data_cfg(**kw) -> DataSection:
    base = dict(
        train_min_size=[96, 128],
        test_min_size=128,
        max_size=256,
        batch_size=4,
        size_divisibility=32,
        map_num_cpus=0.5,
        map_batch_size=4,
    )
    return DataSection(**{**base, **kw})


@pytest.mark.ray
def test_streaming_split_covers_every_row_once_per_epoch(ray_session, synth_shards):
    ds = build_dataset(synth_shards / "train", _data_cfg(), train=True, seed=0)
    splits = ds.streaming_split(2, equal=True)  # as Ray Train splits a training set
    seen: dict[int, list[tuple[list[int], list[tuple[int, int]]]]] = {}

    def consume(rank: int) -> None:
        seen[rank] = []
        for _epoch in range(2):
            ids, sizes = [], []
            for b in splits[rank].iter_torch_batches(batch_size=4, collate_fn=RetinaCollate(32)):
                assert b["images"].shape[2] % 32 == 0 and b["images"].shape[3] % 32 == 0
                assert b["gt_labels"].shape == b["gt_boxes"].shape[:2] == b["gt_crowd"].shape
                ids += b["image_id"].tolist()
                sizes += [tuple(s) for s in b["image_sizes"].tolist()]
            seen[rank].append((ids, sizes))

    threads = [threading.Thread(target=consume, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join(timeout=120) for t in threads]
    expected = sorted(read_shards_table(synth_shards / "train", ["image_id"]).column("image_id").to_pylist())
    per_epoch_sizes = []
    for epoch in range(2):
        a, b = seen[0][epoch][0], seen[1][epoch][0]
        assert a and b and not set(a) & set(b)  # each worker its own part
        assert sorted(a + b) == expected  # every row exactly once
        per_epoch_sizes.append(dict(zip(a + b, seen[0][epoch][1] + seen[1][epoch][1], strict=True)))
    # the shorter side is re-drawn each epoch
    assert sum(per_epoch_sizes[0][i] != per_epoch_sizes[1][i] for i in expected) > len(expected) // 2


@pytest.mark.ray
def test_deterministic_training_order_repeats_for_a_seed(ray_session, synth_shards):
    """data.deterministic: the same seed gives the same row order, epoch by epoch, however the parallel
    decode tasks finish (reproducible trials); each epoch still visits the rows in a new order."""
    cfg = _data_cfg(deterministic=True)

    def two_epochs(seed: int) -> list[list[int]]:
        ds = build_dataset(synth_shards / "train", cfg, train=True, seed=seed)
        assert ds.context.execution_options.preserve_order
        return [[int(i) for b in ds.iter_batches(batch_size=4) for i in b["image_id"]] for _ in range(2)]

    first = two_epochs(0)
    assert two_epochs(0) == first
    assert sorted(first[0]) == sorted(first[1]) and first[0] != first[1]
    assert build_dataset(  # on by default
        synth_shards / "train", _data_cfg(), train=True, seed=0
    ).context.execution_options.preserve_order
    assert not build_dataset(
        synth_shards / "train", _data_cfg(deterministic=False), train=True, seed=0
    ).context.execution_options.preserve_order


@pytest.mark.ray
def test_val_dataset_is_deterministic_and_matches_eval_iterator(ray_session, synth_shards):
    cfg = _data_cfg()
    ds = build_dataset(synth_shards / "val", cfg, train=False, seed=0)
    rows = {int(r["image_id"]): r for r in ds.take_all()}
    assert len(rows) == 10
    # Ray's own Parquet reader gives the same rows
    native = build_dataset(synth_shards / "val", cfg, train=False, seed=0, reader="read_parquet").take_all()
    assert sorted(int(r["image_id"]) for r in native) == sorted(rows)
    for r in native:
        np.testing.assert_array_equal(r["image"], rows[int(r["image_id"])]["image"])
    n = 0
    for b in iter_eval_batches(shard_files(synth_shards / "val"), cfg, batch_size=3):
        for k, image_id in enumerate(b["image_id"].tolist()):
            r = rows[image_id]
            h, w = (int(v) for v in r["image_size"])
            assert min(h, w) == 128 or max(h, w) == 256
            np.testing.assert_array_equal(b["images"][k, :, :h, :w].permute(1, 2, 0).numpy(), r["image"])
            g = len(r["gt_labels"])
            np.testing.assert_allclose(b["gt_boxes"][k, :g].numpy(), r["gt_boxes"])
            n += 1
    assert n == 10
    assert (
        sum(
            len(b["image_id"])
            for b in iter_eval_batches(shard_files(synth_shards / "val"), cfg, max_images=5)
        )
        == 5
    )


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """8 synthetic images, image 3's file cut in half (its JPEG header still reads)."""
    root = tmp_path_factory.mktemp("damaged")
    p = make_synthetic_coco(root / "synth", num_train=8, num_val=0, seed=9)
    f = p.train_images / f"{3:012d}.jpg"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    return p


@pytest.mark.ray
def test_prepare_with_ray_tasks_equals_in_process(ray_session, damaged, tmp_path):
    a = prepare_shards(damaged.train_annotations, damaged.train_images, tmp_path / "ray", rows_per_shard=3)
    b = write_shards(damaged.train_annotations, damaged.train_images, tmp_path / "local", rows_per_shard=3)
    # the truncated image is refused at prepare time (the decoder policy), in Ray tasks as in-process
    assert (
        a == b and a["num_images"] == 7 and a["num_shards"] == 3 and a["validation"]["image_unreadable"] == 1
    )
    for name in ("part-00000.parquet", "part-00001.parquet", "part-00002.parquet", "manifest.json"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()


@pytest.mark.ray
def test_undecodable_rows_are_skipped_and_counted_per_data_set(ray_session, damaged, tmp_path, monkeypatch):
    from ray_retina.data import shards
    from ray_retina.data.decode import read_header
    from ray_retina.data.skips import new_counter, skipped_images

    # Shards holding a row that does not decode (prepare refuses one; shards made elsewhere may hold it):
    # written in-process with the header-only check, so the truncated image gets in.
    monkeypatch.setattr(shards, "check_image", lambda data, full=False: read_header(data))
    write_shards(damaged.train_annotations, damaged.train_images, tmp_path / "s", rows_per_shard=3)
    monkeypatch.undo()
    counter = new_counter()
    ds = build_dataset(tmp_path / "s", _data_cfg(), train=True, seed=1, skip_counter=counter)
    ids = [int(i) for b in ds.iter_batches(batch_size=4) for i in b["image_id"]]
    assert sorted(ids) == [1, 2, 4, 5, 6, 7, 8]
    # The data set's own named actor, readable from any process of the job: exactly its one bad image.
    assert skipped_images(counter) == 1
    ids = [int(i) for b in ds.iter_batches(batch_size=4) for i in b["image_id"]]  # a second epoch
    assert len(ids) == 7 and skipped_images(counter) == 1  # distinct images, not skip events
    assert skipped_images(new_counter()) == 0  # another data set's counter starts at zero
