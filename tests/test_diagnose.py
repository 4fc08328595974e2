"""`neon-ray diagnose` (issue 26): the math on a tiny model where the answer is known, the stage through a real Ray
pipeline on the tiny config, the CLI's --json contract, the bad-input lines, and the tune prior's bracket.

Sign convention (the paper's, neon-method.md): a fine-tune that moved θ *up* the real-data loss (Δ = +η·g,
the self-training direction −Δ anti-aligned with g) is one Neon undoes: sign +1 (w > 0 helps) and the paper's
cosine cos(g, −Δ) = −1. A fine-tune that moved down it (Δ = −η·g) is one Neon would undo wrongly: sign −1, cosine +1.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from _support import ROOT, TINY, assert_imports_no_distributed_stack, neon_ray_inprocess, tiny_config
from neon_ray.config import load_config
from neon_ray.diagnosis import bracket_of, diagnose
from neon_ray.errors import NeonError

TOY = ROOT / "neon_ray" / "configs" / "toy_gaussian.yaml"
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: a second thread only adds contention


# ----------------------------------------------------------------------------------------------
# The math: a toy DDPM on the paper's 2-D Gaussian, Δ built from its own real-data gradient


def _toy(tmp_path):
    from neon_ray.runtime.run_model import dataset_of, family_for, spec_of
    from neon_ray.runtime.seeds import derive_seed

    cfg = load_config(TOY, ["model.preset=mlp-tiny", "data.options={n_train: 100, n_test: 4000, seed: 0}"], str(tmp_path / "out"))
    family = family_for(spec_of(cfg))
    torch.manual_seed(0)
    net = family.build()
    x, _ = dataset_of(cfg).load("test")
    xs = torch.from_numpy(x[:2048])
    batches = [(xs[i * 256:(i + 1) * 256], torch.zeros(256, dtype=torch.int64)) for i in range(8)]
    seeds = [derive_seed(7, "diagnose", b) for b in range(len(batches))]
    return family, net, batches, seeds


def _mean_gradient(family, net, batches, seeds) -> dict[str, torch.Tensor]:
    """ḡ over the same batches and draws the diagnosis uses (common random numbers)."""
    net.eval()
    net.zero_grad(set_to_none=True)
    for (x, y), s in zip(batches, seeds):
        (family.training_loss(net, x, y, torch.Generator().manual_seed(s)) / len(batches)).backward()
    grads = {n: p.grad.detach().clone() for n, p in net.named_parameters()}
    net.zero_grad(set_to_none=True)
    return grads


def test_the_diagnosis_math_imports_no_distributed_stack():
    assert_imports_no_distributed_stack("neon_ray.diagnosis", "neon_ray.cost")


@pytest.mark.parametrize("direction", [+1, -1])
def test_a_delta_along_the_real_gradient_gives_the_known_sign_cosine_and_loss_minimum(tmp_path, direction):
    family, net, batches, seeds = _toy(tmp_path)
    base = {k: v.detach().clone() for k, v in net.state_dict().items()}
    g = _mean_gradient(family, net, batches, seeds)
    norm = torch.sqrt(sum((v.double() ** 2).sum() for v in g.values())).item()
    eta = 0.05 / norm  # a step of length 0.05 along ±g: L is close to linear in w over the w points
    finetuned = {k: (v + direction * eta * g[k]) if k in g else v.clone() for k, v in base.items()}
    ws = [-1.0, -0.5, 0.5, 1.0]
    d = diagnose(family.training_loss, net, base, finetuned, batches, seeds, ws)

    assert d.sign == direction
    assert d.cosine == pytest.approx(-direction, abs=1e-5)  # cos(g, −Δ): −1 when Δ = +η·g
    assert d.g_dot_delta == pytest.approx(direction * eta * norm ** 2, rel=1e-4)  # ⟨ḡ, Δ⟩ = ±η·|ḡ|²
    assert d.delta_norm == pytest.approx(0.05, rel=1e-4) and d.grad_norm == pytest.approx(norm, rel=1e-4)
    assert abs(d.g_dot_delta) > 2 * d.g_dot_delta_se
    assert d.loss_argmin_w == direction * 1.0  # the loss falls along −direction·g: lowest at the far w point on that side
    assert d.bracket == sorted([direction * 0.5, direction * 1.0]) and d.bracket_open
    curve = {r["w"]: r for r in d.losses}
    assert sorted(curve) == [-1.0, -0.5, 0.0, 0.5, 1.0] and curve[0.0]["diff"] == 0.0
    # L(θ(w)) − L(θ_base) ≈ −w·⟨g, Δ⟩ for small steps (the first-order term the sign rests on)
    assert curve[0.5]["diff"] == pytest.approx(-0.5 * d.g_dot_delta, rel=0.05)
    # θ_base is left in the network
    assert all(torch.equal(net.state_dict()[k], v) for k, v in base.items())


def test_the_diagnosis_repeats_and_shares_of_the_batches_join_into_it(tmp_path):
    """Common random numbers: the same numbers twice; what Ray tasks each measure on a contiguous share of the batches
    joins into the whole's diagnosis."""
    from neon_ray.diagnosis import conclude, measure

    family, net, batches, seeds = _toy(tmp_path)
    base = {k: v.detach().clone() for k, v in net.state_dict().items()}
    torch.manual_seed(1)
    finetuned = {k: v + 1e-3 * torch.randn_like(v) for k, v in base.items()}
    whole = diagnose(family.training_loss, net, base, finetuned, batches, seeds, [0.5, 1.0])
    again = diagnose(family.training_loss, net, base, finetuned, batches, seeds, [0.5, 1.0])
    assert again.g_dot_delta == whole.g_dot_delta and again.losses == whole.losses
    parts = [measure(family.training_loss, net, base, finetuned, batches[a:b], seeds[a:b], [0.5, 1.0]) for a, b in ((0, 3), (3, 8))]
    joined = conclude(parts, [0.5, 1.0], whole.seconds)
    assert joined.losses == whole.losses and joined.g_dot_delta == whole.g_dot_delta and joined.sign == whole.sign
    assert joined.grad_norm == pytest.approx(whole.grad_norm, rel=1e-6) and joined.cosine == pytest.approx(whole.cosine, rel=1e-5)


