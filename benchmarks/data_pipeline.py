"""Decode + augment throughput on the same shards: single process vs torch DataLoader vs Ray Data.

    .venv/bin/python benchmarks/data_pipeline.py [--images 960] [--repeats 3] [--cpus 2] [--no-simplejpeg]
        [--augment-config configs/retinanet_r50_fpn_finetune_small.yaml] [--compare-torchvision]

All three run the same function (``ray_retina.data.augment.augment_batch``, training mode: decode,
shorter side drawn from ``--train-min-size``, longer side capped, flip) over the same Parquet shards
and hand the augmented rows to the consuming process, which only counts them:

  (a) single process: a plain loop, reading the shards with pyarrow in this process (the per-core limit)
  (b) torch DataLoader, ``--cpus`` workers, an IterableDataset giving each worker its share of the files
      (augmented numpy batches handed to the main process as they are)
  (c) our Ray Data pipeline (``build_dataset``) on a local Ray with ``--cpus`` CPUs, iterated with
      ``iter_batches`` in the driver, each decode task asking ``--map-num-cpus`` (0.5: two tasks per
      core; also timed with 1 CPU per task, as an extra row; ``--compare-readers``: also its
      ``read_parquet`` variant). Ray Data's executor notices finished tasks by polling (``ray.wait``
      with a 0.1 s timeout), so with one task per CPU each core idles between the end of one task
      (one row group, ~0.2 s here) and the start of the next; two tasks per core fill those gaps.

The single process and Ray Data (0.5 CPU per task) are also timed with the training augmentation of
``--augment-config`` on (its ``data.augment``: photometric jitter, crop, zoom-out; the sizes stay this
script's), as rows beside their twins without it, in the same rounds. ``--compare-torchvision`` adds the
same augmentation done by ``torchvision.transforms.v2`` on ``tv_tensors`` (RandomIoUCrop, RandomZoomOut,
RandomShortestSize, ColorJitter, flip, SanitizeBoundingBoxes) in the single process, and times the colour
jitter alone, ours against ColorJitter's four ``adjust_*`` on one (800, 1067) image.

Each figure is the median of ``--repeats`` full passes, run in interleaved rounds after one warm-up
pass each (Ray's and the DataLoader's start-up is outside the timing; a Ray pass includes its
per-epoch execution start, also reported as the time to the first batch).
The data set: synthetic COCO-format shapes at COCO-like sizes (``--image-size``), JPEG.
Target: Ray Data >= 0.8x the DataLoader and >= 1.6x the single process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from _common import recorded_run


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=960)
    ap.add_argument("--image-size", type=int, nargs=2, default=[480, 640], help="source sides, min max")
    ap.add_argument("--train-min-size", type=int, nargs=2, default=[640, 800], help="shorter side jitter")
    ap.add_argument("--max-size", type=int, default=1333)
    ap.add_argument("--rows-per-shard", type=int, default=64)
    ap.add_argument("--map-batch-size", type=int, default=4)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument(
        "--map-num-cpus",
        type=float,
        default=0.5,
        help="Ray CPUs per decode task (data.map_num_cpus); 1.0 is also timed, as an extra row",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--no-simplejpeg", action="store_true", help="decode with Pillow even if simplejpeg is there"
    )
    ap.add_argument(
        "--compare-readers", action="store_true", help="also time build_dataset(reader='read_parquet')"
    )
    ap.add_argument(
        "--augment-config",
        default=str(
            Path(__file__).resolve().parent.parent / "configs" / "retinanet_r50_fpn_finetune_small.yaml"
        ),
        help="config whose data.augment the 'augmentation on' rows use",
    )
    ap.add_argument(
        "--compare-torchvision",
        action="store_true",
        help="also time the same augmentation with torchvision.transforms.v2 (single process)",
    )
    ap.add_argument("--workdir", default="bench_out/data_pipeline")
    ap.add_argument("--json", default=None, help="write the results here too")
    return ap.parse_args()


def _prepare(args: argparse.Namespace) -> Path:
    from ray_retina.data.shards import manifest_exists, write_shards
    from ray_retina.data.synthetic import make_synthetic_coco

    lo, hi = args.image_size
    root = Path(args.workdir) / f"n{args.images}_s{lo}-{hi}_r{args.rows_per_shard}"
    shards = root / "shards"
    if not manifest_exists(shards):
        p = make_synthetic_coco(
            root / "coco",
            args.images,
            0,
            seed=0,
            min_image_size=lo,
            max_image_size=hi,
            max_object_size=min(96, lo),
        )
        write_shards(p.train_annotations, p.train_images, shards, rows_per_shard=args.rows_per_shard)
    return shards


def _kwargs(args: argparse.Namespace, shards: Path, augment: bool = False) -> dict:
    from ray_retina.data.datasets import augment_kwargs
    from ray_retina.data.shards import read_manifest

    cat_ids = [c["id"] for c in read_manifest(shards)["categories"]]
    return augment_kwargs(_data_cfg(args, augment), train=True, cat_ids=cat_ids, seed=0)


def _data_cfg(args: argparse.Namespace, augment: bool = False) -> Any:
    """The benchmark's DataSection; ``augment``: with the ``data.augment`` of ``--augment-config``."""
    from ray_retina.config import DataSection, load_config

    return DataSection(
        train_min_size=list(args.train_min_size),
        test_min_size=args.train_min_size[0],
        max_size=args.max_size,
        hflip_prob=0.5,
        map_batch_size=args.map_batch_size,
        map_num_cpus=args.map_num_cpus,
        size_divisibility=128,
        augment=load_config(args.augment_config).data.augment if augment else {},
    )


