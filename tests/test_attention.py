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


def _assert_equals_plain_softmax(q, k, v, mask, **sizes):
    """Output and the gradients of q, k and v, against plain softmax attention."""
    ours = lambda q, k, v: attention.dot_product_attention(q, k, v, mask=mask, **sizes)  # noqa: E731
    reference = lambda q, k, v: _plain(q, k, v, mask)  # noqa: E731
    np.testing.assert_allclose(ours(q, k, v), reference(q, k, v), rtol=2e-5, atol=2e-6)
    cotangent = jax.random.normal(jax.random.key(9), q.shape)
    for got, want in zip(jax.vjp(ours, q, k, v)[1](cotangent), jax.vjp(reference, q, k, v)[1](cotangent)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("max_scores, chunk_scores", [(10**6, 10**6), (100, 100), (100, 60), (100, 1)])
@pytest.mark.parametrize("head_by_head", [False, True])
def test_attention_in_chunks_equals_plain_softmax_with_gradients(masked, max_scores, chunk_scores, head_by_head):
    q, k, v, mask = _inputs()
    mask = mask if masked else None
    # 24 queries × 20 keys: whole; 4-query chunks (divisors of 24 up to 100 // 20); 3-query chunks (60 // 20);
    # one query at a time. Chunks take all 3 heads at once or go one head at a time.
    _assert_equals_plain_softmax(q, k, v, mask, max_scores=max_scores, chunk_scores=chunk_scores,
                                 head_by_head=head_by_head)


@pytest.mark.parametrize("mask_shape", [(2, 3, 24, 20), (3, 24, 20), (24, 20)])
def test_head_by_head_takes_masks_per_head_or_shared(mask_shape):
    q, k, v, _ = _inputs()
    mask = jax.random.bernoulli(jax.random.key(5), 0.7, mask_shape).at[..., 0].set(True)
    _assert_equals_plain_softmax(q, k, v, mask, max_scores=100, chunk_scores=100, head_by_head=True)


@pytest.mark.parametrize("head_by_head", [None, False, True])
def test_chunked_attention_goes_head_by_head_on_a_cpu(head_by_head):
    q, k, v, _ = _inputs()
    jaxpr = jax.make_jaxpr(lambda q, k, v: attention.dot_product_attention(
        q, k, v, max_scores=100, chunk_scores=100, head_by_head=head_by_head))(q, k, v).jaxpr
    by_head = head_by_head if head_by_head is not None else jax.default_backend() == "cpu"
    # 3 heads, each of 6 chunks of 4 queries; or 6 chunks of all heads.
    assert [eqn.params["length"] for eqn in _equations(jaxpr, "scan")] == ([3, 6] if by_head else [6])


@pytest.mark.parametrize("width", [1, 16, 17, 20, 64, 96, 4096])
def test_row_max_halving_the_rows_is_the_max(width):
    x = jax.random.normal(jax.random.key(width), (3, 5, width))
    x = x.at[0].set(jnp.finfo(jnp.float32).min).at[1, :, -1].set(40.0)  # masked rows; a max in the last column
    np.testing.assert_array_equal(attention._row_max(x), x.max(axis=-1))


@pytest.mark.parametrize("masked", [False, True])
def test_chunks_whose_row_sums_come_from_the_product_with_v(masked):
    """64 keys: the row max halves the scores to 16 columns, and each chunk's row sums ride along in the
    product with v (a column of ones), as at SD 1.5's 4096 tokens."""
    q, k, v, mask = _inputs(q_len=32, k_len=64, seed=3)
    mask = mask if masked else None
    _assert_equals_plain_softmax(q, k, v, mask, max_scores=64, chunk_scores=8 * 64)


def _equations(jaxpr, primitive):
    """Every equation of a jaxpr applying ``primitive``, inside loops, custom rules and nested jits too."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == primitive:
            yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
                if hasattr(sub, "eqns"):
                    yield from _equations(sub, primitive)


@pytest.mark.parametrize("max_scores", [10**6, 100])
def test_gradients_of_k_and_v_are_made_with_their_heads_width_leading(max_scores):
    """The backward pass's products over the queries (k's and v's gradients) put the keys last in their
    output, [.., D, Lk], and never the head width (XLA's CPU backend runs those 3-4× slower): whole
    attention, whose autodiff would make k's gradient [.., Lk, D], and chunked."""
    q, k, v, _ = _inputs()  # 24 queries, 20 keys, heads of 8
    loss = lambda q, k, v: attention.dot_product_attention(  # noqa: E731
        q, k, v, max_scores=max_scores, chunk_scores=100).sum()  # chunked: 4 queries at a time
    grad = jax.make_jaxpr(jax.grad(loss, argnums=(1, 2)))(q, k, v).jaxpr
    over_queries = [eqn for eqn in _equations(grad, "dot_general")
                    if all(eqn.invars[side].aval.shape[dims[0]] in (24, 4) for side, dims in
                           enumerate(eqn.params["dimension_numbers"][0]) if dims)]
    assert len(over_queries) == 2  # k's gradient and v's
    assert [eqn.outvars[0].aval.shape[-2:] for eqn in over_queries] == [(8, 20)] * 2


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


def _chunked_and_whole(q, k, v, mask):
    def run(name):
        def f(q, k, v):
            with attention.implementation(name):
                return attention.dot_product_attention(q, k, v, mask=mask, max_scores=100, chunk_scores=100)
        return f

    return run("auto"), run("whole")


@pytest.mark.parametrize("masked", [False, True])
def test_whole_implementation_never_chunks_and_computes_the_same(masked):
    q, k, v, mask = _inputs()
    chunked, whole = _chunked_and_whole(q, k, v, mask if masked else None)
    np.testing.assert_allclose(whole(q, k, v), chunked(q, k, v), rtol=2e-5, atol=2e-6)
    cotangent = jax.random.normal(jax.random.key(3), q.shape)
    for got, want in zip(jax.vjp(whole, q, k, v)[1](cotangent), jax.vjp(chunked, q, k, v)[1](cotangent)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)
    # XLA's cost analysis counts a loop's body once: the chunked forward (5 chunks of 5 queries) reads as
    # a fifth of the products; the whole one as all of them, 2·2·B·H·Lq·Lk·D.
    flops = {name: jax.jit(f).lower(q, k, v).cost_analysis()["flops"] for name, f in zip(("chunked", "whole"),
                                                                                            (chunked, whole))}
    products = 4 * 2 * 3 * 24 * 20 * 8
    assert products <= flops["whole"] < 1.2 * products
    assert flops["chunked"] < 0.4 * flops["whole"]


def test_a_new_function_traced_in_the_block_gets_the_implementation():
    q, k, v, _ = _inputs()

    def f(q):
        return attention.dot_product_attention(q, k, v, max_scores=100, chunk_scores=100)

    chunked = jax.jit(f).lower(q).cost_analysis()["flops"]  # f's trace is now in JAX's caches
    with attention.implementation("whole"):
        fresh = jax.jit(lambda q: f(q)).lower(q).cost_analysis()["flops"]
    assert fresh > 3 * chunked


def test_implementation_is_scoped_and_checked():
    assert attention.current_implementation() == "auto"
    with attention.implementation("whole"):
        with attention.implementation("chunked"):
            assert attention.current_implementation() == "chunked"
        assert attention.current_implementation() == "whole"
    assert attention.current_implementation() == "auto"
    with pytest.raises(ValueError, match="'fast': choose from auto, chunked, whole, cudnn"):
        with attention.implementation("fast"):
            pass
    q, k, v, mask = _inputs()
    with attention.implementation("cudnn"), pytest.raises(ValueError, match="takes no mask"):
        attention.dot_product_attention(q, k, v, mask=mask)


def test_auto_uses_cudnn_only_for_half_precision_on_a_gpu():
    q = jnp.zeros((1, 16, 2, 40), jnp.bfloat16)
    on_gpu = jax.default_backend() == "gpu"
    assert attention._cudnn_applies(q, q, None) == on_gpu
    assert not attention._cudnn_applies(q.astype(jnp.float32), q, None)
    assert not attention._cudnn_applies(q, q, jnp.ones((1, 1, 16, 16), bool))
    assert not attention._cudnn_applies(q, jnp.zeros((1, 77, 2, 40), jnp.bfloat16), None)  # odd: the text tokens
    wide, odd_width = (jnp.zeros((1, 16, 2, width), jnp.bfloat16) for width in (160, 36))
    assert not attention._cudnn_applies(wide, wide, None)  # wider than 128
    assert not attention._cudnn_applies(odd_width, odd_width, None)  # not a multiple of 8


def _relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's fused attention runs on a CUDA GPU only")
@pytest.mark.parametrize("q_len, k_len, width", [(4096, 4096, 40), (1024, 1024, 80), (256, 78, 64)])
def test_auto_runs_cudnn_on_a_gpu_and_matches_float32_attention(q_len, k_len, width):
    """SD 1.5's self- and cross-attention shapes in bfloat16: cuDNN's kernel is the one compiled, and its
    output and gradients are within bfloat16 rounding (≤ 1e-2 relative L2) of float32 whole attention."""
    keys = jax.random.split(jax.random.key(q_len + k_len), 4)
    q = jax.random.normal(keys[0], (2, q_len, 8, width))
    k, v = (jax.random.normal(key, (2, k_len, 8, width)) for key in keys[1:3])
    cotangent = jax.random.normal(keys[3], q.shape)

    def run(name, dtype):
        def f(q, k, v):
            with attention.implementation(name):
                return attention.dot_product_attention(q, k, v).astype(jnp.float32)
        args = [x.astype(dtype) for x in (q, k, v)]
        out, vjp = jax.vjp(jax.jit(f), *args)
        return out, vjp(cotangent), jax.jit(f).lower(*args).compile().as_text()

    fused, fused_grads, fused_hlo = run("auto", jnp.bfloat16)
    reference, reference_grads, _ = run("whole", jnp.float32)
    assert "cudnn" in fused_hlo.lower()
    assert _relative_error(fused, reference) <= 1e-2
    for got, want in zip(fused_grads, reference_grads):
        assert _relative_error(got, want) <= 1e-2
