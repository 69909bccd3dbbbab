"""The pipeline module `model_index.json` names, for `DiffusionPipeline.from_pretrained(folder,
trust_remote_code=True)`. The shapes demo ships inside `diffusers_tuna2`, so its module is the package's; a folder
saved with `Tuna2Pipeline.save_pretrained(..., save_pipeline_code=True)` holds the whole code instead."""

from diffusers_tuna2.pipeline_tuna2 import Tuna2Pipeline

__all__ = ["Tuna2Pipeline"]
