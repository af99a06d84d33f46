"""Entry point for `ray job submit`: COCO json + images -> Parquet shards (see `ray-retina prepare --help`)."""

import sys

from ray_retina.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