def test_a_zero_delta_abstains_over_the_whole_range():
    assert bracket_of([-1.0, 0.0, 0.5, 2.0], [3.0, 2.0, 1.0, 1.5], 0) == (-1.0, 2.0, False)
    # the minimum inside the predicted side: its neighbours; at w = 0: [0, the first point]
    assert bracket_of([-1.0, 0.0, 0.5, 1.0, 2.0], [3.0, 2.0, 1.0, 0.5, 1.5], 1) == (0.5, 2.0, False)
    assert bracket_of([-1.0, 0.0, 0.5, 1.0], [3.0, 1.0, 1.5, 2.0], 1) == (0.0, 0.5, False)
    assert bracket_of([-1.0, -0.5, 0.0, 0.5], [2.0, 1.0, 3.0, 4.0], -1) == (-1.0, 0.0, False)


# ----------------------------------------------------------------------------------------------
# Config and bad input (no Ray)


def test_the_diagnose_section_is_checked_at_load(tmp_path):
    with pytest.raises(NeonError, match=r"^diagnose\.w_points\[1\]: duplicate value 0\.5"):
        tiny_config(tmp_path, "diagnose.w_points=[0.5,0.5]")
    with pytest.raises(NeonError, match=r"^diagnose\.batches: "):
        tiny_config(tmp_path, "diagnose.batches=1")
    with pytest.raises(NeonError, match=r"^diagnose\.zero_stage: "):
        tiny_config(tmp_path, "diagnose.zero_stage=4")
    with pytest.raises(NeonError, match=r"^tune\.prior: "):
        tiny_config(tmp_path, "tune.prior=always")
    cfg = tiny_config(tmp_path, "tune.prior=diagnose")
    assert cfg.diagnoses() and not tiny_config(tmp_path).diagnoses()


def test_no_held_out_split_is_one_line_naming_the_field(tmp_path):
    args = ["diagnose", str(TINY), "--output", str(tmp_path / "out"), "--set", "data.name=test_diagnose:TrainOnlyDigits"]
    res = neon_ray_inprocess(*args)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("neon-ray: error: diagnose.real_source: dataset 'test_diagnose:TrainOnlyDigits' "
                                                   "has no held-out (test) split"), res.stderr
    assert not (tmp_path / "out").exists()  # nothing set up
    # the same at load when the run would diagnose
    with pytest.raises(NeonError, match=r"^diagnose\.real_source: "):
        tiny_config(tmp_path, "data.name=test_diagnose:TrainOnlyDigits", "tune.prior=diagnose")


