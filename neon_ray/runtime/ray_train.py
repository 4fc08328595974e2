"""Ray Train glue shared by pretrain and finetune: run configs on the output, checkpoints, and failures.

Checkpoints go through Ray Train (`ray.train.report(..., checkpoint=...)`); Ray stores them under the
stage's run directory on the output (`<output>/<stage>/ray/<name>/`) and hands the latest one back
through `ray.train.get_checkpoint()` after a worker failure (FailureConfig) and when the same stage is
run again after the driver stopped (Ray Train restores a run from its storage by name). The run name
holds the stage's config hash, so a checkpoint of another config is never picked up.

Loading never unpickles: plain training state is `torch.load(weights_only=True)` (DeepSpeed's own state:
runtime/deepspeed.py).
"""

from __future__ import annotations

import logging
import os
import tempfile

import torch

from .. import storage
from ..errors import NeonError
from .cluster import ray_storage, resolve_use_gpu
from .progress import emit

log = logging.getLogger("neon_ray")
STATE_FILE = "state.pt"


# glibc raises its mmap threshold after each large free, so the memory of a model built whole and then partitioned
# (ZeRO-3) stays in the heap, resident, for the rest of the run; a fixed threshold hands large blocks back on free.
# How low is a trade of memory for speed. At 128 KiB a large model's mid-sized blocks (its activations at small
# per-worker batches) are mmapped too and less stays resident (DiT-XL/2 under ZeRO-3 on 2 CPU workers: 5.5 GB
# per worker after set-up instead of 8 GB; its ZeRO-0 peak 13.2 GB instead of 14.1 at 4 MiB, where ZeRO-2 of
# xAR-L stops fitting 2 workers in 24 GiB), but every one is faulted in anew at each step: a small model's
# fine-tune ran 2.4× slower (the quickstart's U-Net). On a host, memory decides whether a large model runs at
# all, so large models get 128 KiB and small ones 4 MiB (above which a large model's weights would lie anyway).
# `python benchmarks/host_allocator.py` and `benchmarks/finetune_memory.py` measure both sides.
LARGE_MODEL_PARAMETERS = 100_000_000


def host_memory_env(parameters: int) -> dict[str, str]:
    """The glibc settings of CPU training workers for a model of `parameters` parameters."""
    threshold = str(128 << 10 if parameters >= LARGE_MODEL_PARAMETERS else 4 << 20)
    return {"MALLOC_MMAP_THRESHOLD_": threshold, "MALLOC_TRIM_THRESHOLD_": threshold}


def train_run_config(name: str, storage_uri: str, max_failures: int, worker_env: dict[str, str] | None = None,
                     reports_to=None):
    """A Ray Train RunConfig whose state lives under `storage_uri` (the stage's folder on the output); `worker_env`:
    environment variables of the training workers (set when their processes start); `reports_to`: a picklable
    callable(metrics, step) that receives rank 0's reports as they arrive (e.g. neon_ray.tracking.MetricsSink)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig
    from ray.train import RunConfig as TrainRunConfig

    extra = {"worker_runtime_env": {"env_vars": worker_env}} if worker_env else {}
    if reports_to is not None:
        extra["callbacks"] = [forward_reports(reports_to)]
    # Ray Train's own INFO lines (a line per reported checkpoint, worker-group start-up, resource requests) flood a
    # log; its warnings and errors stay, and the stages print their own throttled progress.
    return TrainRunConfig(name=name, failure_config=FailureConfig(max_failures=max_failures),
                          checkpoint_config=CheckpointConfig(num_to_keep=2), logging_config=LoggingConfig(log_level="WARNING"),
                          **ray_storage(storage_uri), **extra)


def quiet_worker_logs() -> None:
    """Call first in a Ray Train loop: Ray Train's worker logs a line per report ("Reporting training result ...")
    through a logger named by its file's path rather than `ray.train...`, so LoggingConfig's level misses it."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def forward_reports(sink):
    """A Ray Train callback (it runs in the train controller, on the driver's node) handing rank 0's reported
    metrics to `sink(metrics, step)`: the fine-tune's loss curve appears while it runs."""
    from ray.train import UserCallback

    class ForwardReports(UserCallback):
        def __init__(self, sink):
            self.sink = sink

        def after_report(self, run_context, metrics, checkpoint):
            if metrics and "step" in metrics[0]:
                self.sink({k: v for k, v in metrics[0].items() if k != "step"}, int(metrics[0]["step"]))

    return ForwardReports(sink)


def fresh_start(storage_uri: str, name: str) -> None:
    """Forget a run's checkpoints (`--force`: redo the stage from scratch rather than resume it)."""
    storage.remove(storage.join(storage_uri, name))


