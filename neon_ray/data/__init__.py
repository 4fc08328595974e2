"""Datasets behind one small interface: `load(split) -> (uint8 images (N, C, H, W), int64 labels (N,))`."""

from .base import ImageDataset, get_dataset, register_dataset

__all__ = ["ImageDataset", "get_dataset", "register_dataset"]
