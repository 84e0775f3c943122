"""Scaled dot-product attention that never holds the whole score matrix at Stable Diffusion sizes.

At 512 px the UNet's first self-attention compares 4096 queries with 4096 keys per head; holding all
scores (and keeping them for the backward pass) cost the old diffusers Flax UNet tens of GB. Here the
queries are processed in chunks, so the forward pass holds one chunk of scores at a time and keeps only
the output and each query's log-normaliser; the backward pass makes each chunk's scores again and
takes its gradients from those (FlashAttention's backward pass, chunked over queries only). On a CPU the
chunks also go one head at a time, so that a chunk's scores stay in cache.

On a GPU, bfloat16/float16 attention whose head width cuDNN takes goes to cuDNN's fused kernel
instead (``jax.nn.dot_product_attention(implementation="cudnn")``), which keeps the scores on chip.
``implementation(name)`` overrides the choice while a function is traced: ``"whole"`` holds every
score matrix whole, which is what a FLOP count of the model wants (XLA's cost analysis counts the
body of the chunk loop once, so a chunked step's count misses all but one chunk).
"""

from __future__ import annotations

import contextlib
import functools
import threading

import jax
import jax.numpy as jnp

# Score-matrix entries (queries × keys, per batch element and head) above which the scores are made
# chunk by chunk and never kept (the backward pass makes them again): 2^18 covers SD 1.5's 1024-token
# self-attention, whose kept scores held 1.3 GB of an SD 1.5 TI step at batch 4.
DEFAULT_MAX_SCORES = 1 << 18
# Largest chunk, in the same units. Smaller chunks only add loop iterations: on a 2-core CPU SD 1.5's
# 4096-token self-attention (8 heads of 40, batch 1) ran forward in 363 ms with 256-query chunks
# against 419 ms with 64 (and 671 ms before the heads moved ahead of the positions, below).
DEFAULT_CHUNK_SCORES = 1 << 20

# "auto": cuDNN's fused kernel where it applies (see _cudnn_applies), else whole below max_scores and
# chunked above; "chunked" never uses cuDNN; "whole" never chunks; "cudnn" always (a GPU only).
IMPLEMENTATIONS = ("auto", "chunked", "whole", "cudnn")
# cuDNN's fused attention: half-precision inputs, head width a multiple of 8 up to 128 (its limits in
# jax's cudnn wrapper); SD 1.5's 4096- and 1024-token self-attentions (widths 40 and 80) qualify.
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
_CUDNN_MAX_HEAD_WIDTH = 128
_choice = threading.local()


@contextlib.contextmanager
def implementation(name: str):
    """Within the block, attention traced in this thread uses ``name`` (one of ``IMPLEMENTATIONS``).

    The choice is read while tracing and is not part of JAX's trace caches: a function already traced
    for the same arguments, even wrapped by a new ``jax.jit``, keeps what it was traced with. Trace a
    new function inside the block, e.g. ``def whole_step(*a): return step(*a)``, then
    ``jax.jit(whole_step).lower(...).cost_analysis()``.
    """
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {name!r}: choose from {', '.join(IMPLEMENTATIONS)}")
    previous = getattr(_choice, "name", "auto")
    _choice.name = name
    try:
        yield
    finally:
        _choice.name = previous


def current_implementation() -> str:
    """The implementation attention traced now uses (``"auto"`` outside any ``implementation`` block)."""
    return getattr(_choice, "name", "auto")


def _cudnn_applies(q, k, mask) -> bool:
    # Its backward pass also wants even sequence lengths (jax 0.11, cuDNN 9.19): not the 77 text tokens.
    return (jax.default_backend() == "gpu" and mask is None and q.dtype in _CUDNN_DTYPES
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= _CUDNN_MAX_HEAD_WIDTH
            and q.shape[1] % 2 == 0 and k.shape[1] % 2 == 0)


