"""The frozen contextualizer that turns CLIP text features into masked-token predictions (PAPER.md §1.2).

A port of the authors' ``ContextNetV3`` (``contextnet_v3.py`` in other-ones/personal_rc): learned
positions, then blocks of self-attention with a residual and a LayerNorm, a feed-forward network after
every block but the last, and a Linear onto the vocabulary::

    x = x + pos
    x = LN1(x + MHA1(x)); x = FFN1(x)
    ...
    x = LN4(x + MHA4(x)); logits = final(x)

Parameter paths are the PyTorch attribute names, so :mod:`mlmjax.weights` maps
``multi_head_attention1/out_proj/kernel`` to ``multi_head_attention1.out_proj.weight`` with no table.
PyTorch's ``nn.MultiheadAttention`` packs the q/k/v projections into ``in_proj_weight`` ``[3D, D]``;
that parameter is kept here exactly as PyTorch stores it (not a Flax kernel), so it is copied, not
transposed, in both directions.

The vocabulary projection holds 38M of the 62M parameters and is needed at customization only at the
masked tokens, so the module exposes :meth:`Contextualizer.encode` (features ``[B, L, D]``) and
:meth:`Contextualizer.logits` (any ``[..., D]``, e.g. only the masked positions) separately, and
:meth:`Contextualizer.projection` (its weights, for a cross-entropy that never builds the logits).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mlmjax import weights
from mlmjax.models import shapes
from mlmjax.models.attention import dot_product_attention

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "contextualizer.safetensors"
MASK_EMBEDDING_NAME = "mask_embedding.safetensors"
MASK_EMBEDDING_KEY = "mask_embedding"

# `position_ids` is a registered buffer of ContextNetV3; `module.` prefixes every key of a checkpoint
# saved from the DistributedDataParallel wrapper (the authors pretrained on 2 GPUs).
IGNORED_CHECKPOINT_KEYS = (r"(module\.)?position_ids",)
_DDP_PREFIX = "module."

_LAYER_NORM_EPS = 1e-5  # PyTorch's nn.LayerNorm default
# The authors' init hard-codes 768**-0.5 for the final Linear, whatever the width (their SD-2.1 variant
# of width 1024 keeps it); it only matters when pretraining from scratch.
_FINAL_INIT_STD = 768**-0.5


@dataclasses.dataclass(frozen=True)
class ContextualizerConfig:
    """The architecture; defaults are the authors' SD-1.5 ``ContextNetV3``.

    Attributes:
      hidden_size: width of the CLIP text features (768 for SD 1.x, 1024 for SD 2.x).
      num_positions: learned position embeddings (CLIP's 77 tokens).
      num_blocks: attention blocks; a feed-forward network follows every block but the last.
      num_heads: attention heads (4, hard-coded by the authors).
      ffn_size: hidden width of the feed-forward networks (4 × hidden_size).
      vocab_size: output classes: CLIP's 49408 BPE tokens plus ``[MASK]``.
      ffn_residual: authors' quirk: ``x = ffn(x)`` with no residual connection (False, their network).
        True gives the usual ``x = x + ffn(x)``.
    """

    hidden_size: int = 768
    num_positions: int = 77
    num_blocks: int = 4
    num_heads: int = 4
    ffn_size: int = 3072
    vocab_size: int = 49409
    ffn_residual: bool = False

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide hidden_size={self.hidden_size}")
        if self.num_blocks < 1:
            raise ValueError(f"num_blocks={self.num_blocks} must be at least 1")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str) -> ContextualizerConfig:
        """Reads a ``config.json``; an unknown or mistyped field is a :class:`~mlmjax.weights.WeightsError`."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in d.items():
            if key not in fields:
                raise weights.WeightsError(f"{source}: unknown field {key!r}; known: {sorted(fields)}")
            expected = bool if fields[key].type == "bool" else int
            if type(value) is not expected:
                raise weights.WeightsError(f"{source}: {key}={value!r} must be of type {expected.__name__}")
        try:
            return cls(**d)
        except ValueError as error:
            raise weights.WeightsError(f"{source}: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def rename_checkpoint_key(key: str) -> str:
    """Checkpoint key → canonical key: drops the ``module.`` prefix of a DDP-wrapped state dict."""
    return key.removeprefix(_DDP_PREFIX)


def _normal(std: float) -> nn.initializers.Initializer:
    return nn.initializers.normal(stddev=std)


# PyTorch's nn.Linear weight init, kaiming_uniform(a=√5): U(-1/√fan_in, 1/√fan_in).
_torch_linear_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


class MultiheadAttention(nn.Module):
    """PyTorch's ``nn.MultiheadAttention(batch_first=True)`` as the authors call it: ``mha(x, x, x)``,
    no mask (padding is attended to), no dropout, biases on every projection.

    Attributes:
      num_heads: attention heads.
      in_proj_std: standard deviation of the packed q/k/v projection at initialisation.
    """

    num_heads: int
    in_proj_std: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        weight = self.param("in_proj_weight", _normal(self.in_proj_std), (3 * width, width))  # rows: q, k, v
        bias = self.param("in_proj_bias", nn.initializers.zeros, (3 * width,))
        qkv = jnp.einsum("...d,ed->...e", x, weight.astype(self.dtype)) + bias.astype(self.dtype)
        heads = (*x.shape[:-1], self.num_heads, width // self.num_heads)
        q, k, v = (y.reshape(heads) for y in jnp.split(qkv, 3, axis=-1))
        out = dot_product_attention(q, k, v).reshape(x.shape)
        return nn.Dense(width, dtype=self.dtype, kernel_init=_normal(width**-0.5), name="out_proj")(out)


class FeedForward(nn.Module):
    """``W_ff2(relu(W_ff1(x)))``; the authors' ``dropout`` argument is unused in their network."""

    ffn_size: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # Weights keep PyTorch's default init; biases are 0 because the authors zero every parameter
        # whose name contains "bias" after construction, these included.
        dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=_torch_linear_init)
        width = x.shape[-1]
        x = nn.relu(dense(self.ffn_size, name="W_ff1")(x))
        return dense(width, name="W_ff2")(x)


class Contextualizer(nn.Module):
    """The authors' ``ContextNetV3``: CLIP ``last_hidden_state`` ``[B, L, D]`` → vocabulary logits.

    Initialisation follows the authors' pretraining script (``mlm/train_mlm_v6.py``): biases 0,
    ``in_proj`` N(0, D^-½·(2·n)^-½) with their n = 2·num_blocks (8 for the 4-block V3, 4 for the
    2-block V1), ``out_proj`` N(0, D^-½), ``final`` N(0, 768^-½), positions N(0, 0.02), LayerNorm
    scales 1, feed-forward weights PyTorch's default.

    Attributes:
      config: the architecture.
      dtype: computation dtype; parameters are always float32.
    """

    config: ContextualizerConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        c = self.config
        in_proj_std = c.hidden_size**-0.5 * (4 * c.num_blocks) ** -0.5
        self.position_embedding = nn.Embed(c.num_positions, c.hidden_size, embedding_init=_normal(0.02))
        self.attentions = [MultiheadAttention(c.num_heads, in_proj_std, self.dtype,
                                              name=f"multi_head_attention{i}") for i in range(1, c.num_blocks + 1)]
        self.layer_norms = [nn.LayerNorm(epsilon=_LAYER_NORM_EPS, dtype=self.dtype, use_fast_variance=False,
                                         name=f"layer_norm{i}") for i in range(1, c.num_blocks + 1)]
        self.feed_forwards = [FeedForward(c.ffn_size, self.dtype, name=f"feed_forward{i}")
                              for i in range(1, c.num_blocks)]
        self.final = nn.Dense(c.vocab_size, dtype=self.dtype, kernel_init=_normal(_FINAL_INIT_STD))

    def encode(self, hidden_states: jax.Array) -> jax.Array:
        """Features ``[B, L, D]`` before the vocabulary projection, for ``L ≤ num_positions``.

        The authors' forward adds all 77 position embeddings (it slices them with ``x.shape[-1]``, the
        width), so it only runs at L = 77; here the first L are added, which is the same at L = 77.
        """
        length = hidden_states.shape[-2]
        if length > self.config.num_positions:
            raise ValueError(f"sequence length {length} exceeds num_positions={self.config.num_positions}")
        x = hidden_states.astype(self.dtype) + self.position_embedding.embedding[:length].astype(self.dtype)
        for i, (attention, norm) in enumerate(zip(self.attentions, self.layer_norms)):
            x = norm(x + attention(x))
            if i < len(self.feed_forwards):
                y = self.feed_forwards[i](x)
                x = x + y if self.config.ffn_residual else y
        return x

    def logits(self, features: jax.Array) -> jax.Array:
        """The vocabulary projection ``[..., D] → [..., vocab_size]``, e.g. of the masked tokens only."""
        return self.final(features)

    def projection(self) -> tuple[jax.Array, jax.Array]:
        """The vocabulary projection's ``(kernel [D, V], bias [V])``, for losses that fuse it with the
        cross-entropy (:func:`mlmjax.mlm.vocabulary_cross_entropy`)."""
        params = self.final.variables["params"]
        return params["kernel"], params["bias"]

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        """Logits ``[B, L, vocab_size]`` at every position (pretraining)."""
        return self.logits(self.encode(hidden_states))


def init_params(module: Contextualizer, rng: jax.Array) -> dict:
    """Freshly initialised float32 parameters (usable under ``jax.eval_shape`` for shapes only)."""
    c = module.config
    return module.init(rng, jnp.zeros((1, c.num_positions, c.hidden_size)))["params"]


def abstract_params(module: Contextualizer) -> dict:
    """The parameter tree as shapes only."""
    return shapes.abstract_params(init_params, module)


# ---------------------------------------------------------------------------------------------------
# Files: DIR/config.json, DIR/contextualizer.safetensors (the authors' state-dict names, loadable by
# their ContextNetV3 with strict=True) and DIR/mask_embedding.safetensors (one tensor, "mask_embedding",
# shape [hidden_size]: the pretrained, frozen [MASK] token embedding).


def params_from_state_dict(state_dict: Mapping[str, np.ndarray], module: Contextualizer, source: str) -> dict:
    """Flax parameters from a ``ContextNetV3`` state dict (DDP ``module.`` prefix and buffers allowed)."""
    return weights.params_from_state_dict(state_dict, abstract_params(module), source=source,
                                          rename=rename_checkpoint_key, ignore=IGNORED_CHECKPOINT_KEYS)


def state_dict_from_params(params: Mapping, config: ContextualizerConfig) -> dict[str, np.ndarray]:
    """The ``ContextNetV3`` state dict, ``position_ids`` buffer included so PyTorch loads it strictly."""
    state_dict = weights.state_dict_from_params(params, dtype=np.float32)
    state_dict["position_ids"] = np.arange(config.num_positions, dtype=np.int64)[None]
    return state_dict


def _check_mask_embedding(mask_embedding: np.ndarray, config: ContextualizerConfig, source: str) -> np.ndarray:
    mask_embedding = np.asarray(mask_embedding, np.float32)
    if mask_embedding.shape != (config.hidden_size,):
        raise weights.WeightsError(f"{source}: {MASK_EMBEDDING_KEY!r} has shape {mask_embedding.shape}, "
                                   f"expected ({config.hidden_size},)")
    return mask_embedding


def save_contextualizer(folder: str, config: ContextualizerConfig, params: Mapping,
                        mask_embedding: np.ndarray) -> None:
    """Writes ``config.json``, ``contextualizer.safetensors`` and ``mask_embedding.safetensors``."""
    mask_embedding = _check_mask_embedding(mask_embedding, config, "save_contextualizer")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, CONFIG_NAME), "w") as f:
        json.dump(config.to_dict(), f, indent=2, sort_keys=True)
        f.write("\n")
    weights.write_safetensors(os.path.join(folder, WEIGHTS_NAME), state_dict_from_params(params, config))
    weights.write_safetensors(os.path.join(folder, MASK_EMBEDDING_NAME), {MASK_EMBEDDING_KEY: mask_embedding})


