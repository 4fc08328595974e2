"""Config: YAML in/out, --set overrides, errors that name the field path."""

from __future__ import annotations

import pytest
import yaml

from neon_ray.config import RunConfig, build_config, load_config, to_yaml
from neon_ray.errors import ConfigError

from _support import TINY


def test_tiny_config_loads_and_round_trips(tmp_path):
    cfg = load_config(TINY, output=str(tmp_path))
    again = RunConfig.model_validate(yaml.safe_load(to_yaml(cfg)))
    assert again == cfg
    assert cfg.output == str(tmp_path)
    assert cfg.sampler.guidance == 2.0 and cfg.sampler.eta == 0.0  # family defaults filled in, typed


def test_overrides_parse_yaml_values(tmp_path):
    cfg = load_config(TINY, ["finetune.lr=3e-5", "tune.w_grid=[0.1, 0.2]", "sampler.guidance=1.5", "mlflow.enabled=false"], str(tmp_path))
    assert cfg.finetune.lr == 3e-5 and cfg.tune.w_grid == [0.1, 0.2]
    assert cfg.sampler.guidance == 1.5 and cfg.mlflow.enabled is False


def test_relative_output_becomes_absolute():
    assert build_config({"output": "outputs/x"}).output.startswith("/")


@pytest.mark.parametrize("override, field", [
    ("finetune.lr=-1", "finetune.lr"),
    ("finetune.zero_stage=4", "finetune.zero_stage"),
    ("generate.num_samples=0", "generate.num_samples"),
    ("sampler.steps=0", "sampler.steps"),
    ("sampler.guidance=-1", "sampler.guidance"),
    ("sampler.bogus=1", "sampler.bogus"),
    ("model.family=nope", "model.family"),
    ("model.preset=huge", "model.preset"),
    ("pretrain.ema_decay=1.5", "pretrain.ema_decay"),
    ("tune.w_grid=[0.5, -1]", "tune.w_grid[1]"),
    ("tune.w_grid=[]", "tune"),
    ("merge.w=.nan", "merge.w"),
    ("merge.w=0", "merge.w"),
    ("finetune.nonsense=1", "finetune.nonsense"),
    ("evaluate.sampler={steps: 0}", "evaluate.sampler.steps"),
    ("evaluate.sampler={bogus: 1}", "evaluate.sampler.bogus"),
])
def test_errors_name_the_field(tmp_path, override, field):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override], str(tmp_path))
    msg = str(err.value)
    assert msg.startswith(field), msg
    assert "\n" not in msg


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(TINY, ["finetune.lr"], str(tmp_path))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("finetune: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)


def test_scoring_sampler_merges_evaluate_overrides(tmp_path):
    cfg = load_config(TINY, ["evaluate.sampler={guidance: 1.0}"], str(tmp_path))
    assert cfg.sampler.guidance == 2.0 and cfg.scoring_sampler() == cfg.sampler.model_copy(update={"guidance": 1.0})
    assert load_config(TINY, [], str(tmp_path)).scoring_sampler() == cfg.sampler


def test_offload_needs_a_zero_stage(tmp_path):
    with pytest.raises(ConfigError, match=r"^finetune\.offload_optimizer: needs finetune\.zero_stage 1, 2 or 3"):
        load_config(TINY, ["finetune.zero_stage=0", "finetune.offload_optimizer=true"], str(tmp_path))


@pytest.mark.parametrize("path", sorted((TINY.parent).glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_names_a_buildable_model(tmp_path, path):
    """A shipped config (neon_ray/configs) that no longer validates (a renamed field, a dropped preset) fails here, not in a user's run."""
    from neon_ray.runtime.run_model import family_for, spec_of

    cfg = load_config(path, output=str(tmp_path))
    if cfg.model.checkpoint is None:  # built here from the preset (the others take their spec from the checkpoint)
        family_for(spec_of(cfg))


def test_shipped_configs_load_by_name_from_any_folder(tmp_path, monkeypatch):
    """`neon-ray run tiny` from any folder: a shipped config by name, its base checkpoint resolved beside it."""
    from neon_ray.config import CONFIG_DIR, shipped_configs

    monkeypatch.chdir(tmp_path)
    assert {"tiny", "quickstart"} <= set(shipped_configs())
    assert load_config("tiny", output="o") == load_config(TINY, output="o")
    assert load_config("tiny.yaml", output="o") == load_config(TINY, output="o")
    quickstart = load_config("quickstart", output="o")
    assert quickstart.model.checkpoint == str(CONFIG_DIR / "checkpoints" / "fmnist-unet-p2s.safetensors")
    assert quickstart.output == str(tmp_path / "o")  # outputs go to the working folder, never into the package


def test_config_paths_are_relative_to_the_config_file(tmp_path, monkeypatch):
    """Input paths in a config file are taken from its folder; those in --set from the working folder."""
    folder, elsewhere = tmp_path / "exp", tmp_path / "elsewhere"
    (folder / "bases").mkdir(parents=True)
    elsewhere.mkdir()
    data = yaml.safe_load(TINY.read_text())
    data["model"]["checkpoint"] = "bases/b.safetensors"
    data["data"]["path"] = "../fmnist"
    (folder / "run.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.chdir(elsewhere)
    cfg = load_config(folder / "run.yaml", output="o")
    assert cfg.model.checkpoint == str(folder / "bases" / "b.safetensors")
    assert cfg.data.path == str(tmp_path / "fmnist")
    cfg = load_config(folder / "run.yaml", ["model.checkpoint=mine.safetensors"], output="o")
    assert cfg.model.checkpoint == str(elsewhere / "mine.safetensors")


def test_unknown_config_name_lists_the_shipped_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"^config file not found: tiny_nope \(shipped configs, by name: .*\btiny\b"):
        load_config("tiny_nope", output=str(tmp_path))


def test_a_familys_recommended_finetune_applies_unless_the_config_sets_it(tmp_path):
    from _support import tiny_config

    assert tiny_config(tmp_path).finetune.betas == (0.9, 0.999)  # torch's, for families without a recommendation
    var = tiny_config(tmp_path, "model.family=var", "model.preset=var-tiny", "sampler={}")
    assert var.finetune.betas == (0.9, 0.95)  # the Neon authors' VAR fine-tune
    assert tiny_config(tmp_path, "model.family=var", "model.preset=var-tiny", "sampler={}",
                       "finetune.betas=[0.8, 0.9]").finetune.betas == (0.8, 0.9)
    imm = load_config(None, ["model.family=imm", "model.preset=imm-tiny", "sampler={}"], output=str(tmp_path)).finetune
    assert (imm.lr, imm.betas, imm.weight_decay) == (1e-6, (0.9, 0.999), 0.0)  # the Neon authors' IMM fine-tune
    assert load_config("tiny_imm", output=str(tmp_path)).finetune.lr == 1e-4  # the config's own lr wins
