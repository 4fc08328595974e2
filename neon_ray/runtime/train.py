"""Ray Train glue shared by pretrain and finetune: run configs on the output, checkpoints, and failures.

Checkpoints go through Ray Train (`ray.train.report(..., checkpoint=...)`); Ray stores them under the
stage's run directory on the output (`<output>/<stage>/ray/<name>/`) and hands the latest one back
through `ray.train.get_checkpoint()` after a worker failure (FailureConfig) and when the same stage is
run again after the driver stopped (Ray Train restores a run from its storage by name). The run name
holds the stage's config hash, so a checkpoint of another config is never picked up.

Loading never unpickles: plain training state is `torch.load(weights_only=True)`; DeepSpeed's own
checkpoint files are loaded by DeepSpeed with torch's weights-only unpickler forced on and only
DeepSpeed's three plain record types allowed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator

import torch

from .. import storage
from ..errors import NeonError
from .cluster import ray_storage
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


def check_deepspeed(zero_stage: int) -> None:
    """The fine-tune runs DeepSpeed at every ZeRO stage; it is the `deepspeed` extra, since its build needs torch first."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise NeonError(f"finetune.zero_stage: ZeRO stage {zero_stage} needs DeepSpeed, which is not installed: "
                        'pip install --no-build-isolation "neon-ray[deepspeed]" (once torch is installed)')


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


_OOM_MARKS = ("OutOfMemoryError", "out of memory", "running low on memory", "MemoryError", "OOM")


def fit(trainer, stage: str, max_failures: int, out_of_memory: str = ""):
    """`trainer.fit()`, with a failure that exhausted `max_failures` reported in one line with the last worker error
    (and, when a worker ran out of memory, the `out_of_memory` advice)."""
    from ray.train import TrainingFailedError

    try:
        return trainer.fit()
    except TrainingFailedError as exc:
        cause = exc.__cause__ or exc
        text = str(cause)
        last = next((line.strip() for line in reversed(text.strip().splitlines()) if line.strip()), type(cause).__name__)
        if out_of_memory and any(mark in text for mark in _OOM_MARKS):
            raise NeonError(f"{stage}: a worker ran out of memory ({last[:160]}); {out_of_memory}; nothing was written") from None
        raise NeonError(f"{stage}: training failed after {max_failures} recovered failure(s); last worker error: {last[:300]}") from None


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


# ----------------------------------------------------------------------------------------------
# DeepSpeed state (finetune)


@contextlib.contextmanager
def deepspeed_weights_only() -> Iterator[None]:
    """DeepSpeed loads its checkpoint files with a full unpickler (torch.load with weights_only off): force the weights-only
    unpickler, allowing only DeepSpeed's plain records (loss-scaler settings, the ZeRO stage enum, fragment
    addresses)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from ..models.checkpoint import weights_only_loads

    with weights_only_loads([LossScaler, ZeroStageEnum, fragment_address]):
        yield


DS_TAG = "ds"


def report_deepspeed(engine, metrics: dict, client_state: dict) -> None:
    """Every rank writes its part of DeepSpeed's checkpoint (engine.save_checkpoint) and reports it; Ray Train
    gathers the parts of all ranks into one checkpoint directory."""
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory(prefix="neon-ds-") as tmp:
        engine.save_checkpoint(tmp, tag=DS_TAG, client_state=client_state, save_latest=False)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))


class UnusableCheckpoint(Exception):
    """The latest checkpoint could not be loaded (said in one line); the engine may hold part of it: rebuild it."""


def restore_deepspeed(engine, stage: str, config_hash: str) -> dict | None:
    """Load the latest checkpoint of this run into `engine` (DeepSpeed's own API) and return its client state;
    None without a checkpoint; UnusableCheckpoint when it cannot be used (then start afresh on a new engine)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    try:
        with checkpoint.as_directory() as folder, deepspeed_weights_only():
            path, client = engine.load_checkpoint(folder, tag=DS_TAG, load_module_strict=True)
        if path is None:
            raise ValueError("no DeepSpeed checkpoint in it")
        if client.get("config_hash") != config_hash:
            raise ValueError(f"it was made for config {client.get('config_hash')}, this run is {config_hash}")
        return client
    except Exception as exc:  # noqa: BLE001 - see restored_state
        emit(f"[{stage}] checkpoint {checkpoint.path} cannot be used ({type(exc).__name__}: {str(exc)[:160]}); starting afresh")
        raise UnusableCheckpoint(str(exc)) from None