def load_contextualizer(folder: str, dtype=jnp.float32) -> tuple[Contextualizer, dict, jax.Array]:
    """Loads what :func:`save_contextualizer` (or ``convert_contextualizer``) wrote, strictly.

    Returns ``(module, params, mask_embedding)``; ``mask_embedding`` has shape ``[hidden_size]``.
    """
    config_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise weights.WeightsError(f"{config_path}: file not found; is {folder} a contextualizer folder?")
    with open(config_path) as f:
        try:
            data = json.load(f)
        except ValueError as error:
            raise weights.WeightsError(f"{config_path}: not valid JSON ({error})") from None
    config = ContextualizerConfig.from_dict(data, config_path)
    module = Contextualizer(config, dtype)
    state_dict, source = weights.read_safetensors(folder, WEIGHTS_NAME)
    params = params_from_state_dict(state_dict, module, source)
    tensors, source = weights.read_safetensors(folder, MASK_EMBEDDING_NAME)
    if set(tensors) != {MASK_EMBEDDING_KEY}:
        raise weights.WeightsError(f"{source}: expected exactly one tensor {MASK_EMBEDDING_KEY!r}, "
                                   f"found {sorted(tensors)}")
    mask_embedding = _check_mask_embedding(tensors[MASK_EMBEDDING_KEY], config, source)
    return module, jax.tree.map(jnp.asarray, params), jnp.asarray(mask_embedding)