def test_diagnose_before_finetune_names_the_stage_to_run(tmp_path, tiny_checkpoint):
    res = neon_ray_inprocess("diagnose", str(TINY), "--output", str(tmp_path / "out"), "--set", "mlflow.enabled=false",
                             "--set", f"model.checkpoint={tiny_checkpoint}")
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [
        f"neon-ray: error: stage finetune has not run under {tmp_path / 'out'}; run `neon-ray finetune` (or `neon-ray run`) first"]


def _hand_made_finetune(cfg, base, tmp_path, scale: float = 1e-3):
    """A finetune stage's output made by hand (θ_base plus a seeded perturbation) under the config's own hash, so
    that the diagnose stage runs without a Ray Train fine-tune."""
    from neon_ray.manifest import StageRecord
    from neon_ray.models.checkpoint import load_checkpoint, save_checkpoint
    from neon_ray.pipeline import stage_hash
    from neon_ray.runtime.run_model import spec_of

    state, _ = load_checkpoint(str(base))
    g = torch.Generator().manual_seed(0)
    ft = {k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in state.items()}
    rec = StageRecord("finetune", cfg.output, stage_hash(cfg, "finetune"))
    path = f"{rec.dir}/model.safetensors"
    save_checkpoint(path, ft, spec_of(cfg))
    rec.outputs = {"model": path}
    rec.finish()


