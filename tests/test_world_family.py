"""config.concept.family: its resolution, its validation, and MLM batches of the "world" family."""

import numpy as np
import pytest

from mlmjax import config as config_lib
from mlmjax import method as method_lib
from mlmjax import mlm
from mlmjax import tokenizer as tokenizer_lib
from mlmjax.world import captions

TOKEN, CLASS_NOUN = "<teapot1>", "teapot"


def _config(family: str = "", images: str = "", **mlm_fields):
    config = config_lib.base_config()
    config.concept.family, config.concept.images = family, images
    config.concept.token, config.concept.class_noun = TOKEN, CLASS_NOUN
    config.mlm.weight = 1.0
    config.mlm.update(mlm_fields)
    return config


@pytest.mark.parametrize("family, images, expected", [
    ("", "", "world"),  # the embedded default's concept is the world's teapot
    ("", "/data/dog6", "nonliving"),  # a user's photos: the default before "world" existed
    ("pet", "/data/dog6", "pet"),
    ("world", "/data/teapots", "world"),
    ("nonliving", "", "nonliving"),
    ("", config_lib.EMBEDDED_CONCEPT_IMAGES, "world"),  # the embedded photos, named explicitly
    ("", config_lib.EMBEDDED_CONCEPT_IMAGES + "/", "world"),
])
def test_family_resolution(family, images, expected):
    config = _config(family, images)
    config_lib.validate(config)
    assert config_lib.concept_family(config) == expected
    assert method_lib._prompt_set(config).family == expected


def test_base_config_defaults_to_the_embedded_concepts_family():
    from mlmjax import tiny

    config = config_lib.base_config()
    assert config.concept.family == "" and config_lib.concept_family(config) == "world"
    assert config_lib.EMBEDDED_CONCEPT_IMAGES == tiny.embedded_assets().concept_images


def test_unknown_family_is_rejected_naming_the_key():
    config = _config("animals")
    with pytest.raises(ValueError) as exc:
        config_lib.validate(config)
    message = str(exc.value)
    assert "\n" not in message and message.startswith("config.concept.family='animals':")
    assert all(repr(f) in message for f in ("", "pet", "nonliving", "world"))


def test_resolve_embedded_records_the_family_before_filling_the_photos():
    from mlmjax import train as train_lib

    resolved = train_lib._resolve_embedded(config_lib.base_config())
    assert resolved.concept.images and resolved.concept.family == "world"
    assert config_lib.concept_family(resolved) == "world"


def _world_batch(method: str, class_noun_in_prompts: bool, copies: int):
    """A step's MLM batch for the world family, built as ``method.build`` does but without a model.

    Returns the masked batch, the unmasked rows and the concept ids.
    """
    config = _config(class_noun_in_prompts=class_noun_in_prompts)
    config.method = method
    tokenizer = tokenizer_lib.vendored_tokenizer()
    vocab = len(tokenizer)
    concept_ids = tokenizer_lib.add_concept_tokens(tokenizer, [TOKEN] + [f"{TOKEN}_{k}" for k in range(1, copies)])
    max_masked = method_lib._masked_bound(config, tokenizer, concept_ids, copies)
    moments = (np.zeros((2, 2, 4, 4, 4), np.float32),) * 2  # [flip, image, h, w, c]
    make_batch = method_lib._batch_maker(config, tokenizer, concept_ids, f"{TOKEN} {CLASS_NOUN}", moments, None,
                                         mask_token_id=vocab + copies, max_masked=max_masked)
    batch = make_batch(3)
    rows = np.where(batch["mlm_mask"], batch["mlm_labels"], batch["mlm_input_ids"])
    return batch, rows, concept_ids, tokenizer, max_masked


