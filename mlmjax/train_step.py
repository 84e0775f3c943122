"""The fused train step: L = L_diff + w_prior · L_prior + λ · L_mlm, one jit, one value_and_grad.

``train_step(state, batch, rng) -> (state, metrics)`` is a pure function, so researchers can import it
and ``jax.jit`` it in their own loops (``donate_argnums=0`` recycles the state's buffers). Everything
that changes the traced computation (the modules, whether the MLM branch exists, the XTI layer map)
lives in the state's static :class:`StepSpec`; everything that is data (trainable and frozen
parameters, optimizer state, step, and the :class:`Hyperparameters`: learning rate, w_prior, λ) is a
pytree leaf. So the frozen weights are arguments, never constants folded into the executable, and
runs that differ only in their rate or loss weights (the paper's λ sweeps) share one compiled step.

Parameter tree (trainable and frozen together, split by the config's rules, see ``trainable.py``)::

    text_encoder/...          CLIP text transformer (DreamBooth/Custom Diffusion may train it)
    unet/...                  UNet (DreamBooth: all; Custom Diffusion: cross-attention K/V)
    concept/embeddings        [C, D] new-token vectors, token ids vocab_size .. vocab_size+C-1
    mlm/contextualizer/...    frozen contextualizer (present only when λ > 0)
    mlm/mask_embedding        [D] frozen [MASK] vector, token id vocab_size + C

Batch (host numpy or device arrays)::

    latent_mean, latent_logvar  [B, h, w, c]  VAE posterior moments (unscaled); sampled here
    input_ids                   [B, 77]       prompts with the concept token (id vocab_size)
    prior_latent_mean, prior_latent_logvar, prior_input_ids   as many class images (prior preservation)
    mlm_input_ids, mlm_labels, mlm_mask       [M, 77]  masked context prompts (λ > 0)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from mlmjax import mlm
from mlmjax import sharding
from mlmjax.models.clip_text import CLIPTextModel
from mlmjax.models.contextualizer import Contextualizer
from mlmjax.models.unet import UNet2DConditionModel
from mlmjax.noise_schedule import NoiseSchedule
from mlmjax import trainable


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """The static description of a method's step (hashable: a jit cache key).

    Attributes:
      text_encoder, unet: the Flax modules.
      contextualizer: the frozen contextualizer; None (no MLM branch in the trace) when λ is 0.
      prediction_type: ``epsilon`` or ``v_prediction`` (from the scheduler config).
      scaling_factor: the VAE's latent scaling factor.
      alphas_cumprod: the noise schedule as a tuple (static, exact).
      layer_tokens: XTI/P+: for each cross-attention layer, which concept token (0..C-1) stands in
        for the placeholder in that layer's context; None: one context for all layers.
      max_masked: static bound on masked tokens per MLM batch (see ``mlm.masked_token_bound``).
      vocab_chunk: vocabulary columns per chunk of the MLM cross-entropy; None: the plain product
        (see ``mlm.vocabulary_cross_entropy``).
    """
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    contextualizer: Contextualizer | None
    prediction_type: str
    scaling_factor: float
    alphas_cumprod: tuple[float, ...]
    layer_tokens: tuple[int, ...] | None = None
    max_masked: int = 0
    vocab_chunk: int | None = mlm.DEFAULT_VOCAB_CHUNK

    @property
    def noise_schedule(self) -> NoiseSchedule:
        return NoiseSchedule(np.asarray(self.alphas_cumprod, np.float32), self.prediction_type)


@flax.struct.dataclass
class Hyperparameters:
    """The step's numbers that are data, not structure (float32 scalars): two runs that differ only in
    these share one executable, in memory and in the persistent compilation cache.

    Attributes:
      learning_rate: scales the optimizer's unit-rate update (see :class:`TrainState`); the ``lr`` metric.
      prior_weight: w_prior, the class images' loss weight (used where the batch has class images).
      mlm_weight: λ, the MLM loss weight. λ = 0 is structure too: the spec then has no contextualizer and
        the trace no MLM branch.
    """
    learning_rate: jax.Array
    prior_weight: jax.Array
    mlm_weight: jax.Array

    @classmethod
    def of(cls, *, learning_rate: float, prior_weight: float = 0.0, mlm_weight: float = 0.0) -> Hyperparameters:
        return cls(*(np.float32(value) for value in (learning_rate, prior_weight, mlm_weight)))


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes.

    ``tx`` makes the update at unit learning rate (``optax.adamw(1.0, ...)``; weight decay included), and
    the step multiplies it by ``hyperparams.learning_rate``: optax's ``adamw(lr)`` is exactly its unit-rate
    update times lr, and the rate stays data (see :class:`Hyperparameters`).
    """
    step: jax.Array
    params: dict  # trainable
    frozen: dict
    opt_state: Any
    hyperparams: Hyperparameters
    spec: StepSpec = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, *, params: dict, frozen: dict, spec: StepSpec, tx: optax.GradientTransformation,
               hyperparams: Hyperparameters, mesh: Mesh | None = None) -> TrainState:
        """The state at step 0, created in its shardings on ``mesh`` (see :func:`sharding.initial_leaves`)."""
        if (spec.contextualizer is None) != (float(hyperparams.mlm_weight) == 0):
            raise ValueError(f"mlm_weight={float(hyperparams.mlm_weight):g} with "
                             f"{'no' if spec.contextualizer is None else 'a'} contextualizer in the step's spec: "
                             "λ > 0 needs one, λ = 0 none")
        step, params, frozen, opt_state = sharding.initial_leaves(params, frozen, tx.init, mesh)
        hyperparams = hyperparams if mesh is None else sharding.shard_state(hyperparams, mesh)  # scalars: replicated
        return cls(step=step, params=params, frozen=frozen, opt_state=opt_state, hyperparams=hyperparams,
                   spec=spec, tx=tx)


