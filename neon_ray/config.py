"""The typed configuration of a whole run: YAML in/out, `--set a.b=c` overrides, errors naming the field.

One section per stage. Every check happens here, once, at load: sampler settings are parsed into the
model family's own typed schema, model options are checked against the family, w against Neon's rule,
batch sizes against worker counts, the extractor against the registered ones, the output URI against
what Ray workers can reach. Stages and actors receive validated, typed values only.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .errors import ConfigError

# The shipped configs, package data: `neon-ray run tiny` finds CONFIG_DIR/tiny.yaml from any folder.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Fields that decide how a stage runs (retries, checkpoint cadence, placement, logging), never what it
    # computes: left out of config hashes, so changing them reuses finished outputs.
    OPERATIONAL: ClassVar[set[str]] = set()

    def hash_parts(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude=self.OPERATIONAL)


class FieldError(ValueError):
    """A check across a section's fields, reported at one field (a model validator cannot set the error's location)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class RayConfig(Section):
    address: str | None = Field(None, description="Ray cluster address; null starts (or joins, under `ray job submit`) a local Ray.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for an embedded local Ray (null: all).")
    num_gpus: int | None = Field(None, ge=0, description="GPUs for an embedded local Ray (null: all detected).")
    connect_timeout_s: float = Field(30.0, gt=0, description="Seconds to wait for `ray.address` to answer before giving up with one line.")


class MLflowConfig(Section):
    enabled: bool = True
    tracking_uri: str | None = Field(None, description="null: $MLFLOW_TRACKING_URI, else sqlite:///<output>/mlflow.db")
    experiment: str = "neon-ray"
    run_name: str | None = None
    registered_model: str | None = Field(None, description="Model Registry name of the best Neon model (null: neon-<data>-<family>-<preset>).")


class DataConfig(Section):
    name: str = Field("fashion_mnist", description="A registered dataset: fashion_mnist, digits, or module:attr.")
    path: str | None = Field(None, description="Local folder with the dataset files (null: the dataset's default places).")
    download: bool = Field(True, description="Download from the canonical URL when no local copy exists.")
    options: dict[str, Any] = Field(default_factory=dict, description="Dataset-specific options (e.g. gaussian2d: n_train, n_test, cov, seed).")

    OPERATIONAL: ClassVar[set[str]] = {"download"}


class ModelConfig(Section):
    family: str = Field("diffusion", description="A registered model family or a module:attr plugin.")
    preset: str = Field("unet-small", description="A named size from the family's preset table.")
    options: dict[str, Any] = Field(default_factory=dict, description="Overrides of the preset's fields.")
    checkpoint: str | None = Field(None, description="Base model safetensors URI; null uses the pretrain stage's output.")
    base_train_images: int | None = Field(None, ge=1, description="Images the base saw in training (for the extra-compute fraction) when the checkpoint lacks it.")


