"""Entry point for `ray job submit`:

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \
        -- python jobs/train.py --config configs/smoke.yaml --set optim.max_iters=100
"""

import sys

from ray_retina.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
