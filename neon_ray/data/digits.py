"""scikit-learn's 8×8 handwritten digits (1797 images, 10 classes), upscaled to uint8 0–255.

A fixed permutation (seed 0) splits it into 1437 train and 360 test images.
"""

from __future__ import annotations

import numpy as np

from .base import ImageDataset, Split, register_dataset


@register_dataset
class Digits(ImageDataset):
    name = "digits"
    image_shape = (1, 8, 8)
    num_classes = 10
    test_size = 360

    def load(self, split: Split) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = np.clip(np.round(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[:, None]
        labels = bunch.target.astype(np.int64)
        order = np.random.default_rng(0).permutation(len(labels))
        idx = order[: self.test_size] if split == "test" else order[self.test_size :]
        return images[idx], labels[idx]
