"""ray-retina: RetinaNet with focal loss on Ray Train / Tune / Data, tracked in MLflow."""

import os

# MLflow >= 3 starts a usage-telemetry client on import. Off here unless the user sets the variable: its
# background thread sets and unsets an environment variable while requests reads os.environ, which failed
# a trial's `log_batch` with KeyError('_MLFLOW_TELEMETRY_SESSION_ID') in an 8-trial sweep; and cluster nodes
# often have no route to the internet. Every Ray worker of ours imports this package before mlflow.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

__version__ = "0.1.0"
