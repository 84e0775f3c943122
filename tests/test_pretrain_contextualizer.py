"""Contextualizer pretraining on the embedded tiny model: one short real run, shared by the module.

The step compiles once (module fixture): on this CPU the 49,409-wide vocabulary projection dominates
both compile and step time, so the run is small (batch 8, 60 steps, logits at 24 positions).
"""

import dataclasses
import importlib.util
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from mlmjax import checkpoint as checkpoint_lib
from mlmjax import loop, mlm
from mlmjax import pretrain_contextualizer as pc
from mlmjax import tokenizer as tokenizer_lib
from mlmjax import workdir as workdir_lib
from mlmjax.models import contextualizer as ctx
from mlmjax.world import captions as world_captions

_CONFIG_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "contextualizer.py")


def get_config(options: str = ""):
    spec = importlib.util.spec_from_file_location("contextualizer_config", _CONFIG_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(options)


def small_config():
    c = get_config("tiny")
    c.batch_size = 8
    c.max_steps = 60
    c.log_every = 20
    c.heldout_size = 32
    c.max_caption_tokens = 24  # synthetic captions: at most 17 tokens in 20K drawn
    c.learning_rate = 3e-3
    return c


@pytest.fixture(scope="module")
def tokenizer():
    """The tiny model's tokenizer, without building the run (cheap tests need not wait for training)."""
    return tokenizer_lib.vendored_tokenizer()


def _copy(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    config = small_config()
    setup = pc.build(config)
    initial = _copy({"params": setup.state.params, "frozen": setup.state.frozen})
    workdir = str(tmp_path_factory.mktemp("pretrain"))
    state, metrics = pc.train(setup, config, workdir)  # donates setup.state
    return {"config": config, "setup": setup, "initial": initial, "state": state, "metrics": metrics,
            "workdir": workdir}


def test_heldout_loss_drops(trained):
    m = trained["metrics"]
    # Measured 1.82 → 0.93 (0.51×) in 60 steps; with seed 1, 2.11 → 1.08 (0.51×).
    assert m["heldout_loss_after"] <= 0.7 * m["heldout_loss_before"], m
    assert m["heldout_mlm_accuracy_after"] > m["heldout_mlm_accuracy_before"], m
    with open(os.path.join(trained["workdir"], pc.HELDOUT_FILE)) as f:
        heldout = json.load(f)
    assert heldout["before"]["loss"] == pytest.approx(m["heldout_loss_before"])
    assert heldout["after"]["loss"] == pytest.approx(m["heldout_loss_after"])


def test_metrics_and_config_written(trained):
    rows = loop.read_metrics(trained["workdir"])
    assert [r["step"] for r in rows] == [1, 20, 40, 60]
    for row in rows:
        assert {"loss", "mlm_accuracy", "grad_norm", "lr"} <= row.keys()
        assert np.isfinite(row["loss"]) and row["grad_norm"] > 0
    assert rows[-1]["lr"] == pytest.approx(3e-3)
    with open(os.path.join(trained["workdir"], workdir_lib.CONFIG_FILE)) as f:
        assert json.load(f) == json.loads(trained["config"].to_json())


def test_text_encoder_bit_identical(trained):
    after = jax.tree.map(np.asarray, trained["state"].frozen)
    jax.tree.map(np.testing.assert_array_equal, after, trained["initial"]["frozen"])


def test_contextualizer_and_mask_embedding_train(trained):
    before, after = trained["initial"]["params"], trained["state"].params
    assert set(after) == {"contextualizer", "mask_embedding"}
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), after, before)
    assert all(jax.tree.leaves(changed)), changed
    assert int(trained["state"].step) == trained["config"].max_steps


def test_saved_contextualizer_reproduces_the_loss(trained):
    state = trained["state"]
    module, params, mask_embedding = ctx.load_contextualizer(os.path.join(trained["workdir"], pc.CONTEXTUALIZER_DIR))
    assert module.config == state.spec.contextualizer.config
    assert module.config.vocab_size == 49409 and module.config.hidden_size == 32
    jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(state.params["contextualizer"]))
    np.testing.assert_array_equal(mask_embedding, state.params["mask_embedding"])
    loss = jax.jit(pc.loss_fn, static_argnums=2)  # features and the vocabulary projection
    batch = {k: v[:2] for k, v in trained["setup"].heldout.items()}
    expected, _ = loss(state.params, state.frozen, state.spec, batch)
    loaded_spec = dataclasses.replace(state.spec, contextualizer=module)
    got, _ = loss({"contextualizer": params, "mask_embedding": mask_embedding}, state.frozen, loaded_spec, batch)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_cut_logits_give_the_full_loss(trained):
    """Logits at the first 24 positions only: the same loss as at all 77, with the authors' B×77 divisor."""
    state = trained["state"]
    batch = {k: v[:4] for k, v in trained["setup"].heldout.items()}
    loss = jax.jit(pc.loss_fn, static_argnums=2)
    cut, _ = loss(state.params, state.frozen, state.spec, batch)
    full_spec = dataclasses.replace(state.spec, max_caption_tokens=tokenizer_lib.MAX_LENGTH)
    full, _ = loss(state.params, state.frozen, full_spec, batch)
    np.testing.assert_allclose(cut, full, rtol=1e-6)