def iter_augmented(files: list[str], kwargs: dict, batch_size: int):
    """Read shard files with pyarrow and augment them, in the calling process."""
    import pyarrow.parquet as pq

    from ray_retina.data.augment import READ_COLUMNS, augment_batch

    for path in files:
        for rb in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=READ_COLUMNS):
            rows = {c: rb.column(c).to_numpy(zero_copy_only=False) for c in READ_COLUMNS}
            yield augment_batch(rows, **kwargs)


_CLK = os.sysconf("SC_CLK_TCK")


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user + system CPU seconds) of a live process, from /proc (Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[1]), (int(fields[11]) + int(fields[12])) / _CLK
    except (OSError, IndexError, ValueError):
        return None


def descendants(root: int) -> set[int]:
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _proc_stat(int(entry))) is not None:
            parent[int(entry)] = st[0]
    out, frontier = set(), {root}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - out
        out |= frontier
    return out


class CpuMeter:
    """CPU seconds used during a pass by a process and all its descendants, including processes that
    start or end during the pass (Ray starts and kills idle workers as it goes): a thread samples /proc
    every 20 ms and keeps, per pid, the CPU time when first and last seen."""

    def __init__(self, root: int, *, exclude: set[int] | None = None, only: set[int] | None = None) -> None:
        import threading

        self.root, self.exclude, self.only = root, exclude or set(), only
        self._stop = threading.Event()
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self, *, first_pass: bool) -> None:
        pids = self.only if self.only is not None else ({self.root} | descendants(self.root)) - self.exclude
        for pid in pids:
            if (st := _proc_stat(pid)) is not None:
                # a process first seen after the start was born during the pass: count all its CPU
                self._first.setdefault(pid, st[1] if first_pass else 0.0)
                self._last[pid] = st[1]

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._sample(first_pass=False)

    def __enter__(self) -> CpuMeter:
        self._sample(first_pass=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample(first_pass=False)

    @property
    def seconds(self) -> float:
        return sum(self._last[p] - self._first[p] for p in self._last)

    def by_kind(self) -> dict[str, float]:
        """CPU seconds per kind of process: this one, decode workers, each Ray daemon, ..."""
        out: dict[str, float] = {}
        for pid in self._last:
            kind = "this process" if pid == self.root else _kind(pid)
            out[kind] = out.get(kind, 0.0) + self._last[pid] - self._first[pid]
        return out


_KINDS: dict[int, str] = {}


def _kind(pid: int) -> str:
    if pid not in _KINDS:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            return "exited"
        head = argv[0].decode(errors="replace")
        if head.startswith("ray::"):  # a Ray worker's process title: ray::<task or actor>
            kind = "Ray workers (decode tasks, idle)" if ("MapBatches" in head or "IDLE" in head) else head
        else:
            script = next((a.decode() for a in argv[1:] if a.endswith(b".py")), head)
            kind = os.path.basename(script)
        _KINDS[pid] = kind
    return _KINDS[pid]


def count_pass(batches) -> tuple[int, float]:
    """Consume one pass; returns (images, seconds until the first batch)."""
    t0 = time.perf_counter()
    n, first = 0, None
    for b in batches:
        if first is None:
            first = time.perf_counter() - t0
        n += len(b["image_id"])
    return n, first or 0.0


def single_pass(files: list[str], kwargs: dict, args: argparse.Namespace):
    return lambda: count_pass(iter_augmented(files, kwargs, args.map_batch_size))


def torchvision_pass(files: list[str], args: argparse.Namespace):
    """The same training augmentation with torchvision.transforms.v2 on tv_tensors, one image at a time, in
    this process: decode (same decoder) -> [RandomIoUCrop] -> [RandomZoomOut] -> RandomShortestSize ->
    [ColorJitter] -> flip -> SanitizeBoundingBoxes, each [] with the probability of --augment-config; the
    image handed on as a contiguous (h, w, 3) uint8 array, as ours."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    from ray_retina.config import load_config
    from ray_retina.data.augment import READ_COLUMNS, _as_array
    from ray_retina.data.decode import decode_image
    from ray_retina.data.formats.coco import xywh_to_xyxy

    torch.set_num_threads(1)  # one core, as a decode task
    a = load_config(args.augment_config).data.augment
    p, c, z = a.photometric, a.crop, a.zoom_out
    lo, hi = args.train_min_size
    transform = v2.Compose(
        [
            v2.RandomApply([v2.RandomIoUCrop(min_scale=c.min_scale)], p=c.prob),
            v2.RandomZoomOut(
                fill={tv_tensors.Image: tuple(z.fill), "others": 0}, side_range=(1.0, z.max_ratio), p=z.prob
            ),
            v2.RandomShortestSize(min_size=list(range(lo, hi + 1)), max_size=args.max_size),
            v2.RandomApply(
                [
                    v2.ColorJitter(
                        brightness=p.brightness, contrast=p.contrast, saturation=p.saturation, hue=p.hue
                    )
                ],
                p=p.prob,
            ),
            v2.RandomHorizontalFlip(0.5),
            v2.SanitizeBoundingBoxes(),
        ]
    )

    def batches():
        for path in files:
            for rb in pq.ParquetFile(path).iter_batches(batch_size=args.map_batch_size, columns=READ_COLUMNS):
                rows = {k: rb.column(k).to_numpy(zero_copy_only=False) for k in READ_COLUMNS}
                out = []
                for i in range(len(rows["image_id"])):
                    img = torch.from_numpy(decode_image(bytes(rows["image"][i]))).permute(2, 0, 1)
                    boxes = xywh_to_xyxy(_as_array(rows["bbox"][i], np.float32).reshape(-1, 4))
                    sample = {
                        "image": tv_tensors.Image(img),
                        "boxes": tv_tensors.BoundingBoxes(
                            torch.from_numpy(boxes), format="XYXY", canvas_size=tuple(img.shape[1:])
                        ),
                        "labels": torch.tensor(_as_array(rows["category_id"][i], np.int64).reshape(-1)),
                    }
                    t = transform(sample)
                    out.append(t["image"].permute(1, 2, 0).contiguous().numpy())
                yield {"image_id": rows["image_id"][: len(out)], "image": out}

    return lambda: count_pass(batches())


def photometric_timing(repeats: int = 15) -> dict[str, float]:
    """ms per (800, 1067) image: our colour jitter (one Pillow colour-matrix pass + a histogram for the
    contrast's mean) vs torchvision v2's four adjust_* (ColorJitter), one thread, the same factors."""
    import numpy as np
    import torch
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    from ray_retina.data.augment import photometric

    torch.set_num_threads(1)
    yy, xx = np.mgrid[0:800, 0:1067]
    img = np.stack([128 + 90 * np.sin(xx / (9 + 4 * k) + yy / (13 + k)) for k in range(3)], 2)
    img = img.astype(np.uint8)
    t = torch.from_numpy(img).permute(2, 0, 1)
    b, c, s, h = 1.2, 0.8, 1.3, 0.05

    def tv_all():
        x = F.adjust_hue(F.adjust_saturation(F.adjust_contrast(F.adjust_brightness(t, b), c), s), h)
        return x.permute(1, 2, 0).contiguous()

    def tv_no_hue():
        return F.adjust_saturation(F.adjust_contrast(F.adjust_brightness(t, b), c), s)

    cases = {
        "ours, all four": lambda: photometric(img, brightness=b, contrast=c, saturation=s, hue=h),
        "torchvision v2, all four": tv_all,
        "torchvision v2, without hue": tv_no_hue,
        "for scale: Pillow bilinear resize 1067x800 -> 1200x900": lambda: Image.fromarray(img).resize(
            (1200, 900), Image.BILINEAR
        ),
    }
    out = {}
    for name, fn in cases.items():
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = 1000 * statistics.median(times)
    return out


def dataloader_pass(files: list[str], kwargs: dict, args: argparse.Namespace):
    import torch
    from torch.utils.data import DataLoader, IterableDataset, get_worker_info

    class Shards(IterableDataset):
        def __iter__(self):
            info = get_worker_info()
            mine = files if info is None else files[info.id :: info.num_workers]
            # numpy batches cross to the main process pickled through a pipe: for images of this size
            # that is faster here than torch tensors through shared memory (one shm file per tensor)
            yield from iter_augmented(mine, kwargs, args.map_batch_size)

    torch.set_num_threads(1)
    loader = DataLoader(
        Shards(), batch_size=None, num_workers=args.cpus, persistent_workers=True, prefetch_factor=4
    )

    def run():
        out = count_pass(loader)
        _LOADER_PIDS.update(w.pid for w in loader._iterator._workers)  # persistent: alive between passes
        return out

    return run


_LOADER_PIDS: set[int] = set()


def ray_pass(shards: Path, args: argparse.Namespace, reader: str, augment: bool = False):
    import ray

    from ray_retina.data.datasets import build_dataset

    if not ray.is_initialized():
        env = {"RAY_RETINA_NO_SIMPLEJPEG": "1"} if args.no_simplejpeg else {}
        ray.init(
            address="local",
            num_cpus=args.cpus,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": env},
        )
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
    ds = build_dataset(shards, _data_cfg(args, augment), train=True, seed=0, reader=reader)
    return lambda: count_pass(ds.iter_batches(batch_size=None))


def main() -> None:
    args = _args()
    if args.no_simplejpeg:
        os.environ["RAY_RETINA_NO_SIMPLEJPEG"] = "1"
    from ray_retina.data.decode import _use_simplejpeg
    from ray_retina.data.shards import shard_files

    shards = _prepare(args)
    files = shard_files(shards)
    kwargs = _kwargs(args, shards)
    aug_kwargs = _kwargs(args, shards, augment=True)
    decoder = "simplejpeg" if _use_simplejpeg() else "Pillow"
    print(
        f"{args.images} images {args.image_size[0]}-{args.image_size[1]} px in {len(files)} shards, "
        f"shorter side {args.train_min_size}, max {args.max_size}, decoder {decoder}, {os.cpu_count()} cores here, "
        f"load average {os.getloadavg()[0]:.1f}",
        file=sys.stderr,
    )
    augment = {k: v for k, v in aug_kwargs.items() if k in ("photometric", "crop", "zoom_out")}
    print(f"augmentation on: {augment} (from {args.augment_config})", file=sys.stderr)
    photo_ms = photometric_timing() if args.compare_torchvision else None

    ray_name = f"Ray Data, {args.cpus} CPUs"
    passes = {
        "single process": single_pass(files, kwargs, args),
        f"torch DataLoader, {args.cpus} workers": dataloader_pass(files, kwargs, args),
        ray_name: ray_pass(shards, args, "row_groups"),
        "single process, augmentation on": single_pass(files, aug_kwargs, args),
        f"{ray_name}, augmentation on": ray_pass(shards, args, "row_groups", augment=True),
    }
    if args.compare_torchvision:
        passes["single process, augmentation on, torchvision v2"] = torchvision_pass(files, args)
    if (
        args.map_num_cpus != 1.0
    ):  # one task per CPU: the executor's polling leaves the CPUs idle between tasks
        one = argparse.Namespace(**{**vars(args), "map_num_cpus": 1.0})
        passes[f"Ray Data, {args.cpus} CPUs, 1 CPU per task"] = ray_pass(shards, one, "row_groups")
    if args.compare_readers:
        passes[f"Ray Data read_parquet, {args.cpus} CPUs"] = ray_pass(shards, args, "read_parquet")
    # Interleaved rounds (a, b, c, a, b, c, ...) after one warm-up pass each, so that a change in the
    # machine's load hits all three alike.
    for run in passes.values():
        run()
    # CPU seconds of the processes doing each variant's work (this process included): the cost per
    # image, which other processes' load on a shared machine changes far less than the wall clock.
    # The DataLoader's workers and Ray's processes are all children of this one: the single process is
    # measured on itself, the DataLoader on itself + its workers, Ray on itself + all other descendants
    # (Ray's own processes included), also those Ray starts during the pass.
    me = os.getpid()
    results = {name: {"runs": [], "first_batch_s": [], "cpu_ms_per_image": []} for name in passes}
    for _ in range(args.repeats):
        for name, run in passes.items():
            if "DataLoader" in name:
                meter = CpuMeter(me, only={me} | _LOADER_PIDS)
            elif "Ray" in name:
                meter = CpuMeter(me, exclude=set(_LOADER_PIDS))
            else:
                meter = CpuMeter(me, only={me})
            with meter:
                t0 = time.perf_counter()
                n, first = run()
                wall = time.perf_counter() - t0
            cpu = meter.seconds
            if "Ray" in name:
                for kind, sec in meter.by_kind().items():
                    kinds = results[name].setdefault("cpu_ms_per_image_by_process", {})
                    kinds.setdefault(kind, []).append(1000 * sec / n)
            results[name]["runs"].append(n / wall)
            results[name]["first_batch_s"].append(first)
            results[name]["cpu_ms_per_image"].append(1000 * cpu / n)
    for name, r in results.items():
        r["images_per_s"] = statistics.median(r["runs"])
        r["cpu_ms"] = statistics.median(r["cpu_ms_per_image"])
        print(
            f"  {name:<34} {r['images_per_s']:7.1f} images/s  (runs: {', '.join(f'{x:.1f}' for x in r['runs'])}; "
            f"first batch after {statistics.median(r['first_batch_s']):.2f} s; {r['cpu_ms']:.1f} CPU ms/image)",
            file=sys.stderr,
        )

    for name, r in results.items():
        if "cpu_ms_per_image_by_process" in r:
            parts = {k: statistics.median(v) for k, v in r["cpu_ms_per_image_by_process"].items()}
            r["cpu_ms_by_process"] = parts
            print(
                f"  {name}, CPU ms / image by process: "
                + ", ".join(
                    f"{k} {v:.2f}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]) if v >= 0.05
                ),
                file=sys.stderr,
            )
    single, loader, ray_ = (r["images_per_s"] for r in list(results.values())[:3])
    ratios = {
        "ray_vs_dataloader": ray_ / loader,
        "ray_vs_single": ray_ / single,
        "dataloader_vs_single": loader / single,
        "single_augment_on_vs_off": results["single process, augmentation on"]["images_per_s"] / single,
        "ray_augment_on_vs_off": results[f"{ray_name}, augmentation on"]["images_per_s"] / ray_,
    }
    if args.compare_torchvision:
        ours, tv = (
            results[f"single process, augmentation on{x}"]["images_per_s"] for x in ("", ", torchvision v2")
        )
        ratios["ours_vs_torchvision_augment_on"] = ours / tv
    print("\n| pipeline | images/s | vs single process | CPU ms / image | images/s per busy core |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        print(
            f"| {name} | {r['images_per_s']:.1f} | {r['images_per_s'] / single:.2f}x | {r['cpu_ms']:.1f} | "
            f"{1000 / r['cpu_ms']:.1f} |"
        )
    ok_loader, ok_single = ratios["ray_vs_dataloader"] >= 0.8, ratios["ray_vs_single"] >= 1.6
    print(
        f"\naugmentation on / off: single process {ratios['single_augment_on_vs_off']:.2f}x, "
        f"Ray Data {ratios['ray_augment_on_vs_off']:.2f}x"
    )
    if args.compare_torchvision:
        print(
            f"ours / torchvision v2, augmentation on, single process: {ratios['ours_vs_torchvision_augment_on']:.2f}x"
        )
        print(
            "colour jitter alone, ms per (800, 1067) image, 1 thread: "
            + "; ".join(f"{k} {v:.1f}" for k, v in photo_ms.items())
        )
    print(
        f"Ray Data / DataLoader = {ratios['ray_vs_dataloader']:.2f}x (target >= 0.8: {'met' if ok_loader else 'MISSED'}); "
        f"Ray Data / single = {ratios['ray_vs_single']:.2f}x (target >= 1.6: {'met' if ok_single else 'MISSED'})"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "args": vars(args),
                    "decoder": decoder,
                    "results": results,
                    "ratios": ratios,
                    "augment": augment,
                    "photometric_ms": photo_ms,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    with recorded_run("data_pipeline"):  # the table and the environment to benchmarks/results/
        main()