class PretrainConfig(Section):
    steps: int = Field(4000, ge=1)
    batch_size: int = Field(128, ge=1, description="Global batch size (split across workers).")
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(200, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    grad_clip: float = Field(1.0, gt=0)
    bf16: bool = Field(False, description="bf16 autocast (fp32 weights); ~1.5× faster on AVX512-BF16 CPUs.")
    workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool | None = Field(None, description="null: use GPUs when the cluster has them.")
    checkpoint_every: int = Field(500, ge=1, description="Steps between checkpoints reported to Ray Train (resume after a failure or a rerun).")
    log_every: int = Field(100, ge=1)
    max_failures: int = Field(1, ge=0, description="Worker-group failures Ray Train recovers from (restart from the last checkpoint).")
    placement_strategy: Literal["PACK", "SPREAD"] = Field("PACK", description="Ray placement of the workers: PACK fills a node first, SPREAD uses every node.")

    OPERATIONAL: ClassVar[set[str]] = {"checkpoint_every", "log_every", "max_failures", "placement_strategy"}


class ActorPool(Section):
    """A Ray Data actor pool's resources (generate's sampling actors; evaluate's sampling and feature actors)."""

    actors: int = Field(2, ge=1, description="Actors in the pool.")
    cpus_per_actor: float = Field(0.5, gt=0, description="CPUs per actor (fractional: small clusters must not deadlock).")
    gpus_per_actor: float | None = Field(None, ge=0, description="null: 1 when the cluster has GPUs, else 0.")
    threads_per_actor: int = Field(1, ge=1, description="torch threads per CPU actor.")

    # Sample i depends only on (seed, stream, i), and a feature only on its image, not on how many actors or threads
    # compute them.
    OPERATIONAL: ClassVar[set[str]] = {"actors", "cpus_per_actor", "gpus_per_actor", "threads_per_actor"}


class GenerateConfig(ActorPool):
    num_samples: int = Field(2000, ge=1, description="|S|, the size of the synthetic set.")
    batch_size: int = Field(250, ge=1, description="Images per sampling call (one Ray Data work item).")
    bf16: bool = Field(False, description="Sample under bf16 autocast (fast on GPUs; off by default so small w·Δθ survive).")


class FinetuneConfig(Section):
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage.")
    bf16: bool = Field(False, description="bf16 mixed precision (fp32 master weights).")
    lr: float = Field(1e-4, gt=0)
    warmup_images: int = Field(0, ge=0, description="Linear warm-up length, in images seen.")
    budget_images: int = Field(20000, ge=1, description="Fine-tune length B, in images seen.")
    batch_size: int = Field(64, ge=1, description="Global batch size (micro-batch × workers × accumulation).")
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW's betas (a family may recommend others: VAR's are (0.9, 0.95); set here, they win).")
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping.")
    workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(0.5, gt=0)
    use_gpu: bool | None = None
    threads_per_worker: int = Field(1, ge=1)
    checkpoint_every: int = Field(100, ge=1, description="Steps between DeepSpeed checkpoints reported to Ray Train (resume after a failure or a rerun).")
    max_failures: int = Field(1, ge=0, description="Worker-group failures Ray Train recovers from (restart from the last checkpoint).")
    placement_strategy: Literal["PACK", "SPREAD"] = Field("PACK", description="Ray placement of the workers: PACK fills a node first, SPREAD uses every node.")
    offload_optimizer: bool = Field(False, description="ZeRO-Offload: keep the optimizer state (Adam moments, fp32 master weights) in CPU memory (zero_stage ≥ 1).")
    activation_checkpointing: bool = Field(False, description="Recompute each transformer block's activations in the backward pass instead of storing them (DiT, xAR).")
    zero_bucket_elements: int = Field(50_000_000, ge=1_000_000, description="DeepSpeed's reduce / all-gather bucket size, in elements (its default, 5e8, is 2 GB per fp32 bucket).")
    zero3_max_live_parameters: int = Field(100_000_000, ge=1_000_000, description="ZeRO-3: parameters gathered at once (DeepSpeed's default, 1e9, keeps a whole 675M model gathered).")

    OPERATIONAL: ClassVar[set[str]] = {"checkpoint_every", "max_failures", "placement_strategy", "activation_checkpointing",
                                       "zero_bucket_elements", "zero3_max_live_parameters"}

    @model_validator(mode="after")
    def _check_offload(self) -> "FinetuneConfig":
        if self.offload_optimizer and self.zero_stage == 0:
            raise FieldError("offload_optimizer", "needs finetune.zero_stage 1, 2 or 3 (ZeRO-Offload partitions the optimizer state)")
        return self

    @model_validator(mode="after")
    def _check_batch(self) -> "FinetuneConfig":
        if self.batch_size % self.workers:
            raise FieldError("batch_size", f"{self.batch_size} is not divisible by finetune.workers={self.workers} (each worker takes an equal micro-batch)")
        return self


class MergeConfig(Section):
    w: float = Field(1.0, description="Extrapolation weight for a standalone `merge` (θ_base − w·(θ_ft − θ_base)).")
    allow_negative_w: bool = Field(False, description="Permit w ≤ 0 (diagnostics such as the paper's toy).")

    @model_validator(mode="after")
    def _check_w(self) -> "MergeConfig":
        _check_w(self.w, "w", self.allow_negative_w)
        return self


