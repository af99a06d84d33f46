"""ray-retina: RetinaNet with focal loss on Ray Train / Tune / Data, tracked in MLflow."""
__version__ = "0.1.0"
