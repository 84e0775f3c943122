"""Precision, memory and compilation of the train step: the AOT compile report, bf16 compute with
float32 master weights, and per-block rematerialisation of the UNet."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from helpers import relative_error
from mlmjax import aot
from mlmjax import train_step as train_step_lib
from mlmjax.models import lean_ops
import test_train_step
from test_train_step import TRAIN_STEP_LEARNING_RATES, build, load_config

# The tiny model's pictures and contextualizer, as the train-step tests make them.
contextualizer_dir, pictures = test_train_step.contextualizer_dir, test_train_step.pictures


def test_compile_step_reports_the_flops_and_memory_of_a_matmul():
    mesh = jax.make_mesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated = NamedSharding(mesh, PartitionSpec())
    a = jax.ShapeDtypeStruct((64, 128), jnp.float32, sharding=replicated)  # no arrays allocated
    b = jax.ShapeDtypeStruct((128, 32), jnp.float32, sharding=replicated)
    compiled = aot.compile_step(jax.jit(jnp.matmul), a, b)
    assert compiled.flops == compiled.lowered_flops == 2 * 64 * 128 * 32  # one device: the whole product
    assert compiled.memory["argument"] == (64 * 128 + 128 * 32) * 4
    assert compiled.memory["output"] == 64 * 32 * 4
    assert compiled.memory["peak_bytes"] == (compiled.memory["argument"] + compiled.memory["output"]
                                             + compiled.memory["temp"] - compiled.memory["alias"])
    assert compiled.compile_seconds > 0
    line = compiled.describe()
    assert line.startswith("compiled in ") and "0.000524 GFLOP/step" in line and "per device" in line
    x, y = np.ones((64, 128), np.float32), np.ones((128, 32), np.float32)
    np.testing.assert_array_equal(compiled(x, y), np.full((64, 32), 128, np.float32))


def _ynn_fusions(compiled: aot.Compiled) -> int:
    return compiled.executable.as_text().count('"__ynn_fusion"')


def test_a_large_cpu_program_is_compiled_with_xlas_own_kernels_unless_xla_flags_choose(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    small = [jax.ShapeDtypeStruct((64, 128), jnp.float32), jax.ShapeDtypeStruct((128, 32), jnp.float32)]
    large = [jax.ShapeDtypeStruct((4096, 4096), jnp.float32)] * 2  # 1.4e11 FLOPs; compiled, never run
    kept = aot.compile_step(jax.jit(jnp.matmul), *small)
    assert kept.compiler_options == {} and _ynn_fusions(kept) > 0  # XLA's default: YNNPACK's product
    chosen = aot.compile_step(jax.jit(jnp.matmul), *large)
    assert chosen.compiler_options == {"xla_cpu_experimental_ynn_fusion_type": ""}
    assert _ynn_fusions(chosen) == 0 and "XLA's own CPU kernels" in chosen.describe()
    assert aot.xla_kernel_options() == chosen.compiler_options  # what bench_layers compiles its layers with
    # The user's XLA_FLAGS (read when the backend started) stand: nothing is passed over them.
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE")
    assert aot.compile_step(jax.jit(jnp.matmul), *large).compiler_options == {}
    assert aot.xla_kernel_options() == {}


def test_a_small_cpu_program_whose_convolution_kernels_are_frozen_takes_xlas_own_kernels(monkeypatch):
    """A frozen UNet's convolutions (the forward pass and the input's gradient) run on XLA's own CPU
    kernels; a program that makes a kernel's gradient (DreamBooth's) keeps XLA's default. Either way the
    values are the convolution's."""
    monkeypatch.delenv("XLA_FLAGS", raising=False)

    def loss(x, kernel):
        y = lean_ops.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(jnp.sin(y))

    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 16, 16)) / 12
    own = {"xla_cpu_experimental_ynn_fusion_type": ""}
    cases = {"forward": (loss, own), "input gradient": (jax.grad(loss), own),
             "kernel gradient": (jax.grad(loss, argnums=1), {}), "both": (jax.grad(loss, argnums=(0, 1)), {})}
    for name, (function, options) in cases.items():
        compiled = aot.compile_step(jax.jit(function), x, kernel)
        assert compiled.compiler_options == options, name
        with jax.default_matmul_precision("highest"):
            expected = function(x, kernel)
        for got, want in zip(jax.tree.leaves(compiled(x, kernel)), jax.tree.leaves(expected)):
            assert relative_error(got, want) < 1e-5, name
    # A program without convolutions is left to XLA's default (the small matmul above).
    assert aot.compile_step(jax.jit(lambda a: jnp.sum(a @ a)), kernel[0, 0]).compiler_options == {}


