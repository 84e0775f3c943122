"""GELU, SiLU and convolution whose backward passes hold less memory.

At SD 1.5's 512 px, batch 4, the peak of a Textual Inversion step (inside the backward pass) held,
besides the saved activations:

* the ``erf``/``erfc`` of every exact GELU and the sigmoid of every SiLU: autodiff of
  ``jax.nn.gelu``/``jax.nn.silu`` keeps them next to the input (1.25 GB for the GEGLUs alone);
* 2.2 GB of convolution kernels transposed for the input gradient: they depend on the weights
  only, so XLA computed them all long before the layers' backward passes needed them.

Here the activations keep their input alone and recompute the derivative from it (behind an
``optimization_barrier``, which keeps XLA from merging the recomputation with the forward pass's own:
common-subexpression elimination would hold the forward values until the backward pass again), and
the convolution's backward pass makes its kernel wait for the incoming gradient. Values are the same functions; gradients agree to float rounding (``tests/test_lean_ops.py``).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

_INV_SQRT2 = 1 / math.sqrt(2)
_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)


def _keeping_input(function: Callable[[jax.Array], jax.Array],
                   derivative: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
    """``function`` differentiated by ``derivative(x)``, with ``x`` its only residual."""
    activation = jax.custom_vjp(function)

    def backward(x, g):
        return (g * derivative(jax.lax.optimization_barrier(x)),)

    activation.defvjp(lambda x: (function(x), x), backward)
    return activation


def _gelu(x: jax.Array) -> jax.Array:
    return 0.5 * x * (1 + jax.lax.erf(x * jnp.asarray(_INV_SQRT2, x.dtype)))


def _gelu_derivative(x: jax.Array) -> jax.Array:
    cdf = 0.5 * (1 + jax.lax.erf(x * jnp.asarray(_INV_SQRT2, x.dtype)))
    return cdf + x * jnp.exp(-0.5 * x * x) * jnp.asarray(_INV_SQRT_2PI, x.dtype)


def _silu_derivative(x: jax.Array) -> jax.Array:
    sigmoid = jax.nn.sigmoid(x)
    return sigmoid * (1 + x * (1 - sigmoid))


gelu = _keeping_input(_gelu, _gelu_derivative)  # exact (erf) GELU, PyTorch's default
silu = _keeping_input(jax.nn.silu, _silu_derivative)  # x · sigmoid(x), a.k.a. swish


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _convolve(convolution: Callable, inputs: jax.Array, kernel: jax.Array) -> jax.Array:
    return convolution(inputs, kernel)


def _convolve_forward(convolution, inputs, kernel):
    return convolution(inputs, kernel), (inputs, kernel)


def _convolve_backward(convolution, residuals, g):
    inputs, kernel = residuals
    # A data dependence makes the kernel's transpose wait for g (XLA's CPU backend lowers an
    # optimization_barrier to scheduling hints that a parameter-only transpose ignores): adding
    # 0 · g[0] is exact for every finite g, and a NaN in g makes every gradient NaN anyway.
    kernel = kernel + jnp.zeros((), kernel.dtype) * g.reshape(-1)[0].astype(kernel.dtype)
    _, vjp = jax.vjp(convolution, inputs, kernel)
    return vjp(g)


_convolve.defvjp(_convolve_forward, _convolve_backward)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Any, padding: Any, **options: Any) -> jax.Array:
    """``jax.lax.conv_general_dilated`` (same arguments) with the lean backward pass; flax's
    ``nn.Conv(conv_general_dilated=...)`` takes it."""
    return _convolve(functools.partial(jax.lax.conv_general_dilated, window_strides=window_strides,
                                       padding=padding, **options), lhs, rhs)
