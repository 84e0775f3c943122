"""The CLIP text encoder of Stable Diffusion 1.x/2.x (transformers ``CLIPTextModel``) in Flax Linen.

Parameter paths mirror transformers' attribute names without the ``text_model.`` prefix, so that
:func:`mlmjax.weights.key_map` turns ``encoder/layers_0/self_attn/q_proj/kernel`` into
``encoder.layers.0.self_attn.q_proj.weight``. Checkpoints exist in two spellings: released SD
checkpoints (and transformers 4) prefix every key with ``text_model.``, transformers 5 saves without
it. :func:`rename_checkpoint_key` accepts both; :func:`export_checkpoint_key` writes the prefixed
form, which both transformers 4 and 5 (and hence diffusers on either) load cleanly.

New concept tokens are not rows of the 49408-row table but a separate small ``extra_embeddings``
array spliced in by :meth:`CLIPTextModel.embed` (DESIGN.md decision 4).

Attention probabilities (transformers' ``output_attentions``) are an analysis output, not part of the
forward pass: :func:`attention_probabilities` asks for them, and only then does each layer compute
and ``sow`` them; every other call runs exactly the usual computation.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mlmjax.models import lean_ops
from mlmjax.models.attention import dot_product_attention
from mlmjax.models.layers import dense
from mlmjax.weights import WeightsError

_PREFIX = "text_model."

# Buffers that PyTorch checkpoints may carry but that are not parameters.
IGNORED_CHECKPOINT_KEYS = (r"(text_model\.)?embeddings\.position_ids",)

# The activations of CLIP-family transformers (the ViT towers in models/vit.py use them too).
ACTIVATIONS = {
    # transformers' "quick_gelu": x·σ(1.702x), the activation OpenAI's CLIP was trained with (SD 1.x).
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    # transformers' "gelu" is the exact erf form (OpenCLIP ViT-H, SD 2.x), not the tanh approximation.
    "gelu": lean_ops.gelu,
}

# Written by transformers for the saving process, not a property of the model; the dtype is dropped so
# that `from_pretrained(dtype="auto")` follows the dtype of the exported weights, not the source's.
_VOLATILE_KEYS = ("_name_or_path", "transformers_version", "torch_dtype", "dtype")

# transformers allows null for these; the network does not use them.
_NULLABLE = frozenset({"pad_token_id", "bos_token_id", "projection_dim"})

# Where :class:`CLIPAttention` sows its probabilities when the collection is mutable.
INTERMEDIATES = "intermediates"
ATTENTION_WEIGHTS = "attention_weights"


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of a transformers ``CLIPTextConfig`` that shape the network; defaults are transformers'.

    ``original_json`` keeps the ``config.json`` it was read from (as a string, so that the config stays
    hashable) and lets :meth:`to_dict` export fields mlmjax does not interpret, unchanged.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int = 49407
    projection_dim: int | None = 512
    original_json: str = dataclasses.field(default="{}", repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str) -> CLIPTextConfig:
        """Reads a ``CLIPTextModel`` ``config.json``; anything mlmjax cannot run is a :class:`WeightsError`."""

        def fail(key: str, value: Any, supported: str) -> WeightsError:
            return WeightsError(f"{source}: {key}={value!r} is not supported; supported: {supported}")

        if d.get("model_type", "clip_text_model") != "clip_text_model":
            raise fail("model_type", d["model_type"], "'clip_text_model' (a text encoder's own config.json)")
        if d.get("architectures", ["CLIPTextModel"]) != ["CLIPTextModel"]:
            raise fail("architectures", d["architectures"], "['CLIPTextModel'] (no text projection)")
        if d.get("attention_dropout", 0.0) != 0.0:
            raise fail("attention_dropout", d["attention_dropout"], "0.0")
        values = {}
        for field in dataclasses.fields(cls):
            if field.name not in d or field.name == "original_json":
                continue
            value, kind = d[field.name], type(field.default)  # int, float or str
            if value is None and field.name in _NULLABLE:
                values[field.name] = None
            elif type(value) is kind or (kind is float and type(value) is int):
                values[field.name] = kind(value)
            else:
                expected = {int: "an integer", float: "a number", str: "a string"}[kind]
                raise fail(field.name, value, expected + " or null" * (field.name in _NULLABLE))
        config = cls(**values, original_json=json.dumps(dict(d), sort_keys=True))
        if config.hidden_act not in ACTIVATIONS:
            raise fail("hidden_act", config.hidden_act, " or ".join(map(repr, ACTIVATIONS)))
        if config.num_attention_heads <= 0 or config.hidden_size % config.num_attention_heads:
            raise fail("num_attention_heads", config.num_attention_heads,
                       f"a divisor of hidden_size={config.hidden_size}")
        return config

    def to_dict(self) -> dict[str, Any]:
        """A ``config.json`` that transformers' ``CLIPTextModel.from_pretrained`` loads."""
        d = {k: v for k, v in json.loads(self.original_json).items() if k not in _VOLATILE_KEYS}
        d.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "original_json"})
        d.update(architectures=["CLIPTextModel"], model_type="clip_text_model")
        return d

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def rename_checkpoint_key(key: str) -> str:
    """Checkpoint key → canonical key: drops the ``text_model.`` prefix of SD / transformers-4 files."""
    return key.removeprefix(_PREFIX)


