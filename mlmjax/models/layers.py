"""Building blocks shared by the UNet and the VAE, named after their diffusers counterparts.

Every submodule carries the diffusers attribute name (``conv1``, ``time_emb_proj``, ``to_out_0``…), so
:func:`mlmjax.weights.key_map` derives the PyTorch state-dict keys from the parameter tree alone.
Tensors are NHWC; parameters are float32 and ``dtype`` is the compute dtype.

The module also holds the config.json parsing that :mod:`unet` and :mod:`vae` share: a diffusers
config is read field by field, and anything mlmjax cannot run faithfully is refused with one line
naming the file, the key and what is supported.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mlmjax.models import lean_ops
from mlmjax.models.attention import dot_product_attention
from mlmjax.weights import WeightsError

Dtype = Any


# ---------------------------------------------------------------------------------------------------
# Config parsing


def unsupported(source: str, key: str, value: Any, supported: str) -> WeightsError:
    return WeightsError(f"{source}: config {key}={value!r} is not supported; mlmjax supports {supported}")


def parse_config(cls, d: Mapping[str, Any], source: str, *, fixed: Mapping[str, tuple], harmless=()):
    """Builds the frozen dataclass ``cls`` from a diffusers ``config.json`` dict.

    Keys naming a field of ``cls`` are taken (JSON lists become tuples); keys in ``fixed`` must hold
    one of the listed values, which are the ones that leave the supported architecture unchanged;
    ``_``-prefixed bookkeeping keys and ``harmless`` ones (e.g. ``sample_size``) are kept for export
    only. Any other key is refused: a field diffusers added later may change the math.
    The original dict is kept in ``source_json`` so that :func:`config_to_dict` exports it faithfully.
    """
    names = {f.name for f in dataclasses.fields(cls)} - {"source_json"}
    values = {}
    for key, value in d.items():
        if key in names:
            values[key] = tuple(value) if isinstance(value, list) else value
        elif key in fixed:
            allowed = fixed[key]
            if not (value in allowed or (isinstance(value, list) and all(v in allowed for v in value))):
                raise unsupported(source, key, value, " or ".join(map(repr, allowed)))
        elif not (key.startswith("_") or key in harmless):
            raise WeightsError(f"{source}: unknown config key {key}={value!r}; mlmjax cannot tell whether "
                               "it changes the model, so it refuses to guess")
    return cls(**values, source_json=json.dumps(dict(d)))


def config_to_dict(config, class_name: str) -> dict:
    """The original config.json dict with every field of ``config`` written over it."""
    d = json.loads(config.source_json)
    for field in dataclasses.fields(config):
        if field.name != "source_json":
            value = getattr(config, field.name)
            d[field.name] = list(value) if isinstance(value, tuple) else value
    d["_class_name"] = class_name
    return d


# ---------------------------------------------------------------------------------------------------
# Layers


def conv(features: int, *, kernel: int = 3, stride: int = 1, padding=None, dtype: Dtype,
         name: str | None = None) -> nn.Conv:
    """``torch.nn.Conv2d``: symmetric ``padding`` (default: same size for stride 1) or ((lo, hi), (lo, hi))."""
    if padding is None:
        padding = (kernel - 1) // 2
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=dtype, name=name,
                   conv_general_dilated=lean_ops.conv_general_dilated)


def dense(features: int, **options: Any) -> nn.Dense:
    """``nn.Dense`` (same options) whose kernel gradient takes the faster form on a CPU
    (:func:`lean_ops.dot_general`)."""
    return nn.Dense(features, dot_general=lean_ops.dot_general, **options)


def group_norm(groups: int, eps: float, *, dtype: Dtype, name: str) -> nn.GroupNorm:
    """``torch.nn.GroupNorm``, statistics in float32 with the two-pass variance PyTorch uses."""
    return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding ``[B] -> [B, dim]`` in float32, diffusers' ``get_timestep_embedding``.

    Frequencies are ``exp(-log(max_period) * i / (dim/2 - freq_shift))``; the sin half comes first
    unless ``flip_sin_to_cos``; an odd ``dim`` is zero-padded.
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = jnp.asarray(timesteps).astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    parts = [jnp.cos(args), jnp.sin(args)] if flip_sin_to_cos else [jnp.sin(args), jnp.cos(args)]
    return jnp.pad(jnp.concatenate(parts, axis=-1), ((0, 0), (0, dim % 2)))


class TimestepEmbedding(nn.Module):
    """The MLP on the sinusoidal embedding: ``linear_1`` → SiLU → ``linear_2``."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = lean_ops.silu(dense(self.features, dtype=self.dtype, name="linear_1")(x))
        return dense(self.features, dtype=self.dtype, name="linear_2")(x)


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding added between, and a 1×1 shortcut conv
    when the channel count changes. Without ``temb`` (the VAE) there is no ``time_emb_proj``."""

    out_channels: int
    groups: int
    eps: float
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = lean_ops.silu(group_norm(self.groups, self.eps, dtype=self.dtype, name="norm1")(x))
        h = conv(self.out_channels, dtype=self.dtype, name="conv1")(h)
        if temb is not None:
            temb = dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(lean_ops.silu(temb))
            h = h + temb[:, None, None, :]
        h = lean_ops.silu(group_norm(self.groups, self.eps, dtype=self.dtype, name="norm2")(h))
        h = conv(self.out_channels, dtype=self.dtype, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, kernel=1, dtype=self.dtype, name="conv_shortcut")(x)
        return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """Stride-2 3×3 conv. ``padding=0`` is diffusers' VAE variant, which pads only bottom/right by 1."""

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        padding = self.padding if self.padding else ((0, 1), (0, 1))
        return conv(self.out_channels, stride=2, padding=padding, dtype=self.dtype, name="conv")(x)


