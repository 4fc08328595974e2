"""Model math: isolation from Ray/DeepSpeed/MLflow, per-image seeding, losses, checkpoints."""

from __future__ import annotations

import pytest
import torch

from _support import assert_imports_no_distributed_stack
from neon_ray.errors import NeonError
from neon_ray.models import ModelSpec, get_family
from neon_ray.models.base import check_state_dict
from neon_ray.runtime.seeds import balanced_labels, sample_seeds


def test_model_math_imports_no_distributed_stack():
    assert_imports_no_distributed_stack("neon_ray.models.diffusion", "neon_ray.merge", "neon_ray.fid.classifier", "neon_ray.fid.stats",
                                        "neon_ray.train_math")


@pytest.fixture
def family():
    return get_family("diffusion")(ModelSpec("diffusion", "unet-tiny", (1, 28, 28), 10))


@pytest.mark.parametrize("settings", [{"steps": 3, "guidance": 2.0}, {"name": "ancestral", "steps": 3, "guidance": 1.0}])
def test_each_image_depends_only_on_its_seed(family, settings):
    torch.manual_seed(0)
    net = family.build().eval()
    s = family.sampler_schema.model_validate(settings)
    seeds = sample_seeds(0, "eval", range(4))
    labels = torch.from_numpy(balanced_labels(range(4), 10))
    together = family.sample(net, labels, seeds, s)
    alone = torch.cat([family.sample(net, labels[i : i + 1], seeds[i : i + 1], s) for i in range(4)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert together.shape == (4, 1, 28, 28) and together.abs().max() <= 1
    other = family.sample(net, labels, sample_seeds(1, "eval", range(4)), s)
    assert not torch.allclose(together, other)


def test_training_loss_is_finite_and_differentiable(family):
    net = family.build()
    x = torch.rand(6, 1, 28, 28) * 2 - 1
    loss = family.training_loss(net, x, torch.arange(6) % 10, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_balanced_labels_and_seed_keys():
    assert balanced_labels(range(25), 10).tolist()[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert sample_seeds(0, "a", [5]) == sample_seeds(0, "a", [5])
    assert sample_seeds(0, "a", [5]) != sample_seeds(0, "b", [5]) != sample_seeds(1, "a", [5])


def test_state_dict_mismatch_names_keys(family):
    net = family.build()
    sd = dict(net.state_dict())
    first = next(iter(sd))
    sd.pop(first)
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(NeonError) as err:
        check_state_dict(net, sd, "x.safetensors")
    assert first in str(err.value) and "extra.weight" in str(err.value) and "x.safetensors" in str(err.value)


def test_unknown_family_and_preset():
    from neon_ray.errors import ConfigError

    with pytest.raises(ConfigError, match="model.family"):
        get_family("nope")
    with pytest.raises(ConfigError, match="model.preset"):
        get_family("diffusion")(ModelSpec("diffusion", "huge", (1, 28, 28), 10))
