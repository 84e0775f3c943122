"""Whole-pipeline loading and saving in diffusers layout, against PyTorch diffusers."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import mlmjax
from mlmjax import pretrained as pretrained_lib
from mlmjax import tiny
from mlmjax.models import clip_text, shapes
from mlmjax import tokenizer as tokenizer_lib
from helpers import relative_error
import torch_reference


@pytest.fixture(scope="module", params=[1, 2], ids=["sd1", "sd2"])
def torch_folder(request, tmp_path_factory):
    """A tiny SD 1.x- or 2.x-like pipeline written by diffusers' own save_pretrained."""
    pipeline = torch_reference.build_pipeline(request.param)
    folder = tmp_path_factory.mktemp(f"sd{request.param}")
    pipeline.save_pretrained(folder)
    return pipeline, str(folder)


def _inputs(seed=0, batch=2):
    rng = np.random.default_rng(seed)
    ids = tokenizer_lib.tokenize(tokenizer_lib.vendored_tokenizer(), ["a photo of a dog", "a red hat on a table"])
    latents = rng.standard_normal((batch, 16, 16, 4)).astype(np.float32)
    images = rng.uniform(-1, 1, (batch, tiny.RESOLUTION, tiny.RESOLUTION, 3)).astype(np.float32)
    return ids[:batch], latents, images, np.array([10, 900])[:batch]


def _text_unet(model, params, ids, latents, timesteps):
    context = model.text_encoder.apply({"params": params["text_encoder"]}, jnp.asarray(ids))
    return np.asarray(model.unet.apply({"params": params["unet"]}, latents, jnp.asarray(timesteps), context))


def test_loads_diffusers_folder_and_matches_pytorch(torch_folder):
    pipeline, folder = torch_folder
    model = mlmjax.load_pretrained(folder)
    ids, latents, images, timesteps = _inputs()
    ours = _text_unet(model, model.params, ids, latents, timesteps)
    theirs = torch_reference.text_unet_forward(pipeline, ids, latents, timesteps)
    assert relative_error(ours, theirs) <= 1e-4
    mean, logvar = model.vae.apply({"params": model.params["vae"]}, images, method=model.vae.encode)
    decoded = model.vae.apply({"params": model.params["vae"]}, mean, method=model.vae.decode)
    for got, want in zip((mean, logvar, decoded), torch_reference.vae_roundtrip(pipeline, images)):
        assert relative_error(got, want) <= 1e-5
    assert model.scheduler_config["prediction_type"] == pipeline.scheduler.config.prediction_type
    assert model.vae.config.scaling_factor == pytest.approx(0.18215)


def test_save_is_loaded_by_diffusers_and_round_trips_exactly(torch_folder, tmp_path):
    import diffusers

    pipeline, folder = torch_folder
    model = mlmjax.load_pretrained(folder)
    out = str(tmp_path / "export")
    mlmjax.save_pretrained(out, model)
    again = mlmjax.load_pretrained(out)
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(again.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.structure(model.params) == jax.tree.structure(again.params)
    # save → load → save writes byte-identical weights
    mlmjax.save_pretrained(str(tmp_path / "export2"), again)
    for sub, name in (("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        with open(os.path.join(out, sub, name), "rb") as f1, open(tmp_path / "export2" / sub / name, "rb") as f2:
            assert f1.read() == f2.read()
    reloaded = diffusers.StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    ids, latents, _, timesteps = _inputs(seed=1)
    np.testing.assert_allclose(torch_reference.text_unet_forward(reloaded, ids, latents, timesteps),
                               torch_reference.text_unet_forward(pipeline, ids, latents, timesteps), rtol=0, atol=0)
    assert len(reloaded.tokenizer) == len(pipeline.tokenizer)


def test_tiny_default_initialises_and_round_trips(tmp_path):
    model = tiny.tiny_pretrained(seed=3)
    again = tiny.tiny_pretrained(seed=3)
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(again.params)):
        np.testing.assert_array_equal(a, b)
    mlmjax.save_pretrained(str(tmp_path / "tiny"), model)
    loaded = mlmjax.load_pretrained(str(tmp_path / "tiny"))
    ids, latents, _, timesteps = _inputs()
    np.testing.assert_array_equal(_text_unet(model, model.params, ids, latents, timesteps),
                                  _text_unet(loaded, loaded.params, ids, latents, timesteps))
    assert loaded.unet.config.to_dict()["block_out_channels"] == tiny.UNET_CONFIG["block_out_channels"]


def test_a_modules_parameter_shapes_are_traced_once_and_each_caller_gets_its_own_tree():
    """Loading a model again in the same process does not trace its initialisation again; a module that
    differs in its configuration, or that cannot be hashed, is traced for itself."""
    traced = []

    def init_params(module, rng):
        traced.append(module)
        return clip_text.init_params(module, rng)

    config = dict(tiny.TEXT_ENCODER_CONFIG)
    module = pretrained_lib.build_component("text_encoder", config)
    first = shapes.abstract_params(init_params, module)
    first["embeddings"] = "edited by its caller"
    again = shapes.abstract_params(init_params, pretrained_lib.build_component("text_encoder", config))
    assert len(traced) == 1 and again["embeddings"] != "edited by its caller"
    assert jax.tree.structure(again) == jax.tree.structure(
        jax.eval_shape(lambda rng: clip_text.init_params(module, rng), jax.random.key(0)))
    leaves = jax.tree.leaves(again)
    assert leaves and all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
    wider = pretrained_lib.build_component("text_encoder", dict(config, hidden_size=2 * config["hidden_size"]))
    assert shapes.abstract_params(init_params, wider)["final_layer_norm"]["scale"].shape == (
        2 * config["hidden_size"],)
    assert len(traced) == 2

    class Unhashable:  # a module whose fields cannot be hashed is traced at every call
        __hash__ = None

    def init_unhashable(module, rng):
        traced.append(module)
        return {"w": jnp.zeros((2, 3))}

    for _ in range(2):
        assert shapes.abstract_params(init_unhashable, Unhashable())["w"].shape == (2, 3)
    assert len(traced) == 4


def test_fp16_sharded_and_prefixed_checkpoints_load(torch_folder, tmp_path):
    _, folder = torch_folder
    reference = mlmjax.load_pretrained(folder)
    variant = tmp_path / "variant"
    shutil.copytree(folder, variant)
    # UNet: fp16 variant only. Text encoder: sharded with an index and the legacy `text_model.` prefix.
    unet_dir = variant / "unet"
    tensors = safetensors.numpy.load_file(unet_dir / "diffusion_pytorch_model.safetensors")
    os.remove(unet_dir / "diffusion_pytorch_model.safetensors")
    safetensors.numpy.save_file({k: v.astype(np.float16) for k, v in tensors.items()},
                                unet_dir / "diffusion_pytorch_model.fp16.safetensors")
    te_dir = variant / "text_encoder"
    tensors = safetensors.numpy.load_file(te_dir / "model.safetensors")
    os.remove(te_dir / "model.safetensors")
    tensors = {("text_model." + k if not k.startswith("text_model.") else k): v for k, v in tensors.items()}
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for shard, names in shards.items():
        safetensors.numpy.save_file({k: tensors[k] for k in names}, te_dir / shard)
    with open(te_dir / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: s for s, names in shards.items() for k in names}}, f)

    model = mlmjax.load_pretrained(str(variant))
    for a, b in zip(jax.tree.leaves(model.params["text_encoder"]), jax.tree.leaves(reference.params["text_encoder"])):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(model.params["unet"]), jax.tree.leaves(reference.params["unet"])):
        np.testing.assert_array_equal(a, np.asarray(b).astype(np.float16).astype(np.float32))
    half = mlmjax.load_pretrained(str(variant), dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(half.params)} == {jnp.dtype(jnp.bfloat16)}


