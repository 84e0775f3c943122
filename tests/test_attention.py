"""The chunked attention equals plain softmax attention, forward and backward, masked or not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlmjax.models import attention


def _plain(q, k, v, mask=None):
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        scores = jnp.where(mask, scores, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)


def _inputs(q_len=24, k_len=20, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = 3 * jax.random.normal(keys[0], (2, q_len, 3, 8))  # large scores: the max shift matters
    k = 3 * jax.random.normal(keys[1], (2, k_len, 3, 8))
    v = jax.random.normal(keys[2], (2, k_len, 3, 8))
    mask = jax.random.bernoulli(keys[3], 0.7, (2, 1, q_len, k_len)).at[..., 0].set(True)
    return q, k, v, mask


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("max_scores, chunk_scores", [(10**6, 10**6), (100, 100), (100, 60), (100, 1)])
def test_attention_in_chunks_equals_plain_softmax_with_gradients(masked, max_scores, chunk_scores):
    q, k, v, mask = _inputs()
    mask = mask if masked else None
    # 24 queries × 20 keys: whole; 5-query chunks (100 // 20); 3-query chunks (60 // 20); one query at a time.
    ours = lambda q, k, v: attention.dot_product_attention(  # noqa: E731
        q, k, v, mask=mask, max_scores=max_scores, chunk_scores=chunk_scores)
    reference = lambda q, k, v: _plain(q, k, v, mask)  # noqa: E731
    np.testing.assert_allclose(ours(q, k, v), reference(q, k, v), rtol=2e-5, atol=2e-6)
    cotangent = jax.random.normal(jax.random.key(9), q.shape)
    grads = jax.vjp(ours, q, k, v)[1](cotangent)
    expected = jax.vjp(reference, q, k, v)[1](cotangent)
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)


def test_chunk_is_the_largest_divisor_of_the_queries_within_the_budget():
    assert attention._largest_divisor_at_most(4096, (1 << 20) // 4096) == 256
    assert attention._largest_divisor_at_most(24, 7) == 6
    assert attention._largest_divisor_at_most(13, 5) == 1  # a prime length: one query at a time
    assert attention._largest_divisor_at_most(8, 0) == 1


def test_bfloat16_inputs_keep_a_float32_softmax():
    q, k, v, _ = _inputs()
    out = attention.dot_product_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
                                          max_scores=100, chunk_scores=100, upcast=True)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), _plain(q, k, v), atol=0.08)