def _largest_divisor_at_most(n: int, limit: int) -> int:
    for candidate in range(max(1, min(n, limit)), 0, -1):
        if n % candidate == 0:
            return candidate
    return 1


def _scores(q, k, mask, upcast: bool) -> jax.Array:
    """Scaled, masked scores ``[B, H, Lq, Lk]`` in float32 from heads-first q ``[B, H, Lq, D]``, k ``[B, H, Lk, D]``."""
    if upcast:
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    scores = _query_key_product(q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype), k)
    return scores if mask is None else jnp.where(mask, scores, jnp.finfo(jnp.float32).min)


def _transposed_product(x, weights):
    """``(weightsᵀ·x)ᵀ``, ``[B, H, D, Lk]``, for x ``[B, H, Lq, D]`` and weights ``[B, H, Lq, Lk]``: the
    gradient of k or v, transposed.

    XLA's CPU backend runs a product whose output rows are short (``D`` wide: 40 in SD 1.5's largest
    attention) 3-4× slower than the same product with its output transposed: weightsᵀ·x for a chunk of
    SD 1.5's 4096-token attention (32 heads × 256 queries) in 99 ms, xᵀ·weights in 25 (2-core CPU)."""
    return jnp.einsum("bhqd,bhqk->bhdk", x, weights, preferred_element_type=jnp.float32)


@jax.custom_vjp
def _query_key_product(q, k):
    """q·kᵀ ``[B, H, Lq, Lk]`` in float32; autodiff would make k's gradient the slow way round."""
    return jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)


def _query_key_gradients(q, k, d_scores):
    """The gradients of q·kᵀ from the scores' gradient, in float32: q's ``[B, H, Lq, D]`` and k's transposed,
    ``[B, H, D, Lk]`` (:func:`_transposed_product`)."""
    d_scores = d_scores.astype(q.dtype)
    dq = jnp.einsum("bhqk,bhkd->bhqd", d_scores, k, preferred_element_type=jnp.float32)
    return dq, _transposed_product(q, d_scores)


def _query_key_product_backward(residuals, d_scores):
    q, k = residuals
    dq, dk_transposed = _query_key_gradients(q, k, d_scores)
    return dq.astype(q.dtype), jnp.swapaxes(dk_transposed, 2, 3).astype(k.dtype)


_query_key_product.defvjp(lambda q, k: (_query_key_product(q, k), (q, k)), _query_key_product_backward)


def _row_max(x: jax.Array, width: int = 16) -> jax.Array:
    """``x.max(axis=-1)``, halving the rows with element-wise maxima down to ``width`` columns first.

    XLA's CPU backend turns a long row reduction into a reduce-window it runs at about 1.2 G elements/s,
    where element-wise maxima of the two halves fuse into one vectorised pass: the max of SD 1.5's
    [32, 1024, 4096] scores chunk in 27 ms instead of 96 (2-core CPU)."""
    while x.shape[-1] > width and x.shape[-1] % 2 == 0:
        half = x.shape[-1] // 2
        x = jnp.maximum(x[..., :half], x[..., half:])
    return x.max(axis=-1)


def _softmax_times_values(scores, v, last_column_ones: bool = False):
    """``(softmax(scores)·v, logsumexp(scores))``, normalising the ``[.., Lq, D]`` output rather than
    the ``[.., Lq, Lk]`` scores: one pass less over the largest tensor. On a CPU the contextualizer's
    attention (25 × 77 tokens, 4 heads of 8) runs forward in 1.6 ms instead of 2.6 (forward and
    backward: 4.4 instead of 4.6). The max is only a shift that cancels, so it needs no gradient.

    ``last_column_ones``: v ends with a column of ones (:func:`_with_ones_column`), so the weights' row
    sums come out of the product with v instead of a pass of their own over the scores. XLA's CPU
    backend reduces long rows slowly; for a chunk of SD 1.5's 4096-token attention this is faster, for
    77 tokens slower."""
    top = jax.lax.stop_gradient(_row_max(scores))[..., None]
    weights = jnp.exp(scores - top)
    out = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    if last_column_ones:
        out, total = out[..., :-1], out[..., -1:]
    else:
        total = weights.sum(axis=-1, keepdims=True)
    return (out / total).astype(v.dtype), (top + jnp.log(total))[..., 0]


