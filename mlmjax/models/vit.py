"""Vision Transformers for evaluation: CLIP's image tower and DINO's ViT, one Flax Linen module.

CLIP-I and CLIP-T (PAPER.md §4) embed images with CLIP's vision tower (transformers
``CLIPVisionModelWithProjection`` or the image half of ``CLIPModel``), DINO with a ``ViTModel``
(``facebook/dino-vits16``). Both are the same network, a pre-LN transformer over patch tokens with a
class token, and differ in a few small ways and in every name (CLIP's ``CLIPVisionTransformer`` first,
then ``ViTModel``'s, as the files spell them; transformers 5 renames ViT's modules in memory but still
reads and writes these keys):

* patch embedding: ``embeddings.patch_embedding`` without bias / ``embeddings.patch_embeddings.projection``
  with bias;
* class token and positions: ``class_embedding`` [D] and ``position_embedding.weight`` [N+1, D] /
  ``cls_token`` [1, 1, D] and ``position_embeddings`` [1, N+1, D];
* a norm right after the embeddings: ``pre_layrnorm`` (sic) / none;
* one layer: ``encoder.layers.i.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1, mlp.fc2}`` /
  ``encoder.layer.i.{layernorm_before, attention.attention.{query,key,value}, attention.output.dense,
  layernorm_after, intermediate.dense, output.dense}``;
* the final norm: ``post_layernorm`` on the pooled CLS token only / ``layernorm`` on every token.

:class:`VisionTransformer` computes both; a :class:`Layout` says which family it is and where
transformers keeps each tensor, and the parameter tree nests exactly like the checkpoint's keys, so
:func:`mlmjax.weights.params_from_state_dict` loads a checkpoint strictly with no renaming. The
pooled feature (``pooler_output`` for CLIP) is the final-normed CLS token in both families; for DINO
that is the feature its evaluation compares (``ViTModel``'s optional ``pooler`` is not the DINO
feature and is not part of this port).

:class:`CLIPVisionModelWithProjection` and :class:`CLIPModel` add the heads around it; their trees
are transformers' state dicts as well (``vision_model.…``, ``visual_projection``, ``text_model.…``,
``text_projection``, ``logit_scale``), the text half being :class:`mlmjax.models.clip_text.CLIPTextModel`.

Images are NHWC, already resized to the model's ``image_size`` and normalised (see
:func:`mlmjax.eval_models.preprocess`); position embeddings are not interpolated, so any other size is
refused. These modules run inference only: dropout in a config is ignored.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from mlmjax.models import clip_text, shapes
from mlmjax.models.attention import dot_product_attention
from mlmjax.weights import WeightsError

T = TypeVar("T")

ACTIVATIONS = clip_text.ACTIVATIONS  # quick_gelu (OpenAI CLIP) and exact-erf gelu (ViT/DINO, OpenCLIP)


# ---------------------------------------------------------------------------------------------------
# Layouts: how each family is built and named


@dataclasses.dataclass(frozen=True)
class Layout:
    """How transformers builds one family of ViT and where it keeps each tensor.

    Paths are relative to the Flax module that creates the tensor (the embeddings, the model, one
    encoder layer or its attention) and are transformers' attribute names; a dot nests one level.
    """

    # Under ``embeddings``.
    class_token: str
    position_embedding: str
    patch_embedding: str
    patch_bias: bool
    batched_tokens: bool  # class token and positions stored as [1, 1, D] and [1, N+1, D]
    # At the top: a norm right after the embeddings (None: none), the final norm.
    pre_norm: str | None
    final_norm: str
    final_norm_all_tokens: bool  # False: only on the pooled CLS token (last_hidden_state stays un-normed)
    # Under ``encoder``: the list of layers.
    layers: str
    # In one layer; ``query`` … ``out`` are relative to the ``attention`` module.
    norm1: str
    attention: str
    query: str
    key: str
    value: str
    out: str
    norm2: str
    fc1: str
    fc2: str


CLIP_LAYOUT = Layout(
    class_token="class_embedding", position_embedding="position_embedding.embedding",
    patch_embedding="patch_embedding", patch_bias=False, batched_tokens=False,
    pre_norm="pre_layrnorm", final_norm="post_layernorm", final_norm_all_tokens=False,
    layers="layers", norm1="layer_norm1", attention="self_attn",
    query="q_proj", key="k_proj", value="v_proj", out="out_proj",
    norm2="layer_norm2", fc1="mlp.fc1", fc2="mlp.fc2",
)

VIT_LAYOUT = Layout(
    class_token="cls_token", position_embedding="position_embeddings",
    patch_embedding="patch_embeddings.projection", patch_bias=True, batched_tokens=True,
    pre_norm=None, final_norm="layernorm", final_norm_all_tokens=True,
    layers="layer", norm1="layernorm_before", attention="attention",
    query="attention.query", key="attention.key", value="attention.value", out="output.dense",
    norm2="layernorm_after", fc1="intermediate.dense", fc2="output.dense",
)

LAYOUTS = {"clip": CLIP_LAYOUT, "vit": VIT_LAYOUT}

# config.json model_type → layout, and transformers' defaults for the fields a config may leave out.
_MODEL_TYPES = {"clip_vision_model": "clip", "vit": "vit"}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 image_size=224, patch_size=32, num_channels=3, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "vit": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                image_size=224, patch_size=16, num_channels=3, hidden_act="gelu", layer_norm_eps=1e-12,
                qkv_bias=True),
}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """The fields of a transformers ``CLIPVisionConfig`` or ``ViTConfig`` that shape the network."""

    layout: str  # "clip" or "vit": a key of LAYOUTS
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int
    hidden_act: str
    layer_norm_eps: float
    qkv_bias: bool = True  # ViT only; CLIP's projections always have biases

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str) -> ViTConfig:
        """Reads a vision ``config.json`` (or CLIP's ``vision_config``); the family comes from ``model_type``.

        Fields a config leaves out take transformers' defaults for that family; fields that do not
        change the inference computation (dropout, initialiser scales, the pooler) are ignored.
        Anything mlmjax cannot run is a :class:`WeightsError` naming ``source``, the key and the value.
        """

        def fail(key: str, value: Any, supported: str) -> WeightsError:
            return WeightsError(f"{source}: {key}={value!r} is not supported; supported: {supported}")

        model_type = d.get("model_type")
        if model_type not in _MODEL_TYPES:
            raise fail("model_type", model_type, " or ".join(map(repr, _MODEL_TYPES)))
        layout = _MODEL_TYPES[model_type]
        values: dict[str, Any] = {"layout": layout}
        for key, default in _DEFAULTS[layout].items():
            value = d.get(key, default)
            square = key in ("image_size", "patch_size")  # transformers also allows [height, width]
            if square and isinstance(value, list) and len(set(value)) == 1:
                value = value[0]
            kind = type(default)
            if kind is float and type(value) is int:
                value = float(value)
            if type(value) is not kind:
                expected = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[kind]
                raise fail(key, value, expected + (" (or [n, n]: square only)" if square else ""))
            values[key] = value
        config = cls(**values)
        if config.hidden_act not in ACTIVATIONS:
            raise fail("hidden_act", config.hidden_act, " or ".join(map(repr, ACTIVATIONS)))
        if config.num_attention_heads <= 0 or config.hidden_size % config.num_attention_heads:
            raise fail("num_attention_heads", config.num_attention_heads,
                       f"a divisor of hidden_size={config.hidden_size}")
        if not 0 < config.patch_size <= config.image_size:
            raise fail("patch_size", config.patch_size, f"1 to image_size={config.image_size}")
        return config

    @property
    def names(self) -> Layout:
        return LAYOUTS[self.layout]

    @property
    def grid_size(self) -> int:
        """Patches along each side (transformers floors, as the strided convolution does)."""
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        """Patch tokens plus the class token."""
        return self.grid_size**2 + 1


# ---------------------------------------------------------------------------------------------------
# Placing tensors at transformers' paths


class _Group(nn.Module):
    """One level of the parameter tree and nothing else, like a PyTorch container that only holds
    other modules (ViT's ``intermediate`` holding ``dense``). Calling it runs ``build(self, leaf)``
    inside it, so whatever ``build`` creates becomes its child."""

    @nn.compact
    def __call__(self, build: Callable[[nn.Module, str], T], leaf: str) -> T:
        return build(self, leaf)


class _Placer:
    """Creates modules and parameters at dotted paths below ``module``, one level of nesting at most.

    Lets one module class follow either family's names. Create it inside ``module``'s compact method
    and use it only there: the groups are created on first use and shared by every path below them.
    """

    def __init__(self, module: nn.Module):
        self._module = module
        self._groups: dict[str, _Group] = {}

    def _at(self, path: str, build: Callable[[nn.Module, str], T]) -> T:
        head, _, leaf = path.rpartition(".")
        if not head:
            return build(self._module, leaf)
        if "." in head:
            raise ValueError(f"path {path!r} nests deeper than one level")
        if head not in self._groups:
            self._groups[head] = _Group(name=head)
        return self._groups[head](build, leaf)

    def dense(self, path: str, features: int, *, use_bias: bool = True, dtype: jnp.dtype) -> nn.Dense:
        return self._at(path, lambda _, name: nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name))

    def conv(self, path: str, features: int, *, patch: int, use_bias: bool, dtype: jnp.dtype) -> nn.Conv:
        return self._at(path, lambda _, name: nn.Conv(features, (patch, patch), strides=(patch, patch),
                                                      padding="VALID", use_bias=use_bias, dtype=dtype, name=name))

    def layer_norm(self, path: str, eps: float, *, dtype: jnp.dtype) -> nn.LayerNorm:
        # Two-pass variance, as PyTorch computes it: E[x²]-E[x]² loses digits when the mean is large.
        return self._at(path, lambda _, name: nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False,
                                                           name=name))

    def param(self, path: str, shape: tuple[int, ...], init: nn.initializers.Initializer) -> jax.Array:
        return self._at(path, lambda parent, name: parent.param(name, init, shape))


# ---------------------------------------------------------------------------------------------------
# The network


class _Embeddings(nn.Module):
    """Patch embedding (a strided convolution), class token prepended, learned positions added."""

    config: ViTConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        c, names, place = self.config, self.config.names, _Placer(self)
        width, init = c.hidden_size, nn.initializers.normal(0.02)
        batch = (1,) if names.batched_tokens else ()  # ViT stores them with a leading batch axis
        class_token = place.param(names.class_token, (*batch, *batch, width), init)
        positions = place.param(names.position_embedding, (*batch, c.num_positions, width), init)
        patches = place.conv(names.patch_embedding, width, patch=c.patch_size, use_bias=names.patch_bias,
                             dtype=self.dtype)(pixel_values)
        # [B, h, w, D] row-major is the order of PyTorch's flatten(2) over [B, D, h, w].
        patches = patches.reshape(patches.shape[0], -1, width)
        class_tokens = jnp.broadcast_to(class_token.reshape(1, 1, width), (patches.shape[0], 1, width))
        tokens = jnp.concatenate([class_tokens.astype(patches.dtype), patches], axis=1)
        return tokens + positions.reshape(c.num_positions, width).astype(patches.dtype)


class _Attention(nn.Module):
    """Bidirectional multi-head self-attention."""

    config: ViTConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, names, place = self.config, self.config.names, _Placer(self)
        heads = (*x.shape[:-1], c.num_attention_heads, c.hidden_size // c.num_attention_heads)
        q, k, v = (place.dense(path, c.hidden_size, use_bias=c.qkv_bias, dtype=self.dtype)(x).reshape(heads)
                   for path in (names.query, names.key, names.value))
        out = dot_product_attention(q, k, v)
        return place.dense(names.out, c.hidden_size, dtype=self.dtype)(out.reshape(x.shape))


class _EncoderLayer(nn.Module):
    """Pre-LN block: x + attention(LN(x)), then x + fc2(act(fc1(LN(x))))."""

    config: ViTConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, names, place = self.config, self.config.names, _Placer(self)
        h = place.layer_norm(names.norm1, c.layer_norm_eps, dtype=self.dtype)(x)
        x = x + _Attention(c, self.dtype, name=names.attention)(h)
        h = place.layer_norm(names.norm2, c.layer_norm_eps, dtype=self.dtype)(x)
        h = place.dense(names.fc1, c.intermediate_size, dtype=self.dtype)(h)
        h = place.dense(names.fc2, c.hidden_size, dtype=self.dtype)(ACTIVATIONS[c.hidden_act](h))
        return x + h


class _Encoder(nn.Module):
    config: ViTConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.config.num_hidden_layers):
            x = _EncoderLayer(self.config, self.dtype, name=f"{self.config.names.layers}_{i}")(x)
        return x


def _example_images(config: ViTConfig, dtype: jnp.dtype) -> jax.Array:
    return jnp.zeros((1, config.image_size, config.image_size, config.num_channels), dtype)


class VisionTransformer(nn.Module):
    """CLIP's vision tower (``CLIPVisionModel``'s ``vision_model``) or a ``ViTModel`` without pooler.

    Attributes:
      config: the architecture and, through ``config.layout``, the family and its names.
      dtype: computation dtype; parameters are float32.
    """

    config: ViTConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Encodes normalised NHWC images ``[B, S, S, C]`` (S = ``config.image_size``).

        Returns transformers' ``(last_hidden_state [B, N+1, D], pooler_output [B, D])``: for CLIP the
        encoder output and ``post_layernorm`` of its CLS token; for ViT the ``layernorm`` of every
        token and its CLS token (DINO's image feature).
        """
        c, names, place = self.config, self.config.names, _Placer(self)
        expected = (c.image_size, c.image_size, c.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"images of shape {tuple(pixel_values.shape)} given; the model takes NHWC "
                             f"[B, {c.image_size}, {c.image_size}, {c.num_channels}]: resize to image_size="
                             f"{c.image_size} first (mlmjax.eval_models.preprocess)")
        x = _Embeddings(c, self.dtype, name="embeddings")(pixel_values.astype(self.dtype))
        if names.pre_norm is not None:
            x = place.layer_norm(names.pre_norm, c.layer_norm_eps, dtype=self.dtype)(x)
        x = _Encoder(c, self.dtype, name="encoder")(x)
        final_norm = place.layer_norm(names.final_norm, c.layer_norm_eps, dtype=self.dtype)
        if names.final_norm_all_tokens:
            x = final_norm(x)
            return x, x[:, 0]
        return x, final_norm(x[:, 0])

    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        """The pooled feature ``[B, D]``: what DINO evaluation compares."""
        return self(pixel_values)[1]

    def example_inputs(self) -> tuple[jax.Array, ...]:
        """Inputs of the right shapes for ``init``."""
        return (_example_images(self.config, self.dtype),)


# ---------------------------------------------------------------------------------------------------
# CLIP heads


class CLIPVisionModelWithProjection(nn.Module):
    """transformers' ``CLIPVisionModelWithProjection``: the vision tower and ``visual_projection``.

    Attributes:
      config: the vision tower (``config.layout == "clip"``).
      projection_dim: width of the shared image-text embedding space.
      dtype: computation dtype; parameters are float32.
    """

    config: ViTConfig
    projection_dim: int
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.vision_model = VisionTransformer(self.config, self.dtype)
        self.visual_projection = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        return self.get_image_features(pixel_values)

    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        """``image_embeds [B, projection_dim]``, not normalised (as transformers returns them)."""
        return self.visual_projection(self.vision_model(pixel_values)[1])

    def example_inputs(self) -> tuple[jax.Array, ...]:
        return (_example_images(self.config, self.dtype),)


class CLIPOutput(NamedTuple):
    """What :meth:`CLIPModel.__call__` returns; the embeddings are L2-normalised, as in transformers."""

    logits_per_image: jax.Array  # [B_images, B_texts]: exp(logit_scale) · cosine similarity
    image_embeds: jax.Array
    text_embeds: jax.Array


def _normalize(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class CLIPModel(nn.Module):
    """transformers' ``CLIPModel``: both towers, both projections and ``logit_scale``.

    CLIP-T is the cosine of :meth:`get_text_features` and :meth:`get_image_features`; CLIP-I the cosine
    of two images' features.

    Attributes:
      text_config: the text tower, :class:`mlmjax.models.clip_text.CLIPTextModel`.
      vision_config: the vision tower (``layout == "clip"``).
      projection_dim: width of the shared embedding space (``CLIPConfig.projection_dim``).
      dtype: computation dtype; parameters are float32.
    """

    text_config: clip_text.CLIPTextConfig
    vision_config: ViTConfig
    projection_dim: int
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.text_model = clip_text.CLIPTextModel(self.text_config, self.dtype)
        self.vision_model = VisionTransformer(self.vision_config, self.dtype)
        self.visual_projection = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype)
        self.text_projection = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(2.6592), ())

    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        """``image_embeds [B, projection_dim]``, not normalised."""
        return self.visual_projection(self.vision_model(pixel_values)[1])

    def get_text_features(self, input_ids: jax.Array) -> jax.Array:
        """``text_embeds [B, projection_dim]``: ``text_projection`` of the state at EOS, not normalised.

        ``input_ids`` ``[B, L]`` as CLIP's tokenizer makes them (BOS … EOS, padded; L ≤ 77).
        """
        last_hidden_state = self.text_model(input_ids)
        return self.text_projection(self.text_model.pooled_output(last_hidden_state, input_ids))

    def __call__(self, input_ids: jax.Array, pixel_values: jax.Array) -> CLIPOutput:
        image_embeds = _normalize(self.get_image_features(pixel_values))
        text_embeds = _normalize(self.get_text_features(input_ids))
        logits = jnp.exp(self.logit_scale) * image_embeds @ text_embeds.T
        return CLIPOutput(logits, image_embeds, text_embeds)

    def example_inputs(self) -> tuple[jax.Array, ...]:
        return jnp.zeros((1, 1), jnp.int32), _example_images(self.vision_config, self.dtype)


def init_params(module: VisionTransformer | CLIPVisionModelWithProjection | CLIPModel, rng: jax.Array) -> dict:
    """Freshly initialised float32 parameters (under ``jax.eval_shape``: the shapes only)."""
    return module.init(rng, *module.example_inputs())["params"]


def abstract_params(module: VisionTransformer | CLIPVisionModelWithProjection | CLIPModel) -> dict:
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves: no memory, no compute."""
    return shapes.abstract_params(init_params, module)
