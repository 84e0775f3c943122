"""Masking (as properties over many draws, with the real CLIP tokenizer) and the MLM losses (by hand)."""

import fractions
import itertools
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mlmjax import mlm
from mlmjax import tokenizer as tokenizer_lib

LN2, LN4, LN6 = math.log(2), math.log(4), math.log(6)
# Jitted as in a train step (and one compilation each instead of one per operation).
gather_masked = jax.jit(mlm.gather_masked, static_argnums=2)
customization_mlm_loss = jax.jit(mlm.customization_mlm_loss, static_argnames="chunk")
pretraining_mlm_loss = jax.jit(mlm.pretraining_mlm_loss, static_argnames=("normalization", "chunk"))


def identity_projection(vocab: int) -> tuple[jax.Array, jax.Array]:
    """A projection that passes features through, so that by-hand logits can be fed as features."""
    return jnp.eye(vocab), jnp.zeros(vocab)
# Each holds "<teddy1> teddy bear" exactly once; some also hold "teddy" or "bear" alone, which are
# ordinary words there and may be masked.
PROMPTS = [
    "a photo of a <teddy1> teddy bear",
    "a rendering of a <teddy1> teddy bear with the eiffel tower in the background",
    "a close-up photo of the <teddy1> teddy bear wearing a red santa hat",
    "a chef is hugging <teddy1> teddy bear",
    "<teddy1> teddy bear next to a brown bear in a snowy forest",
    "<teddy1> teddy bear captured in the ukiyo-e style",
    "a teddy who looks like <teddy1> teddy bear, on a wooden floor",
    "<teddy1> teddy bear",
]


@pytest.fixture(scope="module")
def setup():
    tokenizer = tokenizer_lib.load_tokenizer()
    concept_id, mask_id = tokenizer_lib.add_concept_tokens(tokenizer, ["<teddy1>", "[MASK]"])
    ids = tokenizer_lib.tokenize(tokenizer, PROMPTS)
    protected = mlm.protected_sequences(tokenizer, ["<teddy1>", "teddy bear"])
    kwargs = dict(mask_token_id=mask_id, bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id,
                  protected=protected)
    return tokenizer, ids, concept_id, kwargs


def reference_maskable(tokenizer, concept_id) -> np.ndarray:
    """Maskable positions written out per prompt, independently of mlm.py: the word tokens between
    BOS and EOS, minus the concept token and the "teddy bear" that follows it."""
    out = np.zeros((len(PROMPTS), tokenizer_lib.MAX_LENGTH), bool)
    for row, prompt in enumerate(PROMPTS):
        words = tokenizer.encode(prompt, add_special_tokens=False)
        at = words.index(concept_id)
        out[row, 1:1 + len(words)] = True
        out[row, 1 + at:1 + at + 3] = False  # "<teddy1>", "teddy", "bear"
    return out


def test_masking_properties_over_many_draws(setup):
    tokenizer, ids, concept_id, kwargs = setup
    maskable = reference_maskable(tokenizer, concept_id)
    assert maskable.sum(axis=1).tolist() == [4, 11, 12, 4, 9, 8, 10, 0]
    rng = np.random.default_rng(0)
    p, batches, batch_size = 0.15, 400, 25
    masked_total = maskable_total = 0
    ever_masked = np.zeros_like(maskable)
    for _ in range(batches):
        rows = rng.integers(len(PROMPTS), size=batch_size)
        out = mlm.mask_tokens(ids[rows], rng, mask_prob=p, **kwargs)
        assert not np.any(out.mask & ~maskable[rows]), "masked a BOS/EOS/padding/concept/class token"
        assert out.mask.sum() >= 1
        np.testing.assert_array_equal(out.input_ids, np.where(out.mask, kwargs["mask_token_id"], ids[rows]))
        np.testing.assert_array_equal(out.labels, np.where(out.mask, ids[rows], mlm.IGNORE_INDEX))
        masked_total += out.mask.sum()
        maskable_total += maskable[rows].sum()
        np.logical_or.at(ever_masked, rows, out.mask)
    # Binomial proportion over ~160k maskable tokens: standard error ≈ 9e-4; allow 5 of them.
    rate = masked_total / maskable_total
    standard_error = math.sqrt(p * (1 - p) / maskable_total)
    assert abs(rate - p) < 5 * standard_error, (rate, standard_error)
    # Every maskable token was masked at some point, the lone "teddy" and "brown bear" included.
    np.testing.assert_array_equal(ever_masked, maskable)