def _nearest_indices(size_in: int, size_out: int) -> np.ndarray:
    # PyTorch's "nearest" mode: source = floor(target * in/out), the scale in float32.
    scale = np.float32(size_in) / np.float32(size_out)
    return np.minimum(np.floor(np.arange(size_out, dtype=np.float32) * scale), size_in - 1).astype(np.int32)


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling then a 3×3 conv.

    ``size`` (H, W) is the skip connection's size, which differs from 2× when an input side was odd
    on the way down; the resampling then follows PyTorch's ``interpolate(size=…, mode="nearest")``.
    """

    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        for axis in (1, 2):
            target = 2 * x.shape[axis] if size is None else size[axis - 1]
            if target == 2 * x.shape[axis]:
                x = jnp.repeat(x, 2, axis=axis)
            else:
                x = jnp.take(x, _nearest_indices(x.shape[axis], target), axis=axis)
        return conv(self.out_channels, dtype=self.dtype, name="conv")(x)


class Attention(nn.Module):
    """diffusers' ``Attention`` on tokens ``[B, L, C]``: ``to_q/k/v`` → multi-head attention → ``to_out_0``.

    Self-attention when ``context`` is None, else cross-attention over ``context [B, L', D]``. The VAE's
    mid-block attention (``norm_num_groups`` set, ``residual_connection``) also normalises its input
    with ``group_norm`` and adds the input back, as diffusers does inside the same module.
    """

    heads: int
    head_dim: int
    qkv_bias: bool = False
    upcast: bool = False
    norm_num_groups: int | None = None
    norm_eps: float = 1e-6
    residual_connection: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        residual = x
        if self.norm_num_groups is not None:
            x = group_norm(self.norm_num_groups, self.norm_eps, dtype=self.dtype, name="group_norm")(x)
        context = x if context is None else context

        def project(name: str, y: jax.Array) -> jax.Array:
            y = dense(self.heads * self.head_dim, use_bias=self.qkv_bias, dtype=self.dtype, name=name)(y)
            return y.reshape(*y.shape[:-1], self.heads, self.head_dim)

        out = dot_product_attention(project("to_q", x), project("to_k", context), project("to_v", context),
                                    upcast=self.upcast)
        out = dense(x.shape[-1], dtype=self.dtype, name="to_out_0")(out.reshape(*out.shape[:-2], -1))
        return out + residual if self.residual_connection else out
