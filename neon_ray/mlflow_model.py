"""θ_neon as an MLflow pyfunc model ("models from code": MLflow runs this file; no object is ever pickled).

The weights travel as the safetensors artifact `weights`, the model spec and sampler settings as the
JSON artifact `spec`. `predict` takes a table with `label` and `seed` columns and returns the encoded
samples (`png` for images, `vec` for vectors), sample i drawn from seed i exactly as neon-ray's own
sampling does:

    model = mlflow.pyfunc.load_model("models:/neon-fashion_mnist-diffusion-unet-p2s@champion")
    images = model.predict(pd.DataFrame({"label": [0, 1, 2], "seed": [7, 8, 9]}))

The `neon_ray` package is logged with the model (`code_paths`), so it loads where neon-ray is not installed.
"""


import json

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class NeonSampler(PythonModel):
    def load_context(self, context) -> None:
        from neon_ray.data.codec import CODECS
        from neon_ray.models import ModelSpec
        from neon_ray.runtime.run_model import load_model

        with open(context.artifacts["spec"]) as fh:
            meta = json.load(fh)
        spec = ModelSpec(meta["family"], meta["preset"], tuple(meta["image_shape"]), int(meta["num_classes"]), dict(meta["options"]))
        self.family, self.net = load_model(spec, context.artifacts["weights"])
        self.settings = self.family.validate_sampler(meta["sampler"])
        self.codec = CODECS[meta["codec"]]

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        import torch

        labels = torch.tensor(model_input["label"].to_numpy(dtype="int64", copy=True))
        seeds = [int(s) for s in model_input["seed"]]
        samples = self.codec.from_model(self.family.sample(self.net, labels, seeds, self.settings)).cpu().numpy()
        return pd.DataFrame({self.codec.column: [self.codec.encode(s) for s in samples]})


mlflow.models.set_model(NeonSampler())
