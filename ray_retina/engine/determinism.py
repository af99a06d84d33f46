"""Deterministic kernels for ``train.deterministic``.

What makes two runs of one config, seed and world size differ, and what pins each:

- Ray Data's delivery order (decode tasks finish in any order): ``data.deterministic`` (``preserve_order``).
- augmentation draws: a function of (seed, image id, epoch) only (``data/augment.py``), whatever task runs it.
- initialisation: ``seed_everything(seed + rank)`` before the model is built; DDP broadcasts rank 0's weights.
- data-parallel reduction order: gloo's ring all-reduce sums the ranks in a fixed order for a fixed world
  size; NCCL alike for a fixed topology.
- thread-count-dependent CPU kernels: the same ``cpus_per_worker`` (Ray sets OMP_NUM_THREADS from it) or
  ``train.threads_per_worker`` gives the same split; a different count may change the last bits.
- CPU kernels: the same inputs and thread count give the same bits (no switch needed).
- GPU kernels that use atomics (scatter/index_add backward, some convolution algorithms) and cuDNN's
  autotuner: this module (deterministic algorithms, cuDNN deterministic, benchmark off, and the cuBLAS
  workspace setting that makes cuBLAS reductions repeatable).
- evaluation order: detections are gathered in rank order and sorted by score by COCO eval; the val plan
  gives each rank fixed images.
"""

from __future__ import annotations

import os

import torch

CUBLAS_WORKSPACE = ":4096:8"  # what PyTorch's reproducibility notes ask of cuBLAS >= 10.2


def set_deterministic(enabled: bool) -> None:
    """``enabled`` on a CUDA machine: deterministic algorithms (``warn_only``: an op without a deterministic
    kernel warns instead of failing the run), cuDNN deterministic with its autotuner off. Call before the
    first CUDA kernel (the cuBLAS workspace variable is read when cuBLAS starts).

    Nothing on a CPU-only machine: the CPU kernels training uses already give the same bits for the same
    inputs and thread count (``benchmarks/determinism.py``: two steps from the same weights, identical
    gradients), and deterministic mode there only costs time."""
    if not enabled or not torch.cuda.is_available():
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
