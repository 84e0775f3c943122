"""Masked language modelling on prompts: masking (host-side numpy) and the two losses (JAX).

PAPER.md §1.3-1.4. Each BPE token is masked independently with probability ``mask_prob`` and always
replaced by ``[MASK]`` (no 80/10/10 split). Never masked: BOS, EOS, padding, and, during
customization, the concept token and the class noun.

At customization the cross-entropy is needed only at the masked tokens, and the contextualizer's
vocabulary projection is 38M of its 62M parameters, so a train step runs::

    features = contextualizer.apply(p, clip_out, method=Contextualizer.encode)     # [B, L, D]
    selected, positions, valid = gather_masked(features, masked.mask, max_masked)  # [N, D]
    logits = contextualizer.apply(p, selected, method=Contextualizer.logits)       # [N, V]
    loss, accuracy = customization_mlm_loss(logits, masked.labels.reshape(-1)[positions], valid)

with the static ``max_masked`` from :func:`masked_token_bound`, also passed to :func:`mask_tokens`
so that the buffer can never overflow.
"""

from __future__ import annotations

from typing import Iterable, Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.stats

IGNORE_INDEX = -100  # the label of positions without a target, as in PyTorch's cross_entropy


class MaskedTokens(NamedTuple):
    """A masked batch.

    Attributes:
      input_ids: ``[B, L]``, ``mask_token_id`` at the masked positions.
      labels: ``[B, L]``, the original id at the masked positions and ``IGNORE_INDEX`` elsewhere.
      mask: ``[B, L]`` bool, the masked positions.
    """

    input_ids: np.ndarray
    labels: np.ndarray
    mask: np.ndarray


def non_padding_mask(input_ids: np.ndarray, eos_id: int) -> np.ndarray:
    """``[B, L]`` bool: True up to and including each row's first EOS.

    Padding is found by position, not by id: SD 1.x pads with the EOS id itself, and SD 2.x pads with
    id 0, which is also the real token "!".
    """
    is_eos = np.asarray(input_ids) == eos_id
    return np.cumsum(is_eos, axis=1) - is_eos == 0


def protected_positions(input_ids: np.ndarray, sequences: Iterable[Sequence[int]]) -> np.ndarray:
    """``[B, L]`` bool: the positions covered by any occurrence of any of the token-id ``sequences``.

    Sequences are matched whole, so a class noun of several BPE tokens ("teddy bear") is protected
    only where its tokens appear together, and then entirely.
    """
    ids = np.asarray(input_ids)
    covered = np.zeros(ids.shape, bool)
    for sequence in sequences:
        sequence = np.asarray(sequence)
        k = len(sequence)
        if k == 0 or k > ids.shape[1]:
            continue
        windows = np.lib.stride_tricks.sliding_window_view(ids, k, axis=1)  # [B, L-k+1, k]
        starts = (windows == sequence).all(axis=-1)
        for offset in range(k):
            covered[:, offset:offset + starts.shape[1]] |= starts
    return covered


def protected_sequences(tokenizer, phrases: Iterable[str]) -> tuple[tuple[int, ...], ...]:
    """The token ids of each phrase (e.g. ``["<dog6>", "teddy bear"]``) for :func:`mask_tokens`."""
    return tuple(tuple(tokenizer.encode(phrase, add_special_tokens=False)) for phrase in phrases)


def masked_token_bound(num_tokens: int, mask_prob: float, overflow_prob: float = 1e-9) -> int:
    """A static number of masked tokens per batch that a draw exceeds with probability ≤ ``overflow_prob``.

    The count of masked tokens is Binomial(n, p) for n maskable tokens, so this is its upper
    ``overflow_prob`` quantile (at least 1, for the one-token guarantee of :func:`mask_tokens`).
    Pass ``num_tokens = batch size × the most maskable tokens in a prompt``: 75 for any CLIP prompt;
    e.g. 25 prompts × 75 at p = 0.15 give 378 of 1925 positions, and the vocabulary projection runs
    at 378 positions instead of 1925. :func:`mask_tokens` with the same ``max_masked`` drops the rare
    excess, so the buffer of :func:`gather_masked` never overflows.
    """
    return max(1, int(scipy.stats.binom.isf(overflow_prob, num_tokens, mask_prob)))