def torch_trainer(loop, loop_config: dict, section, name: str, stage_dir: str, fresh: bool, use_gpu: bool | None = None,
                  worker_env: dict[str, str] | None = None, reports_to=None):
    """A TorchTrainer for a training stage: `section.workers` workers of `section.cpus_per_worker` CPUs each (GPUs per
    `use_gpu`, default `section.use_gpu` resolved against the cluster), placed by `section.placement_strategy`, its
    state under `<stage_dir>/ray/<name>` (forgotten first when `fresh`), `section.max_failures` worker failures
    recovered from the latest checkpoint."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    use_gpu = resolve_use_gpu(section.use_gpu) if use_gpu is None else use_gpu
    ray_dir = storage.join(stage_dir, "ray")
    if fresh:
        fresh_start(ray_dir, name)
    return TorchTrainer(
        loop, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=section.workers, use_gpu=use_gpu, resources_per_worker={"CPU": section.cpus_per_worker},
                                     placement_strategy=section.placement_strategy),
        run_config=train_run_config(name, ray_dir, section.max_failures, worker_env=worker_env, reports_to=reports_to))


# A worker the OS or Ray's memory monitor killed leaves no exception of its own, only text.
_KILLED_FOR_MEMORY = ("out of memory", "running low on memory", "OOM")


def ran_out_of_memory(error: BaseException) -> bool:
    """Whether a failed training run's workers ran out of memory: an out-of-memory exception where a worker raised one."""
    import ray.exceptions

    failures = list(getattr(error, "worker_failures", {}).values()) or [error.__cause__ or error]
    if any(isinstance(e, (torch.OutOfMemoryError, MemoryError, ray.exceptions.OutOfMemoryError)) for e in failures):
        return True
    return any(mark in str(e) for e in failures for mark in _KILLED_FOR_MEMORY)


def fit(trainer, stage: str, max_failures: int, out_of_memory: str = ""):
    """`trainer.fit()`, with a failure that exhausted `max_failures` reported in one line with the last worker error
    (and, when a worker ran out of memory, the `out_of_memory` advice)."""
    from ray.train import TrainingFailedError

    try:
        return off_the_main_thread(trainer.fit)
    except TrainingFailedError as exc:
        cause = exc.__cause__ or exc
        text = str(cause)
        last = next((line.strip() for line in reversed(text.strip().splitlines()) if line.strip()), type(cause).__name__)
        if out_of_memory and ran_out_of_memory(exc):
            raise NeonError(f"{stage}: a worker ran out of memory ({last[:160]}); {out_of_memory}; nothing was written") from None
        raise NeonError(f"{stage}: training failed after {max_failures} recovered failure(s); last worker error: {last[:300]}") from None


def off_the_main_thread(call):
    """`call()` in a thread of its own while the main thread waits. Ray Train and Ray Tune install Ctrl-C handlers of
    their own when fit() runs on the main thread (Train's aborts the run and the process exits 1 without a word; Tune's
    ends the search and returns it as if finished). Off the main thread they install none, so Ctrl-C raises
    KeyboardInterrupt here, as SIGTERM does (runtime/cluster.py): exit 130, a rerun resumes."""
    import threading

    outcome: dict = {}

    def target():
        try:
            outcome["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread as it is
            outcome["error"] = exc

    worker = threading.Thread(target=target, name="ray-train-fit", daemon=True)  # daemon: an interrupt need not wait
    worker.start()
    while worker.is_alive():
        worker.join(0.5)  # a short join: the main thread takes the signal between two
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


# ----------------------------------------------------------------------------------------------
# Plain training state (pretrain)


def report_state(metrics: dict, state: dict | None) -> None:
    """Report from every worker; the worker passing `state` (rank 0) attaches it as the checkpoint."""
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory(prefix="neon-ckpt-") as tmp:
        checkpoint = None
        if state is not None:
            torch.save(state, os.path.join(tmp, STATE_FILE))
            checkpoint = Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def restored_state(stage: str, config_hash: str) -> dict | None:
    """The state of the latest checkpoint of this run, or None (no checkpoint; or an unreadable or foreign one,
    said in one line: the stage then starts afresh rather than reuse it)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    try:
        with checkpoint.as_directory() as folder:
            state = torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=True)
        if state.get("config_hash") != config_hash:
            raise ValueError(f"it was made for config {state.get('config_hash')}, this run is {config_hash}")
        return state
    except Exception as exc:  # noqa: BLE001 - a torn, corrupt or foreign checkpoint means "start over", never reuse
        emit(f"[{stage}] checkpoint {checkpoint.path} cannot be used ({type(exc).__name__}: {str(exc)[:160]}); starting afresh")
        return None
