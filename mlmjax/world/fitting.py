"""The optimisation step every world pretraining stage shares: one loss, AdamW, an optional EMA.

A stage supplies ``loss_fn(params, batch, rng) -> (loss, metrics)``; :func:`fit` jits the step, hands
it to the caller's loop (mlmjax's ``loop.train_loop``: progress bar, ``metrics.jsonl``, finite-loss
checks) and returns the trained parameters, or their exponential moving average when ``ema_decay``
is set: short diffusion trainings sample much better from the average than from the last iterate.

The step is data-parallel over this process's devices. On a CPU, XLA runs one small convolution or
matmul at a time on one core, so a 2-core machine trains a world network about 1.5x faster as two
CPU devices (``jax_num_cpu_devices``, which `pretrain` sets) that each take half of every batch.
The numbers then depend on the device count, a different summation order, and on nothing else.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mlmjax import sharding

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]
RunLoop = Callable[[Callable, Any, Iterator[dict], int], Any]


@dataclasses.dataclass(frozen=True)
class Schedule:
    steps: int
    learning_rate: float
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0

    def optimizer(self) -> optax.GradientTransformation:
        """Warm-up then cosine decay to a tenth, global-norm clipping, AdamW."""
        rate = optax.warmup_cosine_decay_schedule(0.0, self.learning_rate, min(self.warmup, self.steps // 10 + 1),
                                                  self.steps, end_value=self.learning_rate / 10)
        return optax.chain(optax.clip_by_global_norm(self.grad_clip),
                           optax.adamw(rate, weight_decay=self.weight_decay))


@flax.struct.dataclass
class FitState:
    step: jax.Array
    params: Any
    opt_state: Any
    ema: Any  # None without an EMA


def make_step(loss_fn: LossFn, tx: optax.GradientTransformation, ema_decay: float = 0.0):
    """The jitted ``(state, batch, rng) -> (state, metrics)``; the step's key is ``fold_in(rng, step)``."""
    def step(state: FitState, batch: dict, rng: jax.Array):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, batch, jax.random.fold_in(rng, state.step))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema
        if ema_decay:  # the usual warm-up: average over about `step` steps until that exceeds 1/(1-decay)
            decay = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
            ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
        return FitState(state.step + 1, params, opt_state, ema), metrics
    return jax.jit(step, donate_argnums=0)


def fit(loss_fn: LossFn, params: Any, schedule: Schedule, batches: Iterator[dict], run_loop: RunLoop, *,
        ema_decay: float = 0.0) -> Any:
    """Trains ``params`` for ``schedule.steps``; returns host arrays (the EMA when ``ema_decay``)."""
    tx = schedule.optimizer()
    # Data parallel over this process's devices: the state replicated, each batch's rows split.
    mesh = sharding.make_mesh(sharding.DATA_PARALLEL, jax.local_devices())
    params = jax.tree.map(jnp.asarray, params)
    ema = jax.tree.map(jnp.copy, params) if ema_decay else None
    state = jax.device_put(FitState(jnp.zeros((), jnp.int32), params, tx.init(params), ema), sharding.replicated(mesh))
    batches = (sharding.shard_batch(batch, mesh) for batch in batches)
    state = run_loop(make_step(loss_fn, tx, ema_decay), state, batches, schedule.steps)
    return jax.tree.map(np.asarray, state.ema if ema_decay else state.params)
