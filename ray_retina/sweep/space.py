"""What a sweep searches: the Tune distributions of ``tune.search_space``, the paper's Table 1 preset, and how
one trial's sampled values become dotted config overrides and a readable label."""

from __future__ import annotations

import math
from typing import Any

import ray
from ray import tune
from ray.tune.search.basic_variant import BasicVariantGenerator

from ray_retina.config import Config, apply_overrides

# A searched key of the paper preset: one grid point is a [gamma, alpha] pair (the paper pairs each gamma
# with the alpha that suited it), expanded to loss.gamma and loss.alpha by `trial_overrides`.
FOCAL_PAIR = "focal_pair"

# Paper Table 1b (R50-FPN, 600 px, COCO minival): gamma with the best alpha for it, and the AP reached.
PAPER_TABLE1 = [
    # (gamma, alpha, AP)
    (0.0, 0.75, 31.1),
    (0.1, 0.75, 31.4),
    (0.2, 0.75, 31.9),
    (0.5, 0.50, 32.9),
    (1.0, 0.25, 33.7),
    (2.0, 0.25, 34.0),
    (5.0, 0.25, 32.2),
]
PRESETS = ("paper-table1",)

# Short names of the swept keys in trial labels (the paper's symbols, spelled out for every font).
LABEL_NAMES = {"loss.gamma": "gamma", "loss.alpha": "alpha", "model.prior": "pi", "optim.lr": "lr"}
FOCAL_KEYS = tuple(LABEL_NAMES)


def search_space(cfg: Config) -> dict[str, Any]:
    """Tune distributions from ``tune.search_space``: dotted key -> {type, low, high | values}."""
    space: dict[str, Any] = {}
    for key, spec in cfg.tune.search_space.items():
        kind = spec.get("type")
        if kind == "uniform":
            space[key] = tune.uniform(float(spec["low"]), float(spec["high"]))
        elif kind == "loguniform":
            space[key] = tune.loguniform(float(spec["low"]), float(spec["high"]))
        elif kind == "choice":
            space[key] = tune.choice(list(spec["values"]))
        elif kind == "grid":
            space[key] = tune.grid_search(list(spec["values"]))
        else:
            raise ValueError(
                f"tune.search_space.{key}: type must be uniform, loguniform, choice or grid, got {kind!r}"
            )
        probe = spec.get("low", (spec.get("values") or [None])[0])
        apply_overrides(cfg, {key: probe})  # fails now, naming the key, if the key is not a config key
    return space


def preset_space(preset: str) -> dict[str, Any]:
    """The search space of a preset. paper-table1: gamma with the alpha the paper pairs with it, as a grid."""
    if preset == "paper-table1":
        return {FOCAL_PAIR: tune.grid_search([[g, a] for g, a, _ in PAPER_TABLE1])}
    raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")


def noise_space(cfg: Config) -> dict[str, Any]:
    """The noise repeats' space: the base config with seeds ``seed .. seed + tune.noise_repeats - 1``, as a
    grid (every seed changes the initialisation, the data order and the augmentation draws)."""
    return {"seed": tune.grid_search([cfg.seed + i for i in range(cfg.tune.noise_repeats)])}


def trial_overrides(trial_params: dict[str, Any]) -> dict[str, Any]:
    """The dotted config overrides of one trial (a focal pair expands to loss.gamma and loss.alpha)."""
    params = {k: v for k, v in trial_params.items() if k != FOCAL_PAIR}
    if FOCAL_PAIR in trial_params:
        gamma, alpha = trial_params[FOCAL_PAIR]
        params.update({"loss.gamma": float(gamma), "loss.alpha": float(alpha)})
    return params


def trial_label(params: dict[str, Any], trial_id: str) -> str:
    """A trial's MLflow run name: its parameters, then its id, e.g.
    ``gamma=2 alpha=0.25 pi=0.01 lr=0.005 [abc12_00003]`` (3 significant digits)."""
    parts = []
    for key in sorted(params, key=lambda k: (list(LABEL_NAMES).index(k) if k in LABEL_NAMES else 99, k)):
        v = params[key]
        shown = f"{v:.3g}" if isinstance(v, float) else str(v)
        parts.append(f"{LABEL_NAMES.get(key, key.rsplit('.', 1)[-1])}={shown}")
    return " ".join(parts + [f"[{trial_id}]"])


def rounds_of(cfg: Config) -> int:
    """Eval rounds a trial runs at most (Tune's ``training_iteration`` counts them)."""
    return cfg.tune.max_t or max(1, math.ceil(cfg.optim.max_iters / cfg.train.eval_period))


def max_concurrent(cfg: Config) -> int:
    """Trials that fit at once: cluster CPUs / (workers x CPUs per worker + one data task), and GPUs alike."""
    if cfg.tune.max_concurrent_trials is not None:
        return cfg.tune.max_concurrent_trials
    res = ray.cluster_resources()
    workers = max(1, cfg.scaling.num_workers)
    n = int(res.get("CPU", 1.0) // (workers * cfg.scaling.cpus_per_worker + cfg.data.map_num_cpus))
    if cfg.scaling.use_gpu:
        n = min(n, int(res.get("GPU", 0.0) // (workers * cfg.scaling.gpus_per_worker)))
    return max(1, n)


def search_alg(cfg: Config, max_concurrent_trials: int, *, grid: bool = False) -> Any:
    """The searcher, carrying its own concurrency limit (so TuneConfig.max_concurrent_trials stays unset).

    Random search and grids (`grid`: a preset, the noise repeats) use Tune's BasicVariantGenerator seeded from
    the config: the same `seed` draws the same trials, so two sweeps (e.g. ASHA against FIFO) compare the same
    points.
    """
    if grid or cfg.tune.search_alg == "random":
        return BasicVariantGenerator(random_state=cfg.seed, max_concurrent=max_concurrent_trials)
    try:  # optuna is an optional extra
        # deferred: Optuna is an optional dependency, loaded only for the tpe searcher
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch
    except ImportError as err:  # pragma: no cover - depends on the optional extra
        raise ImportError(
            "tune.search_alg=optuna needs the optuna extra: pip install 'ray-retina[optuna]'"
        ) from err
    return ConcurrencyLimiter(OptunaSearch(seed=cfg.seed), max_concurrent=max_concurrent_trials)