# ---------------------------------------------------------------------------------------------------
# bf16 compute, float32 master weights

_BF16_MATMUL = re.compile(r"stablehlo\.(dot_general|convolution)[^\n]*-> tensor<[^>]*bf16>")


def _step(config, pictures, contextualizer_dir):
    """(state, batch, rng, jitted step) of ``config`` on the tiny model."""
    setup = build(config, pictures, contextualizer_dir)
    batch = setup.make_batch(0)
    return setup.state, batch, jax.random.key(1), jax.jit(train_step_lib.train_step)


@pytest.mark.parametrize("name", ["ti", "dreambooth"])
def test_a_bf16_step_matches_the_fp32_step_and_keeps_float32_state(name, pictures, contextualizer_dir):
    """TI + MLM and DreamBooth + prior + MLM: the losses of a bfloat16-compute step within 2e-2 of the
    float32 step; parameters and optimizer state stay float32; the matmuls really run in bf16."""
    results = {}
    for dtype in ("float32", "bfloat16"):
        config = load_config(name)
        # test_train_step's rate: the float32 step is then the program it compiles, which the persistent
        # compilation cache gives whichever test comes second.
        config.compute_dtype, config.learning_rate = dtype, TRAIN_STEP_LEARNING_RATES[name]
        state, batch, rng, step = _step(config, pictures, contextualizer_dir)
        lowered = step.lower(state, batch, rng)
        new_state, metrics = lowered.compile()(state, batch, rng)
        results[dtype] = new_state, {k: float(v) for k, v in metrics.items()}, lowered.as_text()
        assert all(m.dtype == jnp.float32 for m in metrics.values() if jnp.issubdtype(m.dtype, jnp.floating))
    (_, fp32, fp32_text), (bf16_state, bf16, bf16_text) = results["float32"], results["bfloat16"]
    print(name, {k: (fp32[k], bf16[k], abs(bf16[k] - fp32[k]) / abs(fp32[k])) for k in fp32 if fp32[k]})
    for key in ("loss", "loss_diff", "loss_mlm") + (("loss_prior",) if name == "dreambooth" else ()):
        assert abs(bf16[key] - fp32[key]) <= 2e-2 * abs(fp32[key]), (key, bf16[key], fp32[key])
    assert np.isfinite(bf16["grad_norm"]) and bf16["grad_norm"] > 0
    assert abs(bf16["grad_norm"] - fp32["grad_norm"]) <= 0.1 * fp32["grad_norm"]
    for leaf in jax.tree.leaves((bf16_state.params, bf16_state.opt_state, bf16_state.frozen)):
        assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(bf16_state.params))
    assert len(_BF16_MATMUL.findall(bf16_text)) >= 20 and not _BF16_MATMUL.findall(fp32_text)


# ---------------------------------------------------------------------------------------------------
# Rematerialisation of the UNet's blocks


def test_remat_gives_the_plain_step_recomputing_the_unet_blocks(pictures, contextualizer_dir):
    """TI at batch 16: ``config.remat`` changes neither the loss nor the update beyond float rounding,
    and the compiled step recomputes the UNet blocks (more FLOPs).

    The memory it saves shows on accelerators: on an H200 (jax 0.11.2) the tiny UNet's forward and
    backward at batch 16 holds 61.5 MB of XLA temporaries with remat instead of 91.3 MB (batch 64:
    242 MB instead of 367 MB), for 42% more FLOPs. XLA's CPU backend schedules without regard to
    memory and its temporaries stay the same, so there that part is not asserted.
    """
    runs = {}
    for remat in (False, True):
        config = load_config("ti")
        config.mlm.weight, config.batch_size, config.remat = 0.0, 16, remat
        state, batch, rng, step = _step(config, pictures, contextualizer_dir)
        assert state.spec.unet.remat is remat
        compiled = aot.compile_step(step, state, batch, rng)
        new_state, metrics = compiled(state, batch, rng)
        runs[remat] = compiled, float(metrics["loss"]), new_state.params
    (plain, plain_loss, plain_params), (remat, remat_loss, remat_params) = runs[False], runs[True]
    print("plain:", plain.describe(), "\nremat:", remat.describe())
    assert abs(remat_loss - plain_loss) <= 1e-6 * abs(plain_loss)
    for a, b in zip(jax.tree.leaves(remat_params), jax.tree.leaves(plain_params)):
        assert relative_error(a, b) <= 1e-6
    assert remat.flops > 1.2 * plain.flops  # the UNet's forward runs twice
    if jax.default_backend() != "cpu":
        assert remat.memory["temp"] < 0.8 * plain.memory["temp"], (remat.memory, plain.memory)
