"""torch's threads in this process: set for a worker, and restored after a Ray Data actor class ran in-process."""

from __future__ import annotations

import os

import torch


def set_torch_threads(n: int) -> None:
    torch.set_num_threads(max(1, int(n)))
    os.environ["OMP_NUM_THREADS"] = str(max(1, int(n)))


def run_here(actor_class, kwargs: dict, batch: dict):
    """One call of a Ray Data actor class in this process (a pool of one would only add its start-up); the thread
    settings the actor makes for itself are undone afterwards, since this process goes on with other work."""
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    try:
        return actor_class(**kwargs)(batch)
    finally:
        torch.set_num_threads(threads)
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp
