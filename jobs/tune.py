"""Entry point for `ray job submit`:

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \
        -- python jobs/tune.py --config configs/tune_focal.yaml
"""

import sys

from ray_retina.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
