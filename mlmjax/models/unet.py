"""The Stable Diffusion 1.x/2.x UNet (diffusers' ``UNet2DConditionModel``) in Flax Linen, NHWC.

Parameter paths mirror the diffusers attributes (``down_blocks_1/attentions_0/transformer_blocks_0/
attn2/to_k/kernel`` ↔ ``down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight``), so
diffusers checkpoints load through :mod:`mlmjax.weights` without a hand-written table.

Per-layer context (XTI / P+). ``context`` is either ``[B, L, D]``, shared by every cross-attention
layer, or ``[N, B, L, D]`` with one context per cross-attention layer, N =
:func:`num_cross_attention_layers`. Layer ``n`` of the stack feeds the n-th ``attn2`` in this order:

1. the down blocks in order; within a block its ``attentions`` in order, within each attention its
   ``transformer_blocks`` in order;
2. the mid block's attention(s), likewise;
3. the up blocks in order, likewise.

This is also the order of execution. For SD 1.5 (one transformer block per attention) that is
``down_blocks.{0,1,2}.attentions.{0,1}`` (6 layers), ``mid_block.attentions.0`` (1), then
``up_blocks.{1,2,3}.attentions.{0,1,2}`` (9): 16 layers in 7 block groups, see
:func:`cross_attention_block_groups`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from mlmjax.models import lean_ops
from mlmjax.models.layers import (Attention, Downsample2D, Dtype, ResnetBlock2D, TimestepEmbedding, Upsample2D,
                                  config_to_dict, conv, dense, group_norm, parse_config, timestep_embedding,
                                  unsupported)

_CROSS_DOWN, _PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
_CROSS_UP, _PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"

# diffusers fields that must keep these values: the SD 1.x/2.x architecture is what is ported.
_FIXED = {
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "act_fn": ("silu", "swish"),
    "dropout": (0.0,),
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False,),
    "projection_class_embeddings_input_dim": (None,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
}
# Used only by features refused above, or by pipelines: kept for export, no effect on the math here.
_HARMLESS = ("sample_size", "addition_embed_type_num_heads")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The fields of diffusers' ``UNet2DConditionModel`` config that SD 1.x/2.x use; diffusers' defaults.

    NB diffusers' naming quirk: ``attention_head_dim`` is the number of heads per block for these
    models (``num_attention_heads`` overrides it when given); see :attr:`heads`.
    """

    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = (_CROSS_DOWN, _CROSS_DOWN, _CROSS_DOWN, _PLAIN_DOWN)
    up_block_types: tuple[str, ...] = (_PLAIN_UP, _CROSS_UP, _CROSS_UP, _CROSS_UP)
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int = 1
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    source_json: str = dataclasses.field(default="{}", repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: dict, source: str) -> UNetConfig:
        """Reads a diffusers ``config.json`` dict; raises ``WeightsError`` for what cannot run faithfully."""
        config = parse_config(cls, d, source, fixed=_FIXED, harmless=_HARMLESS)
        config.validate(source)
        return config

    def to_dict(self) -> dict:
        return config_to_dict(self, "UNet2DConditionModel")

    @property
    def heads(self) -> tuple[int, ...]:
        heads = self.attention_head_dim if self.num_attention_heads is None else self.num_attention_heads
        return heads if isinstance(heads, tuple) else (heads,) * len(self.block_out_channels)

    def validate(self, source: str) -> None:
        n = len(self.block_out_channels)
        block_types = {"down_block_types": (_CROSS_DOWN, _PLAIN_DOWN), "up_block_types": (_CROSS_UP, _PLAIN_UP)}
        for key, allowed in block_types.items():
            types = getattr(self, key)
            if len(types) != n or any(t not in allowed for t in types):
                raise unsupported(source, key, types, f"{n} entries (one per block_out_channels) from {allowed}")
        for key in ("layers_per_block", "transformer_layers_per_block", "cross_attention_dim", "norm_num_groups"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise unsupported(source, key, value, "a positive int (the same for every block)")
        for key in ("attention_head_dim", "num_attention_heads"):
            value = getattr(self, key)
            if isinstance(value, tuple) and len(value) != n:
                raise unsupported(source, key, value, f"an int or {n} ints, one per block")
        for channels, heads in zip(self.block_out_channels, self.heads):
            if channels % self.norm_num_groups or channels % heads:
                raise unsupported(source, "block_out_channels", self.block_out_channels, "channels divisible by "
                                  f"norm_num_groups={self.norm_num_groups} and heads={self.heads}")


def _attention_layers(config: UNetConfig) -> tuple[list[int], int, list[int]]:
    """Cross-attention layers in each down block, the mid block and each up block."""
    depth = config.transformer_layers_per_block
    down = [config.layers_per_block * depth * (t == _CROSS_DOWN) for t in config.down_block_types]
    up = [(config.layers_per_block + 1) * depth * (t == _CROSS_UP) for t in config.up_block_types]
    return down, depth, up


def num_cross_attention_layers(config: UNetConfig) -> int:
    """N, the leading size of a per-layer context stack (16 for SD 1.5)."""
    down, mid, up = _attention_layers(config)
    return sum(down) + mid + sum(up)


def cross_attention_block_groups(config: UNetConfig) -> list[int]:
    """For each cross-attention layer (module docstring order), the index of its block group.

    The groups are the blocks that have cross-attention: down blocks, the mid block, up blocks
    (SD 1.5: 7 groups), e.g. to share one XTI/P+ token embedding between the layers of a block.
    """
    down, mid, up = _attention_layers(config)
    counts = [n for n in down if n] + [mid] + [n for n in up if n]
    return [group for group, n in enumerate(counts) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------
# Modules


class GEGLU(nn.Module):
    """``proj`` to twice the width, then value · GELU(gate) (exact erf GELU, as PyTorch's default)."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x, gate = jnp.split(dense(2 * self.features, dtype=self.dtype, name="proj")(x), 2, axis=-1)
        return x * lean_ops.gelu(gate)


class FeedForward(nn.Module):
    """``net_0`` (GEGLU to 4× width) then ``net_2`` back; ``net_1`` is diffusers' (inactive) dropout."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = GEGLU(4 * x.shape[-1], dtype=self.dtype, name="net_0")(x)
        return dense(x.shape[-1], dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention on ``context``, GEGLU feed-forward; residuals."""

    heads: int
    upcast: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        def norm(name):  # diffusers' Transformer2DModel default norm_eps, not the UNet's
            return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, use_fast_variance=False, name=name)

        def attention(name):
            return Attention(self.heads, x.shape[-1] // self.heads, upcast=self.upcast, dtype=self.dtype, name=name)

        x = x + attention("attn1")(norm("norm1")(x))
        x = x + attention("attn2")(norm("norm2")(x), context)
        return x + FeedForward(dtype=self.dtype, name="ff")(norm("norm3")(x))


class Transformer2DModel(nn.Module):
    """GroupNorm, ``proj_in`` (1×1 conv, or Linear with ``use_linear_projection``), one
    :class:`BasicTransformerBlock` per context given, ``proj_out``, plus the input."""

    config: UNetConfig
    heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, contexts: Sequence[jax.Array]) -> jax.Array:
        b, h, w, c = x.shape
        linear = self.config.use_linear_projection

        def project(name, y):
            if linear:
                return dense(c, dtype=self.dtype, name=name)(y)
            return conv(c, kernel=1, dtype=self.dtype, name=name)(y)

        y = group_norm(self.config.norm_num_groups, 1e-6, dtype=self.dtype, name="norm")(x)
        y = project("proj_in", y.reshape(b, h * w, c) if linear else y).reshape(b, h * w, c)
        for i, context in enumerate(contexts):
            y = BasicTransformerBlock(self.heads, self.config.upcast_attention, dtype=self.dtype,
                                      name=f"transformer_blocks_{i}")(y, context)
        y = project("proj_out", y if linear else y.reshape(b, h, w, c))
        return y.reshape(b, h, w, c) + x


def _split(contexts: Sequence[jax.Array], parts: int) -> list[Sequence[jax.Array]]:
    size = len(contexts) // parts
    return [contexts[i * size:(i + 1) * size] for i in range(parts)]


class DownBlock(nn.Module):
    """diffusers' ``CrossAttnDownBlock2D`` (``heads`` > 0) or ``DownBlock2D`` (``heads`` == 0).

    Returns the output and the skip connections (each layer's output, then the downsampled one).
    """

    config: UNetConfig
    out_channels: int
    heads: int
    add_downsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, contexts) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        cfg, skips = self.config, []
        per_layer = _split(contexts, cfg.layers_per_block) if self.heads else [()] * cfg.layers_per_block
        for i, layer_contexts in enumerate(per_layer):
            x = ResnetBlock2D(self.out_channels, cfg.norm_num_groups, cfg.norm_eps, dtype=self.dtype,
                              name=f"resnets_{i}")(x, temb)
            if self.heads:
                transformer = Transformer2DModel(cfg, self.heads, dtype=self.dtype, name=f"attentions_{i}")
                x = transformer(x, layer_contexts)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, cfg.downsample_padding, dtype=self.dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, tuple(skips)


class MidBlock(nn.Module):
    """diffusers' ``UNetMidBlock2DCrossAttn``: resnet, transformer, resnet (resnets scaled by
    ``mid_block_scale_factor``)."""

    config: UNetConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, contexts) -> jax.Array:
        cfg = self.config

        def resnet(name):
            return ResnetBlock2D(x.shape[-1], cfg.norm_num_groups, cfg.norm_eps, cfg.mid_block_scale_factor,
                                 dtype=self.dtype, name=name)

        x = resnet("resnets_0")(x, temb)
        x = Transformer2DModel(cfg, cfg.heads[-1], dtype=self.dtype, name="attentions_0")(x, contexts)
        return resnet("resnets_1")(x, temb)


class UpBlock(nn.Module):
    """diffusers' ``CrossAttnUpBlock2D`` (``heads`` > 0) or ``UpBlock2D`` (``heads`` == 0).

    Each of its ``layers_per_block + 1`` resnets takes the last remaining skip connection,
    concatenated on channels; ``upsample_size`` is the (H, W) of the next block's skips.
    """

    config: UNetConfig
    out_channels: int
    heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, skips, temb, contexts, upsample_size) -> jax.Array:
        cfg = self.config
        num_layers = cfg.layers_per_block + 1
        per_layer = _split(contexts, num_layers) if self.heads else [()] * num_layers
        for i, layer_contexts in enumerate(per_layer):
            x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
            x = ResnetBlock2D(self.out_channels, cfg.norm_num_groups, cfg.norm_eps, dtype=self.dtype,
                              name=f"resnets_{i}")(x, temb)
            if self.heads:
                transformer = Transformer2DModel(cfg, self.heads, dtype=self.dtype, name=f"attentions_{i}")
                x = transformer(x, layer_contexts)
        if upsample_size is not None:
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x, upsample_size)
        return x


class UNet2DConditionModel(nn.Module):
    """``__call__(sample [B,H,W,C], timesteps (scalar or [B]), context, *, train=False) -> [B,H,W,out]``.

    ``context``: ``[B, L, D]`` or a per-layer stack ``[N, B, L, D]`` (order in the module docstring).
    ``remat`` rematerialises each down/mid/up block in the backward pass (less memory, ~⅓ more
    compute); it does not change parameters or results. ``train`` is accepted for a uniform model
    signature: SD UNets have no dropout (``dropout`` other than 0 is refused by the config).
    The output is in the compute ``dtype``.
    """

    config: UNetConfig
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps, context: jax.Array, *, train: bool = False) -> jax.Array:
        del train  # no dropout in SD UNets
        cfg = self.config
        contexts = self._per_layer_contexts(context.astype(self.dtype))
        down_block, mid_block = self._maybe_remat(DownBlock), self._maybe_remat(MidBlock)
        up_block = self._maybe_remat(UpBlock, static_argnums=(5,))  # upsample_size; self is argument 0

        sample = sample.astype(self.dtype)
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), sample.shape[:1])
        temb = timestep_embedding(timesteps, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                  freq_shift=cfg.freq_shift).astype(self.dtype)
        temb = TimestepEmbedding(4 * cfg.block_out_channels[0], dtype=self.dtype, name="time_embedding")(temb)

        x = conv(cfg.block_out_channels[0], dtype=self.dtype, name="conv_in")(sample)
        skips = [x]
        down_layers, mid_layers, up_layers = _attention_layers(cfg)
        offset = 0
        last = len(cfg.block_out_channels) - 1
        for i, (channels, n) in enumerate(zip(cfg.block_out_channels, down_layers)):
            block = down_block(cfg, channels, cfg.heads[i] if n else 0, i < last, dtype=self.dtype,
                               name=f"down_blocks_{i}")
            x, block_skips = block(x, temb, contexts[offset:offset + n])
            skips.extend(block_skips)
            offset += n
        x = mid_block(cfg, dtype=self.dtype, name="mid_block")(x, temb, contexts[offset:offset + mid_layers])
        offset += mid_layers

        channels, heads = cfg.block_out_channels[::-1], cfg.heads[::-1]
        for i, n in enumerate(up_layers):
            block_skips, skips = skips[-(cfg.layers_per_block + 1):], skips[:-(cfg.layers_per_block + 1)]
            upsample_size = tuple(skips[-1].shape[1:3]) if i < last else None
            block = up_block(cfg, channels[i], heads[i] if n else 0, dtype=self.dtype, name=f"up_blocks_{i}")
            x = block(x, tuple(block_skips), temb, contexts[offset:offset + n], upsample_size)
            offset += n

        x = lean_ops.silu(group_norm(cfg.norm_num_groups, cfg.norm_eps, dtype=self.dtype, name="conv_norm_out")(x))
        return conv(cfg.out_channels, dtype=self.dtype, name="conv_out")(x)

    def _maybe_remat(self, block: type[nn.Module], **kwargs) -> type[nn.Module]:
        return nn.remat(block, **kwargs) if self.remat else block

    def _per_layer_contexts(self, context: jax.Array) -> tuple[jax.Array, ...]:
        n = num_cross_attention_layers(self.config)
        if context.ndim == 3:
            return (context,) * n
        if context.ndim != 4 or context.shape[0] != n:
            raise ValueError(f"context must be [B, L, D] or [{n}, B, L, D] (one per cross-attention layer); "
                             f"got shape {context.shape}")
        return tuple(context)


def init_params(module: UNet2DConditionModel, rng: jax.Array) -> dict:
    """Random parameters (a plain nested dict); cheap under ``jax.eval_shape`` for shapes only."""
    cfg = module.config
    side = 2 ** (len(cfg.block_out_channels) - 1)
    sample = jnp.zeros((1, side, side, cfg.in_channels), jnp.float32)
    context = jnp.zeros((1, 1, cfg.cross_attention_dim), jnp.float32)
    return module.init(rng, sample, jnp.zeros((1,), jnp.int32), context)["params"]


def rename_checkpoint_key(key: str) -> str:
    """UNet checkpoints have no legacy names: identity."""
    return key


IGNORED_CHECKPOINT_KEYS: tuple[str, ...] = ()
