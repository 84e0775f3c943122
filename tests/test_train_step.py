"""The fused train step and the four baselines chosen by config, on the tiny model."""

import dataclasses
import functools
import importlib.util
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlmjax import method as method_lib
from mlmjax import pretrained as pretrained_lib
from mlmjax import tiny
from mlmjax import train_step as train_step_lib
from mlmjax import trainable
from mlmjax.models import contextualizer as contextualizer_lib

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
METHODS = ("ti", "xti", "dreambooth", "custom_diffusion")


def load_config(name: str, options: str | None = None):
    spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(options) if options is not None else module.get_config()
    config.concept.token = "<teapot1>"
    config.concept.class_noun = "teapot"
    return config


@pytest.fixture(scope="module")
def contextualizer_dir(tmp_path_factory):
    config = contextualizer_lib.ContextualizerConfig(hidden_size=32, num_heads=4, ffn_size=64)
    module = contextualizer_lib.Contextualizer(config)
    params = contextualizer_lib.init_params(module, jax.random.key(0, impl="rbg"))
    mask = np.random.default_rng(0).standard_normal(32).astype(np.float32)
    folder = str(tmp_path_factory.mktemp("contextualizer"))
    contextualizer_lib.save_contextualizer(folder, config, params, mask)
    return folder


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    root = tmp_path_factory.mktemp("pictures")
    tiny.write_pictures(str(root / "concept"), seed=1, count=4, concept=True)
    tiny.write_pictures(str(root / "class"), seed=2, count=4, concept=False)
    from mlmjax import data

    return data.load_images(str(root / "concept"), 32), data.load_images(str(root / "class"), 32)


def build(config, pictures, contextualizer_dir):
    concept, classes = pictures
    return method_lib.build(config, tiny.tiny_pretrained(), concept_images=concept,
                            class_images=classes if config.prior.weight else None,
                            contextualizer_folder=contextualizer_dir)


def _sd15_abstract():
    from test_fullsize import CONFIGS as FULL

    params = {}
    for name in ("text_encoder", "unet"):
        config = dict(FULL["sd15"][name])
        if name == "text_encoder":
            config.update(vocab_size=49408, max_position_embeddings=77)
        module = pretrained_lib.build_component(name, config)
        params[name] = pretrained_lib.abstract_params(name, module)
    return params


@pytest.mark.parametrize("name, options, expected", [
    ("ti", None, 768),
    ("xti", None, 7 * 768),
    ("dreambooth", None, 859_520_964 + 123_060_480 + 768),
    ("dreambooth", "no_text_encoder", 859_520_964 + 768),
    ("custom_diffusion", None, 19_169_280 + 123_060_480 + 768),
    ("custom_diffusion", "no_text_encoder", 19_169_280 + 768),
    ("custom_diffusion", "no_text_encoder,qo", 19_169_280 + 2 * 12_390_400 + 12_480 + 768),  # + to_q, to_out (C², bias)
])
def test_trainable_parameters_at_sd15_size(name, options, expected):
    """Counts follow from SD 1.5's shapes; to_k/to_v of the 16 cross-attention layers: 768 × 12,480 × 2."""
    params = _sd15_abstract()
    config = load_config(name, options)
    tokens = 7 if name == "xti" else 1
    params["concept"] = {"embeddings": jax.ShapeDtypeStruct((tokens, 768), jnp.float32)}
    train, frozen = trainable.split(params, trainable.labels(params, config.trainable))
    assert trainable.count(train) == expected
    assert trainable.count(train) + trainable.count(frozen) == 859_520_964 + 123_060_480 + tokens * 768


def test_a_parameter_no_rule_covers_is_an_error():
    with pytest.raises(ValueError, match="unet/conv_in/kernel matches no trainable rule"):
        trainable.labels({"unet": {"conv_in": {"kernel": 0}}}, [(r"concept/.*", "train")])


