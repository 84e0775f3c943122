"""From a method config to a ready train state and a batch function (PAPER.md §1.4 and §3).

The four baselines differ only in configuration: which parameters the rules mark trainable, how many
concept tokens there are (XTI/P+: one per cross-attention block group or layer), whether class images
enter a prior-preservation loss, and the MLM weight λ. Everything here runs once at start-up, on the
host; the per-step work is in ``train_step.py``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mlmjax import config as config_lib
from mlmjax import data as data_lib
from mlmjax import mlm
from mlmjax import optimizer as optimizer_lib
from mlmjax import sharding
from mlmjax import tokenizer as tokenizer_lib
from mlmjax import trainable
from mlmjax.models import contextualizer as contextualizer_lib
from mlmjax.models import unet as unet_lib
from mlmjax.noise_schedule import NoiseSchedule
from mlmjax.pretrained import Pretrained
from mlmjax.prompts import prompt_set as prompts_lib
from mlmjax.train_step import Hyperparameters, StepSpec, TrainState



@dataclasses.dataclass
class Setup:
    """Everything a customization run needs besides the loop."""
    model: Pretrained
    state: TrainState
    make_batch: Callable[[int], dict]  # step -> numpy batch, a pure function of (seed, step)
    concept_phrase: str
    label_tree: dict


def num_concept_tokens(config: ml_collections.ConfigDict, unet_config) -> int:
    """1, or for XTI/P+ one token per cross-attention block group or layer of this UNet."""
    if config.method != "xti":
        return 1
    if config.concept.xti_tokens == "blocks":
        return max(unet_lib.cross_attention_block_groups(unet_config)) + 1
    if config.concept.xti_tokens == "layers":
        return unet_lib.num_cross_attention_layers(unet_config)
    raise ValueError(f"config.concept.xti_tokens={config.concept.xti_tokens!r}: use 'blocks' or 'layers'")


def _layer_tokens(config: ml_collections.ConfigDict, unet_config) -> tuple[int, ...] | None:
    if config.method != "xti":
        return None
    if config.concept.xti_tokens == "blocks":
        return tuple(unet_lib.cross_attention_block_groups(unet_config))
    return tuple(range(unet_lib.num_cross_attention_layers(unet_config)))


def _concept_tokens(tokenizer, config: ml_collections.ConfigDict, count: int, vocab_size: int) -> list[int]:
    """Adds ``<token>`` (and for XTI ``<token>_1`` ...) to the tokenizer; ids vocab_size, vocab_size+1, ..."""
    if len(tokenizer) != vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the text encoder's vocabulary has "
                         f"{vocab_size}; use the checkpoint's own tokenizer without added tokens")
    names = [config.concept.token] + [f"{config.concept.token}_{k}" for k in range(1, count)]
    ids = tokenizer_lib.add_concept_tokens(tokenizer, names)
    if ids != list(range(vocab_size, vocab_size + count)):
        raise AssertionError(f"new token ids {ids} are not consecutive after the vocabulary")
    return ids


def _init_embedding(model: Pretrained, tokenizer, word: str, count: int) -> np.ndarray:
    """``[count, D]`` float32 copies of the embedding of ``word`` (a single token), on the host."""
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"config.concept.init_word={word!r} is {len(ids)} tokens; choose a single-token word")
    table = model.params["text_encoder"]["embeddings"]["token_embedding"]["embedding"]
    return np.tile(np.asarray(table[ids[0]], np.float32)[None], (count, 1))


def optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW (no warm-up), with optional global-norm clipping, as the baselines; at unit rate, which the
    step scales by the state's ``learning_rate`` (``config.learning_rate``, see :func:`hyperparameters`)."""
    o = config.optimizer
    return _unit_rate_adamw(float(o.b1), float(o.b2), float(o.eps), float(o.weight_decay), float(o.grad_clip))