class EvaluateConfig(ActorPool):
    num_samples: int = Field(5000, ge=2, description="Samples per FID evaluation.")
    seed: int = Field(1_000_003, description="Seed stream of evaluation samples (the same for every w).")
    sampler: dict[str, Any] = Field(default_factory=dict, description="Sampler overrides for scoring models, merged over `sampler` (e.g. {score_scale: 1.0}: score every θ with the model's plain sampler while S comes from a biased one). Empty: score with `sampler`.")
    extractor: str = Field("fmnist-classifier", description="fmnist-classifier, inception-fid-helper (standard FID Inception, offline), inception-v3-compat (torch-fidelity's, needs extractor_weights), identity (vector data) or pixel-pool (4×4-pooled pixels: cheap, for tests and data-path benchmarks).")
    extractor_weights: str | None = Field(None, description="Local weights file of the extractor (null: the packaged default; never downloaded).")
    reference_split: Literal["train", "test"] = "test"
    reference_cache: str | None = Field(None, description="Folder for cached reference statistics (null: <output>/reference).")
    reference: str | None = Field(None, description="Reference statistics file (.npz from `neon-ray ref-stats`, which also imports ADM/EDM files); null: a file in reference_cache.")
    reference_source: str | None = Field(None, description="Image folder or Parquet set to compute the reference from (null: data.name's reference_split).")
    batch_size: int | None = Field(None, ge=1, description="Images per sampling call of the scored models (null: generate.batch_size).")
    bf16: bool | None = Field(None, description="Sample the scored models under bf16 autocast (null: generate.bf16).")
    feature_batch_size: int = Field(500, ge=1, description="Images per extractor call inside a feature actor.")
    prc: bool = Field(True, description="Also report precision and recall (k-NN manifolds, Kynkäänniemi et al. 2019).")
    prc_k: int = Field(5, ge=1, description="k of the k-NN manifold radii.")
    prc_num_samples: int = Field(5000, ge=2, description="At most this many (seeded) generated samples enter precision/recall.")
    prc_num_reference: int = Field(10000, ge=2, description="At most this many (seeded) reference features are cached for precision/recall.")
    floor: bool = Field(True, description="Also report fid_floor: FID of as many real images (the other split) against the reference.")

    # reference_cache: where cached statistics live; they are keyed by what they are of (scoring.reference_identity).
    OPERATIONAL: ClassVar[set[str]] = ActorPool.OPERATIONAL | {"reference_cache"}

    @field_validator("extractor")
    @classmethod
    def _known_extractor(cls, name: str) -> str:
        from .fid.extractors import EXTRACTORS

        known = [e.name for e in EXTRACTORS]
        if name not in known:
            raise ValueError(f"unknown feature extractor {name!r}; known: {known}")
        return name


class DiagnoseConfig(Section):
    """`neon-ray diagnose`: g·Δ and the real-data loss along θ_base − w·Δ on held-out real data (neon_ray.diagnosis)."""

    enabled: bool = Field(False, description="Also run the diagnose stage in `neon-ray run` (always on with tune.prior: diagnose; `neon-ray diagnose` runs it regardless).")
    batches: int = Field(8, ge=2, description="Held-out batches (the standard errors are over batches).")
    batch_size: int = Field(64, ge=1, description="Real images per batch.")
    w_points: list[float] = Field(default_factory=lambda: [-1.0, -0.5, -0.25, 0.25, 0.5, 1.0, 1.5, 2.0],
                                  description="The w at which the real-data loss L(θ_base − w·Δ) is computed (w = 0 is always added).")
    seed: int = Field(2_000_003, description="Seed stream of the held-out rows and of each batch's noise, timesteps and tokens (the same for every θ).")
    real_source: str | None = Field(None, description="A Parquet set (with labels for a class-conditional model) or image folder of real samples the base never trained on; null: the dataset's test split.")
    workers: int = Field(0, ge=0, description="Ray tasks that share the batches (each loads θ_base and θ_ft); 0: in the driver process (small models). The result is the same for any count.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs (and torch threads, rounded) per diagnose task.")
    zero_stage: int | None = Field(None, ge=0, le=3, description="null: plain torch (the driver, or `workers` Ray tasks); 0–3: a Ray Train group of DeepSpeed engines at this ZeRO stage (`workers` of them, or finetune.workers when 0), for a model whose gradient does not fit one worker. The result is the same either way.")

    OPERATIONAL: ClassVar[set[str]] = {"enabled", "workers", "cpus_per_worker", "zero_stage"}

    @model_validator(mode="after")
    def _check_points(self) -> "DiagnoseConfig":
        if not any(w != 0 for w in self.w_points):
            raise FieldError("w_points", "needs at least one w ≠ 0 (w = 0 is always added)")
        for i, w in enumerate(self.w_points):
            if not math.isfinite(w):
                raise FieldError(f"w_points[{i}]", f"must be finite, got {w}")
            if w in self.w_points[:i]:
                raise FieldError(f"w_points[{i}]", f"duplicate value {w}")
        return self


