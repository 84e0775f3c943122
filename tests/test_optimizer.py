"""`mlmjax.optimizer.adamw`: the same updates and state as optax's clip_by_global_norm + adamw chain,
to the bit without clipping or when the clip does not trigger, to float rounding when it does; and
the memory that fusing the update saves."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mlmjax import config as config_lib
from mlmjax import optimizer

HYPERPARAMETERS = dict(learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2)


def _optax_chain(grad_clip: float) -> optax.GradientTransformation:
    h = HYPERPARAMETERS
    adamw = optax.adamw(h["learning_rate"], b1=h["b1"], b2=h["b2"], eps=h["eps"], weight_decay=h["weight_decay"])
    return optax.chain(optax.clip_by_global_norm(grad_clip), adamw) if grad_clip else adamw


# Gradients of global norm about √12 ≈ 3.5: a clip at 1 always triggers, one at 100 never does.
@pytest.mark.parametrize("grad_clip", [0.0, 1.0, 100.0])
def test_updates_and_state_equal_optax(grad_clip):
    rng = np.random.default_rng(0)
    params = {"unet": {"kernel": jnp.asarray(rng.standard_normal((5, 3)), jnp.float32)},
              "concept": jnp.asarray(rng.standard_normal(7), jnp.float32)}
    reference, fused = _optax_chain(grad_clip), optimizer.adamw(**HYPERPARAMETERS, grad_clip=grad_clip)
    reference_state, fused_state = reference.init(params), fused.init(params)
    assert jax.tree.structure(fused_state) == jax.tree.structure(reference_state)  # checkpoints restore as before
    reference_params = fused_params = params
    for _ in range(4):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
        reference_updates, reference_state = jax.jit(reference.update)(grads, reference_state, reference_params)
        fused_updates, fused_state = jax.jit(fused.update)(grads, fused_state, fused_params)
        reference_params = optax.apply_updates(reference_params, reference_updates)
        fused_params = optax.apply_updates(fused_params, fused_updates)
        for got, want in zip(jax.tree.leaves((fused_updates, fused_state, fused_params)),
                             jax.tree.leaves((reference_updates, reference_state, reference_params))):
            if grad_clip == 1.0:  # the clip as a factor: g·(c/norm) against optax's (g/norm)·c
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
            else:
                np.testing.assert_array_equal(got, want)
    assert int(jax.tree.leaves(fused_state)[0]) == 4  # the step count moved


def test_update_without_parameters_is_a_clear_error():
    fused = optimizer.adamw(**HYPERPARAMETERS)
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match="weight decay needs the parameters"):
        fused.update(params, fused.init(params))


def test_dreambooths_optimizer_holds_no_clipped_copy_of_the_gradients():
    """DreamBooth's configured optimizer (grad_clip 1) in a step whose gradients come out of matrix
    products, as a network's do: with optax's chain XLA writes every clipped gradient out beside the
    raw one (it does not repeat a division in both moments' updates), a second copy of the gradients
    in temporaries; the fused update holds the gradients alone. (The tiny DreamBooth step showed the
    same, for two compiles of a minute each; at SD 1.5 shapes the step's peak fell from 18.30 to
    16.25 GiB, README "Precision, memory and compilation".)"""
    from mlmjax import aot, method

    config = config_lib.load_method_config("dreambooth", [])
    assert config.optimizer.grad_clip == 1.0
    # The chain's rates do not change what XLA holds: the module's reference chain, clipping as DreamBooth.
    fused, chain = method.optimizer(config), _optax_chain(config.optimizer.grad_clip)
    rng = np.random.default_rng(0)
    widths = (64, 256, 256, 256, 256, 64)
    params = {f"layer{i}": {"kernel": jnp.asarray(rng.standard_normal((a, b)) / np.sqrt(a), jnp.float32),
                            "bias": jnp.zeros(b, jnp.float32)} for i, (a, b) in enumerate(zip(widths, widths[1:]))}
    inputs = jnp.asarray(rng.standard_normal((32, widths[0])), jnp.float32)

    def loss(params, x):
        for i in range(len(widths) - 1):
            x = jnp.tanh(x @ params[f"layer{i}"]["kernel"] + params[f"layer{i}"]["bias"])
        return jnp.mean(x * x)

    def step_with(tx):
        def step(params, opt_state, x):
            updates, opt_state = tx.update(jax.grad(loss)(params, x), opt_state, params)
            return optax.apply_updates(params, updates), opt_state
        return jax.jit(step, donate_argnums=(0, 1))

    gradient_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    temporaries = {name: aot.compile_step(step_with(tx), params, tx.init(params), inputs).memory["temp"]
                   for name, tx in (("fused", fused), ("optax", chain))}
    print({k: v / gradient_bytes for k, v in temporaries.items()}, "× the gradients' bytes")
    assert temporaries["fused"] < 1.25 * gradient_bytes  # the gradients and a few activations
    assert temporaries["optax"] - temporaries["fused"] >= 0.75 * gradient_bytes
