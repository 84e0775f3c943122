"""Text-space metrics of a customized run: no image model, only its text encoder and a contextualizer.

Two questions about the concept token, each asked on the same prompts twice: once as the run uses
them (the concept phrase in the slot, e.g. "a photo of a <c> teapot at the beach") and once with the
plain class noun in the slot ("a photo of a teapot at the beach"), the "no concept" reference that the
``_class`` metrics report. Both versions are masked at the same context words and read by the same
text encoder (the run's: DreamBooth and Custom Diffusion fine-tune it, so their reference moves too),
so every difference between the two columns comes from the concept token alone.

1. *Does the contextualizer still read the context?* ``mlm_accuracy`` and ``mlm_cross_entropy``: the
   frozen contextualizer's top-1 accuracy and mean cross-entropy at the masked tokens, on the CLIP
   features of the customized text encoder, pooled over all masked tokens, exactly as the training
   MLM loss (``train_step.mlm_loss``) computes them.
2. *How does the concept token mix with its context in the CLIP text encoder?* The encoder is causal,
   so context after the concept can read it and context before it can only be read by it; and in
   pretrained CLIP text encoders the BOS token takes most of a typical query's attention (an attention
   sink), so raw probabilities mostly measure how much a query parks on BOS. Each attention number is
   therefore a share of a query's *non-BOS* attention, averaged over layers, heads and query tokens
   (pooled over prompts):

   * ``attention_context_to_subject``: queries are the context tokens after the whole concept phrase
     (before EOS), the keys the concept token (reference: the class noun's tokens). Prompts whose
     slot ends the caption contribute nothing.
   * ``attention_subject_to_context``: the query is the concept token (reference: the class noun's
     first token), the keys the context tokens before it; the rest of its non-BOS attention is on itself.
   * ``attention_context_to_bos``: the raw probability the first metric's queries put on BOS, to show
     how much attention the shares leave out.

   XTI/P+ encodes each prompt once per concept token ``<c>_k``, each copy masked independently (as its
   MLM loss does), and every metric pools over the copies: the MLM numbers over all copies' masked
   tokens, as that loss averages; the attention shares, whose terms are the same in every copy, are
   then exactly the mean over the tokens.

"Held out": the MLM prompts of training are drawn uniformly from the family's whole prompt set
(``PromptSet.sample`` with a generator seeded ``(seed, step)``), so no line of the set is reserved, and
training's thousands of draws cover most lines of the small caption types. The evaluation prompts are
new draws from the family's full set, from a generator whose seed (``seed``, :data:`EVAL_STREAM`)
no training step uses, masked afresh: held-out draws (prompt, prefix and mask), not unseen text.
Runs trained on a restricted set (``mlm.prompt_types``, ``mlm.per_type_size``) are still evaluated on
the full family set, so runs with and without MLM, and ablations, are scored on the same masked prompts.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mlmjax import config as config_lib
from mlmjax import method as method_lib
from mlmjax import mlm
from mlmjax import tokenizer as tokenizer_lib
from mlmjax import train_step as train_step_lib
from mlmjax.models import clip_text
from mlmjax.models import contextualizer as contextualizer_lib
from mlmjax.prompts.prompt_set import PromptSet
from mlmjax.prompts.templates import SLOT
from mlmjax.train_step import StepSpec
from mlmjax.workdir import TrainedRun

# The second word of every evaluation generator's seed: training's generators are seeded with
# (seed, step) for steps < 2**32, so no step draws the evaluation prompts (this word is 64 bits).
EVAL_STREAM = int.from_bytes(b"text_mlm", "big")

# The static buffer of masked tokens (``StepSpec.max_masked``) is the most any block holds, rounded up
# to a multiple of this, so that other seeds and prompt counts mostly reuse one compiled function.
_MASKED_BUCKET = 64

METRICS = ("mlm_accuracy", "mlm_cross_entropy", "attention_context_to_subject", "attention_subject_to_context",
           "attention_context_to_bos")


class PromptBatch(NamedTuple):
    """One version of the evaluation prompts, host or device arrays ``[R, 77]`` (R: prompts × copies).

    Attributes:
      input_ids: the prompts, unmasked (what the attention metrics read).
      masked_ids, labels, mask: the MLM inputs, as :class:`mlmjax.mlm.MaskedTokens`.
      subject: the concept token, or the class noun's tokens in the reference.
      subject_start: the subject's first token.
      after: context tokens after the whole concept phrase, EOS and padding excluded.
      before: context tokens before the concept phrase, BOS excluded.
    """

    input_ids: np.ndarray
    masked_ids: np.ndarray
    labels: np.ndarray
    mask: np.ndarray
    subject: np.ndarray
    subject_start: np.ndarray
    after: np.ndarray
    before: np.ndarray


def evaluation_templates(family: str, num_prompts: int, seed: int) -> list[str]:
    """``num_prompts`` context prompts of ``family`` with the ``<new1>`` slot unfilled, as training draws
    them (type, line and prefix uniform) but from the evaluation stream of ``seed``."""
    rng = np.random.default_rng([seed, EVAL_STREAM])
    return PromptSet.load(family).sample(rng, num_prompts, SLOT)


def _mask_rng(seed: int) -> np.random.Generator:
    # Apart from the prompts' generator, so that the masks of given prompts depend on the seed alone.
    return np.random.default_rng([seed, EVAL_STREAM, 1])


def prompt_batches(run: TrainedRun, templates: list[str], *, seed: int,
                   mask_token_id: int) -> tuple[PromptBatch, PromptBatch]:
    """The concept and class-noun versions of ``templates``, masked at the same context tokens.

    The concept version is what training's MLM batches hold: ``<new1>`` becomes the run's MLM phrase
    (``"<c> class"``, or ``"<c>"`` with ``mlm.class_noun_in_prompts`` off), XTI/P+ repeats every prompt
    once per concept token, and each copy is masked independently with ``mlm.mask_prob``, the concept
    and class-noun tokens protected. The class version has the class noun in the slot instead, and is
    masked at exactly the same context tokens (shifted by the difference in the slot's length).
    """
    config, tokenizer = run.config, run.model.tokenizer
    vocab_size = run.model.text_encoder.config.vocab_size
    concept_ids = tokenizer.convert_tokens_to_ids(run.concept_tokens)
    class_noun = config.concept.class_noun
    phrase = method_lib.mlm_phrase(config)
    noun = tokenizer.encode(class_noun, add_special_tokens=False)
    phrase_length = len(tokenizer.encode(phrase, add_special_tokens=False))

    ids = tokenizer_lib.tokenize(tokenizer, [t.replace(SLOT, phrase) for t in templates]).astype(np.int32)
    class_ids = tokenizer_lib.tokenize(tokenizer, [t.replace(SLOT, class_noun) for t in templates]).astype(np.int32)
    ids, masked = method_lib.mask_concept_prompts(
        ids, _mask_rng(seed), mask_prob=config.mlm.mask_prob, concept_ids=concept_ids,
        protected=method_lib.protected_tokens(config, tokenizer, concept_ids), mask_token_id=mask_token_id,
        bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id)
    class_ids = np.tile(class_ids, (len(concept_ids), 1))

    is_concept = (ids >= vocab_size) & (ids < vocab_size + len(concept_ids))
    if not (is_concept.sum(axis=1) == 1).all():
        raise ValueError(f"every prompt must hold the concept token exactly once (phrase {phrase!r})")
    length = ids.shape[1]
    positions = np.arange(length)[None]
    slot = np.argmax(is_concept, axis=1)[:, None]
    # Class position j holds the concept version's token `source[j]` outside the slot.
    in_noun = (positions >= slot) & (positions < slot + len(noun))
    source = np.where(positions < slot, positions, positions - len(noun) + phrase_length)
    inside = (source >= 0) & (source < length)
    source = np.clip(source, 0, length - 1)
    class_mask = ~in_noun & inside & np.take_along_axis(masked.mask, source, axis=1)

    non_padding = mlm.non_padding_mask(ids, tokenizer.eos_token_id)
    class_non_padding = mlm.non_padding_mask(class_ids, tokenizer.eos_token_id)
    # The map must hold: the class noun in the slot, the concept version's tokens everywhere else.
    noun_at = np.asarray(noun)[np.clip(positions - slot, 0, len(noun) - 1)]
    same_context = np.take_along_axis(ids, source, axis=1) == class_ids
    if ((in_noun & (class_ids != noun_at)).any() or (~in_noun & inside & class_non_padding & ~same_context).any()
            or class_mask.sum() != masked.mask.sum()):
        raise AssertionError(f"the prompts with {phrase!r} and with {class_noun!r} do not tokenize alike "
                             "outside the slot")

    words = non_padding & (ids != tokenizer.eos_token_id)
    class_words = class_non_padding & (class_ids != tokenizer.eos_token_id)
    concept = PromptBatch(
        input_ids=ids, masked_ids=masked.input_ids, labels=masked.labels, mask=masked.mask,
        subject=is_concept, subject_start=is_concept, after=words & (positions >= slot + phrase_length),
        before=(positions > 0) & (positions < slot))
    reference = PromptBatch(
        input_ids=class_ids, masked_ids=np.where(class_mask, mask_token_id, class_ids),
        labels=np.where(class_mask, class_ids, mlm.IGNORE_INDEX), mask=class_mask,
        subject=in_noun, subject_start=positions == slot, after=class_words & (positions >= slot + len(noun)),
        before=(positions > 0) & (positions < slot))
    return concept, reference


def _share_sums(probabilities: jax.Array, queries: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sum over layers, heads and ``queries`` of the share of each query's non-BOS attention on ``keys``.

    Args:
      probabilities: ``[layers, B, H, L, L]``.
      queries, keys: ``[B, L]`` bool; ``keys`` must not hold position 0 (BOS).

    Returns:
      ``(sum, count)``, count being the number of (layer, head, query) terms. The non-BOS mass is
      summed rather than taken as 1 − p(BOS), which would cancel to 0 when BOS takes nearly everything.
    """
    non_bos = probabilities[..., 1:].sum(axis=-1)
    on_keys = jnp.einsum("nbhqk,bk->nbhq", probabilities, keys.astype(probabilities.dtype))
    share = jnp.where(non_bos > 0, on_keys / jnp.where(non_bos > 0, non_bos, 1.0), 0.0)
    weight = queries[None, :, None, :]
    count = queries.sum() * probabilities.shape[0] * probabilities.shape[2]
    return jnp.where(weight, share, 0.0).sum(), count


@functools.partial(jax.jit, static_argnums=0)
def batch_sums(spec: StepSpec, params: dict, batch: PromptBatch) -> dict[str, jax.Array]:
    """The sums and counts behind :data:`METRICS` on one batch (pooled by :func:`text_metrics`).

    ``spec`` carries the contextualizer and the static ``max_masked`` (at least any row block's masked
    tokens); ``params`` the run's parameters with ``mlm`` (contextualizer and ``[MASK]`` embedding).
    """
    # The MLM term exactly as training computes it; its means are turned back into sums for pooling.
    mlm_batch = {"mlm_input_ids": batch.masked_ids, "mlm_labels": batch.labels, "mlm_mask": batch.mask}
    cross_entropy, accuracy = train_step_lib.mlm_loss(spec, params, mlm_batch)
    masked = batch.mask.sum()

    variables = {"params": params["text_encoder"]}
    embeds = spec.text_encoder.apply(variables, batch.input_ids, train_step_lib.extra_embeddings(params),
                                     method=clip_text.CLIPTextModel.embed)
    _, probabilities = clip_text.attention_probabilities(spec.text_encoder, variables, batch.input_ids,
                                                         inputs_embeds=embeds)
    to_subject, to_subject_count = _share_sums(probabilities, batch.after, batch.subject)
    from_subject, from_subject_count = _share_sums(probabilities, batch.subject_start, batch.before)
    to_bos = jnp.where(batch.after[None, :, None, :], probabilities[..., 0], 0.0).sum()
    return {
        "mlm_accuracy": (jnp.round(accuracy * masked), masked),
        "mlm_cross_entropy": (cross_entropy * masked, masked),
        "attention_context_to_subject": (to_subject, to_subject_count),
        "attention_subject_to_context": (from_subject, from_subject_count),
        "attention_context_to_bos": (to_bos, to_subject_count),
    }


def _scoring_state(run: TrainedRun, contextualizer_folder: str) -> tuple[StepSpec, dict, int]:
    """The run's spec and parameters with the MLM branch of ``contextualizer_folder`` put back;
    and the ``[MASK]`` token id."""
    module, ctx_params, mask_embedding = contextualizer_lib.load_contextualizer(contextualizer_folder)
    text_config = run.model.text_encoder.config
    if module.config.hidden_size != text_config.hidden_size:
        raise ValueError(f"{contextualizer_folder}: contextualizer width {module.config.hidden_size} does not "
                         f"match the text encoder's {text_config.hidden_size}")
    if module.config.vocab_size < text_config.vocab_size:
        raise ValueError(f"{contextualizer_folder}: contextualizer vocabulary {module.config.vocab_size} is "
                         f"smaller than the text encoder's {text_config.vocab_size}")
    spec = dataclasses.replace(run.spec, contextualizer=module.clone(dtype=run.spec.text_encoder.dtype))
    params = {**run.params, "mlm": {"contextualizer": ctx_params, "mask_embedding": mask_embedding}}
    num_tokens = run.params["concept"]["embeddings"].shape[0]
    return spec, params, text_config.vocab_size + num_tokens


def _blocks(batch: PromptBatch, rows: int) -> list[PromptBatch]:
    """``batch`` cut into blocks of ``rows`` rows; the last is padded with rows that count nowhere
    (all masks False), so that every block has one shape and one compiled function."""
    total = batch.input_ids.shape[0]
    padded = -(-total // rows) * rows

    def pad(x: np.ndarray) -> np.ndarray:
        filler = np.zeros_like(x[:1]) if x.dtype == bool else x[:1]  # ids: any valid row
        return np.concatenate([x, np.repeat(filler, padded - total, axis=0)])

    full = PromptBatch(*(pad(x) for x in batch))
    return [PromptBatch(*(x[start:start + rows] for x in full)) for start in range(0, padded, rows)]


def text_metrics(run: TrainedRun, contextualizer_folder: str, *, num_prompts: int = 1000, seed: int = 0,
                 batch_size: int = 64) -> dict[str, float]:
    """The run's text-space metrics (see the module docstring) on ``num_prompts`` evaluation prompts.

    Args:
      run: a customized run, e.g. :func:`mlmjax.workdir.load_trained`'s.
      contextualizer_folder: the contextualizer that scores every run of a comparison, with or without
        MLM (a run's own ``mlm.contextualizer`` by default in ``mlmjax.evaluate``).
      num_prompts: prompts drawn from the family's prompt set (XTI/P+: each encoded once per token).
      seed: the evaluation draws: the same seed gives the same prompts to every run of a family, the
        same masks too where the MLM phrase and the number of concept tokens agree (e.g. TI with and
        without MLM), and the same numbers (up to float summation order across ``batch_size``).
      batch_size: rows (prompt copies) per jitted call.

    Returns:
      Each name of :data:`METRICS` for the concept prompts, and with the suffix ``_class`` for the
      reference prompts with the class noun in the slot. A metric without a single term (e.g. no
      prompt with context after the slot) is NaN.
    """
    if num_prompts < 1 or batch_size < 1:
        raise ValueError(f"num_prompts={num_prompts} and batch_size={batch_size} must be positive")
    spec, params, mask_token_id = _scoring_state(run, contextualizer_folder)
    templates = evaluation_templates(config_lib.concept_family(run.config), num_prompts, seed)
    concept, reference = prompt_batches(run, templates, seed=seed, mask_token_id=mask_token_id)
    blocks = {"": _blocks(concept, batch_size), "_class": _blocks(reference, batch_size)}
    most_masked = max(int(block.mask.sum()) for block in blocks[""])
    spec = dataclasses.replace(spec, max_masked=max(1, -(-most_masked // _MASKED_BUCKET) * _MASKED_BUCKET))

    out = {}
    for suffix, version_blocks in blocks.items():
        totals = {name: np.zeros(2) for name in METRICS}
        for block in version_blocks:
            for name, (total, count) in jax.device_get(batch_sums(spec, params, block)).items():
                totals[name] += (float(total), float(count))
        for name, (total, count) in totals.items():
            out[name + suffix] = float(total / count) if count else float("nan")
    return out
