"""The paper's image metrics (PAPER.md §4): CLIP-T, CLIP-I and DINO, batched and jitted.

* **CLIP-T** (prompt fidelity): cosine between a generated image's CLIP embedding and the CLIP text
  embedding of ``"A photo depicts " + prompt``, the prompt written with the plain class noun instead
  of the concept token; clipped at 0 (``max(cos, 0)``, scale 1), averaged over images.
* **CLIP-I** and **DINO** (concept fidelity): the mean cosine over every (real photo, generated image)
  pair, with CLIP's image embedding or DINO ViT-S/16's CLS feature.

Images enter as uint8 ``[N, H, W, 3]``; each model's own preprocessing (resize, normalise) runs inside
the jitted embedding function. Batches are padded to a fixed size so one executable serves them all,
and split over the devices when there are several.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from mlmjax import eval_models

CLIP_T_PREFIX = "A photo depicts "


@functools.partial(jax.jit, static_argnames=("text",))
def _embed(model: eval_models.EvalModel, inputs: jax.Array, text: bool = False) -> jax.Array:
    features = eval_models.text_embeddings(model, inputs) if text else eval_models.image_embeddings(model, inputs)
    features = features.astype(jnp.float32)
    return features / jnp.linalg.norm(features, axis=-1, keepdims=True)


def _batched(model: eval_models.EvalModel, inputs: np.ndarray, batch_size: int, text: bool) -> np.ndarray:
    """Unit-norm embeddings of ``inputs`` in fixed-size batches (the last padded), over all devices."""
    devices = jax.devices()
    batch_size = -(-batch_size // len(devices)) * len(devices)
    sharding = None
    if len(devices) > 1:
        mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
        sharding = NamedSharding(mesh, PartitionSpec("data"))
    out = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start:start + batch_size]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), axis=0)])
        batch = jnp.asarray(padded) if sharding is None else jax.device_put(padded, sharding)
        out.append(np.asarray(_embed(model, batch, text=text))[:len(chunk)])
    return np.concatenate(out)


def image_embeddings(model: eval_models.EvalModel, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """``[N, D]`` unit-norm embeddings of uint8 images ``[N, H, W, 3]``."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [N, H, W, 3]; got {images.dtype} {images.shape}")
    return _batched(model, images, batch_size, text=False)


def clip_t_texts(prompt_templates: list[str], class_noun: str) -> list[str]:
    """The CLIP-T texts: ``"A photo depicts "`` + each template with the class noun in its ``{}``."""
    return [CLIP_T_PREFIX + template.replace("{}", class_noun) for template in prompt_templates]


def text_embeddings(clip: eval_models.EvalModel, tokenizer, texts: list[str], batch_size: int = 32) -> np.ndarray:
    """``[T, D]`` unit-norm CLIP text embeddings, tokenized with CLIP's tokenizer (padded to 77)."""
    ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    return _batched(clip, ids.astype(np.int32), batch_size, text=True)


def clip_t(image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
    """Per-image CLIP-T, ``max(cos, 0)``: image i against text i (both unit-norm ``[N, D]``)."""
    return np.maximum(np.sum(image_embeds * text_embeds, axis=-1), 0.0)


def mean_pairwise_cosine(real: np.ndarray, generated: np.ndarray) -> np.ndarray:
    """Per generated image, the mean cosine to every real image (unit-norm inputs); their mean is
    CLIP-I or DINO."""
    return (generated @ real.T).mean(axis=1)