def mask_tokens(
    input_ids: np.ndarray,
    rng: np.random.Generator,
    *,
    mask_prob: float,
    mask_token_id: int,
    bos_id: int,
    eos_id: int,
    protected: Iterable[Sequence[int]] = (),
    min_masked_per_batch: int = 1,
    max_masked: int | None = None,
) -> MaskedTokens:
    """Masks each maskable BPE token of ``input_ids`` ``[B, L]`` independently with ``mask_prob``.

    Maskable: before the first EOS, not BOS, not inside an occurrence of a ``protected`` sequence.
    The authors protect the concept token and the class noun by comparing whitespace-separated words
    with the class noun, which never matches a class noun of two words ("teddy bear"); matching
    token sequences protects it (and, unlike their rule, also the same tokens ending a longer word).

    Args:
      rng: the source of randomness; masking is deterministic given its state.
      protected: token-id sequences never masked (see :func:`protected_sequences`).
      min_masked_per_batch: if fewer tokens were drawn, more are picked uniformly among the unmasked
        maskable ones, so that the MLM loss always has a target. This changes only batches that drew
        too few, e.g. with probability 0.85^200 ≈ 8e-15 for 200 maskable tokens at p = 0.15.
      max_masked: if more tokens were drawn, a uniformly random subset of ``max_masked`` is kept
        (see :func:`masked_token_bound`); None: no limit.

    Raises:
      ValueError: the batch has fewer than ``min_masked_per_batch`` maskable tokens.
    """
    ids = np.asarray(input_ids)
    maskable = (non_padding_mask(ids, eos_id) & (ids != bos_id) & (ids != eos_id)
                & ~protected_positions(ids, protected))
    mask = maskable & (rng.random(ids.shape) < mask_prob)
    count = int(mask.sum())
    if count < min_masked_per_batch:
        free = np.flatnonzero(maskable & ~mask)
        if count + free.size < min_masked_per_batch:
            raise ValueError(f"the batch has {int(maskable.sum())} maskable token(s), fewer than "
                             f"min_masked_per_batch={min_masked_per_batch}: every token is BOS, EOS, "
                             "padding or protected (concept token / class noun); add context to the prompts")
        mask.flat[rng.choice(free, min_masked_per_batch - count, replace=False)] = True
    elif max_masked is not None and count > max_masked:
        drawn = np.flatnonzero(mask)
        mask.flat[rng.choice(drawn, count - max_masked, replace=False)] = False
    return MaskedTokens(input_ids=np.where(mask, mask_token_id, ids),
                        labels=np.where(mask, ids, IGNORE_INDEX), mask=mask)


def gather_masked(features: jax.Array, mask: jax.Array, max_masked: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The features of the masked positions in a static-size buffer, for jit.

    Args:
      features: ``[B, L, D]``.
      mask: ``[B, L]`` bool.
      max_masked: the buffer size N; masked positions beyond the first N (row-major) are dropped,
        which :func:`mask_tokens` with the same ``max_masked`` rules out.

    Returns:
      ``features [N, D]``, ``positions [N]`` (flat indices into ``B × L``: gather labels with
      ``labels.reshape(-1)[positions]``), and ``valid [N]`` (False for the unused tail, whose
      entries repeat position 0).
    """
    flat_mask = mask.reshape(-1)
    (positions,) = jnp.nonzero(flat_mask, size=max_masked, fill_value=0)
    valid = jnp.arange(max_masked) < flat_mask.sum()
    return features.reshape(-1, features.shape[-1])[positions], positions, valid


def customization_mlm_loss(logits: jax.Array, labels: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy over the masked tokens (``mlm_target='masked'``, PAPER.md §1.4).

    Args:
      logits: ``[N, V]`` at the gathered masked positions.
      labels: ``[N]`` original token ids.
      valid: ``[N]`` bool; invalid entries contribute nothing.

    Returns:
      ``(loss, accuracy)``; both are 0, not NaN, when no entry is valid (the authors' mean over an
      empty selection is NaN).
    """
    safe_labels = jnp.where(valid, labels, 0)
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe_labels)
    count = jnp.maximum(valid.sum(), 1)
    loss = jnp.where(valid, cross_entropy, 0.0).sum() / count
    correct = valid & (jnp.argmax(logits, axis=-1) == safe_labels)
    return loss, correct.sum() / count


def pretraining_mlm_loss(
    logits: jax.Array,
    labels: jax.Array,
    masked: jax.Array,
    non_padding: jax.Array,
    masked_weight: float = 5.0,
    normalization: Literal["all_positions", "non_padding"] = "all_positions",
) -> jax.Array:
    """Weighted cross-entropy over all non-padding tokens (``mlm_target='non_padding'``, PAPER.md §1.3).

    Every non-padding position (BOS, words, EOS) predicts its original token; masked positions weigh
    ``masked_weight`` (the authors' ``mlm_weight = 5``).

    Args:
      logits: ``[B, L, V]``.
      labels: ``[B, L]`` original (unmasked) ids.
      masked: ``[B, L]`` bool.
      non_padding: ``[B, L]`` bool (see :func:`non_padding_mask`).
      normalization: authors' quirk ``"all_positions"`` (default): the sum is divided by B × L, so
        padding adds zeros to the denominator and the loss shrinks with the prompts' length.
        ``"non_padding"`` divides by the number of non-padding positions instead.
    """
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), jnp.where(non_padding, labels, 0))
    weight = jnp.where(non_padding, jnp.where(masked, masked_weight, 1.0), 0.0)
    total = (weight * cross_entropy).sum()
    if normalization == "all_positions":
        return total / cross_entropy.size
    if normalization == "non_padding":
        return total / jnp.maximum(non_padding.sum(), 1)
    raise ValueError(f"normalization={normalization!r}; expected 'all_positions' or 'non_padding'")
