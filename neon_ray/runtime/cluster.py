"""Joining or starting Ray, and what every Ray worker of a run inherits (no model math here)."""

from __future__ import annotations

import logging
import os

from .progress import INTERACTIVE_ENV, interactive

log = logging.getLogger("neon_ray")
RAY_DATA_LOGGING = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ray_data_logging.yaml")


def worker_env() -> dict[str, str]:
    """Environment for every worker of this run: quiet warnings, and progress bars only for a terminal.

    Ray Data draws tqdm bars in whichever process runs a dataset (Tune trials run sampling and
    scoring in workers); in a non-TTY log those bars are thousands of lines, so they are switched off
    there and the stages' own throttled lines (neon_ray.runtime.progress) remain.
    """
    tty = interactive()
    env = {"PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning", INTERACTIVE_ENV: "1" if tty else "0",
           "RAY_DATA_LOGGING_CONFIG": RAY_DATA_LOGGING, "RAY_AIR_NEW_OUTPUT": "0"}  # Tune's classic output obeys verbose=0
    if not tty:
        env["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    return env


def ensure_ray(cfg) -> None:
    """Join the configured/ambient cluster (`ray.address`, else $RAY_ADDRESS), or start an embedded local Ray."""
    env = worker_env()
    os.environ.update(env)  # before Ray Data is imported: the driver runs datasets too (generate, feature passes)
    import ray
    from ray.data import DataContext

    if ray.is_initialized():
        return
    DataContext.get_current().enable_progress_bars = env[INTERACTIVE_ENV] == "1"
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": env})
    else:
        # The dashboard stays on: Ray Train's placement-group cleaner polls the state API it serves.
        ray.init(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, log_to_driver=True, runtime_env={"env_vars": env})
        log.info("started a local Ray: %s", {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")})


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def resolve_use_gpu(flag: bool | None) -> bool:
    return cluster_has_gpus() if flag is None else flag


def actor_gpus(gpus_per_actor: float | None) -> float:
    """GPUs per actor: the configured number, else 1 when the cluster has GPUs, else 0."""
    use_gpu = resolve_use_gpu(None if gpus_per_actor is None else gpus_per_actor > 0)
    return (gpus_per_actor if gpus_per_actor is not None else 1.0) if use_gpu else 0.0


def ray_storage(uri: str) -> dict:
    """`storage_path`/`storage_filesystem` for Ray Train and Tune run configs: their state lives under `uri`
    (on the run's output, never in the driver's temp dir), through the same filesystem as every other output."""
    from .. import storage

    if storage.is_local(uri):
        return {"storage_path": storage.filesystem(uri)[1]}
    fs, path = storage.pyarrow_filesystem(uri)
    return {"storage_path": path, "storage_filesystem": fs}