def test_the_diagnose_command_prints_one_json_line_and_records_the_stage(tmp_path, tiny_checkpoint):
    """The stage and the command without a Ray fine-tune: --json's contract, the manifest, the MLflow child run, a rerun
    that skips, and the human line without --json."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "out"
    sets = [f"model.checkpoint={tiny_checkpoint}", "diagnose.batches=3", "diagnose.batch_size=16", "diagnose.w_points=[-0.5,0.5,1.0]"]
    _hand_made_finetune(tiny_config(out, *sets), tiny_checkpoint, tmp_path)
    args = ["diagnose", str(TINY), "--output", str(out), *[a for s in sets for a in ("--set", s)]]
    # the output's own store, whatever an earlier test of this process left in MLFLOW_TRACKING_URI
    res = neon_ray_inprocess(*args, "--json", env={"MLFLOW_TRACKING_URI": ""})
    assert res.returncode == 0, res.stderr
    last = res.stdout.strip().splitlines()[-1]
    d = json.loads(last)
    assert {"sign", "bracket", "cosine", "loss_argmin_w", "seconds"} <= set(d) and "\n" not in last
    assert d["sign"] in (-1, 0, 1) and d["loss_argmin_w"] in (-0.5, 0.0, 0.5, 1.0) and d["metrics"]["images"] == 48
    assert [r["w"] for r in d["metrics"]["losses"]] == [-0.5, 0.0, 0.5, 1.0]
    manifest = json.loads((out / "diagnose" / "manifest.json").read_text())
    assert manifest["metrics"]["bracket"] == d["bracket"] and manifest["inputs"]["real"] == "fashion_mnist/test"
    assert manifest["params"]["batches"] == 3 and manifest["inputs"]["finetuned"] == "finetune/model.safetensors"
    client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("neon-ray").experiment_id], "tags.stage = 'diagnose'")
    assert len(runs) == 1 and runs[0].data.metrics["sign"] == d["sign"] and runs[0].data.metrics["cosine"] == pytest.approx(d["cosine"])
    assert {"bracket_lo", "bracket_hi", "g_dot_delta", "loss_at.0.5"} <= set(runs[0].data.metrics)
    again = neon_ray_inprocess(*args, env={"MLFLOW_TRACKING_URI": ""})  # current: skipped (the manifest is not rewritten); the human line
    assert again.returncode == 0 and json.loads((out / "diagnose" / "manifest.json").read_text()) == manifest
    assert again.stdout.strip().splitlines()[-1].startswith(f"diagnose: sign {d['sign']:+d}"), again.stdout



def _family_configs() -> list[str]:
    from neon_ray.config import shipped_configs

    return sorted(name for name in shipped_configs() if name.startswith("tiny"))  # every family's tiny config, new ones too


FAMILY_CONFIGS = _family_configs()


@pytest.mark.parametrize("name", FAMILY_CONFIGS)
def test_every_familys_tiny_config_diagnoses_with_common_random_numbers(tmp_path, name):
    """The stage on every family's tiny config (a random base, a hand-made fine-tune): the family's own loss, the same
    draws for every θ, so a rerun gives the same numbers to the last digit."""
    from neon_ray.config import load_config
    from neon_ray.models.checkpoint import save_checkpoint
    from neon_ray.pipeline import run_command
    from neon_ray.runtime.run_model import family_for, spec_of

    out = tmp_path / "out"
    small = ["diagnose.batches=2", "diagnose.batch_size=8", "diagnose.w_points=[0.5]", "mlflow.enabled=false"]
    cfg = load_config(name, small, str(out))
    family = family_for(spec_of(cfg))
    torch.manual_seed(0)
    base = tmp_path / "base.safetensors"
    save_checkpoint(str(base), family.build().state_dict(), family.spec, train_images=1000)
    cfg = load_config(name, [*small, f"model.checkpoint={base}"], str(out))
    _hand_made_finetune(cfg, base, tmp_path)
    first = run_command(cfg, "diagnose").metrics
    again = run_command(cfg, "diagnose", force=True).metrics
    assert first["losses"] == again["losses"] and first["g_dot_delta"] == again["g_dot_delta"], name
    assert all(math.isfinite(r["loss"]) for r in first["losses"]) and math.isfinite(first["cosine"]) and first["images"] == 16


def test_a_search_from_the_prior_needs_the_diagnosis_first(tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    sets = [f"model.checkpoint={tiny_checkpoint}", "tune.prior=diagnose", "tune.search=bracket", "mlflow.enabled=false"]
    _hand_made_finetune(tiny_config(out, *sets), tiny_checkpoint, tmp_path)
    res = neon_ray_inprocess("tune", str(TINY), "--output", str(out), *[a for s in sets for a in ("--set", s)])
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [
        f"neon-ray: error: stage diagnose has not run under {out}; run `neon-ray diagnose` (or `neon-ray run`) first"]

@pytest.mark.slow
def test_the_diagnosis_over_ray_tasks_is_the_drivers(tmp_path, tiny_checkpoint, ray_local):
    """diagnose.workers: 2 Ray tasks share the batches; the same numbers as in the driver (a real local Ray)."""
    from neon_ray.pipeline import run_command

    sets = [f"model.checkpoint={tiny_checkpoint}", "diagnose.batches=4", "diagnose.batch_size=16", "diagnose.w_points=[0.5,1.0]",
            "mlflow.enabled=false"]
    cfg = tiny_config(tmp_path / "out", *sets)
    _hand_made_finetune(cfg, tiny_checkpoint, tmp_path)
    here = run_command(cfg, "diagnose").metrics
    there = run_command(tiny_config(tmp_path / "out", *sets, "diagnose.workers=2", "diagnose.cpus_per_worker=0.5"), "diagnose",
                        force=True).metrics
    assert there["losses"] == here["losses"] and there["g_dot_delta"] == here["g_dot_delta"] and there["sign"] == here["sign"]
    assert there["cosine"] == pytest.approx(here["cosine"], rel=1e-5) and there["bracket"] == here["bracket"]


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_the_diagnosis_on_zero_engines_is_the_drivers(tmp_path, tiny_checkpoint, ray_local, zero_stage):
    """diagnose.zero_stage: 2 Ray Train workers holding θ_base in real DeepSpeed engines (parameters partitioned under
    ZeRO-3, gradients under 2 and 3), every batch on both: the driver's per-batch numbers, up to summation order."""
    from neon_ray.pipeline import run_command

    sets = [f"model.checkpoint={tiny_checkpoint}", "diagnose.batches=3", "diagnose.batch_size=16", "diagnose.w_points=[-0.5,1.0]",
            "mlflow.enabled=false"]
    cfg = tiny_config(tmp_path / "out", *sets)
    _hand_made_finetune(cfg, tiny_checkpoint, tmp_path)
    here = run_command(cfg, "diagnose").metrics
    # ZeRO-2 takes finetune.workers (the tiny config's 2; diagnose.workers 0), ZeRO-3 its own count
    workers = [] if zero_stage == 2 else ["diagnose.workers=2"]
    zero = tiny_config(tmp_path / "out", *sets, f"diagnose.zero_stage={zero_stage}", *workers, "diagnose.cpus_per_worker=0.5")
    there = run_command(zero, "diagnose", force=True)
    assert there.params["zero_stage"] == zero_stage and there.params["workers"] == 2
    m = there.metrics
    assert m["g_dot_delta"] == pytest.approx(here["g_dot_delta"], rel=1e-5)
    assert m["g_dot_delta_se"] == pytest.approx(here["g_dot_delta_se"], rel=1e-4)
    for key in ("cosine", "grad_norm", "delta_norm"):
        assert m[key] == pytest.approx(here[key], rel=1e-5), key
    assert [r["w"] for r in m["losses"]] == [r["w"] for r in here["losses"]]
    assert [r["loss"] for r in m["losses"]] == pytest.approx([r["loss"] for r in here["losses"]], rel=1e-6)
    assert (m["sign"], m["bracket"], m["loss_argmin_w"], m["images"]) == (here["sign"], here["bracket"], here["loss_argmin_w"], here["images"])


