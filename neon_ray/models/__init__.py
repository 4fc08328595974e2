"""Model families behind one small protocol (see `base.ModelFamily`). Pure torch: no Ray, DeepSpeed or MLflow."""

from .base import ModelFamily, ModelSpec
from .registry import get_family, register_family

__all__ = ["ModelFamily", "ModelSpec", "get_family", "register_family"]
