"""Ray connection and resource helpers (no model math here)."""

from __future__ import annotations

import logging
import os

from .config import RayConfig

log = logging.getLogger("neon_ray")


def ensure_ray(cfg: RayConfig) -> None:
    """Join the configured/ambient cluster, or start an embedded local Ray."""
    import ray

    if ray.is_initialized():
        return
    env = {"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning"}}
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, log_to_driver=True, runtime_env=env)
    else:
        # The dashboard stays on: Ray Train's placement-group cleaner polls the state API it serves.
        ray.init(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, log_to_driver=True, runtime_env=env)
        log.info("started a local Ray: %s", {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")})


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def resolve_use_gpu(flag: bool | None) -> bool:
    return cluster_has_gpus() if flag is None else flag
