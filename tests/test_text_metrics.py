"""Text-space metrics on the embedded default: the tiny model and the contextualizer pretrained on it."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlmjax import method as method_lib
from mlmjax import mlm
from mlmjax import pretrained as pretrained_lib
from mlmjax import text_metrics
from mlmjax import tiny, trainable
from mlmjax import workdir as workdir_lib
from mlmjax.models import clip_text
from mlmjax.models import unet as unet_lib
from test_train_step import load_config

EMBEDDED = tiny.embedded_assets()
FAST = dict(num_prompts=48, batch_size=32)  # 48 prompts: the last block of a TI run is padded
SHARES = ("attention_context_to_subject", "attention_subject_to_context", "attention_context_to_bos")


def _run(name: str, *, class_noun_in_prompts: bool | None = None, concept_seed: int | None = None
         ) -> workdir_lib.TrainedRun:
    """A run on the embedded model as ``load_trained`` returns it: the concept tokens initialised from
    the class noun, or random with ``concept_seed``."""
    config = load_config(name)
    config.mlm.weight = 0.0
    config.pretrained = EMBEDDED.model
    if class_noun_in_prompts is not None:
        config.mlm.class_noun_in_prompts = class_noun_in_prompts
    model = pretrained_lib.load_pretrained(EMBEDDED.model)  # fresh: build_state adds tokens to its tokenizer
    built = method_lib.build_state(config, model, contextualizer_folder=None)
    trained = built.state.params
    if concept_seed is not None:
        shape = trained["concept"]["embeddings"].shape
        trained = {"concept": {"embeddings": np.random.default_rng(concept_seed).standard_normal(shape, np.float32)}}
    return workdir_lib.TrainedRun(
        workdir="unused", step=0, config=config, model=model, spec=built.state.spec,
        params=trainable.merge(trained, built.state.frozen), trained=trained,
        concept_tokens=built.concept_tokens, concept_phrase=built.concept_phrase)


def _mask_id(run: workdir_lib.TrainedRun) -> int:
    return run.model.text_encoder.config.vocab_size + len(run.concept_tokens)


def test_prompt_batches_align_the_concept_and_class_versions():
    run = _run("ti")  # phrase "<teapot1> teapot"
    templates = ["a photo of a <new1> on the beach", "a cat is petting <new1>"] * 20
    concept, reference = text_metrics.prompt_batches(run, templates, seed=3, mask_token_id=_mask_id(run))
    tokenizer = run.model.tokenizer
    words = lambda ids, where: tokenizer.convert_ids_to_tokens([int(i) for i in ids[where]])
    assert words(concept.input_ids[0], slice(1, 10)) == [
        "a</w>", "photo</w>", "of</w>", "a</w>", "<teapot1>", "teapot</w>", "on</w>", "the</w>", "beach</w>"]
    assert words(reference.input_ids[0], slice(1, 9)) == [
        "a</w>", "photo</w>", "of</w>", "a</w>", "teapot</w>", "on</w>", "the</w>", "beach</w>"]
    np.testing.assert_array_equal(np.flatnonzero(concept.subject[0]), [5])
    np.testing.assert_array_equal(np.flatnonzero(reference.subject[0]), [5])
    np.testing.assert_array_equal(np.flatnonzero(concept.after[0]), [7, 8, 9])
    np.testing.assert_array_equal(np.flatnonzero(reference.after[0]), [6, 7, 8])
    np.testing.assert_array_equal(np.flatnonzero(concept.before[0]), [1, 2, 3, 4])
    np.testing.assert_array_equal(np.flatnonzero(reference.before[0]), [1, 2, 3, 4])
    assert not concept.after[1].any() and not reference.after[1].any()  # the slot ends the caption

    # The same words are masked in both versions, never the concept or class-noun tokens.
    assert concept.mask.sum() == reference.mask.sum() > 0
    for c, r in zip(concept, reference):
        assert c.shape == r.shape == (40, 77)
    for row in range(len(templates)):
        assert (words(concept.labels[row], concept.mask[row]) == words(reference.labels[row], reference.mask[row]))
    assert not (concept.mask & concept.subject).any() and not (reference.mask & reference.subject).any()
    assert not (concept.mask & (concept.input_ids == tokenizer.convert_tokens_to_ids("teapot</w>"))).any()
    np.testing.assert_array_equal(concept.masked_ids[concept.mask], _mask_id(run))
    np.testing.assert_array_equal(reference.masked_ids[reference.mask], _mask_id(run))
    np.testing.assert_array_equal(reference.labels[~reference.mask], mlm.IGNORE_INDEX)
    # About mask_prob of the maskable tokens (40 prompts, ~6 maskable each).
    assert 0.05 < concept.mask.sum() / (concept.after.sum() + concept.before.sum()) < 0.3


def test_xti_prompt_batches_hold_one_independently_masked_copy_per_token():
    run = _run("xti")  # phrase "<teapot1>" (the authors' quirk)
    n = len(run.concept_tokens)  # one per cross-attention block group of the embedded UNet
    assert n == max(unet_lib.cross_attention_block_groups(run.model.unet.config)) + 1 == 5
    templates = text_metrics.evaluation_templates("nonliving", 10, seed=0)
    concept, reference = text_metrics.prompt_batches(run, templates, seed=0, mask_token_id=_mask_id(run))
    vocab = run.model.text_encoder.config.vocab_size
    assert concept.input_ids.shape == (n * 10, 77)
    copies = concept.input_ids.reshape(n, 10, 77)
    for k in range(n):
        np.testing.assert_array_equal(copies[k][concept.subject.reshape(n, 10, 77)[k]], vocab + k)
        np.testing.assert_array_equal(np.where(copies[k] >= vocab, vocab, copies[k]),
                                      np.where(copies[0] >= vocab, vocab, copies[0]))
    np.testing.assert_array_equal(reference.input_ids.reshape(n, 10, 77),
                                  np.repeat(reference.input_ids[None, :10], n, axis=0))
    masks = concept.mask.reshape(n, 10, 77)
    assert not all(np.array_equal(masks[0], masks[k]) for k in range(1, n))


def test_metrics_are_bounded_deterministic_and_independent_of_batching():
    run = _run("ti")  # concept initialised from the class noun, phrase "<teapot1> teapot"
    metrics = text_metrics.text_metrics(run, EMBEDDED.contextualizer, **FAST)
    assert sorted(metrics) == sorted(m + s for m in text_metrics.METRICS for s in ("", "_class"))
    for suffix in ("", "_class"):
        assert 0 < metrics["mlm_accuracy" + suffix] < 1  # a pretrained contextualizer: well above chance
        assert 0 < metrics["mlm_cross_entropy" + suffix] < math.log(49409)
        for name in SHARES:
            assert 0 < metrics[name + suffix] < 1, (name + suffix, metrics)
    # Causal: up to the slot both prompts are the same tokens (the concept vector is the class noun's),
    # so the subject's attention to what comes before it is identical.
    assert metrics["attention_subject_to_context"] == metrics["attention_subject_to_context_class"]
    assert text_metrics.text_metrics(run, EMBEDDED.contextualizer, **FAST) == metrics
    rebatched = text_metrics.text_metrics(run, EMBEDDED.contextualizer, num_prompts=48, batch_size=48)
    for name, value in metrics.items():
        assert rebatched[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    other_seed = text_metrics.text_metrics(run, EMBEDDED.contextualizer, seed=1, **FAST)
    assert other_seed["mlm_cross_entropy"] != metrics["mlm_cross_entropy"]


@pytest.mark.parametrize("name", ["ti", "xti"])
def test_class_reference_is_the_run_when_the_concept_is_the_class_noun(name):
    # Phrase "<c>" (the XTI quirk; for TI set here): with the class noun's vector in every concept
    # token, the concept prompts are the class prompts, token for token.
    at_init = _run(name, class_noun_in_prompts=False)
    metrics = text_metrics.text_metrics(at_init, EMBEDDED.contextualizer, **FAST)
    for metric in text_metrics.METRICS:
        assert metrics[metric] == pytest.approx(metrics[metric + "_class"], rel=1e-6, abs=1e-7), metric

    moved = text_metrics.text_metrics(_run(name, class_noun_in_prompts=False, concept_seed=5),
                                      EMBEDDED.contextualizer, **FAST)
    for metric in text_metrics.METRICS:  # the reference does not depend on the concept vector
        assert moved[metric + "_class"] == pytest.approx(metrics[metric + "_class"], rel=1e-6, abs=1e-7)
    assert moved["mlm_cross_entropy"] != pytest.approx(moved["mlm_cross_entropy_class"], rel=1e-3)
    assert moved["attention_subject_to_context"] != pytest.approx(moved["attention_subject_to_context_class"],
                                                                  rel=1e-3)


def test_share_sums_normalise_over_non_bos_keys():
    probabilities = jax.nn.softmax(jax.random.normal(jax.random.key(0), (2, 3, 4, 6, 6)) * 3, axis=-1)
    probabilities = jnp.where(jnp.tril(jnp.ones((6, 6), bool)), probabilities, 0.0)
    probabilities /= probabilities.sum(-1, keepdims=True)  # causal rows, as the encoder's
    queries = jnp.array([[0, 0, 1, 1, 1, 0]] * 3, bool)
    causal_keys = jnp.array([[0, 1, 1, 1, 1, 1]] * 3, bool)  # all non-BOS keys a query can see
    total, count = text_metrics._share_sums(probabilities, queries, causal_keys)
    assert count == 3 * 2 * 4 * 3
    assert float(total / count) == pytest.approx(1.0, rel=1e-6)
    one_key = jnp.array([[0, 1, 0, 0, 0, 0]] * 3, bool)
    total, _ = text_metrics._share_sums(probabilities, queries, one_key)
    expected = probabilities[..., 1] / probabilities[..., 1:].sum(-1)
    assert float(total) == pytest.approx(float(jnp.where(queries[None, :, None], expected, 0).sum()), rel=1e-6)


def test_attention_probabilities_match_transformers():
    import torch
    import transformers

    model = pretrained_lib.load_pretrained(EMBEDDED.model)
    ids = model.tokenizer(["a photo of a teapot on the beach", "a red teapot"], padding="max_length",
                          max_length=77, return_tensors="np").input_ids
    variables = {"params": model.params["text_encoder"]}
    hidden, probabilities = clip_text.attention_probabilities(model.text_encoder, variables, ids)
    np.testing.assert_array_equal(hidden, model.text_encoder.apply(variables, ids))  # the output is untouched
    assert probabilities.shape == (2, 2, 2, 77, 77)  # layers, batch, heads, queries, keys
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-5)
    assert not np.triu(np.asarray(probabilities), k=1).any()  # causal

    reference = transformers.CLIPTextModel.from_pretrained(
        EMBEDDED.model, subfolder="text_encoder", dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        attentions = reference(torch.from_numpy(ids), output_attentions=True).attentions
    np.testing.assert_allclose(probabilities, np.stack([a.numpy() for a in attentions]), atol=2e-6)
