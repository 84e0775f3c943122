"""``mlmjax.profiling``: each traced operation gets its kind and its scope from the compiled module."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from mlmjax import profiling

SCAN_LENGTH = 5


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3))(x)
        return nn.Dense(16)(x.reshape(x.shape[0], -1))


def loss(params, x, w):
    y = Net().apply(params, x)

    def body(carry, _):  # a loop outside the model: its body runs SCAN_LENGTH times a step
        return jnp.tanh(carry @ w), None

    y, _ = jax.lax.scan(body, y, None, length=SCAN_LENGTH)
    return jnp.mean(y ** 2)


@pytest.fixture(scope="module")
def compiled():
    x = jnp.ones((4, 8, 8, 3))
    w = jnp.full((16, 16), 0.05)
    params = Net().init(jax.random.key(0), x)
    executable = jax.jit(jax.grad(loss, argnums=(0, 2))).lower(params, x, w).compile()
    return executable, (params, x, w)


def test_operations_get_their_kind_and_scope(compiled):
    ops = profiling.hlo_ops(compiled[0].as_text())
    kinds = {(op.category, op.scope) for op in ops.values()}
    assert ("convolution", "Net forward") in kinds
    assert ("matmul", "Net forward") in kinds and ("matmul", "Net backward") in kinds
    # XLA's CPU compiler rewrites the kernel gradient's convolution without a source: unattributed.
    assert ("convolution", profiling.UNATTRIBUTED) in kinds
    # The scan outside the model: its products are matmuls issued by this file's loss function, and the
    # loop itself is a container, never counted.
    assert ("matmul", "test_profiling.loss") in kinds
    assert any(op.opcode == "while" and op.category == "container" for op in ops.values())
    assert set(op.category for op in ops.values()) <= set(profiling.CATEGORIES) | {"container"}
    # Layers: the innermost Flax modules, so each block's copy of a layer adds up.
    layers = {op.layer for op in ops.values()}
    assert {"Net Conv forward", "Net Dense forward", "Net Dense backward", "test_profiling.loss"} <= layers


def test_a_profile_sums_the_traced_operations(compiled, tmp_path):
    executable, args = compiled
    jax.block_until_ready(executable(*args))
    summary = profiling.profile_calls(lambda: jax.block_until_ready(executable(*args)), executable.as_text(),
                                      str(tmp_path), steps=3)
    assert summary["where"] == "host" and summary["steps"] == 3
    assert summary["trace"].startswith(str(tmp_path)) and summary["trace"].endswith(".xplane.pb")
    # Charged from start to start within a call on a CPU, the operations make up at most the calls' time.
    assert 0 < summary["op_ms_per_step"] <= summary["wall_ms_per_step"]
    assert sum(summary["by_category"].values()) == pytest.approx(summary["op_ms_per_step"])
    assert sum(summary["by_scope"].values()) == pytest.approx(summary["op_ms_per_step"])
    assert sum(summary["by_layer"].values()) == pytest.approx(summary["op_ms_per_step"])  # fewer than 15 layers
    ops = profiling.hlo_ops(executable.as_text())
    assert {o["name"] for o in summary["top_ops"]} <= set(ops)
    assert all(o["category"] != "container" for o in summary["top_ops"])
    # Each step runs the loop bodies' products SCAN_LENGTH times (forward, and again in the backward pass).
    in_loop = [o for o in summary["top_ops"] if o["scope"] == "test_profiling.loss" and o["category"] == "matmul"]
    assert in_loop and all(o["calls_per_step"] == SCAN_LENGTH for o in in_loop)


def test_the_module_name_is_what_the_trace_calls_it(compiled):
    name = profiling.module_name(compiled[0].as_text())
    assert name.startswith("jit_") and profiling.module_name("HloModule jit_train_step, is_scheduled=true") == \
        "jit_train_step"
