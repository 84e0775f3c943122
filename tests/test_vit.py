"""The Flax CLIP and DINO image (and CLIP text) encoders against transformers (PyTorch, CPU, float32).

Tiny random networks written by transformers' ``save_pretrained`` and read back through
:mod:`mlmjax.eval_models`, as the evaluation reads the released ``openai/clip-vit-base-patch32`` and
``facebook/dino-vits16`` folders.
"""

import dataclasses
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import safetensors.numpy
import torch
import transformers

from helpers import relative_error
from mlmjax import eval_models
from mlmjax import tokenizer as tokenizer_lib
from mlmjax import weights
from mlmjax.models import vit
from torch_reference import randomize_

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

TOLERANCE = 1e-5

# Like OpenAI's ViT-B/32 (quick_gelu) and ViT-L/14 (another patch size, depth and head width), tiny.
CLIP_B = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8, hidden_act="quick_gelu")
CLIP_L = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=2, image_size=28,
              patch_size=14, hidden_act="gelu")
# OpenAI's text config keeps the pre-2023 ids (eos_token_id=2: pooling at the largest id) and the real vocabulary.
CLIP_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=49408,
                 max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)
DINO = {
    # dino-vits16's layout: qkv biases, and the pooler ViTModel adds by default (skipped on load).
    "pooler": (dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=3, image_size=32,
                    patch_size=8), True),
    "no_qkv_bias": (dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         image_size=[24, 24], patch_size=8, qkv_bias=False), False),
}
PROMPTS = ["A photo depicts a duck toy on the beach", "A photo depicts a teddy bear wearing a santa hat", "a"]


@dataclasses.dataclass
class Reference:
    torch_model: torch.nn.Module
    folder: str
    model: eval_models.EvalModel


def _save(torch_model: torch.nn.Module, folder: str) -> None:
    torch_model.save_pretrained(folder, safe_serialization=True)
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]


def _pixels(config: vit.ViTConfig, seed: int, batch: int = 3) -> np.ndarray:
    """Normalised NHWC images, as the model takes them."""
    shape = (batch, config.image_size, config.image_size, config.num_channels)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _nchw(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(pixels)).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def prompt_ids() -> np.ndarray:
    """CLIP-T's text ids: the real CLIP tokenizer, padded to 77."""
    return tokenizer_lib.tokenize(tokenizer_lib.vendored_tokenizer(), PROMPTS)


@pytest.fixture(scope="module")
def clip_vision(tmp_path_factory) -> Reference:
    torch_model = transformers.CLIPVisionModelWithProjection(
        transformers.CLIPVisionConfig(projection_dim=16, **CLIP_B)).eval()
    randomize_(torch_model, seed=1)
    folder = str(tmp_path_factory.mktemp("clip_vision"))
    _save(torch_model, folder)
    return Reference(torch_model, folder, eval_models.load_clip(folder))


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Reference:
    config = transformers.CLIPConfig(text_config=CLIP_TEXT, vision_config=CLIP_L, projection_dim=12)
    torch_model = transformers.CLIPModel(config).eval()
    randomize_(torch_model, seed=2)
    folder = str(tmp_path_factory.mktemp("clip"))
    _save(torch_model, folder)
    return Reference(torch_model, folder, eval_models.load_clip(folder))


@pytest.fixture(scope="module", params=list(DINO))
def dino(request, tmp_path_factory) -> Reference:
    kwargs, pooler = DINO[request.param]
    torch_model = transformers.ViTModel(transformers.ViTConfig(**kwargs), add_pooling_layer=pooler).eval()
    randomize_(torch_model, seed=3)
    folder = str(tmp_path_factory.mktemp(f"dino_{request.param}"))
    _save(torch_model, folder)
    return Reference(torch_model, folder, eval_models.load_dino(folder))


# ---------------------------------------------------------------------------------------------------
# Parity


@functools.partial(jax.jit, static_argnums=0)
def _clip_vision_forward(module, params, pixels):
    def forward(m, x):
        last_hidden_state, _ = m.vision_model(x)
        return last_hidden_state, m(x)

    return module.apply({"params": params}, pixels, method=forward)


def test_clip_vision_with_projection_matches_transformers(clip_vision):
    model = clip_vision.model
    assert isinstance(model.module, vit.CLIPVisionModelWithProjection)
    # No preprocessor_config.json: CLIP's own constants.
    assert model.preprocessing == eval_models.Preprocessing(32, eval_models.CLIP_MEAN, eval_models.CLIP_STD, "cubic")
    pixels = _pixels(model.module.config, seed=0)
    last, embeds = _clip_vision_forward(model.module, model.params, pixels)
    with torch.no_grad():
        expected = clip_vision.torch_model(pixel_values=_nchw(pixels))
    assert relative_error(last, expected.last_hidden_state) <= TOLERANCE
    assert relative_error(embeds, expected.image_embeds) <= TOLERANCE


