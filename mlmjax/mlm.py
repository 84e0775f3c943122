"""Masked language modelling on prompts: masking (host-side numpy) and the two losses (JAX).

PAPER.md §1.3-1.4. Each BPE token is masked independently with probability ``mask_prob`` and always
replaced by ``[MASK]`` (no 80/10/10 split). Never masked: BOS, EOS, padding, and, during
customization, the concept token and the class noun.

At customization the cross-entropy is needed only at the masked tokens, and the contextualizer's
vocabulary projection is 38M of its 62M parameters, so a train step runs::

    features = contextualizer.apply(p, clip_out, method=Contextualizer.encode)     # [B, L, D]
    selected, positions, valid = gather_masked(features, masked.mask, max_masked)  # [N, D]
    kernel, bias = contextualizer.apply(p, method=Contextualizer.projection)       # [D, V], [V]
    loss, accuracy = customization_mlm_loss(selected, kernel, bias, masked.labels.reshape(-1)[positions], valid)

with the static ``max_masked`` from :func:`masked_token_bound`, also passed to :func:`mask_tokens`
so that the buffer can never overflow. Both losses take features and the projection rather than
logits, because :func:`vocabulary_cross_entropy` never materialises the ``[N, V]`` logits.
"""

from __future__ import annotations

import functools
import math
from typing import Iterable, Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

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


def masked_token_bound(maskable_probs: Sequence[float] | np.ndarray, batch_size: int, mask_prob: float, *,
                       copies: int = 1, overflow_prob: float = 1e-9) -> int:
    """A static number of masked tokens per MLM batch that a batch exceeds with probability ≤ ``overflow_prob``.

    ``maskable_probs[n]`` is the probability that one prompt drawn for the batch has ``n`` maskable
    tokens (:meth:`mlmjax.prompts.PromptSet.count_distribution`); the batch holds ``batch_size``
    independent prompts, each ``copies`` times (XTI: once per concept token), every copy masked
    independently. A prompt with ``n`` maskable tokens then has Binomial(copies · n, p) masked ones, and
    the batch the ``batch_size``-fold convolution of that mixture, whose upper ``overflow_prob``
    quantile this is (at least 1, for the one-token guarantee of :func:`mask_tokens`). Taken from
    every prompt's length rather than the longest one's: 25 prompts of the paper's "nonliving" set
    mask 28.6 tokens on average, and the bound is 67 where the longest prompt's length gave 127
    (CLIP's 75 tokens, 378). :func:`mask_tokens` with the same ``max_masked`` drops the rare excess,
    so the buffer of :func:`gather_masked` never overflows.
    """
    lengths = np.asarray(maskable_probs, np.float64)
    if lengths.ndim != 1 or lengths.size == 0 or np.any(lengths < 0) or not np.isclose(lengths.sum(), 1.0):
        raise ValueError("maskable_probs must be a probability distribution over maskable-token counts")
    # One prompt's masked tokens: a mixture over its length of Binomial(copies · length, p).
    per_prompt = np.zeros(copies * (lengths.size - 1) + 1)
    for n in np.flatnonzero(lengths):
        per_prompt[:copies * n + 1] += lengths[n] * _binomial_pmf(copies * n, mask_prob)
    total = np.ones(1)
    for _ in range(batch_size):
        total = np.convolve(total, per_prompt)
    # P[count > m], summed from the far tail so that 1e-9 is not lost next to probabilities near 1.
    above = np.append(np.cumsum(total[::-1])[::-1][1:], 0.0)
    return max(1, int(np.argmax(above <= overflow_prob)))


def _binomial_pmf(n: int, p: float) -> np.ndarray:
    """``P[Binomial(n, p) = k]`` for ``k = 0..n`` in float64, from log-gammas: scipy.stats, which gave
    it before, took 1.4 s of every training run's start-up to import."""
    k = np.arange(n + 1)
    if p <= 0 or p >= 1:
        return (k == (n if p >= 1 else 0)).astype(np.float64)
    log_choose = math.lgamma(n + 1) - np.array([math.lgamma(i + 1) + math.lgamma(n - i + 1) for i in range(n + 1)])
    return np.exp(log_choose + k * math.log(p) + (n - k) * math.log1p(-p))


