"""Feature extractors registered with torch-fidelity, and their fingerprints.

- `fmnist-classifier`: the small Fashion-MNIST CNN shipped in neon_ray/assets (offline, 128-d).
Statistics carry `fingerprint(name, weights)` so scores from different feature spaces never mix.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache

import torch
from safetensors.torch import load_file
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from ..errors import NeonError
from .classifier import FashionClassifier

ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets")
FMNIST_CLASSIFIER = "fmnist-classifier"
DEFAULT_WEIGHTS = {FMNIST_CLASSIFIER: os.path.join(ASSETS, "fmnist_classifier.safetensors")}


class FashionClassifierExtractor(FeatureExtractorBase):
    """torch-fidelity extractor over `FashionClassifier`. Input: uint8 (B, 1 or 3, 28, 28)."""

    input_size = (28, 28)

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        path = feature_extractor_weights_path or DEFAULT_WEIGHTS[FMNIST_CLASSIFIER]
        if not os.path.isfile(path):
            raise NeonError(f"evaluate.extractor_weights: file not found: {path} (train it with scripts/train_fid_classifier.py)")
        self.net = FashionClassifier()
        self.net.load_state_dict(load_file(path))
        self.net.eval()

    @staticmethod
    def get_provided_features_list():
        return ("feat128", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"fid": "feat128", "kid": "feat128", "prc": "feat128", "isc": "logits"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, 28, 28, dtype=torch.uint8)

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] not in (1, 3) or tuple(x.shape[-2:]) != self.input_size:
            raise NeonError(f"{self.name} expects uint8 images of shape (B, 1|3, 28, 28), got {tuple(x.shape)}")
        if x.shape[1] == 3:  # grey images stored as RGB by image-folder tools
            x = x.float().mean(dim=1, keepdim=True).round().to(torch.uint8)
        features, logits = self.net(x)
        by_name = {"feat128": features, "logits": logits}
        return tuple(by_name[f] for f in self.features_list)


def register_extractors() -> None:
    """Idempotent: torch-fidelity refuses to register a name twice."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if FMNIST_CLASSIFIER not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(FMNIST_CLASSIFIER, FashionClassifierExtractor)


def weights_path(name: str, configured: str | None) -> str | None:
    return configured or DEFAULT_WEIGHTS.get(name)


@lru_cache(maxsize=16)
def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(name: str, configured_weights: str | None) -> str:
    path = weights_path(name, configured_weights)
    digest = _file_digest(path)[:16] if path and os.path.isfile(path) else "builtin"
    return f"{name}@{digest}"


def create_extractor(name: str, configured_weights: str | None, features: list[str], device: str = "cpu"):
    """An extractor instance created through torch-fidelity's own factory."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    from torch_fidelity.utils import create_feature_extractor

    register_extractors()
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        raise NeonError(f"evaluate.extractor: unknown feature extractor {name!r}; registered: {sorted(FEATURE_EXTRACTORS_REGISTRY)}")
    kwargs = {"verbose": False}
    path = weights_path(name, configured_weights)
    if path:
        kwargs["feature_extractor_weights_path"] = path
    extractor = create_feature_extractor(name, features, cuda=False, **kwargs)
    return extractor.to(device)