def export_checkpoint_key(key: str) -> str:
    """Canonical key → the key written on export.

    The prefixed form is what released SD checkpoints contain; transformers 4 needs it (its
    ``CLIPTextModel`` holds the layers under ``text_model``) and transformers 5 strips it on load,
    so the export loads everywhere that diffusers does.
    """
    return _PREFIX + key


def _normal(std: float) -> nn.initializers.Initializer:
    return nn.initializers.normal(stddev=std)


class CLIPAttention(nn.Module):
    """Multi-head self-attention; initialisation scales follow transformers' ``_init_weights``."""

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        c = self.config
        width, depth = c.hidden_size, c.num_hidden_layers
        in_std = width**-0.5 * (2 * depth) ** -0.5

        def project(name: str, std: float, y: jax.Array) -> jax.Array:
            return dense(width, dtype=self.dtype, kernel_init=_normal(std), name=name)(y)

        heads = (*x.shape[:-1], c.num_attention_heads, c.head_dim)
        q, k, v = (project(n, in_std, x).reshape(heads) for n in ("q_proj", "k_proj", "v_proj"))
        out = dot_product_attention(q, k, v, mask=mask)
        if self.is_mutable_collection(INTERMEDIATES) and not self.is_initializing():
            # Recomputed beside the (chunked) attention kernel rather than returned by it, so that
            # training and sampling never hold the probabilities.
            self.sow(INTERMEDIATES, ATTENTION_WEIGHTS, _attention_weights(q, k, mask))
        return project("out_proj", width**-0.5, out.reshape(x.shape))


