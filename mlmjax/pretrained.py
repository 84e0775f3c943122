"""Stable Diffusion in diffusers layout: load into Flax, save back.

A diffusers-layout folder is what ``StableDiffusionPipeline.save_pretrained`` writes::

    model_index.json
    text_encoder/config.json, model.safetensors           (transformers CLIPTextModel)
    tokenizer/vocab.json, merges.txt, ...                 (optional: the vendored CLIP BPE otherwise)
    unet/config.json, diffusion_pytorch_model.safetensors
    vae/config.json, diffusion_pytorch_model.safetensors
    scheduler/scheduler_config.json

Weights may be fp32 or fp16, single files or sharded with an index; pickles are refused.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mlmjax import files
from mlmjax import tokenizer as tokenizer_lib
from mlmjax import weights
from mlmjax.models import clip_text, shapes, unet, vae

WeightsError = weights.WeightsError


@dataclasses.dataclass(frozen=True)
class _Component:
    """How one network of the pipeline is stored and built."""
    module: ModuleType  # provides the Config, model class, init_params, checkpoint renames
    config_class: str
    model_class: str
    weights_name: str
    library: str  # the model_index.json entry
    class_name: str

    def build(self, config: dict, dtype, source: str):
        config = getattr(self.module, self.config_class).from_dict(config, source)
        return getattr(self.module, self.model_class)(config=config, dtype=dtype)


_COMPONENTS = {
    "text_encoder": _Component(clip_text, "CLIPTextConfig", "CLIPTextModel", "model.safetensors",
                               "transformers", "CLIPTextModel"),
    "unet": _Component(unet, "UNetConfig", "UNet2DConditionModel", "diffusion_pytorch_model.safetensors",
                       "diffusers", "UNet2DConditionModel"),
    "vae": _Component(vae, "VAEConfig", "AutoencoderKL", "diffusion_pytorch_model.safetensors",
                      "diffusers", "AutoencoderKL"),
}


@dataclasses.dataclass
class Pretrained:
    """A Stable Diffusion model as mlmjax uses it: Flax modules plus their parameters.

    Attributes:
      tokenizer: a transformers ``CLIPTokenizer`` (no torch needed).
      text_encoder, unet, vae: Flax modules; call them with ``module.apply({'params': p}, ...)``.
      scheduler_config: the ``scheduler/scheduler_config.json`` dict (betas, prediction type, ...).
      params: ``{'text_encoder': ..., 'unet': ..., 'vae': ...}``, plain nested dicts of numpy arrays on
        the host: whoever uses them puts them where they belong (a train state puts each onto its
        sharding on the mesh, so no device ever holds a whole copy first). Jitted functions accept
        them as they are; one called many times should be given them ``jax.device_put`` once.
      path: the folder it was loaded from, if any.
    """
    tokenizer: Any
    text_encoder: clip_text.CLIPTextModel
    unet: unet.UNet2DConditionModel
    vae: vae.AutoencoderKL
    scheduler_config: dict
    params: dict
    path: str | None = None

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along each side (8 for Stable Diffusion)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """The image size the UNet was trained at: its ``sample_size`` in latents × the VAE factor."""
        return int(self.unet.config.to_dict().get("sample_size", 64)) * self.vae_scale_factor


def _read_json(path: str) -> dict:
    return files.read_json_object(path, WeightsError, "is this a diffusers-layout Stable Diffusion folder?")


def build_component(component: str, config: dict, dtype=jnp.float32, source: str = "config"):
    """The Flax module of ``component`` (``text_encoder``, ``unet``, ``vae``) from its config dict."""
    return _COMPONENTS[component].build(dict(config), dtype, source)


def init_component(component: str, module, seed: int) -> dict:
    """Random parameters for ``module``, deterministic in ``seed``, float32.

    Kernels are LeCun-normal (N(0, 1/fan_in)), embeddings N(0, 0.02), norm scales 1, biases 0, drawn
    with numpy from the abstract shapes, and returned as numpy arrays on the host. ``module.init``
    would give the same kind of weights, but XLA takes ~40 s to compile it even for the tiny UNet
    (one inlined truncated-normal sampler per tensor); this takes milliseconds.
    """
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = getattr(path[-1], "key", "")
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return rng.standard_normal(leaf.shape, np.float32) / np.sqrt(fan_in, dtype=np.float32)
        if name == "embedding":
            return rng.standard_normal(leaf.shape, np.float32) * np.float32(0.02)
        if name == "scale":
            return np.ones(leaf.shape, np.float32)
        if name == "bias":
            return np.zeros(leaf.shape, np.float32)
        raise ValueError(f"no initialiser for parameter {jax.tree_util.keystr(path)}")

    return jax.tree_util.tree_map_with_path(draw, abstract_params(component, module))


def abstract_params(component: str, module) -> dict:
    """The parameter tree of ``module`` as shapes only (no memory, no compute)."""
    return shapes.abstract_params(_COMPONENTS[component].module.init_params, module)


def load_component(folder: str, component: str, dtype=jnp.float32):
    """Loads one network (``text_encoder``, ``unet`` or ``vae``) from its sub-folder.

    Returns ``(module, params)``; the module computes in ``dtype`` and the parameters are ``dtype``
    numpy arrays on the host (see :class:`Pretrained`).
    """
    spec = _COMPONENTS[component]
    config_path = os.path.join(folder, "config.json")
    module = build_component(component, _read_json(config_path), dtype, config_path)
    state_dict, source = weights.read_safetensors(folder, spec.weights_name)
    params = weights.params_from_state_dict(
        state_dict, abstract_params(component, module), source=source, dtype=np.dtype(dtype),
        rename=spec.module.rename_checkpoint_key, ignore=spec.module.IGNORED_CHECKPOINT_KEYS)
    return module, params


def load_pretrained(path: str, dtype=jnp.float32) -> Pretrained:
    """Loads a diffusers-layout Stable Diffusion folder (SD 1.x or 2.x) into Flax.

    Every tensor must match the model described by the folder's configs exactly; anything else is a
    ``WeightsError`` naming the file and key.
    """
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise WeightsError(f"{path}: folder not found; `pretrained` must be a diffusers-layout folder "
                           "(what StableDiffusionPipeline.save_pretrained writes)")
    index_path = os.path.join(path, "model_index.json")
    index = _read_json(index_path)
    for name in (*_COMPONENTS, "scheduler"):
        if name not in index:
            raise WeightsError(f"{index_path}: no {name!r} entry; mlmjax needs text_encoder, tokenizer, "
                               "unet, vae and scheduler")
        if not os.path.isdir(os.path.join(path, name)):
            raise WeightsError(f"{path}: sub-folder {name}/ is missing")
    modules, params = {}, {}
    for name in _COMPONENTS:
        modules[name], params[name] = load_component(os.path.join(path, name), name, dtype)
    scheduler_config = _read_json(os.path.join(path, "scheduler", "scheduler_config.json"))
    return Pretrained(tokenizer=tokenizer_lib.load_tokenizer(os.path.join(path, "tokenizer")),
                      scheduler_config=scheduler_config, params=params, path=path, **modules)


def _model_index(scheduler_config: dict) -> dict:
    index = {"_class_name": "StableDiffusionPipeline",
             "feature_extractor": [None, None], "safety_checker": [None, None],
             "requires_safety_checker": False,
             "scheduler": ["diffusers", scheduler_config.get("_class_name", "DDPMScheduler")],
             "tokenizer": ["transformers", "CLIPTokenizer"]}
    for name, spec in _COMPONENTS.items():
        index[name] = [spec.library, spec.class_name]
    return index


def _write_json(path: str, data: dict) -> None:
    files.write_json_atomic(path, data)


def save_component(folder: str, component: str, module, params: dict, *, dtype=np.float32) -> None:
    """Writes one network's ``config.json`` and weights into ``folder``, as :func:`load_component` reads them.

    The config is the module's, so a module cloned with a changed config (e.g. a text encoder whose
    vocabulary grew by added tokens) is written consistently with its parameters.
    """
    spec = _COMPONENTS[component]
    os.makedirs(folder, exist_ok=True)
    _write_json(os.path.join(folder, "config.json"), module.config.to_dict())
    state_dict = weights.state_dict_from_params(params, dtype=dtype)
    export_key = getattr(spec.module, "export_checkpoint_key", lambda key: key)
    weights.write_safetensors(os.path.join(folder, spec.weights_name),
                              {export_key(k): v for k, v in state_dict.items()})


def save_pretrained(path: str, model: Pretrained, params: dict | None = None, *,
                    dtype=np.float32, overwrite: bool = False) -> None:
    """Writes ``model`` (with ``params`` instead of ``model.params`` if given) as a diffusers folder.

    The result loads in PyTorch diffusers (``StableDiffusionPipeline.from_pretrained``) and back in
    mlmjax bit for bit (``load_pretrained``). The folder is assembled next to ``path`` and moved into
    place at the end, so an interrupted save leaves nothing half-written under ``path``.
    """
    params = model.params if params is None else params
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path) and os.listdir(path) and not overwrite:
        raise FileExistsError(f"{path}: folder exists and is not empty; choose a new one or pass overwrite=True")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".mlmjax-save-", dir=parent)
    try:
        _write_json(os.path.join(staging, "model_index.json"), _model_index(model.scheduler_config))
        for name in _COMPONENTS:
            save_component(os.path.join(staging, name), name, getattr(model, name), params[name], dtype=dtype)
        os.makedirs(os.path.join(staging, "scheduler"))
        _write_json(os.path.join(staging, "scheduler", "scheduler_config.json"), model.scheduler_config)
        model.tokenizer.save_pretrained(os.path.join(staging, "tokenizer"))
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