def _with_ones_column(v):
    return jnp.concatenate([v, jnp.ones((*v.shape[:-1], 1), v.dtype)], axis=-1)


def _attend(q, k, v, mask, upcast: bool):
    """Attention on heads-first arrays: q ``[B, H, Lq, D]``, k/v ``[B, H, Lk, D]`` → ``[B, H, Lq, D]``."""
    return _softmax_times_values(_scores(q, k, mask, upcast), v)[0]


def _chunk(x, index, size, axis):
    return None if x is None else jax.lax.dynamic_slice_in_dim(x, index * size, size, axis=axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attend_in_chunks(q, k, v, mask, chunk: int, upcast: bool):
    """:func:`_attend` one chunk of ``chunk`` queries at a time, with FlashAttention's backward pass."""
    return _attend_in_chunks_forward(q, k, v, mask, chunk, upcast)[0]


def _attend_in_chunks_forward(q, k, v, mask, chunk, upcast):
    v_and_ones = _with_ones_column(v)  # once for all chunks

    def one_chunk(index):
        scores = _scores(_chunk(q, index, chunk, 2), k, _chunk(mask, index, chunk, -2), upcast)
        return _softmax_times_values(scores, v_and_ones, last_column_ones=True)

    out, logsumexp = jax.lax.map(one_chunk, jnp.arange(q.shape[2] // chunk))  # [chunks, B, H, chunk, (D)]
    out, logsumexp = (jnp.moveaxis(x, 0, 2).reshape(*x.shape[1:3], -1, *x.shape[4:]) for x in (out, logsumexp))
    return out, (q, k, v, mask, out, logsumexp)


def _attend_in_chunks_backward(chunk, upcast, residuals, g):
    """The gradients from the output and the softmax's log-normaliser alone, chunk by chunk: each chunk's
    scores are made once more and give its weights directly (``exp(s - logsumexp)``), with no pass for
    their max or sum and no product with v, which the autodiff of a checkpointed forward pass repeats."""
    q, k, v, mask, out, logsumexp = residuals
    scale = q.shape[-1] ** -0.5
    # d softmax: P ∘ (dP - rowsum(dO ∘ O)), since rowsum(P ∘ dP) = dO · O.
    g_dot_out = jnp.einsum("bhqd,bhqd->bhq", g, out, preferred_element_type=jnp.float32)

    def one_chunk(carry, index):
        dk, dv = carry
        q_c, g_c = _chunk(q, index, chunk, 2), _chunk(g, index, chunk, 2)
        weights = jnp.exp(_scores(q_c, k, _chunk(mask, index, chunk, -2), upcast)
                          - _chunk(logsumexp, index, chunk, 2)[..., None])
        dv = dv + _transposed_product(g_c, weights.astype(g.dtype))
        d_weights = jnp.einsum("bhqd,bhkd->bhqk", g_c, v, preferred_element_type=jnp.float32)
        d_scores = weights * (d_weights - _chunk(g_dot_out, index, chunk, 2)[..., None])
        dq, dk_transposed = _query_key_gradients(q_c, k, d_scores)
        return (dk + dk_transposed * scale, dv), dq * scale

    zeros = jnp.zeros(jnp.swapaxes(k, 2, 3).shape, jnp.float32)  # dk and dv transposed, as they accumulate
    (dk, dv), dq = jax.lax.scan(one_chunk, (zeros, zeros), jnp.arange(q.shape[2] // chunk))
    dq = jnp.moveaxis(dq, 0, 2).reshape(q.shape)
    dk, dv = (jnp.swapaxes(x, 2, 3) for x in (dk, dv))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attend_in_chunks.defvjp(_attend_in_chunks_forward, _attend_in_chunks_backward)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    upcast: bool = False,
    max_scores: int = DEFAULT_MAX_SCORES,
    chunk_scores: int = DEFAULT_CHUNK_SCORES,
    head_by_head: bool | None = None,
) -> jax.Array:
    """softmax(q·kᵀ/√d)·v for q ``[B, Lq, H, D]``, k/v ``[B, Lk, H, D]`` → ``[B, Lq, H, D]``.

    Args:
      mask: boolean, broadcastable to ``[B, H, Lq, Lk]``; False entries are excluded.
      upcast: compute the scores in float32 even for bf16/fp16 inputs (SD 2.x ``upcast_attention``).
        The softmax is always float32.
      max_scores: largest ``Lq × Lk`` held whole; above it the queries are split into chunks whose
        scores the backward pass makes again (FlashAttention's backward pass) instead of keeping them.
      chunk_scores: largest ``chunk × Lk`` of one such chunk.
      head_by_head: chunked attention loops over the heads too, the whole batch at once (None: on a
        CPU, where a chunk's scores then stay in cache; an accelerator takes all heads in each chunk).

    Which of these runs is ``implementation``'s choice (module docstring); cuDNN takes no mask and
    no ``upcast`` (its scores accumulate in float32 anyway).
    """
    name = current_implementation()
    if name == "cudnn":
        if mask is not None:
            raise ValueError("attention implementation 'cudnn' takes no mask; use 'auto'")
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    if name == "auto" and _cudnn_applies(q, k, mask):
        try:
            return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
        except (NotImplementedError, ValueError, RuntimeError):  # refused while tracing: XLA's path.
            pass  # (What jax checks only when differentiating, _cudnn_applies must rule out itself.)
    q_len, k_len = q.shape[1], k.shape[1]
    # Heads ahead of positions, once for the whole layer: every chunk's two products then read
    # contiguous [L, D] blocks instead of transposing k and v again in each of its iterations.
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    if q_len * k_len <= max_scores or name == "whole":
        return jnp.swapaxes(_attend(q, k, v, mask, upcast), 1, 2)
    chunk = _largest_divisor_at_most(q_len, max(1, chunk_scores // k_len))
    if mask is not None:
        mask = jnp.broadcast_to(mask, (*mask.shape[:-2], q_len, k_len))
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)  # [B or 1, H or 1, Lq, Lk]
    if head_by_head is None:
        head_by_head = jax.default_backend() == "cpu"
    attend = _attend_head_by_head if head_by_head else _attend_in_chunks
    return jnp.swapaxes(attend(q, k, v, mask, chunk, upcast), 1, 2)


def _attend_head_by_head(q, k, v, mask, chunk, upcast):
    """:func:`_attend_in_chunks` one head at a time, the whole batch at once.

    On a CPU a chunk's scores for one head (SD 1.5's 4096-token attention at batch 4: [4, 256, 4096],
    16 MB) stay in cache between the operations that make and read them, where all 8 heads' (128 MB) do
    not: forward and backward 3.64 → 2.92 s, the forward alone 2.07 → 1.17 s (2-core CPU). The batch
    stays inside the loop so that a batch split over devices stays split."""
    per_head = lambda x: jnp.moveaxis(x, 1, 0)[:, :, None]  # noqa: E731  [H, B, 1, L, D]
    mask_per_head = mask is not None and mask.shape[1] > 1

    def one_head(head):
        q, k, v, head_mask = head
        return _attend_in_chunks(q, k, v, head_mask if mask_per_head else mask, chunk, upcast)

    heads = (per_head(q), per_head(k), per_head(v), per_head(mask) if mask_per_head else None)
    return jnp.moveaxis(jax.lax.map(one_head, heads)[:, :, 0], 0, 1)