class SearchDimension(Section):
    """One searched field of `tune.space`: a list of values (`choice`) or a range (`low`, `high`, `scale`)."""

    choice: list[Any] | None = None
    low: float | None = None
    high: float | None = None
    scale: Literal["uniform", "log"] = "uniform"

    @model_validator(mode="after")
    def _check(self) -> "SearchDimension":
        if self.choice is not None:
            if self.low is not None or self.high is not None:
                raise FieldError("choice", "give either choice: [...] or a range (low, high), not both")
            if not self.choice:
                raise FieldError("choice", "must hold at least one value (empty choice list)")
            for i, v in enumerate(self.choice):
                if v in self.choice[:i]:
                    raise FieldError(f"choice[{i}]", f"duplicate value {v!r}")
            return self
        if self.low is None or self.high is None:
            raise FieldError("low" if self.low is None else "high", "a range needs both low and high (or give choice: [...])")
        if not self.low < self.high:
            raise FieldError("high", f"must be greater than low={self.low} (empty or inverted range)")
        if self.scale == "log" and self.low <= 0:
            raise FieldError("low", f"a log range needs low > 0, got {self.low}")
        return self

    @property
    def is_range(self) -> bool:
        return self.choice is None


Searcher = Literal["grid", "optuna", "bracket", "line"]