def test_at_least_one_token_masked_at_tiny_probability(setup):
    tokenizer, ids, concept_id, kwargs = setup
    maskable = reference_maskable(tokenizer, concept_id)
    rng = np.random.default_rng(1)
    for _ in range(200):
        rows = rng.integers(len(PROMPTS) - 1, size=4)  # the last prompt has nothing to mask
        out = mlm.mask_tokens(ids[rows], rng, mask_prob=1e-9, **kwargs)
        assert out.mask.sum() == 1
        assert np.all(maskable[rows][out.mask])


def test_batch_without_maskable_tokens(setup):
    _, ids, _, kwargs = setup
    only_concept = ids[[-1, -1]]  # "<teddy1> teddy bear": everything protected
    with pytest.raises(ValueError, match="maskable"):
        mlm.mask_tokens(only_concept, np.random.default_rng(0), mask_prob=0.5, **kwargs)
    out = mlm.mask_tokens(only_concept, np.random.default_rng(0), mask_prob=0.5, min_masked_per_batch=0, **kwargs)
    assert not out.mask.any()


def test_padding_is_found_by_position_sd2_pads_with_a_real_token():
    bos, eos, exclamation = 49406, 49407, 0  # SD 2.x pads with id 0, the token "!"
    ids = np.array([[bos, exclamation, 320, eos] + [exclamation] * 5])
    np.testing.assert_array_equal(mlm.non_padding_mask(ids, eos)[0], [1, 1, 1, 1, 0, 0, 0, 0, 0])
    out = mlm.mask_tokens(ids, np.random.default_rng(0), mask_prob=1.0, mask_token_id=7, bos_id=bos, eos_id=eos)
    np.testing.assert_array_equal(out.mask[0], [0, 1, 1, 0, 0, 0, 0, 0, 0])


def test_max_masked_keeps_a_subset_of_the_drawn_tokens(setup):
    tokenizer, ids, concept_id, kwargs = setup
    maskable = reference_maskable(tokenizer, concept_id)
    out = mlm.mask_tokens(ids, np.random.default_rng(0), mask_prob=1.0, max_masked=10, **kwargs)
    assert out.mask.sum() == 10
    assert np.all(maskable[out.mask])


def test_masked_token_bound_is_the_binomial_quantile():
    n, p, overflow = 100, 0.15, 1e-6

    def tail(k):  # P[Binomial(n, p) > k], summed exactly
        return sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k + 1, n + 1))

    def only(length):  # every prompt has `length` maskable tokens
        return np.eye(length + 1)[length]

    bound = mlm.masked_token_bound(only(n), 1, p, overflow_prob=overflow)
    assert tail(bound) <= overflow < tail(bound - 1)
    assert mlm.masked_token_bound(only(75), 25, 0.15) == 378  # 25 prompts of CLIP's 75 tokens
    assert mlm.masked_token_bound(only(75), 5, 0.15, copies=5) == 378  # XTI: copies are more prompts
    assert mlm.masked_token_bound(only(10), 1, 1e-12) == 1
    assert mlm.masked_token_bound(only(10), 3, 1.0) == 30 and mlm.masked_token_bound(only(10), 3, 0.0) == 1
    # 1,200 tokens (XTI's 16 copies of 75): the law in float64 from log-gammas, against exact fractions.
    exact = [math.comb(1200, k) * fractions.Fraction(3, 20) ** k * fractions.Fraction(17, 20) ** (1200 - k)
             for k in range(1201)]
    np.testing.assert_allclose(mlm._binomial_pmf(1200, 0.15), [float(x) for x in exact], rtol=1e-10, atol=1e-300)