def test_mask_embedding_init_norm(trained):
    table = trained["initial"]["frozen"]["text_encoder"]["embeddings"]["token_embedding"]["embedding"]
    average = np.abs(table.astype(np.float64)).sum(axis=1).mean()
    mask = trained["initial"]["params"]["mask_embedding"]
    assert mask.shape == (32,) and mask.dtype == np.float32
    assert np.abs(mask.astype(np.float64)).sum() == pytest.approx(average, rel=1e-4)
    given = pc.init_mask_embedding(table, np.random.default_rng(0), norm=8.525)
    assert np.abs(given.astype(np.float64)).sum() == pytest.approx(8.525, rel=1e-4)


def test_batches_are_a_pure_function_of_seed_and_step(tokenizer):
    mask_id = len(tokenizer)
    kwargs = dict(seed=3, batch_size=16, user_captions=["a cat on a mat", "two dogs play in the snow"],
                  synthetic_ratio=0.3, tokenizer=tokenizer, mask_prob=0.15, mask_token_id=mask_id)
    a, b = pc.make_batch(5, **kwargs), pc.make_batch(5, **kwargs)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(pc.make_batch(6, **kwargs)["labels"], a["labels"])
    assert not np.array_equal(pc.make_batch(5, **{**kwargs, "seed": 4})["labels"], a["labels"])

    ids, masked = a["labels"], a["mask"]
    assert ids.shape == (16, 77) and masked.sum() >= 1
    np.testing.assert_array_equal(a["non_padding"], mlm.non_padding_mask(ids, tokenizer.eos_token_id))
    assert not np.any(masked & ((ids == tokenizer.bos_token_id) | (ids == tokenizer.eos_token_id)))
    assert not np.any(masked & ~a["non_padding"])
    np.testing.assert_array_equal(a["input_ids"], np.where(masked, mask_id, ids))
    # The user captions are drawn too, not only synthetic ones.
    user = tokenizer_lib.tokenize(tokenizer, kwargs["user_captions"])
    assert any((ids == row).all(axis=1).any() for row in user)


def test_too_long_caption_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="max_caption_tokens"):
        pc.mask_captions(["a photo of " + "a very long caption " * 6], np.random.default_rng(0), tokenizer,
                         mask_prob=0.15, mask_token_id=len(tokenizer), max_caption_tokens=24)


def test_config():
    c = get_config()
    assert c.method == "contextualizer" and c.seed == 7776 and c.batch_size == 150
    assert (c.mask_prob, c.masked_weight, c.synthetic_ratio) == (0.15, 5.0, 0.3)
    assert c.loss_normalization == "all_positions" and c.max_caption_tokens == 77
    assert (c.learning_rate, c.optimizer.weight_decay, c.max_steps) == (1e-4, 0.0, 100_000)
    assert dict(c.contextualizer) == {"num_blocks": 4, "num_heads": 4, "ffn_size": 3072, "ffn_residual": False}
    pc.validate(c)
    tiny = get_config("tiny")
    assert (tiny.batch_size, tiny.contextualizer.ffn_size, tiny.log_every) == (32, 128, 10)
    pc.validate(tiny)
    with pytest.raises(ValueError, match="unknown config option"):
        get_config("huge")


@pytest.mark.parametrize("key, value", [("mask_prob", 0.0), ("loss_normalization", "masked"),
                                        ("max_caption_tokens", 78), ("method", "ti"), ("heldout_size", 0)])
def test_validate_rejects(key, value):
    c = get_config("tiny")
    c[key] = value
    with pytest.raises(ValueError, match=f"config.{key}="):
        pc.validate(c)


def test_run_resumes_its_own_workdir_and_refuses_another_run(trained):
    config = ml_collections.ConfigDict(trained["config"].to_dict())
    config.mask_prob = 0.2
    with pytest.raises(ValueError, match="holds another run: config.mask_prob: 0.15 there, 0.2 now"):
        pc.run(config, trained["workdir"])
    steps = checkpoint_lib.Checkpointer(trained["workdir"]).all_steps()
    assert steps[-1] == trained["config"].max_steps


def test_world_option_draws_the_worlds_synthetic_captions(tokenizer):
    world = get_config("world")
    pc.validate(world)
    assert world.synthetic_data == str(world_captions.DATA_DIR) and world.max_caption_tokens == 40
    with pytest.raises(ValueError, match="one of the options"):
        get_config("tiny,world")
    kwargs = dict(seed=3, batch_size=64, user_captions=["a red cat on the beach"], synthetic_ratio=1.0,
                  tokenizer=tokenizer, mask_prob=0.15, mask_token_id=len(tokenizer),
                  max_caption_tokens=world.max_caption_tokens)
    ids = pc.make_batch(0, synthetic_data=world.synthetic_data, **kwargs)["labels"]
    words = set(tokenizer.batch_decode(ids[:, 1:], skip_special_tokens=True)[0].split())
    vocabulary = set(" ".join(world_captions.derived_files().values()).split()) | set(
        (world_captions.DATA_DIR / "templates" / "synthetic.txt").read_text().split())
    assert words <= vocabulary, words - vocabulary  # nothing outside the world's own words
    default = pc.make_batch(0, **kwargs)["labels"]
    assert not np.array_equal(ids, default)  # mlmjax's own synthetic captions are different ones
    held_out = pc.heldout_batch(3, 8, synthetic_data=world.synthetic_data, tokenizer=tokenizer, mask_prob=0.15,
                                mask_token_id=len(tokenizer))
    assert held_out["labels"].shape == (8, 77)
