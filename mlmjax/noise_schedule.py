"""The DDPM forward process of a checkpoint's ``scheduler_config``: noising and training targets.

Numbers follow diffusers' schedulers to float32 rounding (betas in float32, their product accumulated as torch does),
so an epsilon or v-prediction model is trained against the same targets it was pretrained with.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """``alphas_cumprod[t]`` for t in [0, num_train_timesteps) and the model's prediction type."""
    alphas_cumprod: np.ndarray
    prediction_type: str

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @classmethod
    def from_config(cls, config: dict, source: str = "scheduler_config") -> NoiseSchedule:
        n = int(config.get("num_train_timesteps", 1000))
        start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
        kind = config.get("beta_schedule", "linear")
        if config.get("trained_betas") is not None:
            betas = np.asarray(config["trained_betas"], np.float32)
        elif kind == "linear":
            betas = np.linspace(start, end, n, dtype=np.float32)
        elif kind == "scaled_linear":  # Stable Diffusion's
            betas = np.linspace(start ** 0.5, end ** 0.5, n, dtype=np.float32) ** 2
        elif kind == "squaredcos_cap_v2":
            alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
                             np.float32)
        else:
            raise ValueError(f"{source}: beta_schedule {kind!r} is not supported; use linear, scaled_linear "
                             "or squaredcos_cap_v2")
        prediction_type = config.get("prediction_type", "epsilon")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"{source}: prediction_type {prediction_type!r} is not supported; use one of "
                             f"{PREDICTION_TYPES}")
        # PyTorch accumulates the float32 product in float64; so must we to match bit for bit.
        alphas_cumprod = np.cumprod((1.0 - betas).astype(np.float64)).astype(np.float32)
        return cls(alphas_cumprod=alphas_cumprod, prediction_type=prediction_type)

    def _coefficients(self, timesteps: jax.Array, ndim: int) -> tuple[jax.Array, jax.Array]:
        alpha_bar = jnp.asarray(self.alphas_cumprod)[timesteps]
        shape = alpha_bar.shape + (1,) * (ndim - alpha_bar.ndim)
        return jnp.sqrt(alpha_bar).reshape(shape), jnp.sqrt(1.0 - alpha_bar).reshape(shape)

    def add_noise(self, x0: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
        """x_t = √ᾱ_t · x0 + √(1-ᾱ_t) · noise, per batch element."""
        signal, sigma = self._coefficients(timesteps, x0.ndim)
        return (signal * x0 + sigma * noise).astype(x0.dtype)

    def target(self, x0: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
        """What the UNet is trained to predict: the noise, or the velocity √ᾱ·noise − √(1-ᾱ)·x0."""
        if self.prediction_type == "epsilon":
            return noise
        signal, sigma = self._coefficients(timesteps, x0.ndim)
        return (signal * noise - sigma * x0).astype(x0.dtype)