@functools.lru_cache(maxsize=None)
def _unit_rate_adamw(b1: float, b2: float, eps: float, weight_decay: float,
                     grad_clip: float) -> optax.GradientTransformation:
    # Cached: the transformation is a static part of the train state, compared by identity in jit's
    # cache, so equal hyperparameters must give the same object for runs to share one executable.
    return optimizer_lib.adamw(1.0, b1, b2, eps, weight_decay, grad_clip)


def hyperparameters(config: ml_collections.ConfigDict) -> Hyperparameters:
    """The config's learning rate, w_prior and λ, as the state's data (not part of the compiled step)."""
    return Hyperparameters.of(learning_rate=float(config.learning_rate), prior_weight=float(config.prior.weight),
                              mlm_weight=float(config.mlm.weight))


def _check_trainable(label_tree: dict) -> None:
    for path, label in jax.tree_util.tree_leaves_with_path(label_tree):
        name = "/".join(str(k.key) for k in path)
        if label == trainable.TRAIN and name.startswith("mlm/"):
            raise ValueError(f"config.trainable marks {name} trainable; the contextualizer and [MASK] "
                             "embedding are frozen by the method")


@dataclasses.dataclass
class MethodState:
    """What a method's config makes of a pretrained model, before any data is read."""
    state: TrainState
    label_tree: dict
    concept_ids: list[int]  # token ids of the concept tokens (vocab_size, vocab_size + 1, ...)
    concept_tokens: list[str]  # their names: <token>, and for XTI <token>_1 ... <token>_{C-1}
    concept_phrase: str  # "<token> class_noun", what prompts put in their slot
    mask_token_id: int
    max_masked: int


def build_state(config: ml_collections.ConfigDict, model: Pretrained, *, contextualizer_folder: str | None,
                mesh: jax.sharding.Mesh | None = None) -> MethodState:
    """The train state of ``config`` on ``model``; adds the concept tokens to ``model.tokenizer``.

    The state is created directly in its shardings on ``mesh`` (default: every device, data-parallel;
    a training run passes its ``config.mesh``): the weights go from the host to their shards once and
    the optimizer state is born sharded. With ``mlm.weight`` 0 no contextualizer is read (inference
    and export build the state this way: the MLM branch never holds trainable parameters).
    """
    tokenizer = model.tokenizer
    text_config = model.text_encoder.config
    num_tokens = num_concept_tokens(config, model.unet.config)
    concept_ids = _concept_tokens(tokenizer, config, num_tokens, text_config.vocab_size)
    init_word = config.concept.init_word or config.concept.class_noun
    params = {name: value for name, value in model.params.items() if name != "vae"}
    params["concept"] = {"embeddings": _init_embedding(model, tokenizer, init_word, num_tokens)}

    contextualizer, max_masked = None, 0
    if config.mlm.weight:
        if not contextualizer_folder:
            raise ValueError("config.mlm.weight > 0 needs config.mlm.contextualizer (a contextualizer folder)")
        contextualizer, ctx_params, mask_embedding = contextualizer_lib.load_contextualizer(contextualizer_folder)
        if contextualizer.config.hidden_size != text_config.hidden_size:
            raise ValueError(f"{contextualizer_folder}: contextualizer width {contextualizer.config.hidden_size} "
                             f"does not match the text encoder's {text_config.hidden_size}")
        params["mlm"] = {"contextualizer": ctx_params, "mask_embedding": mask_embedding}
        max_masked = _masked_bound(config, tokenizer, concept_ids, copies=num_tokens if config.method == "xti" else 1)

    label_tree = trainable.labels(params, [tuple(rule) for rule in config.trainable])
    _check_trainable(label_tree)
    trainable_params, frozen = trainable.split(params, label_tree)
    schedule = NoiseSchedule.from_config(model.scheduler_config)
    compute_dtype = jnp.dtype(config.compute_dtype)
    spec = StepSpec(
        text_encoder=model.text_encoder.clone(dtype=compute_dtype),
        unet=model.unet.clone(dtype=compute_dtype, remat=bool(config.remat)),
        contextualizer=None if contextualizer is None else contextualizer.clone(dtype=compute_dtype),
        prediction_type=schedule.prediction_type, scaling_factor=float(model.vae.config.scaling_factor),
        alphas_cumprod=tuple(float(a) for a in schedule.alphas_cumprod),
        layer_tokens=_layer_tokens(config, model.unet.config),
        max_masked=max_masked)
    state = TrainState.create(params=trainable_params, frozen=frozen, spec=spec, tx=optimizer(config),
                              hyperparams=hyperparameters(config),
                              mesh=mesh or sharding.make_mesh(sharding.DATA_PARALLEL))
    return MethodState(
        state=state, label_tree=label_tree, concept_ids=concept_ids,
        concept_tokens=tokenizer.convert_ids_to_tokens(concept_ids),
        concept_phrase=f"{config.concept.token} {config.concept.class_noun}".strip(),
        mask_token_id=text_config.vocab_size + num_tokens, max_masked=max_masked)