@pytest.mark.parametrize("method, class_noun_in_prompts, copies", [("ti", True, 1), ("xti", False, 3)])
def test_mlm_batch_holds_world_prompts(method, class_noun_in_prompts, copies):
    batch, rows, concept_ids, tokenizer, max_masked = _world_batch(method, class_noun_in_prompts, copies)
    assert rows.shape == (25 * copies, 77) and 0 < batch["mlm_mask"].sum() <= max_masked
    noun_id = tokenizer.convert_tokens_to_ids(f"{CLASS_NOUN}</w>")
    phrase = TOKEN if not class_noun_in_prompts else f"{TOKEN} {CLASS_NOUN}"
    world_lines = {line for kind in captions.TYPES
                   for line in captions.world_prompt_set().all_prompts(kind, phrase)}
    for i, row in enumerate(rows):
        (position,) = np.flatnonzero(np.isin(row, concept_ids))  # one concept token a row, never masked
        assert row[position] == concept_ids[i // 25] and not batch["mlm_mask"][i, position]
        has_noun = row[position + 1] == noun_id
        # The world's objects include teapots ("next to a red teapot"): protected wherever they are.
        assert has_noun == class_noun_in_prompts and not batch["mlm_mask"][i, row == noun_id].any()
        # The caption from the concept on is a line of the world's prompt set (prefix before it).
        context = tokenizer.decode(row[position + 1 + has_noun:], skip_special_tokens=True)
        assert f"{phrase} {context}" in world_lines, context
    # XTI: copy k of a prompt is copy 0 with the k-th token, masked independently.
    copies_of = rows.reshape(copies, 25, 77)
    for k in range(1, copies):
        np.testing.assert_array_equal(np.where(copies_of[k] == concept_ids[k], concept_ids[0], copies_of[k]),
                                      copies_of[0])


@pytest.mark.parametrize("class_noun_in_prompts", [True, False])
def test_maskable_token_law_is_that_of_every_prompt_written_out(class_noun_in_prompts):
    """The law of a drawn prompt's maskable tokens, from lines and prefixes counted apart, equals the
    one from every (type, line, prefix) prompt tokenized whole; batches mask what it predicts."""
    config = _config(class_noun_in_prompts=class_noun_in_prompts)
    tokenizer = tokenizer_lib.vendored_tokenizer()
    concept_ids = tokenizer_lib.add_concept_tokens(tokenizer, [TOKEN])
    prompt_set, phrase = method_lib._prompt_set(config), method_lib.mlm_phrase(config)
    protected = method_lib.protected_tokens(config, tokenizer, concept_ids)
    expected = np.zeros(77)
    for kind in prompt_set.types:  # the world's types are all prefixed
        texts = [prefix.format(line) for line in prompt_set.all_prompts(kind, phrase) for prefix in prompt_set.prefixes]
        counts = mlm.maskable_positions(tokenizer_lib.tokenize(tokenizer, texts), bos_id=tokenizer.bos_token_id,
                                        eos_id=tokenizer.eos_token_id, protected=protected).sum(axis=1)
        expected += np.bincount(counts, minlength=77) / len(texts) / len(prompt_set.types)
    law = method_lib._maskable_distribution(config, tokenizer, concept_ids)
    np.testing.assert_allclose(law, expected[:law.size], rtol=0, atol=1e-12)
    assert expected[law.size:].sum() == 0
    mean_tokens = float(np.arange(law.size) @ law)
    assert mean_tokens == pytest.approx(9.291, abs=1e-3)  # the class noun is protected: the same either way

    bound = method_lib._masked_bound(config, tokenizer, concept_ids, copies=1)
    assert bound == 72  # about twice the mean: 25 prompts x 9.29 tokens x 0.15 = 34.8
    make_batch = method_lib._batch_maker(config, tokenizer, concept_ids, f"{TOKEN} {CLASS_NOUN}",
                                         (np.zeros((2, 2, 4, 4, 4), np.float32),) * 2, None,
                                         mask_token_id=len(tokenizer), max_masked=bound)
    masked = [int(make_batch(step)["mlm_mask"].sum()) for step in range(400)]
    # 400 batches: the mean's standard error is about 0.3 tokens.
    assert np.mean(masked) == pytest.approx(25 * 0.15 * mean_tokens, abs=1.5) and max(masked) < bound
