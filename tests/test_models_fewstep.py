"""Few-step (consistency training) family: boundary condition, curriculum, steps, seeding, validation."""

from __future__ import annotations

import pytest
import torch

from neon_ray.errors import ConfigError
from neon_ray.models import ModelSpec, get_family
from neon_ray.models.fewstep import karras_sigmas
from neon_ray.runtime.seeds import balanced_labels, sample_seeds

SHAPE = (1, 12, 12)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def family():
    return get_family("fewstep")(ModelSpec("fewstep", "fewstep-tiny", SHAPE, 10))


@pytest.fixture(scope="module")
def net(family):
    torch.manual_seed(0)
    net = family.build().eval()
    with torch.no_grad():  # the U-Net's output layers start at zero: give it a non-trivial output
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def test_boundary_condition_f_is_identity_at_sigma_min(family, net):
    x = torch.randn(3, *SHAPE)
    sigma = torch.full((3,), family.hparams["sigma_min"])
    torch.testing.assert_close(net(x, sigma, torch.tensor([0, 1, 10])), x)
    assert not torch.allclose(net(x, sigma * 100, torch.tensor([0, 1, 10])), x)


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_each_image_depends_only_on_its_seed(family, net, steps):
    s = family.sampler_schema.model_validate({"steps": steps, "guidance": 1.5})
    seeds = sample_seeds(0, "eval", range(3))
    labels = torch.from_numpy(balanced_labels(range(3), 10))
    together = family.sample(net, labels, seeds, s)
    alone = torch.cat([family.sample(net, labels[i : i + 1], seeds[i : i + 1], s) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert together.shape == (3, *SHAPE) and together.abs().max() <= 1
    assert not torch.allclose(together, family.sample(net, labels, sample_seeds(1, "eval", range(3)), s))


def test_sampling_levels_descend_from_sigma_max(family):
    for steps in (1, 2, 4, 8):
        sig = family.sampling_sigmas(steps)
        assert len(sig) == steps and sig[0] == pytest.approx(80.0)
        assert all(a > b > family.hparams["sigma_min"] for a, b in zip(sig, sig[1:]))


def test_curriculum_doubles_levels_and_the_counter_advances(family):
    every = family.hparams["levels_double_every"]
    assert [family.num_levels(k * every) for k in (0, 1, 2, 100)] == [11, 21, 41, 1281]  # iCT: 10 → 1280 (+1)
    sig = karras_sigmas(11, 0.002, 80.0)
    assert sig[0] == pytest.approx(0.002) and sig[-1] == pytest.approx(80.0) and (sig.diff() > 0).all()
    p = family.level_probs(sig)
    assert p.shape == (10,) and p.sum() == pytest.approx(1.0) and (p > 0).all()

    net = family.build()
    x = torch.rand(4, *SHAPE) * 2 - 1
    loss = family.training_loss(net, x, torch.arange(4), torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and loss > 0 and int(net.ct_step) == 1
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert net.state_dict()["ct_step"].dtype == torch.int64  # copied, not extrapolated, by the merge


def test_guidance_changes_samples(family, net):
    seeds, labels = sample_seeds(0, "g", range(2)), torch.tensor([1, 2])
    plain = family.sample(net, labels, seeds, family.sampler_schema(steps=2))
    guided = family.sample(net, labels, seeds, family.sampler_schema(steps=2, guidance=3.0))
    assert not torch.allclose(plain, guided)


@pytest.mark.parametrize("bad, field", [({"steps": 3}, "sampler.steps"), ({"steps": 0}, "sampler.steps"), ({"steps": 16}, "sampler.steps"),
                                         ({"guidance": -0.5}, "sampler.guidance"), ({"eta": 1}, "sampler.eta")])
def test_sampler_validation_names_the_field(family, bad, field):
    with pytest.raises(ConfigError) as err:
        family.validate_sampler(bad)
    assert str(err.value).startswith(field + ":") and "\n" not in str(err.value)


def test_fmnist_preset_builds():
    fam = get_family("fewstep")(ModelSpec("fewstep", "fewstep-fmnist", (1, 28, 28), 10))
    out = fam.build()(torch.zeros(2, 1, 28, 28), torch.tensor([1.0, 5.0]), torch.tensor([0, 10]))
    assert out.shape == (2, 1, 28, 28)