def maskable_positions(input_ids: np.ndarray, *, bos_id: int, eos_id: int,
                       protected: Iterable[Sequence[int]] = ()) -> np.ndarray:
    """``[B, L]`` bool: the tokens :func:`mask_tokens` may mask: before the first EOS, not BOS, and not
    inside an occurrence of a ``protected`` sequence."""
    ids = np.asarray(input_ids)
    return (non_padding_mask(ids, eos_id) & (ids != bos_id) & (ids != eos_id)
            & ~protected_positions(ids, protected))


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
    maskable = maskable_positions(ids, bos_id=bos_id, eos_id=eos_id, protected=protected)
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


# The vocabulary cross-entropy, chunked. Its logits ([N, 49409]: 25 MB for the tiny model's 127 masked
# rows, 75 MB at SD 1.5's 378) are written, re-read by max, exp-sum, gather and argmax, and kept for
# the backward pass; on a CPU those passes over memory cost 4-5x the projection's matrix product. So
# the projection runs in vocabulary chunks that stay in cache, folding each into a running max and
# sum (the log-sum-exp of "online softmax"); the backward pass recomputes each chunk's logits instead
# of storing them. A loop, not an unrolled chain, keeps one chunk live at a time; XLA's cost analysis
# counts a loop body once, so FLOP counts come from ``chunk=None`` (see mlmjax.bench_cases).
#
# At customization the projection is frozen and only the features get a gradient,
#     d CE / d features = softmax(logits) @ kernel.T - kernel[:, label].T,
# an "attention" of the features over the vocabulary (queries: features, keys and values: the kernel's
# columns). The forward pass folds it into the same loop, rescaled with the running max exactly as the
# sum is (flash attention's forward), so a step makes one pass of two products per chunk instead of a
# forward pass and a backward pass that recomputes the logits. Which path runs is known when the loss
# is differentiated: ``perturbed`` says whether the kernel and bias take part (jax's symbolic zeros).
DEFAULT_VOCAB_CHUNK = 4096  # 13 chunks of CLIP's vocabulary; 2048 and 8192 were slower on a 2-core CPU


