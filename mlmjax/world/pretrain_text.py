"""World pretraining, the `text` stage: the tiny CLIP text encoder, contrastive against a tiny image tower.

As CLIP was trained: a batch of (image, caption) pairs, the text tower's state at the EOS token and
the image tower's pooled features projected into a shared space, and a symmetric cross-entropy that
picks each image's caption among the batch's (and each caption's image), with a learned temperature.
Captions here describe every attribute (no dropping): a partial caption would match many images of
a batch. Only the text encoder is kept; the image tower and both projections are discarded.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mlmjax import tokenizer as tokenizer_lib
from mlmjax.models.clip_text import CLIPTextModel
from mlmjax.world import fitting
from mlmjax.world.corpus import Corpus, to_unit_range


@dataclasses.dataclass(frozen=True)
class Options:
    steps: int = 1500
    batch_size: int = 128
    learning_rate: float = 2e-3
    embed_dim: int = 64
    seed: int = 1


class ImageTower(nn.Module):
    """Four stride-2 convolutions (32 -> 2 px) with GELU and LayerNorm, mean-pooled."""
    widths: tuple[int, ...] = (32, 64, 96, 128)

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = images
        for width in self.widths:
            x = nn.Conv(width, (3, 3), strides=2)(x)
            x = nn.gelu(nn.LayerNorm()(x))
        return x.mean(axis=(1, 2))


class DualEncoder(nn.Module):
    text_encoder: CLIPTextModel
    embed_dim: int

    @nn.compact
    def __call__(self, images: jax.Array, input_ids: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        hidden = self.text_encoder(input_ids)
        text = nn.Dense(self.embed_dim, use_bias=False, name="text_projection")(
            self.text_encoder.pooled_output(hidden, input_ids))
        image = nn.Dense(self.embed_dim, use_bias=False, name="image_projection")(ImageTower()(images))
        log_scale = self.param("log_scale", nn.initializers.constant(np.log(1 / 0.07)), ())
        normalize = lambda v: v / jnp.linalg.norm(v, axis=-1, keepdims=True)
        return normalize(image), normalize(text), jnp.minimum(log_scale, np.log(100.0))


def contrastive_loss(image: jax.Array, text: jax.Array, log_scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    """CLIP's symmetric cross-entropy, and the fraction of images whose own caption scores highest."""
    logits = jnp.exp(log_scale) * image @ text.T
    targets = jnp.arange(len(logits))
    loss = (optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
            + optax.softmax_cross_entropy_with_integer_labels(logits.T, targets).mean()) / 2
    return loss, jnp.mean(jnp.argmax(logits, axis=1) == targets)


def batches(corpus: Corpus, tokenizer, options: Options) -> Iterator[dict]:
    def make(indices: np.ndarray, step: int) -> dict:
        texts = corpus.captions(indices, options.seed, step, drop_prob=0.0, empty_prob=0.0)
        return {"images": to_unit_range(corpus.images[indices]), "input_ids": tokenizer_lib.tokenize(tokenizer, texts)}
    return corpus.stream(options.seed, options.batch_size, make)


def train(text_encoder: CLIPTextModel, text_params: dict, tokenizer, corpus: Corpus, held_out: Corpus,
          options: Options, run_loop: fitting.RunLoop) -> tuple[dict, float]:
    """The trained text encoder parameters (starting from `text_params`), and the image-to-caption
    retrieval accuracy among batches of `options.batch_size` scenes of `held_out`."""
    model = DualEncoder(text_encoder, options.embed_dim)
    sample = corpus.images[:1].astype(np.float32)
    params = model.init(jax.random.key(options.seed), sample, np.zeros((1, 77), np.int32))["params"]
    params = {**params, "text_encoder": text_params}

    def loss(p, batch, rng):
        del rng
        image, text, log_scale = model.apply({"params": p}, batch["images"], batch["input_ids"])
        value, accuracy = contrastive_loss(image, text, log_scale)
        return value, {"retrieval_accuracy": accuracy, "temperature": 1 / jnp.exp(log_scale)}

    trained = fitting.fit(loss, params, fitting.Schedule(options.steps, options.learning_rate),
                          batches(corpus, tokenizer, options), run_loop)
    evaluate = jax.jit(lambda p, batch: loss(p, batch, None)[1]["retrieval_accuracy"])
    held_out_batches = batches(held_out, tokenizer, dataclasses.replace(options, seed=options.seed + 1))
    accuracy = np.mean([float(evaluate(trained, next(held_out_batches))) for _ in range(8)])
    return trained["text_encoder"], float(accuracy)