@functools.partial(jax.jit, static_argnums=0)
def _clip_forward(module, params, input_ids, pixels):
    def forward(m, ids, x):
        return m(ids, x), m.get_image_features(x), m.get_text_features(ids)

    return module.apply({"params": params}, input_ids, pixels, method=forward)


def test_clip_model_matches_transformers(clip, prompt_ids):
    module, ids = clip.model.module, prompt_ids
    assert isinstance(module, vit.CLIPModel)
    pixels = _pixels(module.vision_config, seed=1, batch=2)
    output, image_features, text_features = _clip_forward(module, clip.model.params, ids, pixels)
    with torch.no_grad():
        torch_ids, torch_pixels = torch.from_numpy(ids).long(), _nchw(pixels)
        expected = clip.torch_model(input_ids=torch_ids, pixel_values=torch_pixels)
        expected_text = clip.torch_model.get_text_features(input_ids=torch_ids).pooler_output
        expected_image = clip.torch_model.get_image_features(pixel_values=torch_pixels).pooler_output
    assert output.logits_per_image.shape == (2, len(PROMPTS))
    for ours, theirs in [(output.logits_per_image, expected.logits_per_image),
                         (output.image_embeds, expected.image_embeds), (output.text_embeds, expected.text_embeds),
                         (image_features, expected_image), (text_features, expected_text)]:
        assert relative_error(ours, theirs) <= TOLERANCE


def test_clip_text_tower_is_mlmjax_text_encoder(clip, prompt_ids):
    """The text half loads into mlmjax's own CLIPTextModel; projecting its pooled output is text_embeds."""
    module, params, projection = eval_models.clip_text_tower(clip.model)
    last = jax.jit(module.apply)({"params": params}, prompt_ids)
    with torch.no_grad():
        expected = clip.torch_model.get_text_features(input_ids=torch.from_numpy(prompt_ids).long()).pooler_output
    assert relative_error(module.pooled_output(last, prompt_ids) @ projection, expected) <= TOLERANCE


def test_dino_matches_transformers(dino):
    module = dino.model.module
    pixels = _pixels(module.config, seed=2)
    last, pooled = jax.jit(module.apply)({"params": dino.model.params}, pixels)
    with torch.no_grad():
        expected = dino.torch_model(pixel_values=_nchw(pixels)).last_hidden_state
    assert relative_error(last, expected) <= TOLERANCE
    assert relative_error(pooled, expected[:, 0]) <= TOLERANCE


def test_image_embeddings_preprocess_then_embed(dino):
    """The jitted entry point: uint8 images of another size, resized, normalised, embedded."""
    model = dino.model
    size = model.module.config.image_size
    assert model.preprocessing == eval_models.Preprocessing(size, eval_models.IMAGENET_MEAN, eval_models.IMAGENET_STD)
    images = np.random.default_rng(4).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    ours = jax.jit(eval_models.image_embeddings)(model, images)
    pixels = np.asarray(model.preprocessing(images))
    with torch.no_grad():
        expected = dino.torch_model(pixel_values=_nchw(pixels)).last_hidden_state[:, 0]
    assert relative_error(ours, expected) <= TOLERANCE


# ---------------------------------------------------------------------------------------------------
# Folders and strict loading


def _copy_with(folder: str, tmp_path, edit) -> str:
    """A copy of ``folder`` whose tensors went through ``edit(tensors)``."""
    copy = str(tmp_path / "copy")
    shutil.copytree(folder, copy)
    path = os.path.join(copy, "model.safetensors")
    tensors = safetensors.numpy.load_file(path)
    edit(tensors)
    safetensors.numpy.save_file(tensors, path)
    return copy


def _one_line_naming(error: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)


def test_missing_tensor_is_named(clip_vision, tmp_path):
    folder = _copy_with(clip_vision.folder, tmp_path, lambda t: t.pop("visual_projection.weight"))
    with pytest.raises(weights.WeightsError) as error:
        eval_models.load_clip(folder)
    _one_line_naming(error, "visual_projection.weight", "missing", folder)


def test_unexpected_tensor_is_named(clip_vision, tmp_path):
    key = "vision_model.encoder.layers.2.mlp.fc1.weight"  # a third layer the config does not have
    folder = _copy_with(clip_vision.folder, tmp_path, lambda t: t.update({key: np.zeros((64, 32), np.float32)}))
    with pytest.raises(weights.WeightsError) as error:
        eval_models.load_clip(folder)
    _one_line_naming(error, key)


def test_wrong_shape_is_named(dino, tmp_path):
    key = "embeddings.cls_token"
    width = dino.model.module.config.hidden_size
    folder = _copy_with(dino.folder, tmp_path, lambda t: t.update({key: np.zeros((width,), np.float32)}))
    with pytest.raises(weights.WeightsError) as error:
        eval_models.load_dino(folder)
    _one_line_naming(error, key, f"({width},)", f"(1, 1, {width})")