def extra_embeddings(params: dict) -> jax.Array:
    """Rows for ids ≥ vocab_size: the concept tokens, then [MASK] when the MLM branch is on."""
    rows = [params["concept"]["embeddings"]]
    if "mlm" in params:
        rows.append(params["mlm"]["mask_embedding"][None])
    return jnp.concatenate(rows).astype(jnp.float32)


def _encode(spec: StepSpec, params: dict, input_ids: jax.Array, token_offset: int | jax.Array = 0) -> jax.Array:
    """CLIP text features with the concept token spliced in; ``token_offset`` picks XTI's k-th token.

    Every device looks up every row's tokens and keeps its own rows: the lookup's gradient then lands
    in the vocabulary table whole on each device, from the rows' gradients gathered (B × L × D),
    where a lookup by the rows' own devices would sum the table's gradient over them (Custom Diffusion
    and DreamBooth train the table: a 49408-row all-reduce a step, per lookup; tiny Custom Diffusion on
    two CPU devices took 30.0 ms a step with it, 23.7 without, one device 28.3).
    """
    vocab = spec.text_encoder.config.vocab_size
    ids = sharding.whole(input_ids)
    ids = jnp.where(ids == vocab, vocab + token_offset, ids)
    variables = {"params": params["text_encoder"]}
    embeds = spec.text_encoder.apply(variables, ids, extra_embeddings(params), method=CLIPTextModel.embed)
    return spec.text_encoder.apply(variables, None, inputs_embeds=sharding.split_rows(sharding.whole(embeds)))


def text_context(spec: StepSpec, params: dict, input_ids: jax.Array) -> jax.Array:
    """``[B, L, D]``, or for XTI/P+ ``[layers, B, L, D]`` with token k in the layers of group k."""
    if spec.layer_tokens is None:
        return _encode(spec, params, input_ids)
    num_tokens = params["concept"]["embeddings"].shape[0]
    per_token = jax.vmap(lambda k: _encode(spec, params, input_ids, k))(jnp.arange(num_tokens))
    return per_token[jnp.asarray(spec.layer_tokens)]


def diffusion_draws(rng: jax.Array, shape: tuple[int, ...], num_train_timesteps: int) -> dict[str, jax.Array]:
    """The step's random draws for latents of ``shape`` (``[rows, h, w, c]``: instance rows, then class
    rows; or ``[parts, rows, h, w, c]``, the same draws by part): ``sample`` (the VAE posterior's
    standard normal), ``noise`` and ``timesteps`` (one per row). ``rng`` is the step's key
    (``fold_in(run key, step)``); a reference implementation replays a step from these. With
    ``jax_threefry_partitionable`` (jax's default) a draw depends on its flat index alone, so both
    shapes give the same numbers, and each device makes only the rows it holds."""
    sample_rng, noise_rng, time_rng = jax.random.split(rng, 3)
    return {"sample": jax.random.normal(sample_rng, shape), "noise": jax.random.normal(noise_rng, shape),
            "timesteps": jax.random.randint(time_rng, shape[:-3], 0, num_train_timesteps)}


def _unet_rows(parts: jax.Array) -> jax.Array:
    """``[parts, B, ...]`` (instance rows, class rows) as one UNet batch ``[parts·B, ...]`` with each
    instance row beside its class row: a device holding rows b of every part then holds the UNet
    rows it computes, where one part after the other would move half the rows between devices (Custom
    Diffusion's 4 + 4 on two CPU devices: six all-to-alls and two all-gathers a step). A part that
    does not divide the devices (DreamBooth's one image each) is held whole, and each device takes its
    UNet rows from it (left to XLA, the draws moved between devices: six all-to-alls)."""
    split = parts.shape[1] % sharding.batch_ways() == 0
    parts = sharding.split_rows(parts, axis=1) if split else sharding.whole(parts)
    return sharding.split_rows(jnp.swapaxes(parts, 0, 1).reshape(-1, *parts.shape[2:]))


