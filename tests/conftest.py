"""Shared fixtures: a real local Ray (num_cpus=2) and tiny checkpoints. No mocks."""

from __future__ import annotations

import os

import pytest

from _support import tiny_config

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A randomly initialised unet-tiny base for Fashion-MNIST, saved like a pretrain output."""
    import torch

    from neon_ray.models.checkpoint import save_checkpoint
    from neon_ray.runtime.checkpoints import family_for, spec_of

    cfg = tiny_config(tmp_path / "out")
    family = family_for(spec_of(cfg))
    torch.manual_seed(0)
    net = family.build()
    path = tmp_path / "base.safetensors"
    save_checkpoint(str(path), net.state_dict(), family.spec, train_images=10_000)
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: a second thread only adds synchronisation on a busy 2-core machine (opt in per module)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto) on loopback, with IAM-checked credentials (see tests/_servers.py)."""
    from _servers import start_s3

    server = start_s3()
    yield server
    server.stop()