from neon_ray.data.digits import Digits  # noqa: E402


class TrainOnlyDigits(Digits):
    """A dataset without a held-out split (a plugin that ships its training images only)."""

    splits = ("train",)


# ----------------------------------------------------------------------------------------------
# Whole-method cost


def test_the_extra_compute_is_reported_three_ways(tmp_path):
    from neon_ray.cost import evaluations_per_sample
    from neon_ray.manifest import Manifest
    from neon_ray.pipeline import _compute

    cfg = tiny_config(tmp_path)  # ddim, 3 steps, guidance 2: 6 evaluations per sample = 2 image-equivalents
    assert evaluations_per_sample(cfg.sampler) == 6 and evaluations_per_sample({"steps": 4, "guidance": 1.0}) == 4
    m = {"pretrain": Manifest(stage="pretrain", config_hash="p", wall_seconds=100.0),
         "generate": Manifest(stage="generate", config_hash="g", metrics={"n_synthetic": 30}, wall_seconds=10.0),
         "finetune": Manifest(stage="finetune", config_hash="f", wall_seconds=20.0,
                              metrics={"finetune_images": 32, "base_train_images": 640, "extra_compute_fraction": 0.05}),
         "evaluate": Manifest(stage="evaluate", config_hash="e", metrics={"n": 40}, wall_seconds=5.0),
         "tune": Manifest(stage="tune", config_hash="t", wall_seconds=15.0,
                          metrics={"trials": [{"w": 0.5, "sampler": {}, "n": 40}, {"w": 1.0, "sampler": {"guidance": 1.0}, "n": 40}],
                                   "final": None})}
    c = _compute(cfg, m)
    # search: 40 × 2 (w 0.5 at γ 2) + 40 × 1 (γ 1: 3 evaluations) + the base's evaluation 40 × 2
    assert c["image_equivalents"] == {"finetune": 32.0, "generate": 60.0, "search": 200.0}
    assert c["extra_compute_fraction"] == pytest.approx({"finetune": 0.05, "with_generation": 92 / 640, "with_search": 292 / 640})
    assert c["seconds_fraction"] == pytest.approx({"finetune": 0.2, "with_generation": 0.3, "with_search": 0.5})


# ----------------------------------------------------------------------------------------------
# tune.prior: diagnose (the searchers start from the bracket; no Ray cluster needed to ask them)


def test_the_prior_is_clipped_to_the_allowed_w_with_one_line(tmp_path, caplog):
    import logging

    from neon_ray.stages.tune import prior_of

    cfg = tiny_config(tmp_path, "tune.search=bracket", "tune.prior=diagnose")  # w range 0.5..1.0 (w_grid), w > 0 only
    with caplog.at_level(logging.INFO, logger="neon_ray"):
        p = prior_of(cfg, {"bracket": [0.25, 1.5], "sign": 1})
        assert p["used"] == [0.25, 1.5] and "diagnosed bracket [0.25, 1.5]" in p["note"]
        p = prior_of(cfg, {"bracket": [-0.25, 2.0], "sign": 1})
        assert p["used"] == [0.5, 2.0] and "clipped to the allowed w > 0: [0.5, 2]" in p["note"]
        p = prior_of(cfg, {"bracket": [-1.0, -0.25], "sign": -1})
        assert p["used"] is None and "predicts w < 0" in p["note"]
        p = prior_of(cfg, {"bracket": [-1.0, 2.0], "sign": 0})
        assert p["used"] is None and "abstained" in p["note"]
        p = prior_of(cfg, {"bracket": [0.1, 0.25], "sign": 1, "bracket_open": True})  # the loss still fell at 0.25
        assert p["used"] == [0.1, 1.0] and p["bracket"] == [0.1, 0.25]
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tune.prior:")]
    assert len(notes) == 5  # one line each
    negative = tiny_config(tmp_path, "tune.search=bracket", "tune.prior=diagnose", "tune.allow_negative_w=true")
    assert prior_of(negative, {"bracket": [-1.0, -0.25], "sign": -1})["used"] == [-1.0, -0.25]