def test_legacy_buffers_and_pooler_are_skipped(clip, dino, tmp_path):
    """transformers 4 files carry position_ids buffers; a ViTModel saved with or without its pooler loads
    to the same parameters, and a pooler is nowhere in them."""

    def add_buffers(tensors):
        for tower, length in (("text_model", 77), ("vision_model", clip.model.module.vision_config.num_positions)):
            tensors[f"{tower}.embeddings.position_ids"] = np.arange(length, dtype=np.int64)[None]

    legacy = eval_models.load_clip(_copy_with(clip.folder, tmp_path / "clip", add_buffers))
    assert jax.tree.all(jax.tree.map(np.array_equal, legacy.params, clip.model.params))

    def toggle_pooler(tensors):
        if "pooler.dense.weight" in tensors:
            del tensors["pooler.dense.weight"], tensors["pooler.dense.bias"]
        else:
            width = dino.model.module.config.hidden_size
            tensors.update({"pooler.dense.weight": np.ones((width, width), np.float32),
                            "pooler.dense.bias": np.ones((width,), np.float32)})

    toggled = eval_models.load_dino(_copy_with(dino.folder, tmp_path / "dino", toggle_pooler))
    assert jax.tree.all(jax.tree.map(np.array_equal, toggled.params, dino.model.params))
    assert "pooler" not in dino.model.params


def test_pickle_only_folder_is_refused(clip_vision, tmp_path):
    shutil.copy(os.path.join(clip_vision.folder, "config.json"), tmp_path)
    torch.save(clip_vision.torch_model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(weights.WeightsError) as error:
        eval_models.load_clip(str(tmp_path))
    _one_line_naming(error, "pytorch_model.bin", "safe_serialization=True")


def _write_config(folder, config: dict) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return str(folder)


@pytest.mark.parametrize("loader, config, parts", [
    ("load_clip", dict(model_type="clip_vision_model", architectures=["CLIPVisionModel"]),
     ["architectures", "CLIPVisionModel", "CLIPVisionModelWithProjection"]),
    ("load_clip", dict(model_type="vit"), ["model_type", "'vit'", "CLIPModel"]),
    ("load_dino", dict(model_type="dinov2"), ["model_type", "'dinov2'", "ViTModel"]),
    ("load_dino", dict(model_type="vit", hidden_act="gelu_new"), ["hidden_act", "'gelu_new'", "'gelu'"]),
    ("load_dino", dict(model_type="vit", image_size=[32, 24]), ["image_size", "[32, 24]", "square"]),
    ("load_clip", dict(model_type="clip", vision_config=dict(num_attention_heads=5)),
     ["(vision_config)", "num_attention_heads=5", "hidden_size=768"]),
])
def test_unsupported_config_is_named(tmp_path, loader, config, parts):
    folder = _write_config(tmp_path, config)
    with pytest.raises(weights.WeightsError) as error:
        getattr(eval_models, loader)(folder)
    _one_line_naming(error, os.path.join(folder, "config.json"), *parts)


def test_old_config_dicts_win_as_in_transformers():
    """openai/clip-vit-large-patch14's config.json also holds text_config_dict / vision_config_dict."""
    d = dict(model_type="clip", projection_dim=8,
             text_config=dict(hidden_size=64, num_attention_heads=4, eos_token_id=2),
             text_config_dict=dict(hidden_size=48, num_attention_heads=3),
             vision_config=dict(hidden_size=64, patch_size=16),
             vision_config_dict=dict(hidden_size=40, image_size=64, num_attention_heads=5))
    module = eval_models.build_clip(d, "config.json", jnp.float32)
    expected = transformers.CLIPConfig(**{k: v for k, v in d.items() if k != "model_type"})
    for ours, theirs in ((module.text_config, expected.text_config), (module.vision_config, expected.vision_config)):
        for field in ("hidden_size", "num_attention_heads", "image_size", "patch_size", "eos_token_id"):
            if hasattr(ours, field):
                assert getattr(ours, field) == getattr(theirs, field), field


def test_wrong_image_size_is_refused(dino):
    module = dino.model.module
    size = module.config.image_size
    with pytest.raises(ValueError) as error:
        module.apply({"params": dino.model.params}, np.zeros((1, size + 1, size + 1, 3), np.float32))
    _one_line_naming(error, f"[B, {size}, {size}, 3]", "preprocess")


def test_text_embeddings_need_a_text_tower(clip_vision):
    with pytest.raises(ValueError) as error:
        eval_models.text_embeddings(clip_vision.model, np.zeros((1, 77), np.int32))
    _one_line_naming(error, clip_vision.folder, "CLIPModel")


# ---------------------------------------------------------------------------------------------------
# Preprocessing


def _smooth_image(size: int, seed: int) -> np.ndarray:
    """A photo-like uint8 image: smooth, without the hard edges at which PIL's two 8-bit passes clip the
    cubic kernel's ringing in between (up to 7 levels apart from a float resize there)."""
    coarse = np.random.default_rng(seed).integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    return np.asarray(PIL.Image.fromarray(coarse).resize((size, size), PIL.Image.BICUBIC))


def _check_processor(ref: Reference, processor, load, method: str, tmp_path) -> None:
    """A folder with ``processor``'s preprocessor_config.json loads with its resampling, mean and std,
    and prepares pixels as transformers' PIL processor does, up to its 8-bit rounding."""
    folder = str(tmp_path / "with_processor")
    shutil.copytree(ref.folder, folder)
    processor.save_pretrained(folder)
    preprocessing = load(folder).preprocessing
    assert preprocessing.method == method
    np.testing.assert_allclose(preprocessing.mean, processor.image_mean)
    np.testing.assert_allclose(preprocessing.std, processor.image_std)

    images = np.stack([_smooth_image(64, seed) for seed in range(2)])
    expected = processor(images=list(images), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    ours = np.asarray(jax.jit(preprocessing)(images))
    levels = np.abs(ours - expected) * np.asarray(processor.image_std) * 255  # in 8-bit levels of the input
    assert levels.max() < 1.5 and levels.mean() < 0.5


def test_clip_preprocessing_matches_transformers(clip_vision, tmp_path):
    size = clip_vision.model.module.config.image_size
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size=size)
    _check_processor(clip_vision, processor, eval_models.load_clip, "cubic", tmp_path)


def test_vit_preprocessing_matches_transformers(dino, tmp_path):
    size = dino.model.module.config.image_size
    processor = transformers.ViTImageProcessorPil(size={"height": size, "width": size},
                                                  image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25])
    _check_processor(dino, processor, eval_models.load_dino, "linear", tmp_path)


