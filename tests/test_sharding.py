"""Meshes and shardings: the config's (data, fsdp, tensor) sizes, the parameter PartitionSpecs, a state
created straight into its shardings, and one DreamBooth + MLM step on 8 host devices equal to the
single-device step on three meshes; a jitted step donates what it changes and passes the frozen
weights apart."""

import json
import os
import subprocess
import sys

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from mlmjax import sharding

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("sizes, devices, expected", [
    ({"data": -1, "fsdp": 1, "tensor": 1}, 8, (8, 1, 1)),
    ({"data": 2, "fsdp": -1, "tensor": 1}, 8, (2, 4, 1)),
    ({"data": 1, "fsdp": -1, "tensor": 2}, 8, (1, 4, 2)),
    ({"data": 1, "fsdp": 1, "tensor": 1}, 1, (1, 1, 1)),
])
def test_mesh_shape_fills_minus_one(sizes, devices, expected):
    assert sharding.mesh_shape(sizes, devices) == expected


@pytest.mark.parametrize("sizes, message", [
    ({"data": -1, "fsdp": -1, "tensor": 1}, "at most one -1"),
    ({"data": 3, "fsdp": 1, "tensor": 1}, "needs 3 devices; there are 8"),
    ({"data": -1, "fsdp": 3, "tensor": 1}, "8 devices do not divide by 3"),
    ({"data": 0, "fsdp": 1, "tensor": 1}, "sizes must be positive"),
])
def test_bad_mesh_sizes_are_one_line_errors(sizes, message):
    with pytest.raises(ValueError, match=message):
        sharding.mesh_shape(sizes, 8)


def _mesh(data, fsdp, tensor):
    return AbstractMesh((data, fsdp, tensor), sharding.AXES)


def test_parameter_specs_follow_the_mesh():
    # A UNet-sized kernel [in, out] and conv [3, 3, in, out], a bias, a small table.
    kernel, conv, bias, small = (1280, 5120), (3, 3, 640, 1280), (1280,), (16, 16)
    assert sharding.parameter_spec(kernel, _mesh(8, 1, 1)) == PartitionSpec(None, None)  # data: replicated
    assert sharding.parameter_spec(kernel, _mesh(1, 8, 1)) == PartitionSpec(None, "fsdp")  # largest dim
    assert sharding.parameter_spec(conv, _mesh(2, 4, 1)) == PartitionSpec(None, None, None, "fsdp")
    assert sharding.parameter_spec(kernel, _mesh(1, 4, 2)) == PartitionSpec("fsdp", "tensor")
    assert sharding.parameter_spec(bias, _mesh(1, 8, 1)) == PartitionSpec(None)  # below the size floor
    assert sharding.parameter_spec(small, _mesh(1, 8, 1)) == PartitionSpec(None, None)
    assert sharding.parameter_spec((49408, 768), _mesh(1, 8, 1)) == PartitionSpec("fsdp", None)
    assert sharding.parameter_spec((25, 999), _mesh(1, 8, 1)) == PartitionSpec(None, None)  # nothing divides


