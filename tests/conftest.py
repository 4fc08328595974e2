"""Shared fixtures: a real local Ray (num_cpus=2) and tiny checkpoints. No mocks."""

from __future__ import annotations

import json
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
    from neon_ray.runtime.run_model import family_for, spec_of

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


def _shared_dir(tmp_path_factory, worker_id: str):
    """A folder every pytest worker of this `make test` sees (xdist gives each worker its own basetemp below it)."""
    base = tmp_path_factory.getbasetemp()
    return base if worker_id == "master" else base.parent


@pytest.fixture(scope="session")
def reference_cache(tmp_path_factory, worker_id):
    """One reference-statistics cache (evaluate.reference_cache) for the end-to-end runs of the whole session: the
    Fashion-MNIST test split is featurized once, not per run (its file name holds the extractor's hash; it is
    written temp + rename, so two workers filling it at once both leave the same whole file)."""
    path = _shared_dir(tmp_path_factory, worker_id) / "reference-cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def undisturbed_tiny_run(tmp_path_factory, worker_id, reference_cache):
    """One undisturbed `neon-ray run` of the tiny config at the fault drills' settings, made once for the session
    (the first worker to ask runs it; a file lock keeps the other waiting): test_faults compares its disturbed
    runs with it, test_e2e checks its outputs, MLflow records and reruns. Returns (output folder, the fault drills' Outcome, the --set settings)."""
    from filelock import FileLock

    from _support import TINY, fault_drills

    drills = fault_drills()
    sets = drills.DRILL_SETTINGS + [f"evaluate.reference_cache={reference_cache}"]
    shared = _shared_dir(tmp_path_factory, worker_id)
    out, record = shared / "undisturbed-tiny", shared / "undisturbed-tiny.json"
    with FileLock(str(shared / "undisturbed-tiny.lock")):
        if not record.exists():
            outcome = drills.run(TINY, out, sets)
            record.write_text(json.dumps({"returncode": outcome.returncode, "seconds": outcome.seconds, "log": outcome.log}))
    outcome = drills.Outcome(**json.loads(record.read_text()))
    assert outcome.returncode == 0, outcome.log[-4000:]
    return out, outcome, sets


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto) on loopback, with IAM-checked credentials (see tests/_servers.py)."""
    from _servers import start_s3

    server = start_s3()
    yield server
    server.stop()


# Minutes each long test took in a local `make test` (2026-12-07, two pytest workers, 41.6 min in all, before the
# cuts of that day). The workers take tests in collection order (`-n 2 --dist load`): the long ones go first, so that
# neither worker is left with a long test at the end while the other idles.
LONG_TESTS = {
    "test_zz_job_submit.py::": 11,  # both parts on one cluster: 7.7 + 3.6 minutes
    "test_faults.py::": 10,  # it makes the session's undisturbed tiny run first ...
    "test_families_e2e.py::test_family_runs_end_to_end[dit]": 5,
    "test_storage_s3.py::": 4,
    "test_record_s3.py::test_a_tiny_run_to_s3": 3,
    "test_plugins.py::": 3,
    "test_interrupts.py::": 2,
    "test_families_e2e.py::": 2,
    "test_search.py::test_the_line_search_on_the_tiny_run": 2,  # 131 s and 81 s on 2026-12-07 (copies of the
    "test_diagnose.py::test_diagnose_and_a_search_from_its_bracket": 1,  # session's tiny run), late in file order
    "test_e2e.py::": 1,  # ... which this one then finds made (it would wait on the lock otherwise)
    "test_fid_reference.py::test_cli_fid_json": 1,
    "test_search.py::test_each_searcher": 1,
    "test_stages_ray.py::test_zero": 1,
    "test_diagnose.py::test_the_diagnosis_on_zero_engines": 1,
}


def expected_minutes(nodeid: str) -> float:
    name = nodeid.rsplit("/", 1)[-1]
    return next((m for prefix, m in LONG_TESTS.items() if name.startswith(prefix)), 0)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: -expected_minutes(item.nodeid))  # stable: the rest keep their order