def test_mlm_gradient_reaches_only_the_text_side(pictures, contextualizer_dir):
    """DreamBooth trains the UNet and the text encoder; L_mlm's gradient must reach the text side only.

    L = L_diff + w·L_prior + λ·L_mlm is linear in its parts, so this also means that the UNet receives
    exactly the baseline's gradient.
    """
    setup = build(load_config("dreambooth"), pictures, contextualizer_dir)
    state, batch = setup.state, setup.make_batch(0)
    assert {"mlm_input_ids", "mlm_labels", "mlm_mask"} <= set(batch) and batch["mlm_mask"].any()

    def mlm_loss(params, frozen, batch):  # the weights as arguments: closed over, XLA would fold them
        return train_step_lib.mlm_loss(state.spec, trainable.merge(params, frozen), batch)[0]

    grads = jax.jit(jax.grad(mlm_loss))(state.params, state.frozen, batch)
    assert all(not np.asarray(g).any() for g in jax.tree.leaves(grads["unet"]))
    assert any(np.asarray(g).any() for g in jax.tree.leaves(grads["text_encoder"]))
    assert np.asarray(grads["concept"]["embeddings"]).any()


def test_one_text_encoder_pass_equals_a_pass_per_prompt_batch(pictures, contextualizer_dir):
    """The step encodes the UNet's prompts and the MLM prompts in one pass (``_encode_together``):
    losses and gradients equal those of a pass per batch, the UNet's and the MLM loss's own. Custom
    Diffusion: the text encoder trained, prior rows, and a UNet gradient of its K/V projections only
    (DreamBooth's whole UNet would double the two compiles' time and add nothing on the text side)."""
    setup = build(load_config("custom_diffusion"), pictures, contextualizer_dir)
    state, batch, rng = setup.state, setup.make_batch(0), jax.random.key(5)

    # Frozen weights, batch and key are arguments: closed over, they would be constants of the
    # compiled programs, which XLA then folds (this test took 106 s that way, on a 2-core box).
    def apart(params, frozen, batch, rng):
        merged = trainable.merge(params, frozen)
        rows = train_step_lib._unet_batch(state.spec, batch, rng)
        context = train_step_lib.text_context(state.spec, merged, rows["input_ids"])
        instance, prior = train_step_lib._diffusion_losses(state.spec, merged, rows, context)
        mlm = train_step_lib.mlm_loss(state.spec, merged, batch)[0]
        weights = state.hyperparams
        return instance.mean() + weights.prior_weight * prior.mean() + weights.mlm_weight * mlm, mlm

    def together(params, frozen, batch, rng):
        loss, metrics = train_step_lib.loss_fn(params, frozen, state.spec, state.hyperparams, batch, rng)
        return loss, metrics["loss_mlm"]

    arguments = state.params, state.frozen, batch, rng
    (loss, mlm), grads = jax.jit(jax.value_and_grad(together, has_aux=True))(*arguments)
    (expected_loss, expected_mlm), expected = jax.jit(jax.value_and_grad(apart, has_aux=True))(*arguments)
    assert float(mlm) > 0 and float(mlm) == pytest.approx(float(expected_mlm), rel=1e-6)
    assert float(loss) == pytest.approx(float(expected_loss), rel=1e-6)
    for ours, theirs in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("width, layers, unet_rows, xti, shared", [
    (32, 2, 8, False, True),  # the tiny model: 26 × 77 × 32 × 2 floats, 0.5 MB
    (768, 12, 2, False, False),  # SD 1.5: 71 MB, and 1.0-1.2 GiB more peak memory when shared
    (32, 2, 8, True, False),  # XTI/P+: a pass per concept token
])
def test_prompt_batches_share_a_text_encoder_pass_only_when_small(width, layers, unet_rows, xti, shared):
    text = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=width, num_hidden_layers=layers))
    spec = types.SimpleNamespace(text_encoder=text, layer_tokens=(0, 1) if xti else None)
    unet_ids, mlm_ids = jnp.zeros((unet_rows, 77), jnp.int32), jnp.zeros((26, 77), jnp.int32)
    assert train_step_lib._shares_a_pass(spec, unet_ids, mlm_ids) is shared


