"""mlmjax: MLM-regularised customization of Stable Diffusion in JAX/Flax.

Public API:
  load_pretrained(path, dtype)   a diffusers-layout Stable Diffusion folder -> Flax modules + params
  save_pretrained(path, model)   the inverse; the folder loads in PyTorch diffusers
  WeightsError                   raised for any checkpoint that does not fit its config
"""

from mlmjax.pretrained import Pretrained, load_pretrained, save_pretrained
from mlmjax.weights import WeightsError

__all__ = ["Pretrained", "WeightsError", "load_pretrained", "save_pretrained"]
