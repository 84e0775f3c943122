"""Contextualizer pretraining: masked language modelling on frozen CLIP text features (PAPER.md §1.3).

Captions (COCO-like and synthetic) are masked, encoded by the frozen CLIP text encoder, and the
contextualizer predicts the original token at every non-padding position, masked ones weighing more.
Only the contextualizer and the ``[MASK]`` embedding train. The authors resize the 49,408-row token
table, train all of it and copy the other rows back after every step; here ``[MASK]`` is a separate
``[D]`` parameter spliced in by :meth:`CLIPTextModel.embed` (id ``vocab_size``) and the table is a
frozen argument, which is the same update without a 49k-row optimizer state.

``pretrain_step(state, batch, rng)`` is pure and jittable, like ``train_step.train_step``. A batch is
a pure function of ``(seed, step)`` (:func:`make_batch`), so a run resumed at step k sees exactly the
batches an uninterrupted one would. :func:`run` is what ``python -m mlmjax.train`` calls for
``method = "contextualizer"``; it ends by writing ``<workdir>/contextualizer``, loadable by
:func:`~mlmjax.models.contextualizer.load_contextualizer` as a customization run's ``mlm.contextualizer``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mlmjax import loop as loop_lib
from mlmjax import mlm
from mlmjax import pretrained as pretrained_lib
from mlmjax import resumable
from mlmjax import sharding
from mlmjax import tiny
from mlmjax import tokenizer as tokenizer_lib
from mlmjax import workdir as workdir_lib
from mlmjax.models import contextualizer as contextualizer_lib
from mlmjax.models.clip_text import CLIPTextModel
from mlmjax.prompts import synthetic

CONTEXTUALIZER_DIR = "contextualizer"
HELDOUT_FILE = "heldout.json"
LOSS_NORMALIZATIONS = ("all_positions", "non_padding")
# Held-out captions come from their own seed sequence (a spawn key), distinct from every (seed, step)'s.
_HELDOUT_SPAWN_KEY = (1,)


@dataclasses.dataclass(frozen=True)
class PretrainSpec:
    """The static part of the step (hashable: a jit cache key).

    Attributes:
      text_encoder: the frozen CLIP text encoder module.
      contextualizer: the trained contextualizer module.
      masked_weight: weight of masked positions in the loss (the authors' ``mlm_weight`` = 5).
      loss_normalization: see :func:`mlmjax.mlm.pretraining_mlm_loss`.
      learning_rate: reported as the ``lr`` metric.
      max_caption_tokens: logits are computed at the first this many positions only (see
        :func:`features`); 77: all of them.
      vocab_chunk: see :func:`mlmjax.mlm.vocabulary_cross_entropy`.
    """
    text_encoder: CLIPTextModel
    contextualizer: contextualizer_lib.Contextualizer
    masked_weight: float
    loss_normalization: str
    learning_rate: float
    max_caption_tokens: int = tokenizer_lib.MAX_LENGTH
    vocab_chunk: int | None = mlm.DEFAULT_VOCAB_CHUNK


@flax.struct.dataclass
class PretrainState:
    """``params``: ``{"contextualizer": ..., "mask_embedding": [D]}`` (trained);
    ``frozen``: ``{"text_encoder": ...}`` (an argument of the step, never a compiled-in constant)."""
    step: jax.Array
    params: dict
    frozen: dict
    opt_state: Any
    spec: PretrainSpec = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, *, params: dict, frozen: dict, spec: PretrainSpec, tx: optax.GradientTransformation,
               mesh: jax.sharding.Mesh | None = None) -> PretrainState:
        """The state at step 0, created in its shardings on ``mesh`` (see :func:`sharding.initial_leaves`)."""
        step, params, frozen, opt_state = sharding.initial_leaves(params, frozen, tx.init, mesh)
        return cls(step=step, params=params, frozen=frozen, opt_state=opt_state, spec=spec, tx=tx)


def features(spec: PretrainSpec, params: dict, frozen: dict, input_ids: jax.Array) -> jax.Array:
    """Contextualizer features ``[B, N, D]`` at the first ``N = spec.max_caption_tokens`` positions of
    ``input_ids`` ``[B, 77]``.

    CLIP's ``last_hidden_state`` (``[MASK]`` spliced in) goes through the contextualizer's blocks at
    all 77 positions (its attention sees the padding too); only the vocabulary projection, most of
    the step's cost, is cut to the positions that can hold a caption's tokens. Padding has no target,
    so with captions of at most N tokens this is exact.
    """
    variables = {"params": frozen["text_encoder"]}
    embeds = spec.text_encoder.apply(variables, input_ids, params["mask_embedding"][None],
                                     method=CLIPTextModel.embed)
    hidden = spec.text_encoder.apply(variables, None, inputs_embeds=embeds)
    out = spec.contextualizer.apply({"params": params["contextualizer"]}, hidden,
                                    method=contextualizer_lib.Contextualizer.encode)
    return out[:, :spec.max_caption_tokens]


def loss_fn(params: dict, frozen: dict, spec: PretrainSpec, batch: dict) -> tuple[jax.Array, dict]:
    """The weighted MLM loss over non-padding positions, and the accuracy at the masked ones."""
    out = features(spec, params, frozen, batch["input_ids"])
    kernel, bias = spec.contextualizer.apply({"params": params["contextualizer"]},
                                             method=contextualizer_lib.Contextualizer.projection)
    labels, mask, non_padding = (batch[k][:, :out.shape[1]] for k in ("labels", "mask", "non_padding"))
    loss, accuracy = mlm.pretraining_mlm_loss(out, kernel, bias, labels, mask, non_padding, spec.masked_weight,
                                              spec.loss_normalization, spec.vocab_chunk)
    if spec.loss_normalization == "all_positions":  # divide by B × 77, as over the uncut batch
        loss = loss * out.shape[1] / batch["labels"].shape[1]
    return loss, {"loss": loss, "mlm_accuracy": accuracy}


def pretrain_step(state: PretrainState, batch: dict, rng: jax.Array) -> tuple[PretrainState, dict]:
    """One AdamW step on the contextualizer and the ``[MASK]`` embedding.

    ``rng`` is unused: masking happens on the host (:func:`make_batch`) and the networks have no
    dropout; it is accepted for the loop's uniform ``(state, batch, rng)`` signature.
    """
    del rng
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state.frozen, state.spec, batch)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["lr"] = jnp.asarray(state.spec.learning_rate, jnp.float32)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state), metrics


def evaluate(state: PretrainState, batch: dict) -> dict:
    """``loss`` and ``mlm_accuracy`` of ``state`` on ``batch``, no update."""
    return loss_fn(state.params, state.frozen, state.spec, batch)[1]


# ---------------------------------------------------------------------------------------------------
# Batches (host-side numpy).


def mask_captions(captions: list[str], rng: np.random.Generator, tokenizer, *, mask_prob: float,
                  mask_token_id: int, max_caption_tokens: int = tokenizer_lib.MAX_LENGTH) -> dict[str, np.ndarray]:
    """Tokenizes (77, padded) and masks: each word token with ``mask_prob``, never BOS/EOS/padding.

    Returns ``input_ids`` (masked), ``labels`` (the original ids), ``mask`` and ``non_padding``, all
    ``[B, 77]``. A caption of more than ``max_caption_tokens`` tokens (BOS and EOS included) is an
    error rather than a silently shortened loss.
    """
    ids = tokenizer_lib.tokenize(tokenizer, captions).astype(np.int32)
    non_padding = mlm.non_padding_mask(ids, tokenizer.eos_token_id)
    lengths = non_padding.sum(axis=1)
    if lengths.max() > max_caption_tokens:
        i = int(lengths.argmax())
        raise ValueError(f"caption {captions[i]!r} has {lengths[i]} tokens, more than config.max_caption_tokens="
                         f"{max_caption_tokens}; raise it (77 fits every caption)")
    masked = mlm.mask_tokens(ids, rng, mask_prob=mask_prob, mask_token_id=mask_token_id,
                             bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id, min_masked_per_batch=1)
    return {"input_ids": masked.input_ids.astype(np.int32), "labels": ids, "mask": masked.mask,
            "non_padding": non_padding}


def make_batch(step: int, *, seed: int, batch_size: int, user_captions: list[str], synthetic_ratio: float,
               synthetic_data: str | None = None, **masking) -> dict[str, np.ndarray]:
    """The batch of ``step``: a pure function of ``(seed, step)``, with no iterator state to restore.

    Each caption is synthetic (from the prompt data folder ``synthetic_data``, default mlmjax's) with
    probability ``synthetic_ratio``, else uniform from ``user_captions``.
    """
    rng = np.random.default_rng([seed, step])
    stream = synthetic.caption_stream(rng, user_captions, synthetic_ratio, data_dir=synthetic_data)
    captions = list(itertools.islice(stream, batch_size))
    return mask_captions(captions, rng, **masking)


def heldout_batch(seed: int, size: int, synthetic_data: str | None = None, **masking) -> dict[str, np.ndarray]:
    """A fixed masked batch of synthetic captions, drawn from a stream the training batches never use
    (a caption can still recur: the synthetic set is finite). ``masking``: see :func:`mask_captions`."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=_HELDOUT_SPAWN_KEY))
    return mask_captions(synthetic.synthetic_captions(rng, size, data_dir=synthetic_data), rng, **masking)


# ---------------------------------------------------------------------------------------------------
# Set-up and the run.


def init_mask_embedding(table: np.ndarray, rng: np.random.Generator, norm: float = 0.0) -> np.ndarray:
    """A random ``[D]`` row (N(0, 0.02), CLIP's embedding init) rescaled to L1 norm ``norm``.

    ``norm`` 0 uses the average L1 norm of the rows of ``table``, as the authors' pretraining does
    (their average also counts the new row itself, 1 of 49,409; this leaves it out).
    """
    table = np.asarray(table, np.float64)
    norm = norm or float(np.abs(table).sum(axis=-1).mean())
    row = rng.normal(0.0, 0.02, table.shape[-1])
    return (row / np.abs(row).sum() * norm).astype(np.float32)


def _optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    o = config.optimizer
    return optax.adamw(config.learning_rate, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)


def validate(config: ml_collections.ConfigDict) -> None:
    """Rejects values that cannot run, naming the key."""
    checks = {
        "max_caption_tokens": (0 < config.max_caption_tokens <= tokenizer_lib.MAX_LENGTH,
                               f"must be in [1, {tokenizer_lib.MAX_LENGTH}]"),
        "method": (config.method == "contextualizer", "must be 'contextualizer'"),
        "mask_prob": (0 < config.mask_prob < 1, "must be in (0, 1)"),
        "synthetic_ratio": (0 <= config.synthetic_ratio <= 1, "must be in [0, 1]"),
        "loss_normalization": (config.loss_normalization in LOSS_NORMALIZATIONS,
                               f"must be one of {LOSS_NORMALIZATIONS}"),
        "mask_init_norm": (config.mask_init_norm >= 0, "must be non-negative (0: the table's average)"),
        "masked_weight": (config.masked_weight >= 0, "must be non-negative"),
        "learning_rate": (config.learning_rate >= 0, "must be non-negative"),
    }
    for key in ("batch_size", "max_steps", "log_every", "heldout_size"):
        checks[key] = (config[key] > 0, "must be a positive integer")
    for key, (ok, message) in checks.items():
        if not ok:
            raise ValueError(f"config.{key}={config[key]!r}: {message}")


def _model_folder(config: ml_collections.ConfigDict) -> str:
    return os.path.abspath(os.path.expanduser(config.pretrained or tiny.embedded_assets().model))


def _text_encoder(config: ml_collections.ConfigDict) -> tuple[CLIPTextModel, dict, Any]:
    """The text encoder, its parameters and the tokenizer; the embedded tiny model when ``pretrained`` is empty."""
    folder = _model_folder(config)
    module, params = pretrained_lib.load_component(os.path.join(folder, "text_encoder"), "text_encoder")
    return module, params, tokenizer_lib.load_tokenizer(os.path.join(folder, "tokenizer"))


@dataclasses.dataclass
class Setup:
    """A ready pretraining run: the initial state, the batch of each step, the held-out batch and the
    tokenizer (``[MASK]`` is id ``len(tokenizer)``)."""
    state: PretrainState
    make_batch: Callable[[int], dict]
    heldout: dict
    tokenizer: Any


def build(config: ml_collections.ConfigDict) -> Setup:
    """Loads the text encoder, initialises the contextualizer and ``[MASK]``, and the optimizer."""
    validate(config)
    text_encoder, text_params, tokenizer = _text_encoder(config)
    vocab = text_encoder.config.vocab_size
    if len(tokenizer) != vocab:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the text encoder's vocabulary has {vocab}")
    mask_token_id = vocab  # the authors' tokenizer.add_tokens(['[MASK]'])
    c = config.contextualizer
    module = contextualizer_lib.Contextualizer(contextualizer_lib.ContextualizerConfig(
        hidden_size=text_encoder.config.hidden_size, num_positions=tokenizer_lib.MAX_LENGTH,
        num_blocks=c.num_blocks, num_heads=c.num_heads, ffn_size=c.ffn_size, vocab_size=vocab + 1,
        ffn_residual=c.ffn_residual))
    init = jax.jit(contextualizer_lib.init_params, static_argnums=0)
    table = text_params["embeddings"]["token_embedding"]["embedding"]
    mask_embedding = init_mask_embedding(np.asarray(table), np.random.default_rng(config.seed), config.mask_init_norm)
    params = {"contextualizer": jax.device_get(init(module, jax.random.key(config.seed))),
              "mask_embedding": mask_embedding}
    spec = PretrainSpec(text_encoder=text_encoder, contextualizer=module, masked_weight=float(config.masked_weight),
                        loss_normalization=config.loss_normalization, learning_rate=float(config.learning_rate),
                        max_caption_tokens=config.max_caption_tokens)
    # On the mesh the run trains on (resumable.run's default), so nothing is moved before step 1.
    state = PretrainState.create(params=params, frozen={"text_encoder": text_params}, spec=spec,
                                 tx=_optimizer(config), mesh=sharding.make_mesh(sharding.DATA_PARALLEL))
    user_captions = synthetic.read_caption_file(config.captions) if config.captions else []
    masking = {"tokenizer": tokenizer, "mask_prob": config.mask_prob, "mask_token_id": mask_token_id,
               "max_caption_tokens": config.max_caption_tokens, "synthetic_data": config.synthetic_data or None}
    batch_fn = functools.partial(
        make_batch, seed=config.seed, batch_size=config.batch_size, user_captions=user_captions,
        synthetic_ratio=config.synthetic_ratio if user_captions else 1.0, **masking)
    return Setup(state=state, make_batch=batch_fn, heldout=heldout_batch(config.seed, config.heldout_size, **masking),
                 tokenizer=tokenizer)


def _floats(metrics: dict) -> dict[str, float]:
    return {name: float(value) for name, value in metrics.items()}


def run_identity(config: ml_collections.ConfigDict) -> dict:
    """The config and the content hashes of the text encoder's model and the caption file."""
    hashes = {"pretrained": workdir_lib.model_fingerprint(_model_folder(config))}
    if config.captions:
        hashes["captions"] = workdir_lib.file_fingerprint(config.captions)
    return workdir_lib.identity(config, hashes)


def _check_workdir(workdir: str, identity: dict) -> None:
    """A new workdir, or one holding this same run (resumed); anything else is refused."""
    saved = workdir_lib.read_identity(workdir)
    if saved is not None:
        workdir_lib.check_same_run(saved, identity, workdir)


def train(setup: Setup, config: ml_collections.ConfigDict, workdir: str) -> tuple[PretrainState, dict]:
    """Trains (or resumes) ``setup.state`` (donated) for ``config.max_steps`` in ``workdir``, a new
    folder or one holding the same run, and saves the contextualizer.

    Writes ``config.json``, ``run.json``, ``metrics.jsonl`` (the loop), ``checkpoints/``,
    ``heldout.json`` (held-out loss and accuracy before and after) and ``contextualizer/``. Returns the
    final state and the last logged metrics with ``heldout_{loss,mlm_accuracy}_{before,after}`` added
    (none after a SIGTERM: the run stopped early, saved, and resumes with the same command).
    """
    identity = run_identity(config)
    _check_workdir(workdir, identity)
    workdir_lib.write_run_files(workdir, config, identity)
    eval_fn = jax.jit(evaluate)
    before = _floats(eval_fn(setup.state, setup.heldout))
    print(f"held-out before: loss {before['loss']:.4f}, masked accuracy {before['mlm_accuracy']:.4f}")
    end = resumable.run(pretrain_step, setup.state, setup.make_batch, workdir=workdir,
                        run_identity=identity, seed=config.seed, max_steps=config.max_steps,
                        log_every=config.log_every, checkpoint_every=config.checkpoint.every,
                        keep=config.checkpoint.keep, description="contextualizer")
    state = end.state
    if end.preempted:
        return state, loop_lib.read_metrics(workdir)[-1]
    after = _floats(eval_fn(state, setup.heldout))
    print(f"held-out after:  loss {after['loss']:.4f}, masked accuracy {after['mlm_accuracy']:.4f}")
    with open(os.path.join(workdir, HELDOUT_FILE), "w") as f:
        json.dump({"before": before, "after": after}, f, indent=2, sort_keys=True)
        f.write("\n")
    contextualizer_lib.save_contextualizer(
        os.path.join(workdir, CONTEXTUALIZER_DIR), state.spec.contextualizer.config,
        jax.device_get(state.params["contextualizer"]), np.asarray(state.params["mask_embedding"]))
    metrics = loop_lib.read_metrics(workdir)[-1]
    for name in ("loss", "mlm_accuracy"):
        metrics[f"heldout_{name}_before"], metrics[f"heldout_{name}_after"] = before[name], after[name]
    return state, metrics


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Pretrains a contextualizer as ``config`` says (see :func:`train` for what ``workdir`` receives);
    returns the final metrics. ``python -m mlmjax.train`` calls this for ``method = "contextualizer"``."""
    _check_workdir(workdir, run_identity(config))  # before the slow build
    return train(build(config), config, workdir)[1]