def _attention_weights(q: jax.Array, k: jax.Array, mask: jax.Array) -> jax.Array:
    """``[B, H, Lq, Lk]`` float32 softmax(q·kᵀ/√d) over the keys that ``mask`` allows."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    return jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1)


class CLIPMLP(nn.Module):
    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        x = dense(c.intermediate_size, dtype=self.dtype, kernel_init=_normal((2 * c.hidden_size) ** -0.5),
                  name="fc1")(x)
        x = ACTIVATIONS[c.hidden_act](x)
        fc2_std = c.hidden_size**-0.5 * (2 * c.num_hidden_layers) ** -0.5
        return dense(c.hidden_size, dtype=self.dtype, kernel_init=_normal(fc2_std), name="fc2")(x)


def _layer_norm(config: CLIPTextConfig, dtype: jnp.dtype, name: str | None = None) -> nn.LayerNorm:
    # Two-pass variance, as PyTorch computes it: E[x²]-E[x]² loses digits when the mean is large.
    return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype, use_fast_variance=False, name=name)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + CLIPAttention(self.config, self.dtype, name="self_attn")(
            _layer_norm(self.config, self.dtype, "layer_norm1")(x), mask)
        return x + CLIPMLP(self.config, self.dtype, name="mlp")(
            _layer_norm(self.config, self.dtype, "layer_norm2")(x))


class CLIPEncoder(nn.Module):
    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, ...]:
        """Returns the input followed by every layer's output, as transformers' ``hidden_states``."""
        states = [x]
        for i in range(self.config.num_hidden_layers):
            layer = CLIPEncoderLayer(self.config, self.dtype, name=f"layers_{i}")
            states.append(layer(lean_ops.written_gradient(states[-1]), mask))
        return tuple(states)


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig

    def setup(self):
        init = _normal(0.02)
        self.token_embedding = nn.Embed(self.config.vocab_size, self.config.hidden_size, embedding_init=init)
        self.position_embedding = nn.Embed(self.config.max_position_embeddings, self.config.hidden_size,
                                           embedding_init=init)

    def lookup(self, input_ids: jax.Array, extra_embeddings: jax.Array | None) -> jax.Array:
        vocab = self.config.vocab_size
        table = self.token_embedding.embedding
        embeds = jnp.take(table, jnp.clip(input_ids, 0, vocab - 1), axis=0)
        valid = (input_ids >= 0) & (input_ids < vocab)
        if extra_embeddings is not None:
            extra_ids = input_ids - vocab
            is_extra = (extra_ids >= 0) & (extra_ids < extra_embeddings.shape[0])
            extra = jnp.take(extra_embeddings.astype(table.dtype),
                             jnp.clip(extra_ids, 0, extra_embeddings.shape[0] - 1), axis=0)
            embeds = jnp.where(is_extra[..., None], extra, embeds)
            valid |= is_extra
        return jnp.where(valid[..., None], embeds, jnp.nan)

    def __call__(self, token_embeds: jax.Array) -> jax.Array:
        length = token_embeds.shape[-2]
        if length > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {length} exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        return token_embeds + self.position_embedding.embedding[:length]


class CLIPTextModel(nn.Module):
    """``CLIPTextModel``: token + learned position embeddings, causal pre-LN encoder, final LN.

    Attributes:
      config: the architecture.
      dtype: computation dtype; parameters are always float32.
    """

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.embeddings = CLIPTextEmbeddings(self.config)
        self.encoder = CLIPEncoder(self.config, self.dtype)
        self.final_layer_norm = _layer_norm(self.config, self.dtype)

    def embed(self, input_ids: jax.Array, extra_embeddings: jax.Array | None = None) -> jax.Array:
        """Token embeddings ``[B, L, D]``; id ``vocab_size + i`` selects ``extra_embeddings[i]``.

        The extra rows are spliced in with ``jnp.where``, so their gradient is exactly the gradient at
        the positions that use them and the frozen table gets none of it. Ids outside both ranges
        (negative ones included) give NaN embeddings instead of silently aliasing a valid row.
        """
        return self.embeddings.lookup(input_ids, extra_embeddings)

    def __call__(
        self,
        input_ids: jax.Array | None,
        *,
        inputs_embeds: jax.Array | None = None,
        output_hidden_states: bool = False,
        deterministic: bool = True,
    ) -> jax.Array | tuple[jax.Array, tuple[jax.Array, ...]]:
        """Encodes ``input_ids`` ``[B, L]`` (or ``inputs_embeds`` ``[B, L, D]``, token embeddings before
        positions) into ``last_hidden_state`` ``[B, L, D]``, the tensor that conditions the SD UNet.

        With ``output_hidden_states`` also returns transformers' ``hidden_states``: the embeddings and
        every layer's output (before the final LN), ``num_hidden_layers + 1`` arrays.
        ``deterministic`` is accepted for a uniform module API: CLIP's text encoder has no dropout.
        """
        del deterministic
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        x = self.embeddings(inputs_embeds.astype(self.dtype))
        length = x.shape[-2]
        causal = jnp.tril(jnp.ones((length, length), bool))
        hidden_states = self.encoder(x, causal)
        last_hidden_state = self.final_layer_norm(hidden_states[-1])
        if output_hidden_states:
            return last_hidden_state, hidden_states
        return last_hidden_state

    def pooled_output(self, last_hidden_state: jax.Array, input_ids: jax.Array) -> jax.Array:
        """The ``[B, D]`` state at each sequence's EOS token, as transformers' ``pooler_output``.

        Configs with the pre-2023 ``eos_token_id == 2`` take the position of the largest id (CLIP's EOS
        49407 is the largest in its vocabulary; with added tokens that picks the added token, as in
        transformers). Otherwise it is the first position holding ``eos_token_id``.
        """
        if self.config.eos_token_id == 2:
            position = jnp.argmax(input_ids, axis=-1)
        else:
            position = jnp.argmax(input_ids == self.config.eos_token_id, axis=-1)
        return jnp.take_along_axis(last_hidden_state, position[:, None, None], axis=1)[:, 0]


def attention_probabilities(module: CLIPTextModel, variables: Mapping, input_ids: jax.Array | None, *,
                            inputs_embeds: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """``last_hidden_state`` and every layer's self-attention probabilities.

    Args and the first result are those of :meth:`CLIPTextModel.__call__`; the second is
    ``[num_hidden_layers, B, num_attention_heads, L, L]`` in float32, query positions before key
    positions, as transformers' ``output_attentions`` stacked. Rows sum to 1 over the keys a query may
    attend to (itself and the positions before it: the encoder is causal), the others are 0.
    """
    last_hidden_state, state = module.apply(variables, input_ids, inputs_embeds=inputs_embeds,
                                            mutable=[INTERMEDIATES])
    layers = state[INTERMEDIATES]["encoder"]
    return last_hidden_state, jnp.stack([layers[f"layers_{i}"]["self_attn"][ATTENTION_WEIGHTS][0]
                                         for i in range(module.config.num_hidden_layers)])


def init_params(module: CLIPTextModel, rng: jax.Array) -> dict:
    """Freshly initialised float32 parameters (usable under ``jax.eval_shape`` for shapes only)."""
    return module.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]