def test_lambda_zero_is_the_plain_baseline_without_the_mlm_branch(pictures, contextualizer_dir):
    with_mlm = build(load_config("ti"), pictures, contextualizer_dir)
    config = load_config("ti")
    config.mlm.weight = 0.0
    plain = build(config, pictures, contextualizer_dir)
    assert plain.state.spec.contextualizer is None and "mlm" not in plain.state.frozen
    batch, plain_batch = with_mlm.make_batch(0), plain.make_batch(0)
    assert not any(k.startswith("mlm") for k in plain_batch)
    for key in plain_batch:  # same seed, same step: the same diffusion data
        np.testing.assert_array_equal(plain_batch[key], batch[key])
    # Nothing of the contextualizer (its 32 × 49,409 vocabulary projection) is in the computation,
    # even when the batch carries MLM fields; with λ > 0 it is.
    rng = jax.random.key(3)
    lower = jax.jit(train_step_lib.train_step).lower
    assert "49409" not in lower(plain.state, batch, rng).as_text()
    assert "49409" in lower(with_mlm.state, batch, rng).as_text()


def test_xti_feeds_token_k_to_the_layers_of_block_group_k(pictures, contextualizer_dir):
    setup = build(load_config("xti"), pictures, contextualizer_dir)
    spec = setup.state.spec
    # The tiny UNet: 3 down blocks with 1 cross-attention layer each, the mid block, 3 up blocks with 2.
    assert spec.layer_tokens == (0, 1, 2, 3, 4, 4, 5, 5, 6, 6)
    assert setup.state.params["concept"]["embeddings"].shape == (7, 32)
    params = trainable.merge(setup.state.params, setup.state.frozen)
    tokens = jax.random.normal(jax.random.key(0), (7, 32))
    ids = setup.make_batch(0)["input_ids"]
    stack = train_step_lib.text_context(spec, dict(params, concept={"embeddings": tokens}), ids)
    assert stack.shape == (10, *ids.shape, 32)
    shared = dataclasses.replace(spec, layer_tokens=None)
    for layer, token in enumerate(spec.layer_tokens):
        expected = train_step_lib.text_context(shared, dict(params, concept={"embeddings": tokens[token:token + 1]}), ids)
        np.testing.assert_allclose(stack[layer], expected, rtol=1e-6, atol=1e-6)


def _eval_loss(step, state, batches):
    """Mean diffusion loss at ``state``'s parameters on fixed batches, noise and timesteps.

    The step's metrics are computed before its update, and its randomness is fold_in(rng, step):
    with the step counter pinned to 0 the same noise is drawn for every evaluation.
    """
    pinned = state.replace(step=jnp.zeros_like(state.step))
    return float(np.mean([step(pinned, b, jax.random.key(100))[1]["loss_diff"] for b in batches]))


# The paper's rates move a random tiny model too little in 30 steps.
TRAIN_STEP_LEARNING_RATES = {"ti": 5e-2, "xti": 5e-2, "dreambooth": 1e-3, "custom_diffusion": 5e-3}


@pytest.mark.parametrize("name", METHODS)
def test_each_method_lowers_its_loss_and_freezes_the_rest(name, pictures, contextualizer_dir):
    config = load_config(name)
    config.learning_rate = TRAIN_STEP_LEARNING_RATES[name]
    setup = build(config, pictures, contextualizer_dir)
    frozen_before = jax.tree.map(np.asarray, setup.state.frozen)
    eval_batches = [setup.make_batch(10_000 + i) for i in range(4)]
    step = jax.jit(train_step_lib.train_step)
    before = _eval_loss(step, setup.state, eval_batches)
    state = setup.state
    for i in range(30):
        state, metrics = step(state, setup.make_batch(i), jax.random.key(config.seed))
    after = _eval_loss(step, state, eval_batches)
    print(name, before, after, {k: float(v) for k, v in metrics.items()})
    assert after < 0.97 * before
    assert np.isfinite(float(metrics["loss_mlm"])) and 0 <= float(metrics["mlm_accuracy"]) <= 1
    for a, b in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(frozen_before)):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert int(state.step) == 30


