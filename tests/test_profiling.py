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
    # XLA's CPU runtime tells which execution each operation belongs to: the calls' exact boundaries.
    _, events, _ = profiling._op_events(summary["trace"], ops, profiling.module_name(executable.as_text()))
    assert len({run for *_, run in events}) == 3 and None not in {run for *_, run in events}
    # Each step runs the loop bodies' products SCAN_LENGTH times (forward, and again in the backward pass).
    in_loop = [o for o in summary["top_ops"] if o["scope"] == "test_profiling.loss" and o["category"] == "matmul"]
    assert in_loop and all(o["calls_per_step"] == SCAN_LENGTH for o in in_loop)


def test_the_module_name_is_what_the_trace_calls_it(compiled):
    name = profiling.module_name(compiled[0].as_text())
    assert name.startswith("jit_") and profiling.module_name("HloModule jit_train_step, is_scheduled=true") == \
        "jit_train_step"


# A loop nest as XLA's CPU compiler leaves SD 1.5's chunked attention: the products in the inner body
# have lost their sources; the loops keep theirs.
_LOOPS = """HloModule jit_step, is_scheduled=true

%inner_body (a: (s32[], f32[4,4])) -> (s32[], f32[4,4]) {
  %a = (s32[], f32[4,4]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%a), index=0
  %x = f32[4,4]{1,0} get-tuple-element(%a), index=1
  %dot.7 = f32[4,4]{1,0} dot(%x, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %t = (s32[], f32[4,4]{1,0}) tuple(%i, %dot.7)
}

%inner_cond (b: (s32[], f32[4,4])) -> pred[] {
  %b = (s32[], f32[4,4]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%b), index=0
  %n = s32[] constant(16)
  ROOT %lt.1 = pred[] compare(%j, %n), direction=LT
}

%outer (c: (s32[], f32[4,4])) -> (s32[], f32[4,4]) {
  %c = (s32[], f32[4,4]{1,0}) parameter(0)
  ROOT %while.5 = (s32[], f32[4,4]{1,0}) while(%c), condition=%inner_cond, body=%inner_body, metadata={op_name="@IN"}
}

%outer_cond (d: (s32[], f32[4,4])) -> pred[] {
  %d = (s32[], f32[4,4]{1,0}) parameter(0)
  %k = s32[] get-tuple-element(%d), index=0
  %m = s32[] constant(8)
  ROOT %lt.2 = pred[] compare(%k, %m), direction=LT
}

ENTRY %main (p: f32[4,4]) -> (s32[], f32[4,4]) {
  %p = f32[4,4]{1,0} parameter(0)
  %copy.3 = f32[4,4]{1,0} copy(%p)
  %zero = s32[] constant(0)
  %init = (s32[], f32[4,4]{1,0}) tuple(%zero, %copy.3)
  ROOT %while.9 = (s32[], f32[4,4]{1,0}) while(%init), condition=%outer_cond, body=%outer, metadata={op_name="@OUT"}
}
""".replace("@IN", "jit(step)/jvp(UNet2DConditionModel)/up_blocks_3/attentions_1/transformer_blocks_0/attn1/"
            "while/body/closed_call/while").replace(
    "@OUT", "jit(step)/transpose(jvp(UNet2DConditionModel))/down_blocks_0/attentions_0/transformer_blocks_0/"
    "attn1/while")


def test_operations_without_a_source_in_a_loop_take_the_loops_scope():
    ops = profiling.hlo_ops(_LOOPS)
    # The product lost its source; the loop around it says where it came from.
    assert ops["dot.7"] == profiling.HloOp("dot", "matmul", "UNet2DConditionModel forward",
                                           "UNet2DConditionModel transformer_blocks/attn1 forward")
    # The inner loop's condition has no loop with a source nearer than the inner loop's own.
    assert ops["lt.1"].layer == "UNet2DConditionModel transformer_blocks/attn1 forward"
    # The outer condition: the outer loop's, the backward pass of another block's attention.
    assert ops["lt.2"].scope == "UNet2DConditionModel backward"
    assert ops["lt.2"].layer == "UNet2DConditionModel transformer_blocks/attn1 backward"
    # Outside every loop, what XLA made without a source stays unattributed.
    assert ops["copy.3"].scope == profiling.UNATTRIBUTED
    assert ops["while.9"].category == "container"


def test_a_calls_last_operation_is_not_charged_the_gap_to_the_next_call():
    ops = {name: profiling.HloOp("fusion", "elementwise", "Net forward", "Net forward") for name in "abc"}
    # Two calls 10 ms apart whose first operations differ ("a" then "b": the runtime's two threads start
    # a step with either), each operation 1 ms long, the next starting 0.5 ms after one ends.
    events = [("a", 0.0, 1.0, 7), ("b", 1.5, 1.0, 7), ("c", 3.0, 1.0, 7),
              ("b", 13.0, 1.0, 8), ("a", 14.5, 1.0, 8), ("c", 16.0, 1.0, 8)]
    charges = profiling._charges("host", events, ops)
    assert charges == [("a", 1.5), ("b", 1.5), ("c", 1.0), ("b", 1.5), ("a", 1.5), ("c", 1.0)]
    # Without run ids a call starts where the first operation traced starts again: here that misses
    # the second call's start ("b"), charging "c" the 10 ms between the calls, and cuts it before "a".
    charges = profiling._charges("host", [(name, start, ms, None) for name, start, ms, _ in events], ops)
    assert charges == [("a", 1.5), ("b", 1.5), ("c", 10.0), ("b", 1.0), ("a", 1.5), ("c", 1.0)]
    # On a device each kernel is charged its own duration.
    assert profiling._charges("device", events, ops) == [(name, 1.0) for name, *_ in events]
