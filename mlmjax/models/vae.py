"""The Stable Diffusion VAE (diffusers' ``AutoencoderKL``) in Flax Linen, NHWC.

``encode`` returns the unscaled posterior moments ``(mean, logvar)`` of diffusers'
``latent_dist``; the diffusion model works on ``z * scaling_factor``, and ``decode`` takes the
unscaled ``z`` as diffusers' ``vae.decode`` does. Parameter paths mirror diffusers'
(``encoder/down_blocks_0/resnets_1/conv2/kernel`` ↔ ``encoder.down_blocks.0.resnets.1.conv2.weight``).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
from flax import linen as nn

from mlmjax.models import lean_ops
from mlmjax.models.layers import (Attention, Downsample2D, Dtype, ResnetBlock2D, Upsample2D, config_to_dict, conv,
                                  group_norm, parse_config, unsupported)

_EPS = 1e-6  # every norm in diffusers' Encoder/Decoder
_LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps logvar to this

_FIXED = {
    "act_fn": ("silu", "swish"),
    # Pipelines with these normalise latents differently from z * scaling_factor (SD3, Flux, SDXL variants).
    "shift_factor": (None,),
    "latents_mean": (None,),
    "latents_std": (None,),
}
_HARMLESS = ("sample_size",)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The fields of diffusers' ``AutoencoderKL`` config, with diffusers' defaults.

    ``scaling_factor`` is for the caller (latents = z · scaling_factor); ``force_upcast`` is only
    carried for export (diffusers pipelines run an fp16 VAE in fp32 when it is set).
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    source_json: str = dataclasses.field(default="{}", repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: dict, source: str) -> VAEConfig:
        """Reads a diffusers ``config.json`` dict; raises ``WeightsError`` for what cannot run faithfully."""
        config = parse_config(cls, d, source, fixed=_FIXED, harmless=_HARMLESS)
        config.validate(source)
        return config

    def to_dict(self) -> dict:
        return config_to_dict(self, "AutoencoderKL")

    def validate(self, source: str) -> None:
        n = len(self.block_out_channels)
        for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = getattr(self, key)
            if types != (block,) * n:
                raise unsupported(source, key, types, f"{n} x {block!r} (one per block_out_channels)")
        for key in ("layers_per_block", "latent_channels", "norm_num_groups"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise unsupported(source, key, value, "a positive int")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise unsupported(source, "block_out_channels", self.block_out_channels,
                              f"channels divisible by norm_num_groups={self.norm_num_groups}")


class MidBlock(nn.Module):
    """diffusers' ``UNetMidBlock2D`` without time embedding: resnet, single-head self-attention, resnet."""

    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        groups = self.config.norm_num_groups
        x = ResnetBlock2D(c, groups, _EPS, dtype=self.dtype, name="resnets_0")(x)
        if self.config.mid_block_add_attention:
            attention = Attention(heads=1, head_dim=c, qkv_bias=True, norm_num_groups=groups, norm_eps=_EPS,
                                  residual_connection=True, dtype=self.dtype, name="attentions_0")
            x = attention(x.reshape(b, h * w, c)).reshape(b, h, w, c)
        return ResnetBlock2D(c, groups, _EPS, dtype=self.dtype, name="resnets_1")(x)


class DownEncoderBlock2D(nn.Module):
    """``layers_per_block`` resnets, then (but for the last block) a stride-2 conv padded bottom/right."""

    config: VAEConfig
    out_channels: int
    add_downsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.config.layers_per_block):
            x = ResnetBlock2D(self.out_channels, self.config.norm_num_groups, _EPS, dtype=self.dtype,
                              name=f"resnets_{j}")(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, padding=0, dtype=self.dtype, name="downsamplers_0")(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """``layers_per_block + 1`` resnets, then (but for the last block) a 2× nearest upsampling and conv."""

    config: VAEConfig
    out_channels: int
    add_upsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.config.layers_per_block + 1):
            x = ResnetBlock2D(self.out_channels, self.config.norm_num_groups, _EPS, dtype=self.dtype,
                              name=f"resnets_{j}")(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """Images ``[B, H, W, 3]`` → ``2 * latent_channels`` moments at 1/2^(blocks-1) resolution."""

    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        last = len(cfg.block_out_channels) - 1
        x = conv(cfg.block_out_channels[0], dtype=self.dtype, name="conv_in")(x)
        for i, channels in enumerate(cfg.block_out_channels):
            x = DownEncoderBlock2D(cfg, channels, i < last, dtype=self.dtype, name=f"down_blocks_{i}")(x)
        x = MidBlock(cfg, dtype=self.dtype, name="mid_block")(x)
        x = lean_ops.silu(group_norm(cfg.norm_num_groups, _EPS, dtype=self.dtype, name="conv_norm_out")(x))
        return conv(2 * cfg.latent_channels, dtype=self.dtype, name="conv_out")(x)


class Decoder(nn.Module):
    """Latents ``[B, h, w, latent_channels]`` → images, mirroring the encoder."""

    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        channels = cfg.block_out_channels[::-1]
        x = conv(channels[0], dtype=self.dtype, name="conv_in")(z)
        x = MidBlock(cfg, dtype=self.dtype, name="mid_block")(x)
        last = len(channels) - 1
        for i, out_channels in enumerate(channels):
            x = UpDecoderBlock2D(cfg, out_channels, i < last, dtype=self.dtype, name=f"up_blocks_{i}")(x)
        x = lean_ops.silu(group_norm(cfg.norm_num_groups, _EPS, dtype=self.dtype, name="conv_norm_out")(x))
        return conv(cfg.out_channels, dtype=self.dtype, name="conv_out")(x)


class AutoencoderKL(nn.Module):
    """``encode(images in [-1, 1]) -> (mean, logvar)``, ``decode(z) -> images``; ``__call__`` chains them
    (on the mean) so that ``init`` creates every parameter."""

    config: VAEConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, dtype=self.dtype)
        self.decoder = Decoder(cfg, dtype=self.dtype)
        latents = cfg.latent_channels
        self.quant_conv = conv(2 * latents, kernel=1, dtype=self.dtype) if cfg.use_quant_conv else None
        self.post_quant_conv = conv(latents, kernel=1, dtype=self.dtype) if cfg.use_post_quant_conv else None

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        moments = self.encoder(images.astype(self.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *_LOGVAR_RANGE)

    def decode(self, z: jax.Array) -> jax.Array:
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.decode(self.encode(images)[0])


def init_params(module: AutoencoderKL, rng: jax.Array) -> dict:
    """Random parameters (a plain nested dict); cheap under ``jax.eval_shape`` for shapes only."""
    side = 2 ** (len(module.config.block_out_channels) - 1)
    return module.init(rng, jnp.zeros((1, side, side, module.config.in_channels), jnp.float32))["params"]


# Old VAE checkpoints name the mid-block attention projections as the pre-0.14 diffusers AttentionBlock did.
_LEGACY_ATTENTION = re.compile(
    r"^(?P<prefix>.*\.attentions\.\d+)\.(?P<name>query|key|value|proj_attn)\.(?P<leaf>weight|bias)$")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def rename_checkpoint_key(key: str) -> str:
    """Maps legacy ``…attentions.0.{query,key,value,proj_attn}`` keys to ``to_q/to_k/to_v/to_out.0``."""
    match = _LEGACY_ATTENTION.match(key)
    if match is None:
        return key
    return f"{match['prefix']}.{_LEGACY_NAMES[match['name']]}.{match['leaf']}"


IGNORED_CHECKPOINT_KEYS: tuple[str, ...] = ()
