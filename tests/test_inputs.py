"""Which config field reruns which stage (neon_ray.inputs): every field of the config, changed one at a time,
reruns exactly the stages that read it and those downstream of them; a field that no stage reads is one that
the config marks operational (placement, retries, logging, where outputs go). Then the same on a real run:
a changed dataset option re-scores a fixed checkpoint instead of serving the old score."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from _support import ROOT
from neon_ray.config import load_config
from neon_ray.inputs import config_leaves, is_operational
from neon_ray.pipeline import GRAPH, stage_hash

TOY = ROOT / "neon_ray" / "configs" / "toy_gaussian.yaml"
ALL = frozenset(GRAPH)
NONE: frozenset[str] = frozenset()
PRETRAIN = frozenset({"pretrain"})
MODEL = ALL  # what builds or reads the model: every stage but merge, and merge is downstream of finetune
BASE_READERS = frozenset({"generate", "finetune", "evaluate", "tune", "merge", "diagnose"})  # θ_base and what follows it
SYNTHETIC = frozenset({"generate", "finetune", "tune", "merge", "diagnose"})  # S and what is computed from it
SAMPLING = SYNTHETIC | {"evaluate"}  # how images are drawn, for S and for scoring
FINETUNE = frozenset({"finetune", "tune", "merge", "diagnose"})
SCORING = frozenset({"evaluate", "tune"})
DATA = frozenset({"pretrain", "evaluate", "tune", "diagnose"})  # the data's content: training, the reference, the held-out set
TUNE = frozenset({"tune"})
MERGE = frozenset({"merge"})
DIAGNOSE = frozenset({"diagnose"})  # tune reads the diagnosis only with tune.prior: diagnose (test_the_tune_prior_...)

# The walk starts from the toy config with a base checkpoint (so pretrain does not feed every stage) and a few
# settings that let every other field change alone and stay valid (rungs for ASHA, a positive w grid, ZeRO 2 for
# offload, one rescoring set for the second-space headline).
START = ["model.checkpoint={base}", "finetune.zero_stage=2", "tune.rungs=[1000,200000]", "tune.w_grid=[0.5,1.0]",
         "tune.final_seeds=1"]


def changes(tmp: Path) -> dict[str, tuple[object, frozenset[str]]]:
    """field → (a new value, the stages that must rerun). Every leaf of the config is here (test_the_table_covers...)."""
    folder, file = tmp / "folder", tmp / "file.bin"
    return {
        "output": (str(tmp / "elsewhere"), NONE),
        "seed": (1, PRETRAIN | SYNTHETIC),
        "ray.address": ("127.0.0.1:6379", NONE),
        "ray.num_cpus": (1, NONE),
        "ray.num_gpus": (0, NONE),
        "ray.connect_timeout_s": (5.0, NONE),
        "mlflow.enabled": (False, NONE),
        "mlflow.tracking_uri": (f"sqlite:///{tmp}/other.db", NONE),
        "mlflow.experiment": ("other", NONE),
        "mlflow.run_name": ("other", NONE),
        "mlflow.registered_model": ("other", NONE),
        "data.name": ("neon_ray.data.toy:Gaussian2D", ALL),  # the same data by its plugin path: another name
        "data.path": (str(folder), DATA),
        "data.download": (False, NONE),
        "data.options": ({"n_train": 1000, "n_test": 1000000, "seed": 0, "cov": [[1.0, 0.0], [0.0, 1.0]]}, DATA),
        "model.family": ("neon_ray.models.toy:ToyDDPMFamily", MODEL),
        "model.preset": ("mlp-tiny", MODEL),
        "model.options": ({"hidden": 48}, MODEL),
        "model.checkpoint": (str(file), BASE_READERS),
        "model.base_train_images": (5000, FINETUNE),  # the extra-compute fraction in finetune's manifest
        "sampler.name": ("ddim", SAMPLING),
        "sampler.steps": (30, SAMPLING),
        "sampler.score_scale": (1.2, SYNTHETIC),  # scoring overrides it (evaluate.sampler: score_scale 1.0)
        "pretrain.steps": (10, PRETRAIN),
        "pretrain.batch_size": (128, PRETRAIN),
        "pretrain.lr": (1e-3, PRETRAIN),
        "pretrain.warmup_steps": (5, PRETRAIN),
        "pretrain.weight_decay": (0.1, PRETRAIN),
        "pretrain.ema_decay": (0.99, PRETRAIN),
        "pretrain.grad_clip": (2.0, PRETRAIN),
        "pretrain.bf16": (True, PRETRAIN),
        "pretrain.workers": (2, PRETRAIN),
        "pretrain.cpus_per_worker": (0.5, PRETRAIN),
        "pretrain.use_gpu": (False, PRETRAIN),
        "pretrain.checkpoint_every": (7, NONE),
        "pretrain.log_every": (7, NONE),
        "pretrain.max_failures": (3, NONE),
        "pretrain.placement_strategy": ("SPREAD", NONE),
        "generate.num_samples": (2000, SYNTHETIC),
        "generate.batch_size": (5000, SAMPLING),  # evaluation samples are drawn in generate's batches unless evaluate says
        "evaluate.batch_size": (5000, SCORING),
        "generate.actors": (1, NONE),
        "generate.cpus_per_actor": (0.25, NONE),
        "generate.gpus_per_actor": (0.0, NONE),
        "generate.threads_per_actor": (2, NONE),
        "generate.bf16": (True, SAMPLING),
        "evaluate.bf16": (True, SCORING),
        "finetune.zero_stage": (3, FINETUNE),
        "finetune.bf16": (True, FINETUNE),
        "finetune.lr": (2e-4, FINETUNE),
        "finetune.warmup_images": (100, FINETUNE),
        "finetune.budget_images": (5000, FINETUNE),
        "finetune.batch_size": (50, FINETUNE),
        "finetune.weight_decay": (0.1, FINETUNE),
        "finetune.betas": ((0.9, 0.95), FINETUNE),
        "finetune.grad_clip": (0.5, FINETUNE),
        "finetune.workers": (2, FINETUNE),
        "finetune.cpus_per_worker": (0.5, FINETUNE),
        "finetune.use_gpu": (False, FINETUNE),
        "finetune.threads_per_worker": (2, FINETUNE),
        "finetune.checkpoint_every": (7, NONE),
        "finetune.max_failures": (3, NONE),
        "finetune.placement_strategy": ("SPREAD", NONE),
        "finetune.offload_optimizer": (True, FINETUNE),
        "finetune.activation_checkpointing": (True, NONE),  # recomputes the same activations
        "finetune.zero_bucket_elements": (2_000_000, NONE),
        "finetune.zero3_max_live_parameters": (2_000_000, NONE),
        "merge.w": (2.0, MERGE),
        "merge.allow_negative_w": (True, MERGE),
        "evaluate.num_samples": (300000, SCORING),
        "evaluate.seed": (7, SCORING),
        "evaluate.sampler": ({"score_scale": 1.05}, SCORING),
        "evaluate.extractor": ("fmnist-classifier", SCORING),
        "evaluate.extractor_weights": (str(file), SCORING),
        "evaluate.reference_split": ("train", SCORING),
        "evaluate.reference_cache": (str(folder), NONE),  # where cached statistics live; they are keyed by their source
        "evaluate.reference": (str(file), SCORING),
        "evaluate.reference_source": (str(folder), SCORING),
        "evaluate.feature_batch_size": (100, SCORING),
        "evaluate.actors": (1, NONE),
        "evaluate.cpus_per_actor": (0.25, NONE),
        "evaluate.gpus_per_actor": (0.0, NONE),
        "evaluate.threads_per_actor": (2, NONE),
        "evaluate.prc": (True, SCORING),
        "evaluate.prc_k": (3, SCORING),
        "evaluate.prc_num_samples": (100, SCORING),
        "evaluate.prc_num_reference": (100, SCORING),
        "evaluate.floor": (True, SCORING),
        "tune.w_grid": ([0.5, 2.0], TUNE),
        "tune.search": ("optuna", TUNE),
        "tune.space": ({"w": {"choice": [0.25, 0.5]}}, TUNE),
        "tune.num_trials": (30, TUNE),
        "tune.bracket_steps": (6, TUNE),
        "tune.line_probe": (1.0, TUNE),
        "tune.rungs": ([2000, 200000], TUNE),
        "tune.scheduler": ("asha", TUNE),
        "tune.reduction_factor": (4, TUNE),
        "tune.final_seeds": (2, TUNE),
        "tune.headline_extractor": ("identity", TUNE),
        "tune.headline_samples": (500, TUNE),
        "tune.max_concurrent_trials": (1, NONE),
        "tune.cpus_per_trial": (0.1, NONE),
        "tune.allow_negative_w": (False, TUNE),  # also names which trials may be reused
        "tune.max_failures": (3, NONE),
        "tune.prior": ("diagnose", TUNE),
        "diagnose.enabled": (True, NONE),
        "diagnose.batches": (4, DIAGNOSE),
        "diagnose.batch_size": (32, DIAGNOSE),
        "diagnose.w_points": ([0.5, 1.0], DIAGNOSE),
        "diagnose.seed": (5, DIAGNOSE),
        "diagnose.real_source": (str(folder), DIAGNOSE),
        "diagnose.workers": (2, NONE),  # the same result for any count
        "diagnose.cpus_per_worker": (0.5, NONE),
        "diagnose.zero_stage": (2, NONE),  # the same numbers on ZeRO engines (test_diagnose)
    }


@pytest.fixture
def walk(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.bin").write_bytes(b"a")
    (tmp_path / "file.bin").write_bytes(b"other base")
    base = tmp_path / "base.safetensors"
    base.write_bytes(b"base")  # hashes only look at a checkpoint's identity (name, size, mtime)
    start = [s.format(base=base) for s in START]
    return tmp_path, start, changes(tmp_path)


def _hashes(start: list[str], *more: str, output: Path) -> dict[str, str]:
    cfg = load_config(TOY, [*start, *more], str(output))
    return {name: stage_hash(cfg, name) for name in GRAPH}


def _yaml(value) -> str:
    return json.dumps(value)


def test_the_table_covers_every_config_field_and_no_unread_field_affects_results(walk):
    tmp, start, table = walk
    cfg = load_config(TOY, start, str(tmp / "out"))
    leaves = config_leaves(cfg)
    assert sorted(table) == sorted(leaves), "add the new field to this table (with the stages that read it)"
    for path in leaves:  # a field no stage reads must be marked operational in its section, else it is a bug
        assert (table[path][1] == NONE) == is_operational(cfg, path), path


def test_changing_a_field_reruns_exactly_the_stages_that_read_it(walk):
    tmp, start, table = walk
    before = _hashes(start, output=tmp / "out")
    wrong = {}
    for path, (value, expected) in table.items():
        if path == "output":
            after = _hashes(start, output=Path(value))
        else:
            after = _hashes(start, f"{path}={_yaml(value)}", output=tmp / "out")
        rerun = {name for name in GRAPH if after[name] != before[name]}
        if rerun != expected:
            wrong[path] = {"reran": sorted(rerun), "expected": sorted(expected)}
    assert not wrong, json.dumps(wrong, indent=1)


def test_the_tune_prior_makes_the_search_read_the_diagnosis(walk):
    """With tune.prior: diagnose, what changes the diagnosis reruns the search too (its range is the diagnosed bracket)."""
    tmp, start, _ = walk
    before = _hashes(start, "tune.prior=diagnose", output=tmp / "out")
    after = _hashes(start, "tune.prior=diagnose", "diagnose.batches=4", output=tmp / "out")
    assert {n for n in GRAPH if after[n] != before[n]} == {"diagnose", "tune"}


def test_the_content_of_data_and_reference_folders_counts(walk):
    """A file added to or changed in data.path (or evaluate.reference_source) reruns what reads it."""
    tmp, start, _ = walk
    folder = tmp / "folder"
    for stamp, (field, readers) in enumerate((("data.path", DATA), ("evaluate.reference_source", SCORING)), 1):
        before = _hashes(start, f"{field}={folder}", output=tmp / "out")
        (folder / f"new-{field}.bin").write_bytes(b"x")
        after = _hashes(start, f"{field}={folder}", output=tmp / "out")
        assert {n for n in GRAPH if after[n] != before[n]} == readers, field
        os.utime(folder / "a.bin", (stamp, stamp))  # touched: same name and size, another mtime
        touched = _hashes(start, f"{field}={folder}", output=tmp / "out")
        assert {n for n in GRAPH if touched[n] != after[n]} == readers, field


@pytest.mark.slow
def test_a_changed_dataset_option_rescores_a_fixed_checkpoint(tmp_path, ray_local, caplog):
    """The issue's reproduction: score a fixed toy checkpoint, then again with only data.options.cov changed. The old
    scheme said "evaluate: up to date, skipping" and served the same distance; now the reference and the score change.
    A manifest of the old scheme is redone once, with one line saying why."""
    import torch

    from neon_ray.manifest import read_manifest
    from neon_ray.models.checkpoint import save_checkpoint
    from neon_ray.pipeline import run_command
    from neon_ray.runtime.run_model import family_for, spec_of

    small = ["data.options.n_test=4000", "evaluate.num_samples=2000", "evaluate.feature_batch_size=2000", "sampler.steps=5",
             "generate.batch_size=2000", "mlflow.enabled=false", f"evaluate.reference_cache={tmp_path / 'refs'}"]
    cfg = load_config(TOY, small, str(tmp_path / "out"))
    family = family_for(spec_of(cfg))
    torch.manual_seed(0)
    base = tmp_path / "base.safetensors"
    save_checkpoint(str(base), family.build().state_dict(), family.spec, train_images=1000)
    small.append(f"model.checkpoint={base}")

    first = run_command(load_config(TOY, small, str(tmp_path / "out")), "evaluate")
    other = load_config(TOY, [*small, "data.options.cov=[[1.0,0.0],[0.0,1.0]]"], str(tmp_path / "out"))
    second = run_command(other, "evaluate")
    assert second.config_hash != first.config_hash and second.inputs["reference"] != first.inputs["reference"]
    assert abs(second.metrics["fid"] - first.metrics["fid"]) > 0.1, (first.metrics["fid"], second.metrics["fid"])
    assert run_command(other, "evaluate").finished_at == second.finished_at  # unchanged config: skipped

    # A manifest written by the old scheme (no hash_scheme field) is redone once, saying why.
    manifest = tmp_path / "out" / "evaluate" / "manifest.json"
    old = json.loads(manifest.read_text())
    old.pop("hash_scheme")
    old["config_hash"] = "0123456789abcdef"
    manifest.write_text(json.dumps(old))
    with caplog.at_level(logging.INFO, logger="neon_ray"):
        third = run_command(other, "evaluate")
    assert [r for r in caplog.records if "whose config hashes missed some inputs" in r.getMessage()]
    assert third.hash_scheme == read_manifest(str(tmp_path / "out"), "evaluate").hash_scheme == 2
    assert third.metrics["fid"] == pytest.approx(second.metrics["fid"], rel=1e-9)
