"""The pretrained networks behind the evaluation metrics (PAPER.md §4), loaded from transformers folders.

* CLIP-T and CLIP-I: OpenAI CLIP (the paper uses ViT-B/32), a ``CLIPModel`` folder; a
  ``CLIPVisionModelWithProjection`` folder serves CLIP-I alone.
* DINO: ``facebook/dino-vits16``, a ``ViTModel`` folder.

A folder is what transformers' ``save_pretrained`` writes: ``config.json`` and ``model.safetensors``
(or shards with an index), plus ``preprocessor_config.json`` when the image processor was saved next to
it. Loading is strict (every tensor used, every parameter filled, shapes checked; the error names the
key); pickled weights (``pytorch_model.bin``) are refused: convert them once in PyTorch with
``save_pretrained(folder, safe_serialization=True)``. Known non-parameters are skipped: the
``position_ids`` buffers older files carry, and a ``ViTModel``'s ``pooler.dense`` (``ViTModel``
adds it unless built with ``add_pooling_layer=False``; it is tanh(dense(CLS)), never trained by DINO
and not its feature, which is the final-layernorm CLS token).

Use::

    clip = eval_models.load_clip("/data/clip-vit-base-patch32")
    image_embeds = jax.jit(eval_models.image_embeddings)(clip, images_uint8_nhwc)
    text_embeds = jax.jit(eval_models.text_embeddings)(clip, input_ids)   # CLIP's tokenizer, [B, 77]
    dino = eval_models.load_dino("/data/dino-vits16")
    features = jax.jit(eval_models.image_embeddings)(dino, images_uint8_nhwc)
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mlmjax import files, weights
from mlmjax.models import clip_text, vit

WeightsError = weights.WeightsError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# PIL resampling codes, as preprocessor_config.json stores them, → jax.image.resize methods.
_RESAMPLE = {2: "linear", 3: "cubic"}

_WEIGHTS_NAME = "model.safetensors"
_POSITION_IDS = (r"(text_model\.|vision_model\.)?embeddings\.position_ids",)
_VIT_POOLER = (r"pooler\.dense\.(weight|bias)",)


# ---------------------------------------------------------------------------------------------------
# Preprocessing


def preprocess(images: jax.Array, size: int, mean: Sequence[float], std: Sequence[float], *,
               method: str = "cubic") -> jax.Array:
    """NHWC images → the network's input: values in [0, 1], resized to ``size``×``size``, normalised.

    Args:
      images: ``[B, H, W, C]``, either integers in [0, 255] (uint8 photos or PNGs) or floats in
        [-1, 1] (what the VAE decoder returns; values outside are clipped, as when samples are saved).
      size: the model's ``image_size``.
      mean, std: per channel, on the [0, 1] scale.
      method: ``jax.image.resize`` method: ``"cubic"`` (CLIP's processors, PIL's BICUBIC) or
        ``"linear"`` (``ViTImageProcessor``'s BILINEAR). Shrinking is antialiased, as PIL does.

    The whole image is resized to ``size``×``size``. CLIP's reference processor resizes the short side
    to ``size`` and centre-crops; for square images (every generated sample) the two are the same, a
    non-square photo is squashed here: crop it first. Values are clipped to [0, 1] after resizing, as
    PIL's 8-bit resize clamps, but not rounded to 8 bits (at most half a level of difference).
    Jittable; ``size``, ``mean``, ``std`` and ``method`` are static.
    """
    if images.ndim != 4 or images.shape[-1] != len(mean) or len(mean) != len(std):
        raise ValueError(f"images of shape {tuple(images.shape)} given; expected NHWC [B, H, W, {len(mean)}] "
                         f"for {len(mean)} mean and {len(std)} std values")
    if jnp.issubdtype(images.dtype, jnp.integer):
        x = images.astype(jnp.float32) / 255.0
    else:
        x = jnp.clip((images.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)
    batch, height, width, channels = x.shape
    if (height, width) != (size, size):
        x = jax.image.resize(x, (batch, size, size, channels), method=method, antialias=True)
        x = jnp.clip(x, 0.0, 1.0)  # cubic kernels overshoot
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How a model's images are prepared: ``preprocessing(images)`` is :func:`preprocess` with these."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    method: str = "cubic"

    def __call__(self, images: jax.Array) -> jax.Array:
        return preprocess(images, self.image_size, self.mean, self.std, method=self.method)


def _processor_size(value: Any) -> int | None:
    """The square side a ``size`` / ``crop_size`` entry describes, or None if it is not one."""
    if type(value) is int:
        return value
    if isinstance(value, dict):
        if set(value) == {"shortest_edge"}:
            return value["shortest_edge"]
        if set(value) == {"height", "width"} and value["height"] == value["width"]:
            return value["height"]
    return None


def _read_preprocessing(folder: str, config: vit.ViTConfig, default: Preprocessing) -> Preprocessing:
    """``preprocessor_config.json`` if the folder has one (its mean, std and resampling), else ``default``.

    The image size is always the model's; a processor that prepares another size is refused.
    """
    path = os.path.join(folder, "preprocessor_config.json")
    if not os.path.isfile(path):
        return default
    d = files.read_json_object(path, WeightsError)

    def fail(key: str, supported: str) -> WeightsError:
        return WeightsError(f"{path}: {key}={d[key]!r} is not supported; supported: {supported}")

    for flag in ("do_resize", "do_rescale", "do_normalize"):
        if d.get(flag, True) is not True:
            raise fail(flag, "true")
    if not math.isclose(d.get("rescale_factor", 1 / 255), 1 / 255, rel_tol=1e-6):
        raise fail("rescale_factor", "1/255")
    stats = {}
    for key, fallback in (("image_mean", default.mean), ("image_std", default.std)):
        value = d.get(key, fallback)
        if (not isinstance(value, (list, tuple)) or len(value) != config.num_channels
                or not all(type(v) in (int, float) for v in value)):
            raise fail(key, f"{config.num_channels} numbers")
        stats[key] = tuple(float(v) for v in value)
    if any(v <= 0 for v in stats["image_std"]):
        raise fail("image_std", "positive numbers")
    method = default.method
    if "resample" in d:
        if d["resample"] not in _RESAMPLE:
            raise fail("resample", " or ".join(f"{code} ({name})" for code, name in _RESAMPLE.items()))
        method = _RESAMPLE[d["resample"]]
    size_key = "crop_size" if d.get("do_center_crop") else "size"
    if size_key in d and _processor_size(d[size_key]) != config.image_size:
        raise fail(size_key, f"the model's image_size={config.image_size} (square)")
    return Preprocessing(config.image_size, stats["image_mean"], stats["image_std"], method)


# ---------------------------------------------------------------------------------------------------
# Loading


@flax.struct.dataclass
class EvalModel:
    """A loaded network: a pytree whose only leaves are ``params``, so it can be passed to ``jax.jit``.

    Attributes:
      module: :class:`~mlmjax.models.vit.CLIPModel`, :class:`~mlmjax.models.vit.CLIPVisionModelWithProjection`
        or :class:`~mlmjax.models.vit.VisionTransformer` (DINO).
      params: its parameters, nested like transformers' state dict (``vision_model/encoder/...``).
      preprocessing: how to prepare images for it.
      path: the folder it was loaded from.
    """

    module: nn.Module = flax.struct.field(pytree_node=False)
    params: dict
    preprocessing: Preprocessing = flax.struct.field(pytree_node=False)
    path: str = flax.struct.field(pytree_node=False)


def image_embeddings(model: EvalModel, images: jax.Array) -> jax.Array:
    """The vector a metric compares, ``[B, D]``, for ``images`` as :func:`preprocess` takes them.

    CLIP: ``image_embeds`` (after ``visual_projection``); DINO: the final-layernorm CLS token. Not
    normalised. Jittable.
    """
    return model.module.apply({"params": model.params}, model.preprocessing(images), method="get_image_features")


def text_embeddings(model: EvalModel, input_ids: jax.Array) -> jax.Array:
    """CLIP's ``text_embeds`` ``[B, projection_dim]`` (``text_projection`` of the EOS state), not normalised.

    ``input_ids`` ``[B, L]`` from CLIP's tokenizer (BOS … EOS, padded; L ≤ 77). No attention mask is
    needed: the text tower is causal and pools at EOS, so padding after it changes nothing. Jittable.
    """
    if not isinstance(model.module, vit.CLIPModel):
        raise ValueError(f"{model.path}: a {type(model.module).__name__} has no text tower; CLIP-T needs a "
                         "CLIPModel folder")
    return model.module.apply({"params": model.params}, input_ids, method="get_text_features")


def clip_text_tower(model: EvalModel) -> tuple[clip_text.CLIPTextModel, dict, jax.Array]:
    """The text half of a loaded ``CLIPModel`` as mlmjax's own text encoder.

    Returns ``(module, params, projection)``: ``text_embeds = module.pooled_output(last, ids) @ projection``
    with ``last = module.apply({'params': params}, ids)``; ``projection`` is ``[hidden, projection_dim]``.
    """
    if not isinstance(model.module, vit.CLIPModel):
        raise ValueError(f"{model.path}: a {type(model.module).__name__} has no text tower")
    module = clip_text.CLIPTextModel(model.module.text_config, model.module.dtype)
    return module, model.params["text_model"], model.params["text_projection"]["kernel"]


def _read_config(folder: str, kind: str) -> tuple[dict, str]:
    path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder):
        raise WeightsError(f"{folder}: folder not found; expected a transformers {kind} folder")
    hint = f"expected a transformers {kind} folder (what save_pretrained writes)"
    return files.read_json_object(path, WeightsError, hint), path


def _check_architecture(d: Mapping[str, Any], source: str, expected: str, why: str) -> None:
    architectures = d.get("architectures")
    if architectures is not None and architectures != [expected]:
        raise WeightsError(f"{source}: architectures={architectures!r} is not supported; supported: "
                           f"[{expected!r}] ({why})")


def _projection_dim(d: Mapping[str, Any], source: str) -> int:
    value = d.get("projection_dim", 512)  # transformers' default
    if type(value) is not int or value <= 0:
        raise WeightsError(f"{source}: projection_dim={value!r} is not supported; supported: a positive integer")
    return value


def _tower_config(d: Mapping[str, Any], tower: str, source: str) -> tuple[dict, str]:
    """A ``CLIPConfig``'s ``text_config`` or ``vision_config`` dict, and the source to name in errors.

    Older CLIP files (e.g. ``openai/clip-vit-large-patch14``) also hold ``<tower>_config_dict``;
    transformers then builds the tower from it alone (with defaults for what it leaves out), so this
    does too. The tower's own ``architectures`` (null in older files) means nothing inside a CLIPModel.
    """
    key = f"{tower}_config"
    if d.get(f"{key}_dict") is not None:
        key += "_dict"
    sub = d.get(key) or {}
    if not isinstance(sub, dict):
        raise WeightsError(f"{source}: {key} must be a JSON object, not {type(sub).__name__}")
    return {k: v for k, v in sub.items() if k != "architectures"}, f"{source} ({key})"


def build_clip(d: Mapping[str, Any], source: str = "config",
               dtype=jnp.float32) -> vit.CLIPModel | vit.CLIPVisionModelWithProjection:
    """The Flax module for a CLIP ``config.json`` dict (``CLIPModel`` or ``CLIPVisionModelWithProjection``)."""
    model_type = d.get("model_type")
    if model_type == "clip":
        _check_architecture(d, source, "CLIPModel", "a full CLIP model")
        text, text_source = _tower_config(d, "text", source)
        vision, vision_source = _tower_config(d, "vision", source)
        return vit.CLIPModel(clip_text.CLIPTextConfig.from_dict(text, text_source),
                             vit.ViTConfig.from_dict({"model_type": "clip_vision_model", **vision}, vision_source),
                             _projection_dim(d, source), dtype)
    if model_type == "clip_vision_model":
        _check_architecture(d, source, "CLIPVisionModelWithProjection", "CLIP-I needs visual_projection")
        return vit.CLIPVisionModelWithProjection(vit.ViTConfig.from_dict(d, source), _projection_dim(d, source),
                                                 dtype)
    raise WeightsError(f"{source}: model_type={model_type!r} is not a CLIP model; load_clip reads a transformers "
                       "CLIPModel ('clip') or CLIPVisionModelWithProjection ('clip_vision_model') folder")


def build_dino(d: Mapping[str, Any], source: str = "config", dtype=jnp.float32) -> vit.VisionTransformer:
    """The Flax module for a ``ViTModel`` ``config.json`` dict."""
    if d.get("model_type") != "vit":
        raise WeightsError(f"{source}: model_type={d.get('model_type')!r} is not supported; load_dino reads a "
                           "transformers ViTModel ('vit') folder such as facebook/dino-vits16")
    _check_architecture(d, source, "ViTModel", "the bare encoder, as DINO checkpoints are saved")
    return vit.VisionTransformer(vit.ViTConfig.from_dict(d, source), dtype)


def _load_params(folder: str, module: nn.Module, dtype, ignore: Sequence[str]) -> dict:
    state_dict, source = weights.read_safetensors(folder, _WEIGHTS_NAME)
    params = weights.params_from_state_dict(state_dict, vit.abstract_params(module), source=source,
                                            dtype=np.dtype(dtype), ignore=ignore)
    return jax.tree.map(jnp.asarray, params)


def load_clip(folder: str, dtype=jnp.float32) -> EvalModel:
    """Loads a transformers ``CLIPModel`` (both towers) or ``CLIPVisionModelWithProjection`` folder.

    Preprocessing: the folder's ``preprocessor_config.json`` if present, else CLIP's mean and std and
    bicubic resizing; the size is the vision config's ``image_size``.
    """
    folder = os.path.abspath(os.path.expanduser(folder))
    d, source = _read_config(folder, "CLIPModel")
    module = build_clip(d, source, dtype)
    vision = module.vision_config if isinstance(module, vit.CLIPModel) else module.config
    preprocessing = _read_preprocessing(folder, vision, Preprocessing(vision.image_size, CLIP_MEAN, CLIP_STD))
    return EvalModel(module, _load_params(folder, module, dtype, _POSITION_IDS), preprocessing, folder)


def load_dino(folder: str, dtype=jnp.float32) -> EvalModel:
    """Loads a transformers ``ViTModel`` folder such as ``facebook/dino-vits16``; a ``pooler`` is skipped.

    Preprocessing: the folder's ``preprocessor_config.json`` if present (transformers' ViT processors
    resize bilinearly), else ImageNet's mean and std and bicubic resizing, as DINO's own k-NN evaluation.
    """
    folder = os.path.abspath(os.path.expanduser(folder))
    d, source = _read_config(folder, "ViTModel")
    module = build_dino(d, source, dtype)
    config = module.config
    preprocessing = _read_preprocessing(folder, config, Preprocessing(config.image_size, IMAGENET_MEAN, IMAGENET_STD))
    return EvalModel(module, _load_params(folder, module, dtype, _VIT_POOLER), preprocessing, folder)