def test_the_bound_needs_no_scipy():
    """scipy.stats took 1.4 s of every training run's start-up to import, for one binomial law."""
    code = ("import sys; from mlmjax import mlm; import numpy as np; "
            "print(mlm.masked_token_bound(np.eye(76)[75], 25, 0.15), 'scipy.stats' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["378", "False"]


def test_masked_token_bound_of_a_mixture_of_prompt_lengths():
    """Two prompts, each of 1 or 3 maskable tokens (probability 1/2), each copied twice: the masked
    count's law enumerated by hand, and the bound is its quantile."""
    lengths, p = np.array([0, 0.5, 0, 0.5]), 0.3
    law = np.zeros(13)
    for first, second in itertools.product((1, 3), repeat=2):
        tokens = 2 * (first + second)
        for k in range(tokens + 1):
            law[k] += 0.25 * math.comb(tokens, k) * p**k * (1 - p) ** (tokens - k)
    above = [law[k + 1:].sum() for k in range(13)]
    for overflow in (0.5, 0.1, 1e-3, 1e-6):
        bound = mlm.masked_token_bound(lengths, 2, p, copies=2, overflow_prob=overflow)
        assert above[bound] <= overflow < above[bound - 1], overflow
    with pytest.raises(ValueError, match="probability distribution"):
        mlm.masked_token_bound([0.5, 0.4], 2, p)


def test_gather_masked():
    features = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
    mask = jnp.array([[False, True, False, True], [False, False, True, False]])
    selected, positions, valid = gather_masked(features, mask, 5)
    np.testing.assert_array_equal(positions[:3], [1, 3, 6])
    np.testing.assert_array_equal(valid, [True, True, True, False, False])
    np.testing.assert_array_equal(selected[:3], features.reshape(8, 3)[np.array([1, 3, 6])])


@pytest.mark.parametrize("chunk", [None, 3])  # 3: chunks [0, 3) and an overlapping [1, 4)
def test_customization_loss_by_hand(chunk):
    logits = jnp.array([[math.log(3), 0, 0, 0], [0, math.log(3), 0, 0], [100.0, 0, 0, 0], [0, 0, 0, 2]])
    # Row 0: softmax of [ln 3, 0, 0, 0] gives 3/6 to label 0 → ln 2; row 1 gives 1/6 to label 2 → ln 6
    # and misses (label 1 is top); row 2 is
    # the unused tail of the buffer (its label is position 0's, IGNORE_INDEX); row 3's label is the
    # column that both chunks cover and is its top logit.
    labels = jnp.array([0, 2, mlm.IGNORE_INDEX, 3])
    valid = jnp.array([True, True, False, True])
    row3 = math.log(3 + math.exp(2)) - 2
    loss, accuracy = customization_mlm_loss(logits, *identity_projection(4), labels, valid, chunk=chunk)
    assert loss == pytest.approx((LN2 + LN6 + row3) / 3, rel=1e-6)
    assert accuracy == pytest.approx(2 / 3)


def test_customization_loss_without_masked_tokens_is_zero_with_finite_gradient():
    features = jnp.ones((3, 5))
    labels = jnp.full((3,), mlm.IGNORE_INDEX)
    valid = jnp.zeros((3,), bool)
    value_and_grad = jax.jit(jax.value_and_grad(mlm.customization_mlm_loss, has_aux=True), static_argnames="chunk")
    for chunk in (None, 2):
        (loss, accuracy), grad = value_and_grad(features, *identity_projection(5), labels, valid, chunk=chunk)
        assert loss == 0 and accuracy == 0
        assert np.all(np.asarray(grad) == 0)


@pytest.mark.parametrize("argnums", [(0, 1, 2), (0,)], ids=["trained_projection", "frozen_projection"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_chunked_cross_entropy_equals_the_plain_one_with_gradients(dtype, argnums):
    """Every chunk width, including ones that leave a short last chunk, gives the plain product's
    cross-entropy, top-1 hits and gradients into the features, the kernel and the bias (pretraining),
    or into the features alone (customization, whose one-pass forward rule computes them)."""
    rng = np.random.default_rng(0)
    rows, width, vocab = 9, 8, 50
    features = jnp.asarray(rng.standard_normal((rows, width)), dtype)
    kernel = jnp.asarray(rng.standard_normal((width, vocab)) * 0.7, jnp.float32)
    bias = jnp.asarray(rng.standard_normal(vocab) * 0.3, jnp.float32)
    labels = rng.integers(0, vocab, rows)
    labels[:3] = np.argmax(np.asarray(features, np.float32) @ np.asarray(kernel) + np.asarray(bias), -1)[:3]
    labels = jnp.asarray(labels)  # three hits, the rest almost surely misses
    weights = jnp.asarray(rng.random(rows), jnp.float32)

    def weighted(features, kernel, bias, chunk):
        cross_entropy, is_top = mlm.vocabulary_cross_entropy(features, kernel, bias, labels, chunk)
        return (weights * cross_entropy).sum(), (cross_entropy, is_top)

    grad = jax.jit(jax.grad(weighted, argnums=argnums, has_aux=True), static_argnums=3)
    (plain_grads, (plain_ce, plain_top)) = grad(features, kernel, bias, None)
    assert int(plain_top.sum()) >= 1  # the test must see a hit
    tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
    for chunk in (7, 16, 49):
        grads, (cross_entropy, is_top) = grad(features, kernel, bias, chunk)
        np.testing.assert_allclose(cross_entropy, plain_ce, rtol=tolerance)
        np.testing.assert_array_equal(is_top, plain_top)
        for got, want in zip(grads, plain_grads):
            assert got.dtype == want.dtype
            scale = float(jnp.abs(want.astype(jnp.float32)).max())
            assert float(jnp.abs((got - want).astype(jnp.float32)).max()) <= tolerance * scale


def _loops(jaxpr) -> int:
    """How many scans a jaxpr runs, its sub-jaxprs' included."""
    count = 0
    for equation in jaxpr.eqns:
        count += equation.primitive.name == "scan"
        for value in equation.params.values():
            inner = getattr(value, "jaxpr", None)
            count += _loops(getattr(inner, "jaxpr", inner)) if inner is not None else 0
    return count


def test_a_frozen_projection_makes_one_pass_over_the_vocabulary():
    """Differentiated through the features only, the gradient comes out of the forward loop; a trained
    projection needs a second loop that recomputes the logits (its kernel and bias gradients)."""
    rng = np.random.default_rng(1)
    features = jnp.asarray(rng.standard_normal((4, 8)), jnp.float32)
    kernel, bias = jnp.asarray(rng.standard_normal((8, 50)), jnp.float32), jnp.zeros(50)
    labels = jnp.arange(4)

    def loss(features, kernel, bias):
        return mlm.vocabulary_cross_entropy(features, kernel, bias, labels, chunk=16)[0].sum()

    assert _loops(jax.make_jaxpr(jax.grad(loss))(features, kernel, bias).jaxpr) == 1
    assert _loops(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(features, kernel, bias).jaxpr) == 2


def pretraining_case():
    ln3 = math.log(3)
    logits = jnp.array([
        [[0, 0, 0, 0], [ln3, 0, 0, 0], [ln3, 0, 0, 0]],  # BOS, masked word, EOS
        [[0, ln3, 0, 0], [0, 0, 0, 0], [50, 0, 0, 0]],  # BOS, EOS, padding (its CE of ~50 must not count)
    ])
    labels = jnp.array([[0, 0, 1], [1, 3, 2]])
    masked = jnp.array([[False, True, False], [False, False, False]])
    non_padding = jnp.array([[True, True, True], [True, True, False]])
    return (logits, *identity_projection(4), labels, masked, non_padding)


@pytest.mark.parametrize("chunk", [None, 3])
def test_pretraining_loss_by_hand(chunk):
    args = pretraining_case()
    # ln 4 + 5·ln 2 + ln 6 (row 0) + ln 2 + ln 4 (row 1) = 10·ln 2 + ln 6.
    total = 10 * LN2 + LN6
    loss, accuracy = pretraining_mlm_loss(*args, chunk=chunk)
    assert loss == pytest.approx(total / 6, rel=1e-6)  # the authors': B × L
    assert accuracy == 1.0  # the one masked token's label 0 has the top logit ln 3
    loss, _ = pretraining_mlm_loss(*args, normalization="non_padding", chunk=chunk)
    assert loss == pytest.approx(total / 5, rel=1e-6)


def test_pretraining_loss_matches_the_authors_torch_code():
    logits, _, _, labels, masked, non_padding = (torch.tensor(np.asarray(a)) for a in pretraining_case())
    mlm_labels = torch.where(non_padding, labels, -100).long()
    loss = F.cross_entropy(logits.view(-1, 4), mlm_labels.view(-1), ignore_index=-100, reduction="none")
    loss[masked.view(-1)] *= 5
    expected = loss.mean().item()
    assert pretraining_mlm_loss(*pretraining_case())[0] == pytest.approx(expected, rel=1e-6)


def test_gathered_loss_matches_the_authors_masked_mean(setup):
    """mask_tokens → gather_masked → customization_mlm_loss equals the authors' CE over labels ≠ -100."""
    _, ids, _, kwargs = setup
    masked = mlm.mask_tokens(ids, np.random.default_rng(3), mask_prob=0.3, **kwargs)
    logits = np.random.default_rng(4).standard_normal((*ids.shape, 16), dtype=np.float32)
    labels = np.where(masked.mask, masked.labels % 16, mlm.IGNORE_INDEX)  # a 16-token vocabulary
    selected, positions, valid = gather_masked(jnp.asarray(logits), jnp.asarray(masked.mask), 64)
    loss, _ = customization_mlm_loss(selected, *identity_projection(16), jnp.asarray(labels).reshape(-1)[positions],
                                     valid)
    flat_labels = torch.from_numpy(labels).long().view(-1)
    authors = F.cross_entropy(torch.from_numpy(logits).view(-1, 16), flat_labels, reduction="none")
    assert loss == pytest.approx(authors[flat_labels != -100].mean().item(), rel=1e-6)