class TuneConfig(Section):
    w_grid: list[float] = Field(default_factory=lambda: [0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5],
                                description="The w values of the grid searcher (when tune.space has no `w`), and the default w range (min..max) of the others.")
    search: Searcher = Field("grid", description="grid: every combination; optuna: Optuna's TPE through Ray Tune's OptunaSearch; bracket: golden-section over w at each sampler setting; line: w = 0 and one probe w at each sampler setting on the first rung, FID(w) predicted along the line from their feature moments, the predicted best through every rung.")
    space: dict[str, SearchDimension] = Field(default_factory=dict, description="Searched fields: `w` and any field of the family's sampler, each a choice list or a range. Sampler fields searched here are searched for the base (w = 0) too.")
    num_trials: int = Field(20, ge=2, description="Trials of the optuna searcher (base and Neon arms together).")
    bracket_steps: int = Field(5, ge=2, description="Golden-section evaluations of w per sampler setting (bracket searcher), besides w = 0.")
    line_probe: float | None = Field(None, gt=0, description="The probe w of the line searcher (scored at every sampler setting beside w = 0); null: the middle of the w range (geometric on a log scale; the choice nearest it for a choice list).")
    rungs: list[int] = Field(default_factory=list, description="Sample counts each trial is scored at, increasing (multi-fidelity); empty: evaluate.num_samples only. Trials are compared only at equal n.")
    scheduler: Literal["fifo", "asha"] = Field("fifo", description="asha: Ray Tune's ASHA stops poor Neon trials at a rung (the base arm always runs every rung).")
    reduction_factor: int = Field(3, ge=2, description="ASHA's reduction factor: the top 1/reduction_factor of a rung go on.")
    final_seeds: int = Field(3, ge=0, description="Independent evaluation seed sets (none used by the search) the best base and the best Neon are rescored with at evaluate.num_samples: the headline's mean ± sd. 0: no rescoring (the headline is then the search's own, optimistically selected, scores).")
    headline_extractor: str | None = Field(None, description="A second feature space the rescored pair is also reported in, e.g. inception-fid-helper (the standard FID Inception, offline): the search may run on cheap features, users compare with papers in Inception FID.")
    headline_samples: int = Field(1000, ge=2, description="n of the second-space FID: that many samples of each pick's first rescoring set, against that many real reference images, with a floor of that many real images of the other split.")
    max_concurrent_trials: int = Field(1, ge=1)
    cpus_per_trial: float = Field(0.01, gt=0, description="A trial only orchestrates; its sampling and features run in Ray Data actors with their own CPUs.")
    allow_negative_w: bool = False
    max_failures: int = Field(1, ge=0, description="Retries of a failed trial (Ray Tune's FailureConfig).")
    prior: Literal["diagnose"] | None = Field(None, description="diagnose: the bracket searcher searches w over the diagnose stage's bracket instead of the configured range, and Optuna starts from it (clipped to the allowed w, said in one line); null: the configured range.")

    OPERATIONAL: ClassVar[set[str]] = {"max_concurrent_trials", "cpus_per_trial", "max_failures"}

    @model_validator(mode="after")
    def _check_grid(self) -> "TuneConfig":
        if not self.w_grid:
            raise FieldError("w_grid", "must hold at least one value")
        for i, w in enumerate(self.w_grid):
            _check_w(w, f"w_grid[{i}]", self.allow_negative_w)
            if w in self.w_grid[:i]:
                raise FieldError(f"w_grid[{i}]", f"duplicate value {w} (each w is scored once)")
        if (w := self.space.get("w")) is not None:
            if w.is_range:
                _check_w(w.low, "space.w.low", self.allow_negative_w)
            else:
                for i, v in enumerate(w.choice):
                    if not isinstance(v, (int, float)) or isinstance(v, bool):
                        raise FieldError(f"space.w.choice[{i}]", f"must be a number, got {v!r}")
                    _check_w(float(v), f"space.w.choice[{i}]", self.allow_negative_w)
        for i, n in enumerate(self.rungs):
            if n < 2:
                raise FieldError(f"rungs[{i}]", f"must be ≥ 2 samples (FID needs two), got {n}")
            if i and n <= self.rungs[i - 1]:
                raise FieldError(f"rungs[{i}]", f"rungs must increase: {n} follows {self.rungs[i - 1]}")
        if self.search == "grid":
            for name, dim in self.space.items():
                if dim.is_range:
                    raise FieldError(f"space.{name}", "the grid searcher needs choice: [...] (a range needs search: optuna or bracket)")
        if self.search == "bracket":
            for name, dim in self.space.items():
                if name != "w" and dim.is_range:
                    raise FieldError(f"space.{name}", "the bracket searcher brackets w at each sampler setting: give choice: [...] for sampler fields")
            if (w := self.space.get("w")) is not None and not w.is_range:
                raise FieldError("space.w", "the bracket searcher needs a range for w (low, high)")
            if self.scheduler == "asha":
                raise FieldError("scheduler", "asha stops trials the bracket search needs; use scheduler: fifo with search: bracket (it brackets on the first rung and rescores the best)")
        if self.search == "line":
            for name, dim in self.space.items():
                if name != "w" and dim.is_range:
                    raise FieldError(f"space.{name}", "the line searcher probes each sampler setting: give choice: [...] for sampler fields")
            if self.scheduler == "asha":
                raise FieldError("scheduler", "asha stops trials the line search needs; use scheduler: fifo with search: line (it probes on the first rung and rescores the predicted best)")
            if self.line_probe is not None:
                w = self.w_dimension()
                lo, hi = (w.low, w.high) if w.is_range else (min(w.choice), max(w.choice))
                if not lo <= self.line_probe <= hi:
                    raise FieldError("line_probe", f"{self.line_probe:g} lies outside the searched w [{lo:g}, {hi:g}]")
        if self.scheduler == "asha" and len(self.rungs) < 2:
            raise FieldError("scheduler", "asha needs at least two rungs (tune.rungs: [1000, 2500, ...])")
        if self.search == "optuna":
            import importlib.util

            if importlib.util.find_spec("optuna") is None:
                raise FieldError("search", "optuna is not installed: pip install optuna==5.0.0 (pinned in requirements.txt)")
        return self

    def w_dimension(self) -> SearchDimension:
        """The searched w: `space.w`, else the grid `w_grid` (grid searcher) or its range min..max (the others)."""
        if "w" in self.space:
            return self.space["w"]
        if self.search == "grid" or len(self.w_grid) < 2:
            return SearchDimension(choice=sorted(float(w) for w in self.w_grid))
        return SearchDimension(low=min(self.w_grid), high=max(self.w_grid))

    def sampler_space(self) -> dict[str, SearchDimension]:
        return {k: v for k, v in self.space.items() if k != "w"}


