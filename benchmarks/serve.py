"""Serving: `mlflow models serve` against `ray-retina serve` (Ray Serve, @serve.batch), same model, same images.

    .venv/bin/python benchmarks/serve.py [--clients 1 4 16] [--requests 48] [--max-seconds 30] [--repeats 3]

One model (a ResNet-18 RetinaNet at test size 384 / max 512, untrained, prior 0.05: every answer carries 100
boxes, the detections_per_img cap, as large a JSON as a busy photo's) exported as the MLflow model and
served twice on 127.0.0.1: `mlflow models serve --env-manager local` (its default, one worker) and Ray Serve
(one replica with the same 2 CPUs, batches of up to 8 images, 20 ms wait). Closed loop: C clients, each sending
its next request (one 640 x 480 JPEG, the MLflow JSON of /invocations, identical bytes to both servers) when
its last answer arrives, until --requests requests or --max-seconds. The two servers take turns at every C and
every repeat (the same machine load for both sides); the table gives the medians over repeats of images/s,
p50 and p99 latency. Detections are checked equal on both servers before timing.

Then the abuse load (the served model bounds its work): 8 clients x 25 requests against each server, every
tenth request oversized (a 121-megapixel PNG header, or 17 images where serve.max_images is 16): the count of
5xx (must be 0), of oversized requests refused with a 400 naming the limit (must be all), and p50/p99 of the
rest. Results: stdout and benchmarks/results/serve-<UTC time>.{md,json}.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import load_average, recorded_run
from PIL import Image, ImageDraw

from ray_retina.config import Config, apply_overrides
from ray_retina.engine.loop import Engine
from ray_retina.export import save_pyfunc
from ray_retina.model import build_criterion, build_model, build_postprocessor

CAT_IDS = [1, 2, 3]
NAMES = ["rectangle", "ellipse", "triangle"]
MODEL = {
    "model.backbone": "resnet18",
    "model.backbone_weights": None,
    "model.fpn_channels": 128,
    "model.head_convs": 2,
    "model.prior": 0.05,
    "model.frozen_bn": False,
    "model.freeze_at": 0,
    "data.test_min_size": 384,
    "data.max_size": 512,
}
RAY_SERVE = ["serve.max_batch_size=8", "serve.num_cpus=2"]


def make_checkpoint(out: Path) -> Path:
    cfg = apply_overrides(Config(), MODEL)
    torch.manual_seed(0)
    model = build_model(cfg, len(CAT_IDS))
    engine = Engine(
        cfg, model, build_criterion(cfg, len(CAT_IDS)), build_postprocessor(cfg), torch.device("cpu"), CAT_IDS
    )
    d = out / "run" / "checkpoint_0000001"
    d.mkdir(parents=True)
    state = {**engine.state_dict(), "cat_names": NAMES}
    torch.save(state, d / "checkpoint.pt")
    return d / "checkpoint.pt"


def make_images(n: int = 8) -> list[bytes]:
    """``n`` 640 x 480 JPEGs (quality 90) of coloured shapes on a noisy background."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        px = rng.integers(60, 200, (480, 640, 3), dtype=np.uint8)
        im = Image.fromarray(px)
        draw = ImageDraw.Draw(im)
        for _ in range(6):
            x, y = int(rng.integers(0, 560)), int(rng.integers(0, 400))
            w, h = int(rng.integers(30, 200)), int(rng.integers(30, 200))
            colour = tuple(int(c) for c in rng.integers(0, 255, 3))
            (draw.rectangle if rng.random() < 0.5 else draw.ellipse)((x, y, x + w, y + h), fill=colour)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def bomb_png(width: int = 11000, height: int = 11000) -> bytes:
    """A ~100-byte PNG whose header claims width x height (its pixel data cut short)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)[:-4]
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def body(images: list[bytes]) -> bytes:
    data = [[base64.b64encode(b).decode()] for b in images]
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": data}}).encode()


def post(url: str, data: bytes, timeout: float = 120) -> tuple[int, bytes, float]:
    """(status, body, seconds) of a POST to /invocations."""
    req = urllib.request.Request(
        f"{url}/invocations", data=data, headers={"Content-Type": "application/json"}
    )
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), time.perf_counter() - t0
    except urllib.error.HTTPError as err:
        return err.code, err.read(), time.perf_counter() - t0


def closed_loop(url: str, bodies: list[bytes], clients: int, requests: int, max_s: float) -> dict[str, float]:
    """C clients in a closed loop until ``requests`` answered or ``max_s`` passed: images/s, p50, p99 (s)."""
    lat: list[float] = []
    lock = threading.Lock()
    count = [0]
    t_end = time.perf_counter() + max_s

    def client(k: int) -> None:
        i = k
        while time.perf_counter() < t_end:
            with lock:
                if count[0] >= requests:
                    return
                count[0] += 1
            status, _, dt = post(url, bodies[i % len(bodies)])
            if status != 200:
                raise RuntimeError(f"{url}: HTTP {status}")
            with lock:
                lat.append(dt)
            i += clients

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - t0
    return {
        "images_per_s": len(lat) / wall,
        "p50": float(np.percentile(lat, 50)),
        "p99": float(np.percentile(lat, 99)),
        "n": len(lat),
    }


def abuse(url: str, images: list[bytes], clients: int = 8, per_client: int = 25) -> dict[str, Any]:
    """8 x 25 requests, every tenth oversized (alternately pixels and images per request)."""
    ok_body = [body([b]) for b in images]
    oversized = {"pixels": body([images[0], bomb_png()]), "images": body(images[:1] * 17)}

    def one(i: int) -> tuple[str, int, bytes, float]:
        kind = ("pixels" if (i // 10) % 2 == 0 else "images") if i % 10 == 9 else "ok"
        return (kind, *post(url, oversized.get(kind) or ok_body[i % len(ok_body)]))

    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(clients * per_client)))
    ok = [dt for kind, status, _, dt in results if kind == "ok" and status == 200]
    over = [(kind, status, text) for kind, status, text, _ in results if kind != "ok"]
    return {
        "requests": len(results),
        "5xx": sum(status >= 500 for _, status, _, _ in results),
        "ok_200": len(ok),
        "oversized": len(over),
        "oversized_refused_400": sum(s == 400 and f"serve.max_{k}".encode() in t for k, s, t in over),
        "p50": float(np.percentile(ok, 50)),
        "p99": float(np.percentile(ok, 99)),
    }


def wait_http(url: str, proc: subprocess.Popen | None, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{url}: the server exited") from None
            time.sleep(1)
    raise RuntimeError(f"{url} did not answer in {timeout_s} s")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def same_detections(a: bytes, b: bytes) -> None:
    pa, pb = json.loads(a)["predictions"], json.loads(b)["predictions"]
    assert [r["category_id"] for r in pa] == [r["category_id"] for r in pb], "different detections"
    np.testing.assert_allclose([r["score"] for r in pa], [r["score"] for r in pb], atol=1e-4)
    np.testing.assert_allclose(
        [[r["x1"], r["y1"], r["x2"], r["y2"]] for r in pa],
        [[r["x1"], r["y1"], r["x2"], r["y2"]] for r in pb],
        atol=1e-2,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=48, help="requests per (server, clients, repeat)")
    ap.add_argument("--max-seconds", type=float, default=30.0, help="and at most this long")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-abuse", action="store_true", help="skip the 8 x 25 abuse load")
    ap.add_argument("--batch-wait", type=float, default=0.02, help="Ray Serve's serve.batch_wait_timeout_s")
    args = ap.parse_args()

    import ray
    from ray import serve

    from ray_retina.serve import batch_sizes, run

    tmp = Path(tempfile.mkdtemp(prefix="serve_bench_"))
    ckpt = make_checkpoint(tmp)
    model_dir = save_pyfunc(torch.load(ckpt, weights_only=True), tmp / "model")
    images = make_images()
    bodies = [body([b]) for b in images]

    mlflow_port, ray_port = free_port(), free_port()
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    with open(tmp / "mlflow_serve.log", "w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "models",
                "serve",
                "-m",
                str(model_dir),
                "--env-manager",
                "local",
            ]
            + ["-h", "127.0.0.1", "-p", str(mlflow_port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    servers = {"mlflow models serve": f"http://127.0.0.1:{mlflow_port}"}
    try:
        # The shared machine's other jobs fill its memory: Ray's memory monitor would kill this benchmark's
        # Serve actors for memory they do not use (the whole node's usage decides), so it is off here.
        os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
        ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
        servers["Ray Serve (batch 8)"] = run(
            str(ckpt.parent.parent),
            overrides=[*RAY_SERVE, f"serve.batch_wait_timeout_s={args.batch_wait}", f"serve.port={ray_port}"],
            blocking=False,
        )
        wait_http(f"http://127.0.0.1:{mlflow_port}/ping", proc, 300)
        answers = {name: post(url, bodies[0])[1] for name, url in servers.items()}
        same_detections(*answers.values())
        dets = len(json.loads(answers["mlflow models serve"])["predictions"])
        for url in servers.values():  # warm-up
            closed_loop(url, bodies, 4, 8, 60)

        with recorded_run("serve") as rec:
            print(f"{load_average()} at start; model {MODEL}; {dets} detections in the first image's answer")
            runs: dict[tuple[str, int], list[dict[str, float]]] = {}
            for _ in range(args.repeats):
                for c in args.clients:
                    for name, url in servers.items():
                        runs.setdefault((name, c), []).append(
                            closed_loop(url, bodies, c, max(args.requests, 2 * c), args.max_seconds)
                        )
            print(
                f"{load_average()} at end; medians of {args.repeats} repeats, one 640 x 480 JPEG per request; "
                f"Ray Serve batch wait {args.batch_wait} s"
            )
            print(f"{'server':<22} {'clients':>7} {'images/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
            rows = []
            for (name, c), rs in runs.items():
                med = {k: statistics.median(r[k] for r in rs) for k in ("images_per_s", "p50", "p99")}
                rows.append({"server": name, "clients": c, **med, "repeats": rs})
                print(
                    f"{name:<22} {c:>7} {med['images_per_s']:>9.2f} {1e3 * med['p50']:>8.0f} {1e3 * med['p99']:>8.0f}"
                )
            names = list(servers)
            for c in args.clients:
                a, b = (next(r for r in rows if r["server"] == n and r["clients"] == c) for n in names)
                print(
                    f"Ray Serve / mlflow at {c:>2} clients: images/s x{b['images_per_s'] / a['images_per_s']:.2f}, "
                    f"p99 x{b['p99'] / a['p99']:.2f}"
                )
            hist = batch_sizes(servers[names[1]])
            print(f"Ray Serve batch sizes formed (size: count): {hist}")
            rec.update(
                rows=rows, batch_sizes=hist, model=MODEL, ray_serve=RAY_SERVE, batch_wait=args.batch_wait
            )
            if not args.no_abuse:
                print("abuse load: 8 clients x 25 requests, every tenth oversized")
                rec["abuse"] = {}
                for name, url in servers.items():
                    res = abuse(url, images)
                    rec["abuse"][name] = res
                    print(
                        f"{name:<22} 5xx {res['5xx']}, oversized refused (400 naming the limit) "
                        f"{res['oversized_refused_400']}/{res['oversized']}, ok {res['ok_200']}, "
                        f"p50 {1e3 * res['p50']:.0f} ms, p99 {1e3 * res['p99']:.0f} ms"
                    )
    finally:
        serve.shutdown()
        ray.shutdown()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


if __name__ == "__main__":
    main()