def _chunk_starts(vocab: int, chunk: int) -> jax.Array:
    """Start of each chunk; the last one is moved back to end at ``vocab`` (it overlaps the one
    before, and its overlap is masked), so every slice has the static width ``chunk``."""
    return jnp.minimum(jnp.arange(-(-vocab // chunk)) * chunk, vocab - chunk)


def _chunk_logits(features, kernel, bias, start, index, chunk):
    """``[N, chunk]`` float32 logits of one chunk, ``[chunk]`` their vocabulary ids and the chunk's
    ``[D, chunk]`` kernel slice; on the columns an earlier chunk already covered, the logit is -inf and
    the id -1 (never a label)."""
    columns = start + jnp.arange(chunk)
    fresh = columns >= index * chunk
    w = jax.lax.dynamic_slice_in_dim(kernel, start, chunk, axis=1).astype(features.dtype)
    b = jax.lax.dynamic_slice_in_dim(bias, start, chunk)
    logits = jnp.dot(features, w, preferred_element_type=jnp.float32) + b.astype(jnp.float32)
    return jnp.where(fresh, logits, -jnp.inf), jnp.where(fresh, columns, -1), w


def _chunked_statistics(features, kernel, bias, labels, chunk, expectation=False):
    """Running (max, sum of exp, label logit) over the chunks: log-sum-exp = max + log(sum).

    With ``expectation``, also the softmax-weighted mean of the kernel's columns, ``softmax @ kernel.T``
    ``[N, D]`` float32 (None without)."""
    rows = features.shape[0]

    def fold(carry, xs):
        running_max, running_sum, label_logit, weighted = carry
        start, index = xs
        logits, columns, w = _chunk_logits(features, kernel, bias, start, index, chunk)
        new_max = jnp.maximum(running_max, logits.max(axis=-1))
        rescale = jnp.exp(running_max - new_max)
        unnormalized = jnp.exp(logits - new_max[:, None])
        running_sum = running_sum * rescale + unnormalized.sum(-1)
        if expectation:
            weighted = weighted * rescale[:, None] + jnp.dot(
                unnormalized.astype(features.dtype), w.T, preferred_element_type=jnp.float32)
        hit = columns[None, :] == labels[:, None]
        label_logit = label_logit + jnp.where(hit, logits, 0.0).sum(-1)
        return (new_max, running_sum, label_logit, weighted), None

    starts = _chunk_starts(kernel.shape[1], chunk)
    zeros = jnp.zeros((rows,), jnp.float32)
    weighted = jnp.zeros(features.shape, jnp.float32) if expectation else None
    (maximum, total, label_logit, weighted), _ = jax.lax.scan(
        fold, (jnp.full((rows,), -jnp.inf), zeros, zeros, weighted), (starts, jnp.arange(starts.shape[0])))
    return maximum + jnp.log(total), label_logit, maximum, (weighted / total[:, None] if expectation else None)


class _FeatureGradient(NamedTuple):
    """Residual of a frozen projection: d CE / d features per unit of cotangent, ``[N, D]``, features' dtype."""
    per_unit: jax.Array


class _Inputs(NamedTuple):
    """Residual of a trained projection: what the backward pass recomputes each chunk's logits from."""
    features: jax.Array
    kernel: jax.Array
    bias: jax.Array
    labels: jax.Array
    log_normalizer: jax.Array


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked_cross_entropy(features, kernel, bias, labels, chunk):
    log_normalizer, label_logit, maximum, _ = _chunked_statistics(features, kernel, bias, labels, chunk)
    return log_normalizer - label_logit, label_logit >= maximum


def _chunked_forward(features, kernel, bias, labels, chunk):
    """The forward rule (symbolic zeros: each argument comes with ``perturbed``, whether it is differentiated)."""
    frozen = not (kernel.perturbed or bias.perturbed)
    features, kernel, bias, labels = features.value, kernel.value, bias.value, labels.value
    log_normalizer, label_logit, maximum, expected = _chunked_statistics(
        features, kernel, bias, labels, chunk, expectation=frozen)
    outputs = (log_normalizer - label_logit, label_logit >= maximum)
    if frozen:
        label_columns = jnp.take(kernel, labels, axis=1).T.astype(jnp.float32)  # [N, D]
        return outputs, _FeatureGradient((expected - label_columns).astype(features.dtype))
    return outputs, _Inputs(features, kernel, bias, labels, log_normalizer)


def _chunked_backward(chunk, residuals, cotangents):
    ce_cotangent = cotangents[0]
    if isinstance(residuals, _FeatureGradient):
        per_unit = residuals.per_unit
        d_features = per_unit.astype(jnp.float32) * _dense(ce_cotangent, per_unit.shape[:1])[:, None]
        return d_features.astype(per_unit.dtype), None, None, None
    features, kernel, bias, labels, log_normalizer = residuals
    ce_cotangent = _dense(ce_cotangent, labels.shape)

    def accumulate(carry, xs):
        d_features, d_kernel, d_bias = carry
        start, index = xs
        logits, columns, w = _chunk_logits(features, kernel, bias, start, index, chunk)
        # d CE / d logits = softmax - one_hot(label); the masked overlap has softmax 0 and no label.
        d_logits = (jnp.exp(logits - log_normalizer[:, None])
                    - (columns[None, :] == labels[:, None])) * ce_cotangent[:, None]
        d_features = d_features + jnp.dot(d_logits.astype(features.dtype), w.T, preferred_element_type=jnp.float32)
        # Kernel and bias gradients (pretraining); a frozen projection's are dead code that jit drops.
        d_w = jnp.dot(features.T, d_logits.astype(features.dtype), preferred_element_type=jnp.float32)
        d_kernel = jax.lax.dynamic_update_slice_in_dim(
            d_kernel, jax.lax.dynamic_slice_in_dim(d_kernel, start, chunk, axis=1) + d_w, start, axis=1)
        d_bias = jax.lax.dynamic_update_slice_in_dim(
            d_bias, jax.lax.dynamic_slice_in_dim(d_bias, start, chunk) + d_logits.sum(0), start, axis=0)
        return (d_features, d_kernel, d_bias), None

    starts = _chunk_starts(kernel.shape[1], chunk)
    init = (jnp.zeros(features.shape, jnp.float32), jnp.zeros(kernel.shape, jnp.float32),
            jnp.zeros(bias.shape, jnp.float32))
    (d_features, d_kernel, d_bias), _ = jax.lax.scan(accumulate, init, (starts, jnp.arange(starts.shape[0])))
    return (d_features.astype(features.dtype), d_kernel.astype(kernel.dtype), d_bias.astype(bias.dtype),
            np.zeros(labels.shape, jax.dtypes.float0))


def _dense(cotangent, shape) -> jax.Array:
    """A float32 cotangent, zeros for a symbolic zero (an output nothing was differentiated through)."""
    if isinstance(cotangent, jax.custom_derivatives.SymbolicZero):
        return jnp.zeros(shape, jnp.float32)
    return cotangent.astype(jnp.float32)


_chunked_cross_entropy.defvjp(_chunked_forward, _chunked_backward, symbolic_zeros=True)


def vocabulary_cross_entropy(features: jax.Array, kernel: jax.Array, bias: jax.Array, labels: jax.Array,
                             chunk: int | None = DEFAULT_VOCAB_CHUNK) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy of the projection ``features @ kernel + bias`` against ``labels``, per row.

    Args:
      features: ``[N, D]``, in the computation dtype (the product accumulates in float32).
      kernel, bias: the vocabulary projection, ``[D, V]`` and ``[V]``.
      labels: ``[N]`` ids in ``[0, V)`` (callers replace ignored ones by 0 and mask them out).
      chunk: vocabulary columns per chunk (see the comment above); None: one plain ``[N, V]`` product.

    Returns:
      ``(cross_entropy [N] float32, label_is_top [N] bool)``; ``label_is_top`` is the top-1 hit
      (the label's logit is the largest; a tie counts as a hit).
    """
    if chunk is not None and chunk < kernel.shape[1]:
        return _chunked_cross_entropy(features, kernel, bias, labels, chunk)
    logits = jnp.dot(features, kernel.astype(features.dtype), preferred_element_type=jnp.float32)
    logits = logits + bias.astype(jnp.float32)
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    return jax.nn.logsumexp(logits, axis=-1) - label_logit, label_logit >= logits.max(axis=-1)


def customization_mlm_loss(features: jax.Array, kernel: jax.Array, bias: jax.Array, labels: jax.Array,
                           valid: jax.Array, chunk: int | None = DEFAULT_VOCAB_CHUNK) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy over the masked tokens (``mlm_target='masked'``, PAPER.md §1.4).

    Args:
      features: ``[N, D]`` contextualizer features at the gathered masked positions.
      kernel, bias: its vocabulary projection (:meth:`Contextualizer.projection`).
      labels: ``[N]`` original token ids.
      valid: ``[N]`` bool; invalid entries contribute nothing.
      chunk: see :func:`vocabulary_cross_entropy`.

    Returns:
      ``(loss, accuracy)``; both are 0, not NaN, when no entry is valid (the authors' mean over an
      empty selection is NaN).
    """
    cross_entropy, is_top = vocabulary_cross_entropy(features, kernel, bias, jnp.where(valid, labels, 0), chunk)
    count = jnp.maximum(valid.sum(), 1)
    return jnp.where(valid, cross_entropy, 0.0).sum() / count, (valid & is_top).sum() / count


def pretraining_mlm_loss(
    features: jax.Array,
    kernel: jax.Array,
    bias: jax.Array,
    labels: jax.Array,
    masked: jax.Array,
    non_padding: jax.Array,
    masked_weight: float = 5.0,
    normalization: Literal["all_positions", "non_padding"] = "all_positions",
    chunk: int | None = DEFAULT_VOCAB_CHUNK,
) -> tuple[jax.Array, jax.Array]:
    """Weighted cross-entropy over all non-padding tokens (``mlm_target='non_padding'``, PAPER.md §1.3).

    Every non-padding position (BOS, words, EOS) predicts its original token; masked positions weigh
    ``masked_weight`` (the authors' ``mlm_weight = 5``).

    Args:
      features: ``[B, L, D]`` contextualizer features.
      kernel, bias: its vocabulary projection (:meth:`Contextualizer.projection`).
      labels: ``[B, L]`` original (unmasked) ids.
      masked: ``[B, L]`` bool.
      non_padding: ``[B, L]`` bool (see :func:`non_padding_mask`).
      normalization: authors' quirk ``"all_positions"`` (default): the sum is divided by B × L, so
        padding adds zeros to the denominator and the loss shrinks with the prompts' length.
        ``"non_padding"`` divides by the number of non-padding positions instead.
      chunk: see :func:`vocabulary_cross_entropy`.

    Returns:
      ``(loss, accuracy)``, the accuracy being the top-1 hit rate at the masked positions.
    """
    if normalization not in ("all_positions", "non_padding"):
        raise ValueError(f"normalization={normalization!r}; expected 'all_positions' or 'non_padding'")
    cross_entropy, is_top = vocabulary_cross_entropy(
        features.reshape(-1, features.shape[-1]), kernel, bias, jnp.where(non_padding, labels, 0).reshape(-1), chunk)
    weight = jnp.where(non_padding, jnp.where(masked, masked_weight, 1.0), 0.0).reshape(-1)
    total = (weight * cross_entropy).sum()
    denominator = cross_entropy.size if normalization == "all_positions" else jnp.maximum(non_padding.sum(), 1)
    accuracy = (masked.reshape(-1) & is_top).sum() / jnp.maximum(masked.sum(), 1)
    return total / denominator, accuracy