def test_preprocess_float_range_and_identity():
    images = np.random.default_rng(5).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    mean, std = eval_models.CLIP_MEAN, eval_models.CLIP_STD
    from_uint8 = np.asarray(eval_models.preprocess(images, 16, mean, std))
    # At the model's size there is no resampling: exactly (x/255 - mean) / std.
    np.testing.assert_allclose(from_uint8, (images / 255 - np.array(mean)) / np.array(std), rtol=1e-5, atol=1e-5)
    # The VAE decoder's [-1, 1] floats map to the same values; beyond that they are clipped.
    as_float = images.astype(np.float32) / 127.5 - 1
    np.testing.assert_allclose(eval_models.preprocess(as_float, 16, mean, std), from_uint8, atol=1e-5)
    np.testing.assert_allclose(eval_models.preprocess(as_float * 3, 16, mean, std),
                               eval_models.preprocess(np.clip(as_float * 3, -1, 1), 16, mean, std), atol=1e-6)


def test_preprocessor_for_another_size_is_refused(clip, tmp_path):
    shutil.copytree(clip.folder, tmp_path / "clip")
    transformers.CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size=224).save_pretrained(
        str(tmp_path / "clip"))
    with pytest.raises(weights.WeightsError) as error:
        eval_models.load_clip(str(tmp_path / "clip"))
    _one_line_naming(error, "preprocessor_config.json", "crop_size", "image_size=28")


# ---------------------------------------------------------------------------------------------------
# Full size


def _count(tree) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(tree))


def _torch_count(model_class, config, **kwargs) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in model_class(config, **kwargs).parameters())


def test_full_size_parameter_counts():
    """OpenAI CLIP ViT-B/32 (both towers), ViT-L/14's image tower with projection, DINO ViT-S/16."""
    b32 = transformers.CLIPConfig(
        text_config=dict(bos_token_id=0, eos_token_id=2),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                           patch_size=32), projection_dim=512)
    module = eval_models.build_clip(b32.to_dict(), "b32", jnp.float32)
    assert _count(vit.abstract_params(module)) == _torch_count(transformers.CLIPModel, b32) == 151_277_313

    l14 = transformers.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                                        num_hidden_layers=24, patch_size=14, projection_dim=768)
    module = eval_models.build_clip(l14.to_dict(), "l14", jnp.float32)
    assert _count(vit.abstract_params(module)) == _torch_count(transformers.CLIPVisionModelWithProjection, l14)

    s16 = transformers.ViTConfig(hidden_size=384, intermediate_size=1536, num_attention_heads=6)
    module = vit.VisionTransformer(vit.ViTConfig.from_dict(s16.to_dict(), "s16"))
    assert _count(vit.abstract_params(module)) == _torch_count(transformers.ViTModel, s16, add_pooling_layer=False)