def test_a_step_on_three_meshes_equals_the_single_device_step():
    """DreamBooth + MLM on a smaller tiny model (UNet, text encoder and token trained; batch 8 over the
    devices, the MLM batch of 25 fed whole, padded and split inside the step), created straight into
    its FSDP shardings, then one step, fp32: loss and updated parameters within 1e-5 of one device on
    three meshes, each device doing its share of the work."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               # Optimisation level 0 halves the compile time of the four steps and changes no result
               # beyond float rounding.
               XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
    result = subprocess.run([sys.executable, os.path.join(HERE, "sharded_step_check.py")], capture_output=True,
                            text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])

    # Created on the (1, 8, 1) mesh: every leaf in the sharding the config implies, AdamW's moments
    # sharded like their parameters, every leaf spread over the 8 devices (small ones replicated) and
    # no device holding more than an eighth of any leaf big enough to shard.
    created = measured["created"]
    assert created["specs_as_configured"] and created["devices_per_leaf"] == [8], created
    assert "P('fsdp', None)" in created["opt_state_specs"], created  # the token table's moments
    assert created["sharded_leaves"] >= 10 and created["largest_shard_fraction"] == 1 / 8, created

    assert set(measured["meshes"]) == {"(8, 1, 1)", "(2, 4, 1)", "(1, 8, 1)"}
    for shape, m in measured["meshes"].items():
        assert m["loss_error"] <= 1e-5 and m["mlm_loss_error"] <= 1e-5, (shape, m)
        assert m["params_error"] <= 1e-5 and m["opt_state_error"] <= 1e-5, (shape, m)
        assert m["shardings_kept"], shape  # the step hands the state back in the shardings it took
        assert m["batch_spec"] == "P(('data', 'fsdp'),)" and m["mlm_batch_spec"] == "P()", shape
        # The MLM prompts' rows are split inside the step (replicated, every device computed the whole
        # MLM branch: 0.23-0.28 of the step's FLOPs each); 1/8 is the ideal.
        assert m["flops_share"] <= 0.2, (shape, m["flops_share"])
    # No collective per layer: a backward pass that hung work on a gradient's first element broadcast it
    # from the device holding it, 56 all-reduces on the data-parallel mesh; now the gradients' and the
    # metrics' own.
    assert measured["meshes"]["(8, 1, 1)"]["collectives"].get("all-reduce", 0) <= 4, measured["meshes"]["(8, 1, 1)"]
    # The trained vocabulary table's gradient is made whole on every device from the looked-up rows'
    # gradients (gathered), not summed over the devices: 3.44M elements all-reduced a step before, the
    # table's 1.58M twice (the UNet's prompts and the MLM prompts look it up apart); 0.27M now.
    data_parallel = measured["meshes"]["(8, 1, 1)"]
    assert data_parallel["all_reduced_elements"] < measured["token_table_elements"], data_parallel
    assert all("fsdp" not in spec for spec in measured["meshes"]["(8, 1, 1)"]["param_specs"])
    for shape in ("(2, 4, 1)", "(1, 8, 1)"):
        assert any("fsdp" in spec for spec in measured["meshes"][shape]["param_specs"]), shape
    assert np.isfinite(measured["loss"])


@flax.struct.dataclass
class _State:
    step: jax.Array
    params: dict
    frozen: dict


def _descend(state, batch, rng):
    params = {"p": state.params["p"] - 0.5 * state.frozen["w"][:4] * batch["x"]}
    return state.replace(step=state.step + 1, params=params), {"loss": jnp.sum(params["p"])}


def _fresh_state():
    return _State(step=jnp.zeros((), jnp.int32), params={"p": jnp.ones(4)},
                  frozen={"w": jnp.arange(1 << 16, dtype=jnp.float32)})


def test_a_jitted_step_donates_what_it_changes_and_hands_the_frozen_weights_back_untouched():
    """The frozen weights go in apart, neither donated nor returned (each returned array costs the
    runtime about a microsecond); the caller gets the same arrays back, and the executable's outputs
    hold only what the step changed."""
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    batch, rng = {"x": jnp.full(4, 2.0)}, jax.random.key(0)
    step = sharding.jit_step(_descend, _fresh_state(), mesh)
    compiled = step.compile(_fresh_state(), batch, rng)
    assert compiled.memory["output"] < 1024 < compiled.memory["argument"]  # 256 KiB of frozen weights in, not out
    for run in (step, compiled, step.lower(_fresh_state(), batch, rng).compile()):
        state = _fresh_state()
        frozen, params = state.frozen["w"], state.params["p"]
        new_state, metrics = run(state, batch, rng)
        assert new_state.frozen["w"] is frozen and not frozen.is_deleted()
        assert params.is_deleted()  # donated
        np.testing.assert_array_equal(new_state.params["p"], [1.0, 0.0, -1.0, -2.0])
        assert int(new_state.step) == 1 and float(metrics["loss"]) == -2.0


def test_a_step_that_changes_the_frozen_weights_is_refused_when_traced():
    def tamper(state, batch, rng):
        return state.replace(frozen={"w": state.frozen["w"] * 2}), {}
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    with pytest.raises(ValueError, match="tamper changed state.frozen"):
        sharding.jit_step(tamper, _fresh_state(), mesh)(_fresh_state(), {"x": jnp.ones(4)}, jax.random.key(0))
