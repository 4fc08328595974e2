"""DeepSpeed for the fine-tune: the engine's config, its checkpoints through Ray Train, and the fp32 weights
consolidated into one safetensors file.

DeepSpeed runs the optimiser (ZeRO stage 0–3, optional bf16 with fp32 master weights). At the end every
rank takes part in gathering the full fp32 parameters, one tensor at a time, and rank 0 streams θ_ft into
one safetensors file: the merge needs fp32 θ_ft, since θ_ft − θ_base is far below bf16 resolution, and a
large model's fp32 weights are never held whole beside its training state.

Loading never unpickles: DeepSpeed's own checkpoint files are loaded by DeepSpeed with torch's weights-only
unpickler forced on and only DeepSpeed's three plain record types allowed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from collections.abc import Iterator

import torch

from ..config import FinetuneConfig
from ..errors import NeonError
from ..models.checkpoint import save_checkpoint_streaming
from ..train_math import count_parameters
from .progress import emit

OUT_OF_MEMORY_HINT = ("try finetune.zero_stage: 3 (partitions weights, gradients and optimizer state over the workers), "
                      "finetune.offload_optimizer: true, finetune.activation_checkpointing: true, or more finetune.workers")


def check_deepspeed(zero_stage: int) -> None:
    """The fine-tune runs DeepSpeed at every ZeRO stage; it is the `deepspeed` extra, since its build needs torch first."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise NeonError(f"finetune.zero_stage: ZeRO stage {zero_stage} needs DeepSpeed, which is not installed: "
                        'pip install --no-build-isolation "neon-ray[deepspeed]" (once torch is installed)')


@contextlib.contextmanager
def without_build_notice():
    """DeepSpeed prints "... shm_comm_op built successfully" (a bare print) each time its comm backend starts. Ray
    Train's workers turn print into a root-logger record (RAY_TRAIN_ENABLE_PRINT_PATCH) besides the stream, so both
    are held back here; anything else printed or logged meanwhile passes."""
    drop = logging.Filter()
    drop.filter = lambda record: "built successfully" not in record.getMessage()
    root = logging.getLogger()
    root.addFilter(drop)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.removeFilter(drop)


def start_deepspeed_worker(use_gpu: bool):
    """The start of a Ray Train loop that runs DeepSpeed: Ray Train's per-report lines off, DeepSpeed's CPU
    accelerator on a worker without a GPU; returns the `deepspeed` module."""
    from .ray_train import quiet_worker_logs

    quiet_worker_logs()
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # torch's extension loader warns "No CUDA runtime is found" on a machine with a CUDA toolkit but no GPU: a CPU
        # worker is meant to have none.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import deepspeed

    return deepspeed


def network_facts(spec, activation_checkpointing: bool) -> int:
    """The configured network's parameter count, from a meta-device copy that allocates nothing (a plugin family
    whose build cannot run there is built on the CPU); with `activation_checkpointing`, the family's switch is tried
    on the same copy, so a network without a checkpointable block stack is said before any worker starts."""
    from .run_model import family_for

    family = family_for(spec)
    try:
        with torch.device("meta"):
            net = family.build()
    except Exception:  # noqa: BLE001 - whatever a plugin's build raises on the meta device
        net = family.build()
    if activation_checkpointing:
        family.enable_activation_checkpointing(net)
    return count_parameters(net)


def deepspeed_config(f: FinetuneConfig, micro_batch: int) -> dict:
    return {
        "train_batch_size": f.batch_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": f.grad_clip,
        # Buckets and ZeRO-3's gathered set sized for host memory: DeepSpeed's GPU-sized defaults (5e8-element
        # buckets, 1e9 live parameters) cost a 675M model more per worker than partitioning saves (benchmarks/finetune_memory.py).
        "zero_optimization": {"stage": f.zero_stage, "reduce_bucket_size": f.zero_bucket_elements, "allgather_bucket_size": f.zero_bucket_elements,
                              **({"stage3_max_live_parameters": f.zero3_max_live_parameters, "stage3_max_reuse_distance": f.zero3_max_live_parameters,
                                  "stage3_prefetch_bucket_size": min(f.zero_bucket_elements, f.zero3_max_live_parameters),
                                  # the optimizer steps through the partition in groups this size (its temporaries too)
                                  "sub_group_size": f.zero_bucket_elements} if f.zero_stage == 3 else {}),
                              **({"offload_optimizer": {"device": "cpu"}} if f.offload_optimizer else {})},
        # ZeRO-Offload with our torch AdamW (the same update as without offload) rather than DeepSpeedCPUAdam,
        # which would JIT-compile an op and change the arithmetic
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": f.bf16},
        "steps_per_print": 1 << 30,
        "zero_allow_untested_optimizer": True,
    }


def fp32_layout(engine, net: torch.nn.Module) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of every tensor of the consolidated state dict: parameters in fp32 at their full
    shape (ZeRO-3 keeps it in `ds_shape`, the local tensor being a shard), then the buffers (DeepSpeed's bf16
    mode casts parameters only: buffers keep their dtype)."""
    layout = [(name, torch.float32, tuple(getattr(p, "ds_shape", p.shape))) for name, p in engine.module.named_parameters()]
    layout += [(name, b.dtype, tuple(b.shape)) for name, b in engine.module.named_buffers()]
    expected, names = set(net.state_dict()), {n for n, _, _ in layout}
    assert names == expected, f"gathered keys differ: {sorted(expected ^ names)[:5]}"
    return layout


def iter_fp32_state(engine, keep: bool = True) -> Iterator[tuple[str, torch.Tensor | None]]:
    """Full fp32 tensors one at a time, in `fp32_layout` order: DeepSpeed's master copy where it keeps one
    (ZeRO 1–3, bf16), else the module's. Collective under ZeRO-3: every rank must run it to the end; ranks
    without `keep` get None (each gathered tensor dropped at once)."""
    from deepspeed.utils import safe_get_full_fp32_param

    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)
        yield name, ((full if full is not None else param.detach()).float().cpu().clone() if keep else None)
        del full
    for name, buf in engine.module.named_buffers():
        yield name, (buf.detach().cpu().clone() if keep else None)


def write_fp32_checkpoint(engine, net: torch.nn.Module, uri: str, spec, write: bool, **extra) -> None:
    """Consolidate the fp32 weights into one safetensors file at `uri`, a tensor at a time: the writing rank
    holds one full tensor beyond its training state, never the whole model (rank 0's peak of a 675M ZeRO-3
    run would otherwise grow by its 2.7 GB of fp32 weights). Collective under ZeRO-3: every rank calls it."""
    layout = fp32_layout(engine, net)
    tensors = iter_fp32_state(engine, keep=write)
    try:
        if write:
            save_checkpoint_streaming(uri, layout, tensors, spec, **extra)
    finally:
        for _ in tensors:  # the other ranks' gathers need this one to the end, also after a failed write
            pass


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
