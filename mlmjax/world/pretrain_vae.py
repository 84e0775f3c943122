"""World pretraining, the `vae` stage: the tiny KL autoencoder on rendered world scenes.

Loss: L1 + squared error of the decoded posterior sample, plus `kl_weight` × the KL divergence to a
standard normal (both per element). Stable Diffusion's autoencoder also has a perceptual and an
adversarial term; at 32 px with flat-coloured scenes plain reconstruction suffices. After training,
the latents' scaling factor is set as Stable Diffusion's was: 1 / the standard deviation of latent
samples over the corpus, so the UNet sees unit-variance latents.
"""

from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np

from mlmjax.models.vae import AutoencoderKL
from mlmjax.world import fitting
from mlmjax.world.corpus import Corpus, to_unit_range


@dataclasses.dataclass(frozen=True)
class Options:
    steps: int = 700
    batch_size: int = 48
    learning_rate: float = 2e-3
    kl_weight: float = 1e-3
    seed: int = 0


def loss_fn(params: dict, vae: AutoencoderKL, images: jax.Array, rng: jax.Array, kl_weight: float):
    mean, logvar = vae.apply({"params": params}, images, method=AutoencoderKL.encode)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
    decoded = vae.apply({"params": params}, z, method=AutoencoderKL.decode)
    error = decoded - images
    reconstruction = jnp.mean(jnp.abs(error)) + jnp.mean(error ** 2)
    kl = 0.5 * jnp.mean(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar)
    return reconstruction + kl_weight * kl, {"loss_reconstruction": reconstruction, "loss_kl": kl}


def train(vae: AutoencoderKL, params: dict, corpus: Corpus, options: Options, run_loop: fitting.RunLoop) -> dict:
    """The trained parameters; `run_loop(step_fn, state, batches, steps)` runs the steps."""
    def loss(p, batch, rng):
        return loss_fn(p, vae, batch["images"], rng, options.kl_weight)
    batches = corpus.stream(options.seed, options.batch_size,
                            lambda indices, step: {"images": to_unit_range(corpus.images[indices])})
    return fitting.fit(loss, params, fitting.Schedule(options.steps, options.learning_rate), batches, run_loop)


def latent_moments(vae: AutoencoderKL, params: dict, images: np.ndarray, batch_size: int = 256
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The posterior (mean, logvar) of every image, computed in batches: [N, h, w, c] each."""
    encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=AutoencoderKL.encode))
    means, logvars = [], []
    for start in range(0, len(images), batch_size):
        mean, logvar = encode(params, to_unit_range(images[start:start + batch_size]))
        means.append(np.asarray(mean))
        logvars.append(np.asarray(logvar))
    return np.concatenate(means), np.concatenate(logvars)


def scaling_factor(mean: np.ndarray, logvar: np.ndarray, seed: int = 0) -> float:
    """1 / std of posterior samples, Stable Diffusion's recipe for its 0.18215."""
    rng = np.random.default_rng(seed)
    samples = mean + np.exp(0.5 * logvar) * rng.standard_normal(mean.shape, np.float32)
    return float(1.0 / samples.std())


def reconstruction_error(vae: AutoencoderKL, params: dict, images: np.ndarray) -> float:
    """Mean absolute error of decode(encoder mean), in 0-255 pixel levels."""
    x = to_unit_range(images)
    decoded = jax.jit(lambda p, x: vae.apply({"params": p}, x))(params, x)
    return float(np.mean(np.abs(np.clip(np.asarray(decoded), -1, 1) - x)) * 127.5)