def _unet_batch(spec: StepSpec, batch: dict, rng: jax.Array) -> dict[str, jax.Array]:
    """The UNet's rows (instance rows beside class rows, see :func:`_unet_rows`): ``noisy`` latents,
    ``timesteps``, the ``target`` and the prompts' ``input_ids``; ``parts`` is 2 with class images."""
    names = [("latent_mean", "latent_logvar", "input_ids")]
    if "prior_input_ids" in batch:  # one UNet call for both, as the reference DreamBooth trainer does
        names.append(("prior_latent_mean", "prior_latent_logvar", "prior_input_ids"))
    mean, logvar, ids = (jnp.stack([batch[part[i]] for part in names]) for i in range(3))  # [parts, B, ...]
    schedule = spec.noise_schedule
    draws = diffusion_draws(rng, mean.shape, schedule.num_train_timesteps)
    mean, logvar, ids, sample, noise, timesteps = (_unet_rows(x) for x in (
        mean, logvar, ids, draws["sample"], draws["noise"], draws["timesteps"]))
    latents = (mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * sample) * spec.scaling_factor
    return {"noisy": schedule.add_noise(latents, noise, timesteps), "timesteps": timesteps,
            "target": schedule.target(latents, noise, timesteps), "input_ids": ids, "parts": len(names)}


