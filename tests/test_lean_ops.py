"""The lean-backward GELU, SiLU and convolution (and the patch product that replaces a convolution onto a
few positions): the same values and gradients as JAX's own, and the memory they exist for (XLA's compiled
memory analysis of a small gradient)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlmjax.models import lean_ops


@pytest.mark.parametrize("lean, reference", [
    (lean_ops.gelu, functools.partial(jax.nn.gelu, approximate=False)),
    (lean_ops.silu, jax.nn.silu),
])
def test_activations_equal_jax_in_value_and_gradient(lean, reference):
    x = jnp.linspace(-9.0, 9.0, 4001)
    np.testing.assert_allclose(lean(x), reference(x), rtol=1e-6, atol=1e-6)
    grad = jax.jit(jax.grad(lambda f, x: jnp.sum(f(x) * jnp.cos(x)), argnums=1), static_argnums=0)
    np.testing.assert_allclose(grad(lean, x), grad(reference, x), rtol=1e-5, atol=1e-6)
    bf16 = x.astype(jnp.bfloat16)
    assert lean(bf16).dtype == jnp.bfloat16 and jax.grad(lambda x: lean(x).sum())(bf16).dtype == jnp.bfloat16


@pytest.mark.parametrize("stride, padding", [(1, ((1, 1), (1, 1))), (2, ((0, 1), (0, 1))), (1, "VALID")])
def test_convolution_equals_lax_in_value_and_both_gradients(stride, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 9, 9, 5)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 5, 7)), jnp.float32)
    options = dict(window_strides=(stride, stride), padding=padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def loss(conv, x, kernel):
        return jnp.sum(jnp.sin(conv(x, kernel, **options)))

    value_and_grads = jax.value_and_grad(loss, argnums=(1, 2))
    lean_value, lean_grads = value_and_grads(lean_ops.conv_general_dilated, x, kernel)
    value, grads = value_and_grads(jax.lax.conv_general_dilated, x, kernel)
    np.testing.assert_allclose(lean_value, value, rtol=1e-6)
    for got, want in zip(lean_grads, grads):  # into the input and into the kernel
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding", [((1, 1), (1, 1)), ((0, 2), (2, 1)), "SAME", "VALID"])
def test_a_large_kernels_input_gradient_is_made_by_flipping_positions(padding):
    """Where the kernel outnumbers the incoming gradient (SD 1.5's low resolutions), the input gradient
    flips positions instead of the kernel's taps: the same gradients as lax's."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 4, 5, 16)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 16, 24)), jnp.float32)
    options = dict(window_strides=(1, 1), padding=padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def loss(conv, x, kernel):
        return jnp.sum(jnp.sin(conv(x, kernel, **options)))

    grads = jax.grad(loss, argnums=(1, 2))
    assert kernel.size > jax.eval_shape(lambda: jax.lax.conv_general_dilated(x, kernel, **options)).size
    lean, reference = grads(lean_ops.conv_general_dilated, x, kernel), grads(jax.lax.conv_general_dilated, x, kernel)
    for got, want in zip(lean, reference):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The form taken: the kernel's swap inside a conditional on the gradient, no reversal of the kernel.
    jaxpr = str(jax.make_jaxpr(functools.partial(grads, lean_ops.conv_general_dilated))(x, kernel))
    assert "cond[" in jaxpr
    assert all("rev" not in line or "16,24" not in line for line in jaxpr.splitlines())


@pytest.mark.parametrize("shape, kernel_size, stride, padding", [
    ((4, 2, 2, 6), 3, 1, ((1, 1), (1, 1))),  # the tiny UNet's lowest level
    ((2, 4, 4, 6), 3, 2, ((0, 1), (0, 1))),  # its last downsampler, onto 2x2
    ((3, 2, 1, 6), 1, 1, "VALID"),  # a 1x1 shortcut
    ((2, 1, 3, 6), 3, 1, "SAME"),
])
def test_a_convolution_onto_few_positions_is_one_product_over_its_patches(shape, kernel_size, stride, padding):
    """On a CPU a map of at most PATCH_PRODUCT_POSITIONS outputs is convolved as a product over its
    gathered patches: the same value and gradients as lax's convolution, and no convolution left."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((kernel_size, kernel_size, shape[-1], 5)), jnp.float32)
    options = dict(window_strides=(stride, stride), padding=padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def loss(conv, x, kernel):
        return jnp.sum(jnp.sin(conv(x, kernel, **options)))

    value_and_grads = jax.value_and_grad(loss, argnums=(1, 2))
    (lean_value, lean_grads), (value, grads) = (value_and_grads(conv, x, kernel) for conv in
                                                (lean_ops.conv_general_dilated, jax.lax.conv_general_dilated))
    np.testing.assert_allclose(lean_value, value, rtol=1e-6)
    for got, want in zip(lean_grads, grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    jaxpr = str(jax.make_jaxpr(functools.partial(value_and_grads, lean_ops.conv_general_dilated))(x, kernel))
    assert "conv_general_dilated" not in jaxpr and "dot_general" in jaxpr


@pytest.mark.parametrize("shape, stride, padding", [
    ((1, 4, 4, 32), 1, ((1, 1), (1, 1))),  # a 4x4 level (its input gradient by flips too)
    ((1, 6, 5, 32), 2, ((1, 1), (1, 1))),  # a downsampler onto 3x3
    ((1, 3, 4, 32), 1, ((0, 2), (2, 1))),
])
def test_a_large_kernels_gradient_is_one_product_over_the_inputs_patches(shape, stride, padding, monkeypatch):
    """Where the kernel has PATCH_GRADIENT_RATIO times the incoming gradient's elements (SD 1.5's 8x8 and
    16x16 levels), its gradient is patchesᵀ · g: the same gradients as lax's, one convolution fewer. A
    kernel under PATCH_GRADIENT_MIN_KERNEL elements (the tiny UNet's) keeps the convolution."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, shape[-1], 24)), jnp.float32)
    options = dict(window_strides=(stride, stride), padding=padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    out = jax.eval_shape(lambda: jax.lax.conv_general_dilated(x, kernel, **options))
    assert lean_ops.PATCH_GRADIENT_RATIO * out.size <= kernel.size < lean_ops.PATCH_GRADIENT_MIN_KERNEL
    assert np.prod(out.shape[1:3]) > lean_ops.PATCH_PRODUCT_POSITIONS  # the forward stays a convolution

    def loss(conv, x, kernel):
        return jnp.sum(jnp.sin(conv(x, kernel, **options)))

    grads = jax.grad(loss, argnums=(1, 2))
    made_by_convolution = f"f32[3,3,{shape[-1]},24] = conv_general_dilated["

    def lean_jaxpr():
        return str(jax.make_jaxpr(functools.partial(grads, lean_ops.conv_general_dilated))(x, kernel))

    assert made_by_convolution in lean_jaxpr()  # a small kernel
    monkeypatch.setattr(lean_ops, "PATCH_GRADIENT_MIN_KERNEL", kernel.size)
    lean, reference = grads(lean_ops.conv_general_dilated, x, kernel), grads(jax.lax.conv_general_dilated, x, kernel)
    for got, want in zip(lean, reference):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The kernel's gradient now comes out of a product, where lax's comes out of a convolution.
    lax_jaxpr = str(jax.make_jaxpr(functools.partial(grads, jax.lax.conv_general_dilated))(x, kernel))
    assert made_by_convolution in lax_jaxpr and made_by_convolution not in lean_jaxpr()
    assert "dot_general" in lean_jaxpr()


def test_larger_maps_and_other_layouts_keep_the_convolution():
    kernel = jnp.zeros((3, 3, 4, 4))
    nhwc = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    five_positions = jnp.zeros((1, 1, 5, 4))  # one more output position than a patch product takes
    assert lean_ops.PATCH_PRODUCT_POSITIONS == 4
    nchw = dict(nhwc, dimension_numbers=("NCHW", "HWIO", "NCHW"))
    for x, options in [(five_positions, nhwc), (jnp.zeros((1, 4, 2, 2)), nchw)]:
        jaxpr = str(jax.make_jaxpr(lambda x: lean_ops.conv_general_dilated(x, kernel, **options))(x))
        assert "conv_general_dilated" in jaxpr


def _temp_bytes(conv, activation) -> int:
    """Temporaries of the input gradient through a stack of frozen convolutions and activations."""
    kernels = [jnp.zeros((3, 3, 64, 64)) for _ in range(6)]

    def loss(x):
        for kernel in kernels:
            x = activation(conv(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
        return jnp.sum(x)

    compiled = jax.jit(jax.grad(loss)).lower(jnp.zeros((2, 32, 32, 64))).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_the_lean_backward_holds_less():
    plain = _temp_bytes(jax.lax.conv_general_dilated, functools.partial(jax.nn.gelu, approximate=False))
    lean = _temp_bytes(lean_ops.conv_general_dilated, lean_ops.gelu)
    assert lean < 0.8 * plain, (lean, plain)


def _text_encoder_gradient(monkeypatch, written: bool):
    """(gradient, compiled HLO) of a 6-layer tiny CLIP text encoder's parameters, batch 8."""
    from mlmjax import pretrained, tiny

    if not written:
        monkeypatch.setattr(lean_ops, "written_gradient", lambda x: x)
    # The Dense layers' own conditionals (lean_ops.dot_general) aside: this is about the residual stream.
    monkeypatch.setattr(lean_ops, "dot_general", jax.lax.dot_general)
    text_encoder = pretrained.build_component("text_encoder", {**tiny.TEXT_ENCODER_CONFIG, "num_hidden_layers": 6})
    params = pretrained.init_component("text_encoder", text_encoder, 0)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 1000, (8, 77)), jnp.int32)

    def loss(params):
        return jnp.sum(jnp.sin(text_encoder.apply({"params": params}, ids)))

    gradient = jax.jit(jax.grad(loss)).lower(params).compile()
    return gradient(params), gradient.as_text()


def test_the_residual_gradient_is_written_out_not_recomputed_in_every_fusion(monkeypatch):
    """Without written_gradient XLA's CPU backend fuses the residual-stream gradient of every block above
    into each block's weight-gradient transpose (a 94-operand fusion here; SD 1.5's text encoder spent
    ~3 s a step on them). With it the largest fusion is a block's own, and the gradients are the same."""
    written, written_hlo = _text_encoder_gradient(monkeypatch, written=True)
    plain, plain_hlo = _text_encoder_gradient(monkeypatch, written=False)

    def largest_fusion(hlo):
        return max(line.count("%") - 1 for line in hlo.split("\n") if " fusion(" in line)

    assert largest_fusion(plain_hlo) > 60 and largest_fusion(written_hlo) < 30
    assert written_hlo.count(" conditional(") == 6  # one per layer
    for a, b in zip(jax.tree.leaves(written), jax.tree.leaves(plain)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_square_or_widening_dense_kernel_takes_its_gradient_from_the_input_transposed():
    """layers.dense (nn.Dense with lean_ops.dot_general): the same values and gradients as nn.Dense; on a
    CPU a kernel with no more rows than columns takes the written-out transpose, others keep lax's product."""
    import flax.linen as nn

    from mlmjax.models import layers

    rng = np.random.default_rng(4)
    for width, transposed in [(24, True), (16, True), (8, False)]:
        x = jnp.asarray(rng.standard_normal((2, 5, 16)), jnp.float32)
        params = nn.Dense(width).init(jax.random.key(0), x)

        def loss(module, params, x):
            return jnp.sum(jnp.sin(module.apply(params, x)))

        grads = jax.value_and_grad(loss, argnums=(1, 2))
        lean, reference = grads(layers.dense(width), params, x), grads(nn.Dense(width), params, x)
        for got, want in zip(jax.tree.leaves(lean), jax.tree.leaves(reference)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        jaxpr = str(jax.make_jaxpr(functools.partial(grads, layers.dense(width)))(params, x))
        assert ("cond[" in jaxpr) == transposed, width
    # Other forms of product keep lax's: a batch axis, two contracted axes.
    for lhs, rhs, numbers in [(jnp.zeros((3, 4, 5)), jnp.zeros((3, 5, 7)), (((2,), (1,)), ((0,), (0,)))),
                              (jnp.zeros((4, 2, 3)), jnp.zeros((2, 3, 9)), (((1, 2), (0, 1)), ((), ())))]:
        jaxpr = str(jax.make_jaxpr(jax.grad(lambda r: jnp.sum(lean_ops.dot_general(lhs, r, numbers))))(rhs))
        assert "cond[" not in jaxpr