def test_the_bracket_and_optuna_searchers_start_from_the_prior(tmp_path):
    from tuning.searchers import make_search
    from tuning.spaces import W

    cfg = tiny_config(tmp_path, "tune.search=bracket", "tune.space={w: {low: 0.1, high: 3.0}}", "tune.bracket_steps=3")
    search, _, _ = make_search(cfg, prior=(0.4, 0.8))
    asked = [search.suggest(f"t{i}") for i in range(2)]  # the two interior golden-section points of the prior bracket
    assert all(0.4 < c[W] < 0.8 for c in asked), asked
    plain, _, _ = make_search(cfg)
    assert any(c[W] > 0.8 for c in (plain.suggest("a"), plain.suggest("b")))

    cfg = tiny_config(tmp_path, "tune.search=optuna", "tune.space={w: {low: 0.1, high: 1.0}}", "tune.num_trials=4")
    search, _, _ = make_search(cfg, prior=(0.4, 2.0))
    firsts = [search.suggest(f"t{i}")[W] for i in range(3)]
    assert firsts[:2] == [0.4, 1.0], firsts  # the ends and middle, clipped into the configured range (1.2 and 2.0 → 1.0)


# ----------------------------------------------------------------------------------------------
# Through the product: the session's tiny run (real Ray, DeepSpeed, MLflow sqlite), copied, then diagnosed and searched


@pytest.mark.slow
def test_diagnose_and_a_search_from_its_bracket_on_the_tiny_run(tmp_path, undisturbed_tiny_run):
    import shutil

    from mlflow.tracking import MlflowClient

    from _support import neon_ray_cli

    made, _, sets = undisturbed_tiny_run
    out = tmp_path / "tiny"
    shutil.copytree(made, out)  # a copied output reruns in place: generate and finetune are current
    small = ["diagnose.batches=4", "diagnose.batch_size=16", "diagnose.w_points=[-0.5,0.5,1.0,2.0]"]  # unet-tiny: ~9 ms a sample-pass
    same = [a for s in [*sets, *small] for a in ("--set", s)]
    env = {"MLFLOW_TRACKING_URI": ""}

    # `neon-ray diagnose --json`: one single-line JSON object, last on stdout.
    res = neon_ray_cli("diagnose", str(TINY), "--output", str(out), *same, "--json", timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    d = json.loads(res.stdout.strip().splitlines()[-1])
    assert {"sign", "bracket", "cosine", "loss_argmin_w", "seconds"} <= set(d)
    assert d["sign"] in (-1, 0, 1) and len(d["bracket"]) == 2 and d["bracket"][0] < d["bracket"][1]
    assert -1 <= d["cosine"] <= 1 and d["seconds"] > 0
    assert d["metrics"]["images"] == 4 * 16 and d["metrics"]["batches"] == 4  # seeded rows of the 10k test split
    manifest = json.loads((out / "diagnose" / "manifest.json").read_text())
    assert manifest["metrics"]["bracket"] == d["bracket"] and manifest["inputs"]["real"] == "fashion_mnist/test"
    client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("neon-ray").experiment_id], "tags.stage = 'diagnose'")
    assert len(runs) == 1 and runs[0].data.metrics["sign"] == d["sign"] and "loss_at.0.5" in runs[0].data.metrics
    assert runs[0].data.params["w_points"] == json.dumps([-0.5, 0.5, 1.0, 2.0])

    # `run` with tune.prior: diagnose: the diagnosis is reused (current), the bracket search starts from it and says so.
    prior = ["--set", "tune.prior=diagnose", "--set", "tune.search=bracket", "--set", "tune.bracket_steps=2"]
    res = neon_ray_cli("run", str(TINY), "--output", str(out), *same, *prior, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "diagnose: up to date" in res.stderr and "tune.prior: " in res.stdout + res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["diagnosis"]["bracket"] == d["bracket"]
    p = summary["search"]["prior"]
    assert p["source"] == "diagnose" and p["bracket"] == d["bracket"] and p["note"].startswith("tune.prior: ")
    if p["used"]:  # the bracket searcher's w lie inside the (clipped) prior bracket
        assert all(p["used"][0] <= t["w"] <= p["used"][1] for t in summary["trials"] if t["w"] > 0), summary["trials"]
    f = summary["compute"]["extra_compute_fraction"]
    assert f["finetune"] == pytest.approx(summary["extra_compute_fraction"]) and f["finetune"] < f["with_generation"] < f["with_search"]
    assert summary["compute"]["seconds_fraction"]["with_search"] > 0
    assert "+ generating S" in res.stdout and "diagnosis: sign" in res.stdout