def _diffusion_losses(spec: StepSpec, params: dict, rows: dict, context: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-example MSE of the UNet's prediction: the instance images', then the class images'."""
    prediction = spec.unet.apply({"params": params["unet"]}, rows["noisy"], rows["timesteps"], context)
    per_example = jnp.mean((prediction.astype(jnp.float32) - rows["target"]) ** 2, axis=(1, 2, 3))
    by_part = per_example.reshape(-1, rows["parts"]).T  # [parts, B]
    return by_part[0], by_part[1:].reshape(-1)


def _padded_for_devices(x: jax.Array) -> jax.Array:
    """``x`` with zero rows added up to a multiple of the devices: an MLM batch of 25 on two devices
    gets a 26th prompt with no masked token, which changes no loss and no gradient. Split unevenly
    instead, the text encoder's weight gradients (Custom Diffusion trains it) gathered every layer's
    activations onto each device: 21 all-gathers a step on two CPU devices."""
    x = jnp.asarray(x)
    padding = -x.shape[0] % sharding.batch_ways()
    return jnp.concatenate([x, jnp.zeros((padding, *x.shape[1:]), x.dtype)]) if padding else x


def _by_device(x: jax.Array) -> jax.Array:
    """``[rows, ...]`` split over the devices as ``[devices, rows per device, ...]``, each device's rows
    in its own slice (nothing moves)."""
    return sharding.split_rows(x.reshape(sharding.batch_ways(), -1, *x.shape[1:]))


def _encode_together(spec: StepSpec, params: dict, *input_ids: jax.Array) -> list[jax.Array]:
    """:func:`_encode` of several prompt batches (each dividing the devices) in one text-encoder pass,
    each device encoding its rows of every batch side by side: one weight gradient per layer instead of
    one per batch (on several devices, one all-reduce instead of one per batch: 71 arrays summed a step
    for Custom Diffusion + MLM on two CPU devices, 37 now) and one pass of operations instead of two."""
    per_device = [_by_device(ids) for ids in input_ids]
    joined = jnp.concatenate(per_device, axis=1)
    features = _by_device(_encode(spec, params, sharding.split_rows(joined.reshape(-1, joined.shape[-1]))))
    ends = np.cumsum([ids.shape[1] for ids in per_device])[:-1]  # where each batch's rows end on a device
    return [sharding.split_rows(part.reshape(-1, *part.shape[2:])) for part in jnp.split(features, ends, axis=1)]


def _mlm_rows(batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The MLM prompts' ``input_ids`` (split over the devices), ``mask`` and ``labels`` (whole on every
    device, so each finds every masked position itself: from split masks, Custom Diffusion + MLM on two
    CPU devices made 11 collectives a step, 8 now), padded to a multiple of the devices."""
    ids, mask, labels = (_padded_for_devices(batch[name]) for name in ("mlm_input_ids", "mlm_mask", "mlm_labels"))
    return sharding.split_rows(ids), sharding.whole(mask), sharding.whole(labels)


def _mlm_loss_of_features(spec: StepSpec, params: dict, hidden: jax.Array, mask: jax.Array,
                          labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """:func:`mlm_loss` from the MLM prompts' text features ``hidden`` (and their :func:`_mlm_rows`)."""
    variables = {"params": params["mlm"]["contextualizer"]}
    features = spec.contextualizer.apply(variables, hidden, method=Contextualizer.encode)
    selected, positions, valid = mlm.gather_masked(features, mask, spec.max_masked)
    selected, positions, valid = (sharding.split_rows(x) for x in (selected, positions, valid))
    kernel, bias = spec.contextualizer.apply(variables, method=Contextualizer.projection)
    labels = labels.reshape(-1)[positions]
    return mlm.customization_mlm_loss(selected, kernel, bias, labels, valid, spec.vocab_chunk)


def mlm_loss(spec: StepSpec, params: dict, batch: dict) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy of the frozen contextualizer at the masked tokens of the context prompts."""
    input_ids, mask, labels = _mlm_rows(batch)
    return _mlm_loss_of_features(spec, params, _encode(spec, params, input_ids), mask, labels)


# One text-encoder pass for both prompt batches holds the MLM prompts' activations until the UNet's
# backward pass has run (the UNet's gradient reaches the text encoder last), where apart XLA finishes the
# MLM branch first: at SD 1.5 shapes with 25 prompts that is 1.0-1.2 GiB more peak memory (TI + MLM
# 9.38 -> 10.41 GiB, DreamBooth + MLM 16.66 -> 17.90) for a pass whose operations are large anyway. So
# the batches share a pass only where the MLM prompts' hidden states, all layers, are small: the tiny
# model's 0.5 MB, not SD 1.5's 71 MB.
_SHARED_PASS_MAX_HIDDEN_BYTES = 16 << 20


def _shares_a_pass(spec: StepSpec, unet_ids: jax.Array, mlm_ids: jax.Array) -> bool:
    """Whether :func:`_text_features` encodes both batches at once: not for XTI/P+ (one pass per concept
    token), nor where the UNet's rows do not divide the devices or the MLM branch is large."""
    text = spec.text_encoder.config
    hidden_bytes = mlm_ids.size * text.hidden_size * text.num_hidden_layers * 4
    return (spec.layer_tokens is None and unet_ids.shape[0] % sharding.batch_ways() == 0
            and hidden_bytes <= _SHARED_PASS_MAX_HIDDEN_BYTES)


def _text_features(spec: StepSpec, params: dict, unet_ids: jax.Array,
                   mlm_ids: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
    """The UNet's text context and the MLM prompts' features (None without MLM), in one text-encoder
    pass where :func:`_shares_a_pass`."""
    if mlm_ids is None:
        return text_context(spec, params, unet_ids), None
    if not _shares_a_pass(spec, unet_ids, mlm_ids):
        return text_context(spec, params, unet_ids), _encode(spec, params, mlm_ids)
    return tuple(_encode_together(spec, params, unet_ids, mlm_ids))


def loss_fn(trainable_params: dict, frozen: dict, spec: StepSpec, hyperparams: Hyperparameters, batch: dict,
            rng: jax.Array):
    """The total loss and its parts; gradients are taken w.r.t. ``trainable_params`` only."""
    params = trainable.merge(trainable_params, frozen)
    rows = _unet_batch(spec, batch, rng)
    with_mlm = spec.contextualizer is not None
    mlm_ids, mlm_mask, mlm_labels = _mlm_rows(batch) if with_mlm else (None, None, None)
    context, mlm_hidden = _text_features(spec, params, rows["input_ids"], mlm_ids)
    instance, prior = _diffusion_losses(spec, params, rows, context)
    metrics = {"loss_diff": instance.mean()}
    loss = metrics["loss_diff"]
    if prior.shape[0]:
        metrics["loss_prior"] = prior.mean()
        loss = loss + hyperparams.prior_weight * metrics["loss_prior"]
    if with_mlm:
        metrics["loss_mlm"], metrics["mlm_accuracy"] = _mlm_loss_of_features(spec, params, mlm_hidden, mlm_mask,
                                                                             mlm_labels)
        loss = loss + hyperparams.mlm_weight * metrics["loss_mlm"]
    metrics["loss"] = loss
    return loss, metrics


def train_step(state: TrainState, batch: dict, rng: jax.Array) -> tuple[TrainState, dict]:
    """One optimisation step of the method described by ``state.spec``.

    ``rng`` is folded with the step, so a run is reproducible from (seed, step) alone and a resumed
    run draws exactly what an uninterrupted one would.
    """
    step_rng = jax.random.fold_in(rng, state.step)
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.frozen, state.spec, state.hyperparams, batch, step_rng)
    unit_updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    rate = state.hyperparams.learning_rate  # one more element-wise product, fused into the update's own
    params = optax.apply_updates(state.params, jax.tree.map(lambda u: rate * u, unit_updates))
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["lr"] = rate
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics
