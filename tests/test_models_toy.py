"""Toy 2-D families (paper App. B): the DDPM's ζ knob and the flow's temperature move the sample covariance."""

from __future__ import annotations

import pytest
import torch

from neon_ray.errors import ConfigError
from neon_ray.models import ModelSpec, get_family
from neon_ray.runtime.seeds import sample_seeds

TARGET = torch.tensor([[2.0, 1.0], [1.0, 2.0]])  # App. B: N(0, [[2, 1], [1, 2]])


def make(name: str, preset: str = "mlp-paper"):
    return get_family(name)(ModelSpec(name, preset, (2,), 1))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def train(family, steps: int, seed: int = 0):
    """The paper's setting: 1k real samples of the target, Adam, batches of 256."""
    torch.manual_seed(seed)
    data = torch.distributions.MultivariateNormal(torch.zeros(2), TARGET).sample((1000,))  # (1000, 2)
    net = family.build()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=1e-4)
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(256, dtype=torch.long)
    for _ in range(steps):
        batch = data[torch.randint(0, 1000, (256,), generator=g)]
        loss = family.training_loss(net, batch, labels, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


def covariance(x: torch.Tensor) -> torch.Tensor:
    return torch.cov(x.T.double()).float()


def sample(family, net, settings: dict, n: int = 4000) -> torch.Tensor:
    s = family.sampler_schema.model_validate(settings)
    return family.sample(net, torch.zeros(n, dtype=torch.long), sample_seeds(0, "toy", range(n)), s)


@pytest.fixture(scope="module")
def ddpm():
    family = make("toy-ddpm")
    return family, train(family, 3000)


@pytest.fixture(scope="module")
def flow():
    family = make("toy-flow")
    return family, train(family, 2000)


def test_ddpm_score_scale_moves_the_covariance(ddpm):
    family, net = ddpm
    # Many steps: close to the target. (Few ancestral steps contract: x̂₀'s posterior spread is dropped.)
    cov = covariance(sample(family, net, {"steps": 200}))
    assert torch.linalg.norm(cov - TARGET) / torch.linalg.norm(TARGET) < 0.12, cov
    # The paper's 20-step sampler: ζ > 1 is mode-seeking (narrower), ζ < 1 diversity-seeking (wider).
    dets = {zeta: torch.linalg.det(covariance(sample(family, net, {"score_scale": zeta}))).item() for zeta in (0.9, 1.0, 1.1)}
    assert dets[1.1] < 0.8 * dets[1.0] and dets[0.9] > 1.25 * dets[1.0], dets
    many = {zeta: torch.linalg.det(covariance(sample(family, net, {"steps": 200, "score_scale": zeta}))).item() for zeta in (0.9, 1.1)}
    assert many[1.1] < 0.8 * torch.linalg.det(cov) < 0.8**2 * many[0.9], many


def test_flow_temperature_moves_the_covariance(flow):
    family, net = flow
    cov = covariance(sample(family, net, {"steps": 50}))
    assert torch.linalg.norm(cov - TARGET) / torch.linalg.norm(TARGET) < 0.15, cov
    cold = covariance(sample(family, net, {"steps": 50, "temperature": 0.8}))
    assert torch.linalg.det(cold) < 0.8 * torch.linalg.det(cov)


@pytest.mark.parametrize("name, settings", [("toy-ddpm", {"steps": 4, "score_scale": 1.1}), ("toy-ddpm", {"name": "ddim", "steps": 4}),
                                            ("toy-flow", {"steps": 4, "temperature": 0.7})])
def test_each_sample_depends_only_on_its_seed(name, settings):
    family = make(name, "mlp-tiny")
    torch.manual_seed(0)
    net = family.build().eval()
    s = family.sampler_schema.model_validate(settings)
    seeds, labels = sample_seeds(0, "eval", range(5)), torch.zeros(5, dtype=torch.long)
    together = family.sample(net, labels, seeds, s)
    alone = torch.cat([family.sample(net, labels[i : i + 1], seeds[i : i + 1], s) for i in range(5)])
    torch.testing.assert_close(together, alone)
    assert together.shape == (5, 2) and together.dtype == torch.float32
    assert not torch.allclose(together, family.sample(net, labels, sample_seeds(1, "eval", range(5)), s))


@pytest.mark.parametrize("name", ["toy-ddpm", "toy-flow"])
def test_training_loss_is_finite_and_differentiable(name):
    family = make(name, "mlp-tiny")
    net = family.build()
    loss = family.training_loss(net, torch.randn(8, 2) * 3, torch.zeros(8, dtype=torch.long), torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in net.parameters())


def test_paper_preset_is_four_blocks_of_32():
    net = make("toy-ddpm").build()
    assert len(net.blocks) == 4 and net.inp.out_features == 32


@pytest.mark.parametrize("name, bad, field", [("toy-ddpm", {"score_scale": 0}, "sampler.score_scale"),
                                               ("toy-ddpm", {"score_scale": -1.0}, "sampler.score_scale"),
                                               ("toy-ddpm", {"steps": 0}, "sampler.steps"), ("toy-ddpm", {"name": "euler"}, "sampler.name"),
                                               ("toy-flow", {"temperature": 0.0}, "sampler.temperature"),
                                               ("toy-flow", {"steps": -2}, "sampler.steps")])
def test_sampler_validation_names_the_field(name, bad, field):
    with pytest.raises(ConfigError) as err:
        make(name).validate_sampler(bad)
    assert str(err.value).startswith(field + ":") and "\n" not in str(err.value)