def _resolve_local(path: str | None, keep_if_missing: bool = False, base: str | Path | None = None) -> str | None:
    """A relative local path made absolute against `base` (a config file's folder; default the working folder)."""
    if not path or "://" in path or os.path.isabs(path):
        return path
    resolved = os.path.abspath(os.path.join(base or os.getcwd(), os.path.expanduser(path)))
    return path if keep_if_missing and not os.path.exists(resolved) else resolved


def _check_w(w: float, field: str, allow_negative: bool) -> None:
    """Neon's rule for w (neon_ray.merge.check_w), as a pydantic error at `field` of the section."""
    from .merge import check_w

    try:
        check_w(w, allow_negative)
    except ValueError as exc:
        raise FieldError(field, str(exc)) from None


class RunConfig(Section):
    output: str = Field("outputs/run", description="Output root: a local path or any fsspec URI.")
    seed: int = Field(0, description="Root seed: sample i of a set uses a generator keyed by (seed, stream, i).")
    ray: RayConfig = Field(default_factory=RayConfig)
    mlflow: MLflowConfig = Field(default_factory=MLflowConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    sampler: Any = Field(default_factory=dict, description="The family's sampler settings (steps, guidance, ...), parsed into its typed schema.")
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    diagnose: DiagnoseConfig = Field(default_factory=DiagnoseConfig)

    # Where the output goes, which Ray runs it and where MLflow records it never change what a stage computes.
    OPERATIONAL: ClassVar[set[str]] = {"output", "ray", "mlflow"}

    _scoring_sampler: Any = PrivateAttr(None)

    @field_validator("output")
    @classmethod
    def _check_output(cls, v: str) -> str:
        from . import storage

        v = v.strip()
        if not v:
            raise ValueError("must be a non-empty path or URI")
        storage.check_shareable(v, "output")
        if "://" not in v:  # Ray workers run in other directories: make local paths absolute
            v = os.path.abspath(os.path.expanduser(v))
        return v.rstrip("/") or "/"

    @model_validator(mode="after")
    def _resolve_paths(self) -> "RunConfig":
        # Relative local paths given here (`--set`, a dict) are taken from the working folder and made absolute:
        # Ray workers run in other directories. Those written in a config file were already made absolute
        # against the file's folder by load_config.
        self.model.checkpoint = _resolve_local(self.model.checkpoint)
        self.diagnose.real_source = _resolve_local(self.diagnose.real_source)
        if isinstance(self.model.options.get("vae"), str):  # a local folder, or a hub id (org/name) kept as it is
            self.model.options["vae"] = _resolve_local(self.model.options["vae"], keep_if_missing=True)
        return self

    @model_validator(mode="after")
    def _evaluation_sampling(self) -> "RunConfig":
        # Scored models are sampled like S unless evaluate says otherwise: filled in once, here, so that scoring reads
        # only its own section.
        if self.evaluate.batch_size is None:
            self.evaluate.batch_size = self.generate.batch_size
        if self.evaluate.bf16 is None:
            self.evaluate.bf16 = self.generate.bf16
        return self

    @model_validator(mode="after")
    def _check_model_and_sampler(self) -> "RunConfig":
        # Imported here: the model registry imports torch, which config users should not pay for twice.
        from .models import registry

        family = registry.get_family(self.model.family, field="model.family")
        family.check_preset(self.model.preset, field="model.preset")
        family.check_options(self.model.preset, self.model.options, field="model.options")
        for name, value in family.finetune_defaults.items():  # the family's recommended fine-tune, unless the config says
            if name not in self.finetune.model_fields_set:
                setattr(self.finetune, name, value)
        self.sampler = family.validate_sampler(self.sampler, field="sampler")
        fields = sorted(type(self.sampler).model_fields)
        unknown = sorted(set(self.evaluate.sampler) - set(fields))
        if unknown:
            raise ConfigError(f"evaluate.sampler.{unknown[0]}: unknown field (the family's sampler has {fields})")
        self._scoring_sampler = family.validate_sampler({**self.sampler.model_dump(), **self.evaluate.sampler}, field="evaluate.sampler")
        self._check_search_space(family, fields)
        return self

    def _check_search_space(self, family, fields: list[str]) -> None:
        """tune.space names sampler fields of this family with values its schema takes; rungs fit evaluate.num_samples."""
        scoring = self._scoring_sampler.model_dump()
        for name, dim in self.tune.sampler_space().items():
            if name not in fields:
                raise ConfigError(f"tune.space.{name}: the {family.name} sampler has no field {name!r}; its fields: {fields}")
            numeric = isinstance(scoring[name], (int, float)) and not isinstance(scoring[name], bool)
            if dim.is_range and not numeric:
                raise ConfigError(f"tune.space.{name}: a range needs a numeric field ({name} is {scoring[name]!r}); give choice: [...]")
            values = [dim.low, dim.high] if dim.is_range else dim.choice
            for i, v in enumerate(values):
                where = (("low", "high")[i] if dim.is_range else f"choice[{i}]")
                if dim.is_range and isinstance(scoring[name], int):
                    v = int(v)
                try:
                    family.validate_sampler({**scoring, name: v}, field="sampler")
                except ConfigError as exc:
                    raise ConfigError(f"tune.space.{name}.{where}: {str(exc).split(': ', 1)[-1]}") from None
        if self.tune.headline_extractor is not None:
            from .fid.extractors import EXTRACTORS

            names = [e.name for e in EXTRACTORS]
            if self.tune.headline_extractor not in names:
                raise ConfigError(f"tune.headline_extractor: unknown feature extractor {self.tune.headline_extractor!r}; known: {names}")
            if not self.tune.final_seeds:
                raise ConfigError("tune.headline_extractor: needs tune.final_seeds ≥ 1 (it rescores the rescoring sets' samples)")
            if self.tune.headline_samples > self.evaluate.num_samples:
                raise ConfigError(f"tune.headline_samples: {self.tune.headline_samples} exceeds evaluate.num_samples="
                                  f"{self.evaluate.num_samples} (the size of the rescoring sets it reads)")
        if self.tune.rungs and self.tune.rungs[-1] > self.evaluate.num_samples:
            raise ConfigError(f"tune.rungs[{len(self.tune.rungs) - 1}]: {self.tune.rungs[-1]} exceeds evaluate.num_samples="
                              f"{self.evaluate.num_samples} (the full n every result is reported at)")

    @model_validator(mode="after")
    def _check_diagnose_data(self) -> "RunConfig":
        if self.diagnoses():
            self.check_diagnose_data()
        return self

    def diagnoses(self) -> bool:
        """Whether `neon-ray run` runs the diagnose stage: diagnose.enabled, or a tune prior that needs it."""
        return self.diagnose.enabled or self.tune.prior == "diagnose"

    def check_diagnose_data(self) -> None:
        """Held-out real data for the diagnosis: diagnose.real_source, else the dataset's test split (one line if neither)."""
        if self.diagnose.real_source:
            return
        from .data import get_dataset

        dataset = get_dataset(self.data.name, self.data.path, self.data.download, options=self.data.options)
        if "test" not in dataset.splits:
            raise ConfigError(f"diagnose.real_source: dataset {self.data.name!r} has no held-out (test) split; set "
                              "diagnose.real_source to a Parquet set or image folder of real samples the base never trained on")

    def search_rungs(self) -> list[int]:
        """The sample counts a trial is scored at: tune.rungs, else evaluate.num_samples alone."""
        return list(self.tune.rungs) or [self.evaluate.num_samples]

    def for_workers(self) -> dict[str, Any]:
        """The config as Ray workers receive it: without the tracking section (only the driver talks to MLflow,
        and a tracking URI may carry credentials that must not travel or be stored with experiment state)."""
        data = self.model_dump(mode="json")
        data["mlflow"] = MLflowConfig(enabled=False).model_dump(mode="json")
        return data

    def scoring_sampler(self):
        """The typed sampler settings that score models (evaluate, tune): `sampler` with `evaluate.sampler` merged over it."""
        return self._scoring_sampler


# ----------------------------------------------------------------------------------------------
# Loading, overrides, errors


def _format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    err = exc.errors()[0]
    path = ".".join(str(p) for p in err["loc"] if p != "__root__")
    path = f"{prefix}{path}" if path else prefix.rstrip(".") or "config"
    msg = err["msg"].removeprefix("Value error, ")
    if isinstance(cause := (err.get("ctx") or {}).get("error"), FieldError):
        path, msg = f"{path}.{cause.field}", str(cause)
    extra = f" (got {err['input']!r})" if err.get("type") not in ("extra_forbidden", "missing") and not isinstance(err.get("input"), dict) else ""
    if err.get("type") == "extra_forbidden":
        msg = "unknown field"
    more = f" [+{len(exc.errors()) - 1} more]" if len(exc.errors()) > 1 else ""
    return f"{path}: {msg}{extra}{more}"


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. finetune.lr=1e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides or []:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return data


def build_config(data: dict, overrides: list[str] | None = None, output: str | None = None) -> RunConfig:
    data = apply_overrides(dict(data), overrides or [])
    if output is not None:  # `--output ""` is an error, not "use the config's output"
        data["output"] = output
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None


# Input paths a config file may give relative to itself (a VAE hub id such as org/name stays as it is).
_INPUT_PATHS = (("model", "checkpoint"), ("model", "options", "vae"), ("data", "path"), ("evaluate", "reference_source"),
               ("diagnose", "real_source"))


def shipped_configs() -> dict[str, Path]:
    """The configs that ship with the package, by name (`tiny`, `quickstart`, ...)."""
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.yaml"))}


def find_config(name: str | Path) -> Path:
    """A config file: a path to one, else the name of a shipped config (`tiny` or `tiny.yaml`)."""
    p = Path(name)
    if p.is_file():
        return p
    shipped = shipped_configs()
    if p.parent == Path(".") and p.suffix in ("", ".yaml") and p.stem in shipped:
        return shipped[p.stem]
    raise ConfigError(f"config file not found: {name} (shipped configs, by name: {', '.join(shipped)})")


def _relative_to_file(data: dict, config_path: Path) -> dict:
    base = config_path.resolve().parent
    for keys in _INPUT_PATHS:
        node = data
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(keys[-1]), str):
            node[keys[-1]] = _resolve_local(node[keys[-1]], keep_if_missing=keys[-1] == "vae", base=base)
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None, output: str | None = None) -> RunConfig:
    """The config in a file, or a shipped config by name (None: the defaults). Relative input paths in the file are
    taken from the file's folder, those in `overrides` from the working folder; `output` from the working folder."""
    data = {}
    if path:
        file = find_config(path)
        data = _relative_to_file(load_yaml(file), file)
    return build_config(data, overrides, output)


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def fingerprint(*parts: Any) -> str:
    """Stable hash of config sections / upstream hashes: decides whether a stage's output is current."""
    blob = json.dumps([p.model_dump(mode="json") if isinstance(p, BaseModel) else p for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
