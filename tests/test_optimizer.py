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


def test_dreambooths_step_holds_no_clipped_copy_of_its_gradients(tmp_path):
    """DreamBooth (grad_clip 1) on the tiny model: with optax's chain XLA writes every clipped
    gradient out beside the raw one (it does not repeat a division in both moments' updates), about
    a second copy of the gradients in temporaries; the fused update does not."""
    from mlmjax import aot, bench_cases, method, train_step, trainable

    request = {"size": "tiny", "method": "dreambooth", "mlm": False, "compute_dtype": "float32",
               "configs": config_lib.CONFIGS_DIR}
    state, batch, rng, _ = bench_cases.prepare_case(request, str(tmp_path))
    assert state.tx is method.optimizer(config_lib.load_method_config("dreambooth", []))
    gradient_bytes = 4 * trainable.count(state.params)
    temporaries = {}
    for name, tx in (("fused", state.tx), ("optax", _optax_chain(1.0))):
        step = jax.jit(train_step.train_step, donate_argnums=0)
        temporaries[name] = aot.compile_step(step, state.replace(tx=tx), batch, rng).memory["temp"]
    print({k: v / 2**20 for k, v in temporaries.items()}, "MiB; gradients", gradient_bytes / 2**20, "MiB")
    assert temporaries["optax"] - temporaries["fused"] >= 0.5 * gradient_bytes
