"""Run by tests/test_sharding.py in a process with 8 host devices: one DreamBooth + MLM step on several
meshes against the single-device step. Prints one JSON line of measurements."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mlmjax import data, method, pretrained, sharding, tiny  # noqa: E402
from mlmjax import train_step as train_step_lib  # noqa: E402
from test_train_step import load_config  # noqa: E402

MESHES = [(8, 1, 1), (2, 4, 1), (1, 8, 1)]


def relative_error(a, b) -> float:
    a = np.concatenate([np.ravel(x).astype(np.float64) for x in jax.tree.leaves(a)])
    b = np.concatenate([np.ravel(x).astype(np.float64) for x in jax.tree.leaves(b)])
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    embedded = tiny.embedded_assets()
    config = load_config("dreambooth")  # UNet + text encoder + token train: FSDP has something to shard
    config.concept.token, config.concept.class_noun = "<concept>", embedded.class_noun
    config.batch_size = 8  # divides 8 devices; the MLM batch of 25 does not (replicated)
    config.learning_rate = 1e-4  # a visible update
    model = pretrained.load_pretrained(embedded.model)
    setup = method.build(config, model, concept_images=data.load_images(embedded.concept_images, 32),
                         class_images=data.load_images(embedded.class_images, 32),
                         contextualizer_folder=embedded.contextualizer)
    batch, rng = setup.make_batch(0), jax.random.key(0)
    initial = jax.device_get(setup.state)  # host copy: each mesh's step donates its own
    reference_state, reference = jax.jit(train_step_lib.train_step)(initial, batch, rng)
    out = {"loss": float(reference["loss"]), "meshes": {}}
    for shape in MESHES:
        mesh = sharding.make_mesh(dict(zip(sharding.AXES, shape)))
        state = sharding.shard_state(initial, mesh)
        step = sharding.jit_step(train_step_lib.train_step, state, mesh)
        new_state, metrics = step(state, sharding.shard_batch(batch, mesh), rng)
        specs = {str(leaf.sharding.spec) for leaf in jax.tree.leaves(new_state.params)}
        kept = all(a.sharding == b for a, b in
                   zip(jax.tree.leaves(new_state), jax.tree.leaves(sharding.state_shardings(initial, mesh))))
        out["meshes"][str(shape)] = {
            "loss_error": abs(float(metrics["loss"]) - out["loss"]) / abs(out["loss"]),
            "mlm_loss_error": abs(float(metrics["loss_mlm"]) - float(reference["loss_mlm"])) / float(reference["loss_mlm"]),
            "params_error": relative_error(new_state.params, reference_state.params),
            "update_error": relative_error(jax.tree.map(jnp.subtract, new_state.params, initial.params),
                                           jax.tree.map(jnp.subtract, reference_state.params, initial.params)),
            "opt_state_error": relative_error(new_state.opt_state, reference_state.opt_state),
            "param_specs": sorted(specs), "shardings_kept": kept,
            "batch_spec": str(sharding.shard_batch(batch, mesh)["input_ids"].sharding.spec),
            "mlm_batch_spec": str(sharding.shard_batch(batch, mesh)["mlm_input_ids"].sharding.spec),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
