"""Two real `ray-retina prepare` processes racing on one output folder: exactly one succeeds, the other
exits with one line naming the conflict, and the folder holds one complete shard set of the winner's
source (no shard of the loser under the winner's manifest)."""

from __future__ import annotations

import json
import subprocess
import sys

from ray_retina.data.shards import read_manifest, read_shards_table
from ray_retina.data.synthetic import make_synthetic_coco


def test_two_prepares_racing_on_one_folder_cannot_both_succeed(tmp_path):
    sets = {name: make_synthetic_coco(tmp_path / name, 60, 0, seed=i) for i, name in enumerate(("a", "b"))}
    out = tmp_path / "shards"
    procs = {
        name: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ray_retina.cli",
                "prepare",
                "--annotations",
                str(p.train_annotations),
                "--images",
                str(p.train_images),
                "--out",
                str(out),
                "--no-ray",
                "--rows-per-shard",
                "4",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, p in sets.items()
    }
    results = {name: (p.wait(timeout=120), p.stderr.read()) for name, p in procs.items()}
    winners = [name for name, (rc, _) in results.items() if rc == 0]
    assert len(winners) == 1, results
    (loser,) = set(results) - set(winners)
    rc, err = results[loser]
    last = err.strip().splitlines()[-1]
    assert rc == 1 and last.startswith("error: ") and "Traceback" not in err
    assert "another prepare is writing" in last or "holds the shards of another source" in last

    winner = sets[winners[0]]
    manifest = read_manifest(out)
    assert manifest["source"]["annotations"] == str(winner.train_annotations)
    expected = json.loads(winner.train_annotations.read_text())["images"]
    rows = read_shards_table(out, ["image_id", "file_name"]).to_pylist()
    assert [(r["image_id"], r["file_name"]) for r in rows] == [(i["id"], i["file_name"]) for i in expected]
    for r, image in zip(read_shards_table(out, ["image"]).to_pylist(), expected, strict=True):
        assert r["image"] == (winner.train_images / image["file_name"]).read_bytes()
