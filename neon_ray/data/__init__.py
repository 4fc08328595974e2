"""Datasets behind one small interface: `load(split) -> (samples (N, *sample_shape), int64 labels (N,))`."""

from .base import Dataset, ImageDataset, get_dataset, register_dataset
from .codec import CODECS, SampleCodec

__all__ = ["CODECS", "Dataset", "ImageDataset", "SampleCodec", "get_dataset", "register_dataset"]
