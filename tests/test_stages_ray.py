"""Stages on a real local Ray: layout-independent generation, DeepSpeed fine-tune, skip/resume, bad sets."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from neon_ray.errors import NeonError
from neon_ray.manifest import read_manifest
from neon_ray.pipeline import run_command
from neon_ray.runtime.run_model import spec_of
from neon_ray.runtime.samplesets import read_samples
from neon_ray.runtime.sampling import sample_to_parquet

from _support import tiny_config


def test_generated_images_identical_with_1_and_2_actors(ray_local, tmp_path, tiny_checkpoint):
    cfg = tiny_config(tmp_path / "out", f"model.checkpoint={tiny_checkpoint}", "generate.batch_size=5")
    args = (spec_of(cfg), str(tiny_checkpoint), cfg.sampler, "image", 15, 7, "synthetic")
    one = sample_to_parquet(*args, str(tmp_path / "one"), cfg.generate, actors=1)
    two = sample_to_parquet(*args, str(tmp_path / "two"), cfg.generate, actors=2)
    t1, t2 = read_samples(one["uri"]), read_samples(two["uri"])
    assert t1.column("index").to_pylist() == list(range(15))
    for col in ("index", "label", "seed", "png"):
        assert t1.column(col).to_pylist() == t2.column(col).to_pylist(), col
    assert t1.column("label").to_pylist()[:11] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
    assert len(set(t1.column("png").to_pylist())) == 15  # different seeds, different images
    # A single work item is sampled in this process (no pool, the two actors' threads): the same part as the pool's first item, and this
    # process's torch thread setting is left as it was.
    threads = torch.get_num_threads()
    here = sample_to_parquet(*args[:4], 5, *args[5:], str(tmp_path / "here"), cfg.generate, actors=2)
    assert torch.get_num_threads() == threads
    t0 = read_samples(here["uri"])
    for col in ("index", "label", "seed", "png"):
        assert t0.column(col).to_pylist() == t1.column(col).to_pylist()[:5], col


def test_a_set_of_the_same_samples_is_copied_from_a_donor_not_sampled_again(ray_local, tmp_path, tiny_checkpoint):
    """The base arm of a search takes the evaluate stage's samples over: parts of the same start and count from a
    folder of the same checkpoint, settings, seed stream, batch size and precision (any n) are copied; the rest is
    sampled; a folder of other settings gives nothing."""
    cfg = tiny_config(tmp_path / "out", f"model.checkpoint={tiny_checkpoint}", "generate.batch_size=5")
    args = (spec_of(cfg), str(tiny_checkpoint), cfg.sampler, "image")
    donor = sample_to_parquet(*args, 12, 7, "eval", str(tmp_path / "donor"), cfg.generate)  # items 0, 5, 10 (2 rows)
    rung = sample_to_parquet(*args, 10, 7, "eval", str(tmp_path / "rung"), cfg.generate, donors=(donor["uri"],))
    assert rung["reused_items"] == 2  # both of its items: the donor's first two
    more = sample_to_parquet(*args, 15, 7, "eval", str(tmp_path / "rung+"), cfg.generate, first=10, donors=(donor["uri"],))
    assert more["reused_items"] == 0  # the donor's item at 10 holds 2 rows, this one 5: sampled
    whole = sample_to_parquet(*args, 15, 7, "eval", str(tmp_path / "whole"), cfg.generate)
    got = pa.concat_tables([read_samples(rung["uri"]), read_samples(more["uri"])])
    for col in ("index", "label", "seed", "png"):
        assert got.column(col).to_pylist() == read_samples(whole["uri"]).column(col).to_pylist(), col
    other = cfg.sampler.model_copy(update={"steps": cfg.sampler.steps + 1})
    elsewhere = sample_to_parquet(args[0], args[1], other, "image", 10, 7, "eval", str(tmp_path / "other"), cfg.generate,
                                  donors=(donor["uri"],))
    assert elsewhere["reused_items"] == 0

@pytest.mark.slow
def test_deepspeed_zero2_bf16_finetune_under_torchtrainer(ray_local, tmp_path, tiny_checkpoint):
    cfg = tiny_config(tmp_path / "out", f"model.checkpoint={tiny_checkpoint}", "generate.num_samples=24",
                      "finetune.zero_stage=2", "finetune.bf16=true", "finetune.workers=2", "finetune.batch_size=8",
                      "finetune.budget_images=24", "finetune.lr=1e-3", "mlflow.enabled=false")
    gen = run_command(cfg, "generate")
    assert gen.metrics["n_synthetic"] == 24
    assert run_command(cfg, "generate").finished_at == gen.finished_at  # rerun: skipped, same manifest
    man = run_command(cfg, "finetune")
    assert man.outputs["model"] == "finetune/model.safetensors"  # relative to the output root
    base, tuned = load_file(str(tiny_checkpoint)), load_file(man.uri(cfg.output, "model"))
    assert set(base) == set(tuned)
    assert all(t.dtype.is_floating_point and t.dtype == base[k].dtype for k, t in tuned.items())
    changed = sum(int(not (tuned[k] == base[k]).all()) for k in base)
    assert changed > len(base) // 2  # the optimiser moved the weights (fp32 master copy, not bf16-rounded)
    m = man.metrics
    assert m["finetune_images"] == 24 and m["steps"] == 3
    assert m["extra_compute_fraction"] == pytest.approx(24 / 10_000)
    assert read_manifest(str(tmp_path / "out"), "finetune").config_hash == man.config_hash
    assert (tmp_path / "out" / "finetune" / "ray").is_dir()  # Ray Train's run state lives on the output


def test_empty_synthetic_set_is_refused_and_stage_not_marked_done(ray_local, tmp_path, tiny_checkpoint):
    cfg = tiny_config(tmp_path / "out", f"model.checkpoint={tiny_checkpoint}", "generate.num_samples=4", "mlflow.enabled=false")
    samples = run_command(cfg, "generate").uri(cfg.output, "samples")
    schema = read_samples(samples).schema
    import shutil

    shutil.rmtree(samples)
    (tmp_path / "out" / "generate" / "samples").mkdir()
    pq.write_table(pa.Table.from_batches([], schema=schema), str(tmp_path / "out" / "generate" / "samples" / "empty.parquet"))
    with pytest.raises(NeonError, match="empty synthetic set"):
        run_command(cfg, "finetune")
    assert read_manifest(str(tmp_path / "out"), "finetune") is None


@pytest.mark.slow
def test_zero3_consolidates_to_the_zero0_weights(ray_local, tmp_path, tiny_checkpoint):
    """The same 3 steps on 2 workers under ZeRO-0 (replicated) and ZeRO-3 with the optimizer state offloaded
    (weights, gradients and optimizer state partitioned, gathered at the end): one safetensors file each, equal to
    fp32 tolerance. (ZeRO-3 without offload is measured the same way, on 675M models, by benchmarks/finetune_memory.py.)"""
    common = [f"model.checkpoint={tiny_checkpoint}", "generate.num_samples=16", "finetune.workers=2", "finetune.batch_size=8",
              "finetune.budget_images=24", "finetune.lr=1e-3", "mlflow.enabled=false"]
    runs = {"zero0": ["finetune.zero_stage=0"], "zero3-offload": ["finetune.zero_stage=3", "finetune.offload_optimizer=true"]}
    weights = {}
    for name, extra in runs.items():
        cfg = tiny_config(tmp_path / "out", *common, *extra)  # one output: S is generated once, finetune reruns per config
        run_command(cfg, "generate")
        man = run_command(cfg, "finetune")
        assert man.params["zero_stage"] == int(extra[0][-1]) and man.params["offload_optimizer"] == ("offload" in name)
        weights[name] = load_file(man.uri(cfg.output, "model"))
    base = load_file(str(tiny_checkpoint))
    assert any(not (weights["zero0"][k] == base[k]).all() for k in base)
    assert set(weights["zero3-offload"]) == set(base)
    worst = max((weights["zero3-offload"][k] - weights["zero0"][k]).abs().max().item() for k in base)
    assert worst < 1e-5, worst