def batch_function(config: ml_collections.ConfigDict, model: Pretrained, built: MethodState, *,
                   concept_images: np.ndarray, class_images: np.ndarray | None) -> Callable[[int], dict]:
    """``step -> batch`` for the state :func:`build_state` made; encodes every image once with the VAE.

    Args:
      concept_images: ``[N, R, R, 3]`` in [-1, 1].
      class_images: the same for prior preservation, or None when ``prior.weight`` is 0.
    """
    concept_moments = data_lib.encode_moments(model.vae, model.params["vae"], concept_images)
    class_moments = (None if class_images is None
                     else data_lib.encode_moments(model.vae, model.params["vae"], class_images))
    return _batch_maker(config, model.tokenizer, built.concept_ids, built.concept_phrase, concept_moments,
                        class_moments, mask_token_id=built.mask_token_id, max_masked=built.max_masked)


def build(config: ml_collections.ConfigDict, model: Pretrained, *, concept_images: np.ndarray,
          class_images: np.ndarray | None, contextualizer_folder: str | None,
          mesh: jax.sharding.Mesh | None = None) -> Setup:
    """:func:`build_state` and :func:`batch_function` together (``contextualizer_folder``: a folder
    from ``save_contextualizer``, needed when ``mlm.weight`` > 0)."""
    built = build_state(config, model, contextualizer_folder=contextualizer_folder, mesh=mesh)
    make_batch = batch_function(config, model, built, concept_images=concept_images, class_images=class_images)
    return Setup(model=model, state=built.state, make_batch=make_batch, concept_phrase=built.concept_phrase,
                 label_tree=built.label_tree)


def _prompt_set(config: ml_collections.ConfigDict) -> prompts_lib.PromptSet:
    types = [t.strip() for t in config.mlm.prompt_types.split(",") if t.strip()] or None
    return prompts_lib.PromptSet.load(config_lib.concept_family(config), types=types,
                                      per_type_size=config.mlm.per_type_size or None, seed=config.seed)


def protected_tokens(config: ml_collections.ConfigDict, tokenizer, concept_ids: list[int]) -> list[list[int]]:
    """The token sequences MLM never masks: each concept token and the class noun."""
    return [[t] for t in concept_ids] + list(
        mlm.protected_sequences(tokenizer, [config.concept.token, config.concept.class_noun]))


def mask_concept_prompts(ids: np.ndarray, rng: np.random.Generator, *, mask_prob: float, concept_ids: list[int],
                         protected: list[list[int]], mask_token_id: int, bos_id: int, eos_id: int,
                         max_masked: int | None = None) -> tuple[np.ndarray, mlm.MaskedTokens]:
    """MLM masking of tokenized prompts that hold the concept token, as the train step's batch has it.

    XTI: every prompt once per concept token ``<c>_k``, each copy masked independently; ``protected``
    (:func:`protected_tokens`) is never masked. Returns the expanded ids and their masking. Uses no
    tokenizer, so the batch pipeline's threads can call it at once.
    """
    ids = np.concatenate([np.where(ids == concept_ids[0], token, ids) for token in concept_ids])
    return ids, mlm.mask_tokens(ids, rng, mask_prob=mask_prob, mask_token_id=mask_token_id, protected=protected,
                                max_masked=max_masked, bos_id=bos_id, eos_id=eos_id)


