"""World pretraining, the `unet` stage: the tiny UNet, conditioned on the `text` stage's encoder, by denoising.

The loss is mlmjax's own customization loss (``train_step.loss_fn``: VAE posterior sample, DDPM
noising, the UNet's epsilon error) with nothing customized: no concept token in any prompt, no prior
term, no MLM. Only the UNet trains, on captions that leave attributes unsaid and are sometimes
empty (`corpus.training_caption`), so classifier-free guidance has an unconditional model to push
against. The text encoder and the VAE are frozen, as Stable Diffusion's are: the contextualizer
pretrains on the same text encoder the UNet is conditioned on, and the VAE's posterior moments are
computed once for the whole corpus. The returned weights are the exponential moving average of the
trained ones.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from mlmjax import config as config_lib
from mlmjax import sampling
from mlmjax import tokenizer as tokenizer_lib
from mlmjax import train_step as train_step_lib
from mlmjax import trainable
from mlmjax.pretrained import Pretrained
from mlmjax.world import fitting
from mlmjax.world.corpus import Corpus

RULES = [(config_lib.UNET, "train"), (r".*", "freeze")]


@dataclasses.dataclass(frozen=True)
class Options:
    steps: int = 3000
    batch_size: int = 32
    learning_rate: float = 1e-3
    ema_decay: float = 0.999
    seed: int = 2


def batches(corpus: Corpus, moments: tuple[np.ndarray, np.ndarray], tokenizer, options: Options) -> Iterator[dict]:
    mean, logvar = moments

    def make(indices: np.ndarray, step: int) -> dict:
        return {"latent_mean": mean[indices], "latent_logvar": logvar[indices],
                "input_ids": tokenizer_lib.tokenize(tokenizer, corpus.captions(indices, options.seed, step))}
    return corpus.stream(options.seed, options.batch_size, make)


def train(model: Pretrained, corpus: Corpus, moments: tuple[np.ndarray, np.ndarray], options: Options,
          run_loop: fitting.RunLoop) -> dict:
    """The EMA of the trained ``{"unet": ...}`` parameters."""
    spec = sampling.plain_spec(model)
    width = model.text_encoder.config.hidden_size
    params = {"text_encoder": model.params["text_encoder"], "unet": model.params["unet"],
              "concept": {"embeddings": np.zeros((1, width), np.float32)}}  # unused: no prompt has it
    trained, frozen = trainable.split(params, trainable.labels(params, RULES))

    # No class images and no MLM branch: the loss is the diffusion loss alone, whatever the weights; the
    # rate is fitting's schedule.
    unused = train_step_lib.Hyperparameters.of(learning_rate=0.0)

    def loss(p, batch, rng):
        return train_step_lib.loss_fn(p, frozen, spec, unused, batch, rng)

    schedule = fitting.Schedule(options.steps, options.learning_rate, warmup=200, weight_decay=1e-2)
    averaged = fitting.fit(loss, trained, schedule, batches(corpus, moments, model.tokenizer, options), run_loop,
                           ema_decay=options.ema_decay)
    return {"unet": averaged["unet"]}