def test_the_rate_and_loss_weights_are_data_so_a_sweep_compiles_one_step(pictures, contextualizer_dir):
    """Runs that differ only in learning rate, w_prior or λ (the paper's λ sweeps) share one executable,
    and each gets its own numbers: the loss weighs its parts by the state's weights, and the update
    scales with the state's rate. Custom Diffusion has all three (class images and the MLM branch);
    the program is test_each_method_lowers_its_loss_and_freezes_the_rest's, a persistent-cache hit."""
    config = load_config("custom_diffusion")
    setup = build(config, pictures, contextualizer_dir)
    base = setup.state
    assert float(base.hyperparams.learning_rate) == pytest.approx(config.learning_rate)
    assert (float(base.hyperparams.prior_weight), float(base.hyperparams.mlm_weight)) == pytest.approx(
        (config.prior.weight, config.mlm.weight))
    step = jax.jit(train_step_lib.train_step)
    batch, rng = setup.make_batch(0), jax.random.key(7)
    placed = functools.partial(jax.device_put, device=base.hyperparams.learning_rate.sharding)  # as create() puts it
    weights = {"base": base.hyperparams,
               "rate": base.hyperparams.replace(learning_rate=placed(np.float32(3 * config.learning_rate))),
               "losses": base.hyperparams.replace(prior_weight=placed(np.float32(0.25)),
                                                  mlm_weight=placed(np.float32(0.5)))}
    compiled_before = step._cache_size()  # jit's cache is the function's: earlier tests' steps are in it
    runs = {name: step(base.replace(hyperparams=w), batch, rng) for name, w in weights.items()}
    assert step._cache_size() - compiled_before <= 1  # 0 when test_each_method_... compiled it already
    # The same program text: the same persistent-cache key, so separate processes (launch/sweep.py) share it.
    texts = {name: step.lower(base.replace(hyperparams=w), batch, rng).as_text() for name, w in weights.items()}
    assert texts["base"] == texts["rate"] == texts["losses"]

    for name, (_, metrics) in runs.items():
        w = weights[name]
        parts = metrics["loss_diff"] + w.prior_weight * metrics["loss_prior"] + w.mlm_weight * metrics["loss_mlm"]
        assert float(metrics["loss"]) == pytest.approx(float(parts), rel=1e-6)
        assert float(metrics["lr"]) == pytest.approx(float(w.learning_rate))
    # Same gradients, three times the rate: three times the move (AdamW's decay scales with it too), up
    # to the float32 rounding of the moved parameters (a few units in their last place).
    for start, once, thrice in zip(*(jax.tree.leaves(params) for params in (
            base.params, runs["base"][0].params, runs["rate"][0].params))):
        start, once, thrice = (np.asarray(x, np.float64) for x in (start, once, thrice))
        assert np.abs(thrice - start).max() > 0
        largest = np.maximum(np.abs(start), np.maximum(np.abs(once), np.abs(thrice)))
        ulp = np.spacing(largest.astype(np.float32)).astype(np.float64)
        np.testing.assert_array_less(np.abs((thrice - start) - 3 * (once - start)), 4 * ulp + 1e-12)
    # Other weights, other gradients (here w_prior 1 → 0.25 dominates: 6.9 → 4.0).
    assert float(runs["losses"][1]["grad_norm"]) < 0.8 * float(runs["base"][1]["grad_norm"])
    with pytest.raises(ValueError, match="mlm_weight=0 with a contextualizer"):
        train_step_lib.TrainState.create(params=base.params, frozen=base.frozen, spec=base.spec, tx=base.tx,
                                         hyperparams=base.hyperparams.replace(mlm_weight=np.float32(0)))


def test_batches_are_pure_in_the_step_and_safe_to_make_in_threads(pictures, contextualizer_dir):
    """The batch pipeline prefetches in threads: batches made concurrently must be the sequential ones
    (a shared tokenizer once made them differ)."""
    import concurrent.futures

    setup = build(load_config("xti"), pictures, contextualizer_dir)
    sequential = [setup.make_batch(step) for step in range(24)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        concurrent_batches = list(pool.map(setup.make_batch, range(24)))
    for step, (a, b) in enumerate(zip(sequential, concurrent_batches)):
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=f"step {step}: {name}")
    assert not np.array_equal(sequential[0]["mlm_input_ids"], sequential[1]["mlm_input_ids"])
