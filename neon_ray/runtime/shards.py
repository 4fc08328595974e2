"""A training worker's fixed share of a Parquet sample set, visited in a seeded order.

Worker r of W holds the samples whose index ≡ r (mod W), read once and kept encoded (PNG bytes:
1/W of S). Epoch e visits them in the permutation keyed by (seed, "ft", r, e), in micro-batches
without a ragged tail, so the micro-batch of any step is a pure function of (seed, rank, world, step):
the same whatever the timing, and a resumed run picks up exactly where it stopped. (Ray Data's
streaming split hands blocks to whichever worker asks first, which made θ_ft depend on load.)
"""

from __future__ import annotations

import numpy as np

from .. import storage
from ..errors import NeonError
from .seeds import derive_seed


class SampleShard:
    def __init__(self, uri: str, column: str, rank: int, world: int):
        import pyarrow as pa
        import pyarrow.dataset as pads

        fs, path = storage.filesystem(uri)
        dataset = pads.dataset(path, filesystem=fs, format="parquet")
        parts = []
        for batch in dataset.to_batches(columns=["index", "label", column]):  # one record batch at a time
            index = batch.column("index").to_numpy()
            mine = np.nonzero(index % world == rank)[0]
            if len(mine):
                parts.append(batch.take(pa.array(mine)))
        table = pa.Table.from_batches(parts).sort_by("index") if parts else None
        self.rank, self.column = rank, column
        self.index = table.column("index").to_numpy() if table is not None else np.zeros(0, np.int64)
        self.labels = table.column("label").to_numpy().astype(np.int64) if table is not None else np.zeros(0, np.int64)
        self.blobs = np.array(table.column(column).to_pylist(), dtype=object) if table is not None else np.zeros(0, object)

    def __len__(self) -> int:
        return len(self.index)

    def micro_batch(self, step: int, size: int, seed: int) -> dict[str, np.ndarray]:
        """The micro-batch this worker trains on at `step` (0-based)."""
        per_epoch = len(self) // size
        if per_epoch == 0:
            raise NeonError(f"finetune.batch_size: worker {self.rank}'s share of S holds {len(self)} samples, "
                            f"fewer than its micro-batch of {size}")
        epoch, k = divmod(step, per_epoch)
        order = np.random.default_rng(derive_seed(seed, "ft", self.rank, epoch) % (2**63)).permutation(len(self))
        rows = order[k * size:(k + 1) * size]
        return {self.column: self.blobs[rows], "label": self.labels[rows], "index": self.index[rows]}