def _copy(folder, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


@pytest.mark.parametrize("damage, message", [
    (lambda d: os.remove(d / "model_index.json"), "model_index.json: file not found"),
    (lambda d: shutil.rmtree(d / "vae"), "sub-folder vae/ is missing"),
    (lambda d: os.replace(d / "unet" / "diffusion_pytorch_model.safetensors", d / "unet" / "diffusion_pytorch_model.bin"),
     "pickled PyTorch weights are never loaded"),
    (lambda d: (d / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 64), "not a readable safetensors"),
    (lambda d: (d / "unet" / "config.json").write_text("{not json"), "not valid JSON"),
])
def test_damaged_folders_are_refused_with_the_file_named(torch_folder, tmp_path, damage, message):
    _, folder = torch_folder
    target = _copy(folder, tmp_path)
    damage(target)
    with pytest.raises(mlmjax.WeightsError, match=message):
        mlmjax.load_pretrained(str(target))


def test_mismatched_tensor_is_refused_with_the_key_named(torch_folder, tmp_path):
    _, folder = torch_folder
    target = _copy(folder, tmp_path)
    path = target / "text_encoder" / "model.safetensors"
    tensors = safetensors.numpy.load_file(path)
    key = next(k for k in tensors if k.endswith("final_layer_norm.weight"))
    tensors[key] = tensors[key][:-1]
    safetensors.numpy.save_file(tensors, path)
    with pytest.raises(mlmjax.WeightsError, match=rf"{key}.*shape"):
        mlmjax.load_pretrained(str(target))
    del tensors[key]
    safetensors.numpy.save_file(tensors, path)
    with pytest.raises(mlmjax.WeightsError, match="missing from the checkpoint"):
        mlmjax.load_pretrained(str(target))


def test_missing_folder_and_existing_output_are_errors(tmp_path):
    with pytest.raises(mlmjax.WeightsError, match="folder not found"):
        mlmjax.load_pretrained(str(tmp_path / "nowhere"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError):
        mlmjax.save_pretrained(str(tmp_path / "out"), tiny.tiny_pretrained())
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"


def test_tokenizer_is_the_real_clip_bpe_and_a_saved_tokenizer_wins(tmp_path):
    tokenizer = tokenizer_lib.load_tokenizer()
    assert len(tokenizer) == 49408
    # Ids of OpenAI CLIP's vocabulary (also Stable Diffusion's).
    assert tokenizer("a photo of a sks dog").input_ids == [49406, 320, 1125, 539, 320, 48136, 1929, 49407]
    ids = tokenizer_lib.add_concept_tokens(tokenizer, ["<dog6>"])
    assert ids == [49408]
    for known in ("dog", "Sks", "<dog6>"):
        with pytest.raises(ValueError, match="already in the tokenizer"):
            tokenizer_lib.add_concept_tokens(tokenizer, [known])
    tokenizer.save_pretrained(tmp_path)
    saved = tokenizer_lib.load_tokenizer(str(tmp_path))
    assert len(saved) == 49409 and saved("a <dog6> dog").input_ids == [49406, 320, 49408, 1929, 49407]
    assert tokenizer_lib.tokenize(saved, ["a dog"]).shape == (1, 77)
