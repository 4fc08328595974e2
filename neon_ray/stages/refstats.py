"""`neon-ray ref-stats`: the reference statistics of a config, computed once (or imported) and cached.

Computed from `evaluate.reference_source` (an image folder or a Parquet set) or the dataset's
`evaluate.reference_split`; or imported from a published `.npz` (ADM: `mu`, `sigma`, `mu_s`, `sigma_s`,
`arr_0`; EDM: `mu`, `sigma`) and tagged with the feature space the user names (default: the standard
FID Inception, in which those files were made). Either way the file lands at the configured reference
location (`evaluate.reference`, else the cache), where `evaluate`, `tune` and `fid` find it.
"""

from __future__ import annotations

import logging
import time

from .. import storage
from ..config import RunConfig
from ..errors import NeonError
from ..fid.extractors import INCEPTION_SPACE
from ..fid.stats import import_published
from .evaluate import cached_reference, compute_reference, extractor_fingerprint, extractor_space, reference_uri, sidecar

log = logging.getLogger("neon_ray")
SPACE_ALIASES = {"inception": INCEPTION_SPACE}
SPACE_DIMS = {INCEPTION_SPACE: 2048}


def import_reference(cfg: RunConfig, path: str, feature_space: str = "inception") -> dict:
    """Tag a published statistics file with its feature space and store it as this config's reference."""
    space = SPACE_ALIASES.get(feature_space, feature_space)
    if not storage.exists(path):
        raise NeonError(f"--import: file not found: {path}")
    if space != extractor_space(cfg):
        raise NeonError(f"--import: {path} is in feature space {space}, but evaluate.extractor={cfg.evaluate.extractor} "
                        f"computes {extractor_space(cfg)}; set evaluate.extractor=inception-fid-helper (or the extractor of that space)")
    stats = import_published(storage.read_bytes(path), path, space, SPACE_DIMS.get(space))
    uri = reference_uri(cfg)
    storage.remove(sidecar(uri, "features.npz"))  # a previous computed reference's features are not of this file
    storage.write_bytes_atomic(uri, stats.to_bytes())
    log.info("imported %s (%d-d, feature space %s) → %s", path, len(stats.mu), space, uri)
    return summary(cfg, stats, "imported")


def ref_stats(cfg: RunConfig, import_path: str | None = None, feature_space: str = "inception", num_shards: int | None = None,
              force: bool = False) -> dict:
    t0 = time.time()
    if import_path:
        return import_reference(cfg, import_path, feature_space) | {"seconds": round(time.time() - t0, 2)}
    stats = None if force else cached_reference(cfg)
    state = "up to date" if stats is not None else "computed"
    stats = stats or compute_reference(cfg, num_shards=num_shards)
    return summary(cfg, stats, state) | {"seconds": round(time.time() - t0, 2)}


def summary(cfg: RunConfig, stats, state: str) -> dict:
    features = sidecar(reference_uri(cfg), "features.npz")
    return {"reference": reference_uri(cfg), "state": state, "n": stats.n, "dim": int(len(stats.mu)),
            "feature_space": stats.feature_space, "extractor": extractor_fingerprint(cfg), "source": stats.source,
            "features": features if storage.exists(features) else None}