def mlm_phrase(config: ml_collections.ConfigDict) -> str:
    """What the MLM prompts put in their slot (the authors' XTI quirk: the token without the class noun)."""
    if config.mlm.class_noun_in_prompts:
        return f"{config.concept.token} {config.concept.class_noun}"
    return config.concept.token


def _maskable_distribution(config: ml_collections.ConfigDict, tokenizer, concept_ids: list[int]) -> np.ndarray:
    """``P[n]``: the probability that one MLM prompt of a batch has ``n`` maskable tokens."""
    protected = protected_tokens(config, tokenizer, concept_ids)

    def maskable(texts: list[str]) -> np.ndarray:
        ids = tokenizer_lib.tokenize(tokenizer, texts)
        return mlm.maskable_positions(ids, bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id,
                                      protected=protected).sum(axis=1)

    probs = _prompt_set(config).count_distribution(mlm_phrase(config), maskable)
    most = tokenizer_lib.MAX_LENGTH - 2  # a prefix and its caption together are truncated like any prompt
    return np.append(probs[:most], probs[most:].sum()) if probs.size > most + 1 else probs


def _masked_bound(config: ml_collections.ConfigDict, tokenizer, concept_ids: list[int], copies: int) -> int:
    """The static number of masked tokens a step's MLM batch holds (see :func:`mlm.masked_token_bound`):
    about twice the tokens a batch masks on average. The vocabulary projection runs on these rows, so
    they are taken from every prompt's length, not the longest prompt's: 67 rows instead of 127 for TI's
    25 prompts."""
    return mlm.masked_token_bound(_maskable_distribution(config, tokenizer, concept_ids), config.mlm.batch_size,
                                  config.mlm.mask_prob, copies=copies)


def _batch_maker(config, tokenizer, concept_ids, concept_phrase, concept_moments, class_moments, *,
                 mask_token_id: int, max_masked: int) -> Callable[[int], dict]:
    """``step -> batch``; every random draw comes from a generator seeded with (seed, step)."""
    flip_prob = config.concept.flip_prob
    class_noun = config.concept.class_noun
    prompt_set = None
    if config.mlm.weight:
        prompt_set = _prompt_set(config)
        phrase = mlm_phrase(config)
        masking = dict(mask_prob=config.mlm.mask_prob, concept_ids=concept_ids, mask_token_id=mask_token_id,
                       protected=protected_tokens(config, tokenizer, concept_ids), max_masked=max_masked,
                       bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id)

    def make_batch(step: int) -> dict:
        rng = np.random.default_rng([config.seed, step])
        mean, logvar = data_lib.sample_moments(concept_moments, rng, config.batch_size, flip_prob)
        prompts = [prompts_lib.diffusion_prompt(rng, concept_phrase) for _ in range(config.batch_size)]
        batch = {"latent_mean": mean, "latent_logvar": logvar,
                 "input_ids": tokenizer_lib.tokenize(tokenizer, prompts).astype(np.int32)}
        if class_moments is not None:
            mean, logvar = data_lib.sample_moments(class_moments, rng, config.batch_size, flip_prob)
            batch.update(prior_latent_mean=mean, prior_latent_logvar=logvar,
                         prior_input_ids=tokenizer_lib.tokenize(
                             tokenizer, [config.prior.prompt.format(class_noun)] * config.batch_size
                         ).astype(np.int32))
        if prompt_set is not None:
            ids = tokenizer_lib.tokenize(tokenizer, prompt_set.sample(rng, config.mlm.batch_size, phrase))
            _, masked = mask_concept_prompts(ids, rng, **masking)
            batch.update(mlm_input_ids=masked.input_ids.astype(np.int32), mlm_labels=masked.labels.astype(np.int32),
                         mlm_mask=masked.mask)
        return batch

    return make_batch
