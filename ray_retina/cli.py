"""`ray-retina` console script: synth, prepare, train, tune, eval, predict, export, serve.

``ray-retina train`` with no arguments runs the CPU demo (configs/smoke.yaml): synthetic COCO set, shards,
2 Ray Train workers, COCO AP, MLflow.

Each command imports the modules it runs (torch, Ray, MLflow behind them) inside its own function: ``--help``
and a mistyped argument answer at once, and ``synth`` / ``prepare`` never load the training stack.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ray_retina.config import ConfigError, TTASection, apply_overrides, load_config, to_yaml

DEFAULT_TRAIN_CONFIG = "configs/smoke.yaml"
DEFAULT_TUNE_CONFIG = "configs/tune_focal.yaml"


def _config_path(path: str | None, default: str) -> Path:
    """The config file: as given, else the default relative to the working directory or the repository."""
    if path:
        return Path(path)
    here = Path(default)
    if here.exists():
        return here
    repo = Path(__file__).resolve().parent.parent / default
    return repo if repo.exists() else here


def _add_config_args(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--config", "-c", default=None, help=f"YAML config (default: {default})")
    p.add_argument(
        "--set",
        "-s",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override dotted config keys, e.g. --set optim.lr=0.02 loss.gamma=1 (each validated)",
    )
    p.add_argument("--verbose", "-v", action="store_true", help="Ray's own progress bars and tracebacks")
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (_base_ chain and --set applied) as YAML and exit",
    )


def _print_config(cfg) -> int:  # noqa: ANN001
    from ray_retina.tracking import redact

    print(redact(to_yaml(cfg)), end="")  # credentials in URIs shown as ***
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from ray_retina.data.synthetic import make_synthetic_coco

    make_synthetic_coco(Path(args.out), args.train, args.val, args.seed)
    print(f"wrote {args.train} train + {args.val} val images and COCO json to {args.out}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from ray_retina.data.shards import PrepareConflict, prepare_dataset

    need = ("annotations", "images") if args.format == "coco" else ("root",)
    if missing := [f"--{n}" for n in need if getattr(args, n) is None]:
        args.error(f"--format {args.format} needs {' and '.join(missing)}")
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    try:
        manifests = prepare_dataset(
            args.out,
            format=args.format,
            annotations=args.annotations,
            images=args.images,
            root=args.root,
            data=args.data,
            classes=classes,
            val_fraction=args.val_fraction,
            seed=args.seed,
            splits=args.split,
            rows_per_shard=args.rows_per_shard,
            use_ray=not args.no_ray,
            verify_images=args.verify_images,
            overwrite=args.overwrite,
            split_overlap=args.split_overlap,
        )
    except ValueError as err:  # options that do not fit the source, or a broken data set: one line
        args.error(str(err))
    except (PrepareConflict, OSError) as err:  # another writer, a full disk: one line naming the folder
        if getattr(args, "verbose", False) or isinstance(err, FileNotFoundError):
            raise
        print(f"error: {_one_line(err) if isinstance(err, OSError) else err}", file=sys.stderr)
        return 1
    for out, manifest in manifests.items():  # prepare_shards printed each set's validation summary
        print(
            f"wrote {manifest['num_images']} images / {manifest['num_annotations']} annotations in "
            f"{manifest['num_shards']} shards to {out}"
        )
    return 0


def _print_summary(outcome, cfg) -> None:  # noqa: ANN001
    from ray_retina.engine.evaluate import STAT_NAMES, format_stats

    stats = {k: outcome.metrics[f"val/{k}"] for k in STAT_NAMES if f"val/{k}" in outcome.metrics}
    print("\n" + "=" * 60)
    print(
        f"ray-retina run {outcome.run_name}: {cfg.optim.max_iters} iterations, "
        f"{cfg.scaling.num_workers} workers, {outcome.seconds:.0f} s"
    )
    if stats:
        print(f"COCO box AP on {int(outcome.metrics.get('val/num_images', 0))} val images:")
        print(format_stats(stats))
    if outcome.checkpoint_path:
        print(f"checkpoint: {outcome.checkpoint_path}")
    if outcome.mlflow_run_id:
        print(f"MLflow run: {outcome.mlflow_run_id} (experiment '{cfg.tracking.experiment or cfg.name}')")
        from ray_retina.tracking import redact

        uri = redact(outcome.mlflow_uri or "")
        print(f"open the UI:  mlflow ui --backend-store-uri {uri} --port 5000   then http://127.0.0.1:5000")
    if outcome.tracking_summary:
        print(outcome.tracking_summary)
    print("=" * 60)


def cmd_train(args: argparse.Namespace) -> int:
    from ray_retina.engine.trainer import train

    cfg = load_config(_config_path(args.config, DEFAULT_TRAIN_CONFIG), args.overrides)
    if args.print_config:
        return _print_config(cfg)
    if args.resume:
        cfg = apply_overrides(cfg, {"run.name": args.resume})
    outcome = train(cfg, resume=bool(args.resume), verbose=args.verbose)
    _print_summary(outcome, cfg)
    if outcome.error is not None:
        print(f"training failed: {outcome.error}", file=sys.stderr)
        return 1
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from ray_retina.sweep.run import run_sweep

    overrides = list(args.overrides or [])
    if args.noise_repeats is not None:
        overrides.append(f"tune.noise_repeats={args.noise_repeats}")
    cfg = load_config(_config_path(args.config, DEFAULT_TUNE_CONFIG), overrides)
    if args.print_config:
        return _print_config(cfg)
    summary = run_sweep(
        cfg, preset=args.preset, resume=args.resume, sweep_name=args.name, verbose=args.verbose
    )
    print(summary.table)
    print(f"\nsweep directory: {summary.path}  (resume an interrupted sweep with --resume {summary.path})")
    if summary.parent_run_id:
        print(
            f"MLflow parent run: {summary.parent_run_id}: select its child runs in the UI and press Compare"
        )
    return 0 if summary.num_errors == 0 else 1


def _add_tta_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tta",
        action="store_true",
        help="test-time augmentation: horizontal flip (and --tta-scales), merged before one NMS "
        "(default: the checkpoint config's eval.tta)",
    )
    p.add_argument(
        "--tta-scales",
        type=float,
        nargs="+",
        default=[1.0],
        metavar="S",
        help="with --tta: factors of the test size to run (default 1.0)",
    )


def _tta_arg(args: argparse.Namespace):  # noqa: ANN202 - a TTASection, imported lazily with the config

    return TTASection(enabled=True, flip=True, scales=args.tta_scales) if args.tta else None


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from ray_retina.data.shards import read_manifest
    from ray_retina.engine.evaluate import evaluate_checkpoint, format_per_class, format_stats, names_by_id

    result = evaluate_checkpoint(
        args.checkpoint,
        args.shards,
        device=torch.device(args.device),
        backend=args.backend,
        plots_dir=args.plots,
        max_images=args.max_images,
        tta=_tta_arg(args),
    )
    stats = result.metrics
    print(
        f"COCO box AP on {int(stats['num_images'])} images of {args.shards}"
        + (
            f" ({int(stats['skipped_images'])} did not decode: counted with no detections)"
            if stats["skipped_images"]
            else ""
        )
    )
    print(format_stats(stats))
    print()
    print(format_per_class(result.per_class, names_by_id(read_manifest(args.shards)["categories"])))
    print(
        f"F1: best F1 at IoU 0.5; thr F1: its score threshold; thr P: the lowest reaching precision "
        f"{result.thresholds['precision_target']:g}"
    )
    if args.plots:
        print(
            f"plots: {args.plots}/pr_curves.png, detections.png, focal_loss_cdf.png, confusion_matrix.png, "
            "confidence_curves.png, error_gallery.png"
        )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from ray_retina.predict import predict

    summary = predict(
        args.checkpoint,
        args.input,
        args.out,
        score_thresh=args.score_thresh,
        batch_size=args.batch_size,
        num_actors=args.actors,
        use_gpu=args.gpu,
        draw=not args.no_draw,
        tta=_tta_arg(args),
        frame_stride=args.frame_stride,
        max_frames=args.max_frames,
    )
    print(f"predict: {summary.line()}" + ("" if args.no_draw else f"; drawn in {summary.out}"))
    return 0


def cmd_export(args: argparse.Namespace) -> int:

    from ray_retina.export import export

    if not args.verbose:  # MLflow's download bars while it checks the input example against the model
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if (args.run is None) == (args.sweep is None):
        args.error("give one of --run and --sweep")
    try:
        result = export(
            args.run,
            sweep=args.sweep,
            format=args.format,
            out=args.out,
            register=args.register,
            alias=args.alias,
            tracking_uri=args.tracking_uri,
            champion_rule=args.champion_rule,
            serve_overrides=args.overrides,
        )
    except ValueError as err:  # options that do not fit together, a sweep without a best trial: one line
        args.error(str(err))
    src = result.source
    if src.champion:
        print(src.champion)
    ap = src.metrics.get("val/AP")
    print(f"checkpoint: {src.checkpoint}" + (f"  (val/AP {ap:.4f})" if ap is not None else ""))
    for f in result.files:
        print(f"wrote {f}")
    if result.model_uri:
        print(f"MLflow model: {result.model_uri} (run {result.run_id})")
    if result.registered_name:
        ref = (
            f"models:/{result.registered_name}@{result.alias}"
            if result.alias
            else f"models:/{result.registered_name}/{result.registered_version}"
        )
        print(
            f"registered: {result.registered_name} version {result.registered_version}"
            + (f", alias @{result.alias}" if result.alias else "")
        )
        print(f"serve it:  mlflow models serve -m {ref} --env-manager local -h 127.0.0.1 -p 5001")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from ray_retina.serve import run

    run(args.model, tracking_uri=args.tracking_uri, overrides=args.overrides, num_cpus=args.num_cpus)
    return 0


def build_parser() -> argparse.ArgumentParser:
    # One piece: the whole command line in one table of subcommands and flags, as argparse declares it.
    ap = argparse.ArgumentParser(prog="ray-retina", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command")

    p = sub.add_parser("synth", help="write a synthetic data set in COCO format (JPEGs + instances_*.json)")
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=400)
    p.add_argument("--val", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser(
        "prepare",
        help="COCO json, Pascal VOC or YOLO tree -> Parquet shards + manifest",
        description="Writes one shard set in OUT, or OUT/<split> for each split: the source's own "
        "(VOC ImageSets/Main, YOLO images/train...) or train and val by --val-fraction.",
    )
    p.add_argument("--format", choices=["coco", "voc", "yolo"], default="coco")
    p.add_argument("--annotations", help="coco: the instances json")
    p.add_argument("--images", help="coco: folder of the images named in the json")
    p.add_argument(
        "--root", help="voc: folder with Annotations/ and JPEGImages/; yolo: folder with images/, labels/"
    )
    p.add_argument("--data", help="yolo: the dataset yaml with `names` (default ROOT/data.yaml)")
    p.add_argument(
        "--classes",
        metavar="A,B,C",
        help="class names, ids 1..K in this order (voc: default the "
        "sorted XML names, others dropped and counted; yolo: names of classes 0.. without a data.yaml)",
    )
    p.add_argument(
        "--val-fraction", type=float, help="split a source without splits: OUT/val gets this fraction"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the --val-fraction split")
    p.add_argument("--split", action="append", help="write only this split (repeatable)")
    p.add_argument("--out", required=True, help="output folder (local path or URI)")
    p.add_argument("--rows-per-shard", type=int, default=256)
    p.add_argument("--no-ray", action="store_true", help="write shards in this process instead of Ray tasks")
    p.add_argument(
        "--verify-images",
        action="store_true",
        help="decode every image (default: only those whose header and end marker do not settle it)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace another source's shards in --out")
    p.add_argument(
        "--split-overlap",
        choices=["error", "first"],
        default="error",
        help="an image in two source splits: refuse (default), or keep it in the first split only, counted",
    )
    p.set_defaults(func=cmd_prepare, error=p.error)

    p = sub.add_parser("train", help="train with Ray Train (default: the CPU demo, configs/smoke.yaml)")
    _add_config_args(p, DEFAULT_TRAIN_CONFIG)
    p.add_argument(
        "--resume",
        metavar="RUN",
        default=None,
        help="resume the run of this name (same storage); without it a run.name that ran before is refused",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tune", help="ASHA sweep over the focal parameters with Ray Tune")
    _add_config_args(p, DEFAULT_TUNE_CONFIG)
    p.add_argument(
        "--preset",
        choices=["paper-table1"],
        default=None,
        help="paper-table1: gamma in {0,.1,.2,.5,1,2,5} with the paper's alpha for each, as a grid",
    )
    p.add_argument(
        "--resume", metavar="SWEEP_DIR", default=None, help="restore an interrupted sweep (Tuner.restore)"
    )
    p.add_argument("--name", default=None, help="sweep name (default: config name + time)")
    p.add_argument(
        "--noise-repeats",
        type=int,
        metavar="K",
        default=None,
        help="also train the base config K times with other seeds: the noise floor trials are ranked against "
        "(tune.noise_repeats)",
    )
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("eval", help="COCO AP of a checkpoint on val shards")
    p.add_argument(
        "--checkpoint", required=True, help="checkpoint dir, checkpoint.pt or a run dir (its best by val/AP)"
    )
    p.add_argument("--shards", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--backend",
        default=None,
        choices=["faster_coco_eval", "pycocotools"],
        help="COCO eval implementation (default: the checkpoint config's train.eval_backend)",
    )
    p.add_argument("--max-images", type=int, default=None, help="evaluate the first N images only")
    _add_tta_args(p)
    p.add_argument(
        "--plots", default=None, metavar="DIR", help="write PR curves, detections and Figure 4 here"
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="batch inference with Ray Data: COCO-results json + drawn images")
    p.add_argument(
        "--checkpoint", required=True, help="checkpoint dir, checkpoint.pt or a run dir (its best by val/AP)"
    )
    p.add_argument(
        "--input",
        required=True,
        help="a folder of images (every type prepare takes), a shard folder, or a video file (path or URI)",
    )
    p.add_argument("--out", required=True, help="output folder: a local path or a URI (s3://, gs://, ...)")
    p.add_argument("--score-thresh", type=float, default=0.3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--actors", type=int, default=1, help="model replicas (Ray Data actor pool)")
    p.add_argument("--gpu", action="store_true", help="one GPU per model replica")
    p.add_argument("--no-draw", action="store_true", help="json only: no drawn images or annotated video")
    _add_tta_args(p)
    p.add_argument("--frame-stride", type=int, default=1, help="video: run every N-th frame")
    p.add_argument("--max-frames", type=int, default=None, help="video: at most this many frames")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "export",
        help="the best checkpoint of a run or sweep as an MLflow model (registry), ONNX or TorchScript",
        description="Exports the run's best checkpoint by val/AP (a named checkpoint exactly). mlflow: a "
        "pyfunc model (encoded images in, detections out) logged to the run, optionally registered; "
        "onnx / torchscript: the network and a JSON of its anchor and post-process settings in --out.",
    )
    p.add_argument("--run", help="MLflow run id, Ray Train run dir, checkpoint dir or checkpoint.pt")
    p.add_argument(
        "--sweep", metavar="PARENT_RUN_ID", help="a sweep's MLflow parent run: export its best trial"
    )
    p.add_argument(
        "--champion-rule",
        choices=["best", "most-rounds", "paper-defaults"],
        default="best",
        help="--sweep: among the trials tied with the best within the noise floor, ship the best val/AP, the "
        "one with the most rounds, or the one closest to the paper's gamma 2, alpha 0.25, pi 0.01",
    )
    p.add_argument("--format", choices=["mlflow", "onnx", "torchscript"], default="mlflow")
    p.add_argument(
        "--out", default=None, help="output folder (onnx, torchscript: required; mlflow: also save it here)"
    )
    p.add_argument(
        "--register", metavar="NAME", default=None, help="register in the MLflow Model Registry as NAME"
    )
    p.add_argument("--alias", default=None, help="point this alias (e.g. champion) at the new version")
    p.add_argument(
        "--set",
        "-s",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="serve.KEY=VALUE",
        help="the served model's limits, e.g. --set serve.max_pixels=40000000 serve.max_images=8",
    )
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: for a path, the checkpoint "
        "config's tracking.tracking_uri; then MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    p.add_argument("--verbose", "-v", action="store_true", help="library logs and tracebacks")
    p.set_defaults(func=cmd_export, error=p.error)

    p = sub.add_parser("serve", help="serve a model with Ray Serve: batching across requests, replicas")
    p.add_argument(
        "model",
        help="models:/NAME@alias (or /VERSION), an MLflow run id, a run dir or a checkpoint (its best by val/AP)",
    )
    p.add_argument(
        "--set",
        "-s",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="serve.KEY=VALUE",
        help="override the model config's serve section, e.g. --set serve.max_batch_size=16 serve.port=8001",
    )
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking/registry URI (models:/ and run ids)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray started when none runs")
    p.add_argument("--verbose", "-v", action="store_true", help="library logs and tracebacks")
    p.set_defaults(func=cmd_serve)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command is None:  # `ray-retina` alone: the demo
        args = build_parser().parse_args(["train"])
    _configure_logging(getattr(args, "verbose", False))

    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        if getattr(args, "verbose", False):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as err:
        # A user error (a missing file, folder or shard set): one line that names it, no traceback.
        if getattr(args, "verbose", False):
            raise
        print(f"error: {_one_line(err)}  (--verbose shows the traceback)", file=sys.stderr)
        return 2


def _configure_logging(verbose: bool) -> None:
    """Our INFO lines; the libraries' (Ray, MLflow, alembic) warnings only, unless --verbose."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbose:
        return

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # mlflow sets its loggers' level on import
    for name in ("ray", "mlflow", "alembic", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _one_line(err: OSError) -> str:
    """An OSError as one line: our messages as they are; the OS's "[Errno 2] No such file..." with its path."""
    if err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror.lower()}"
    return " ".join(str(err).split())


if __name__ == "__main__":
    raise SystemExit(main())
