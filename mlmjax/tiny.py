"""The embedded default: a tiny Stable-Diffusion-shaped model that needs no download.

Same architecture family as SD 1.5 (CLIP text tower with the real 49,408-token vocabulary, a UNet
with three cross-attention down blocks, a plain down block, a cross-attention mid block and the mirror
on the way up, hence the same 7 cross-attention block groups; a KL autoencoder), with few channels and
32×32 images (16×16×4 latents).

:func:`tiny_pretrained` gives this architecture with random weights (in about a second on a CPU): the
starting point of tests and, with the UNet twice as wide and without attention at its finest level
(:data:`WORLD_UNET`), of the world's pretraining. The shipped default, ``assets/tiny``, is that model
trained on the miniature world (:mod:`mlmjax.world.pretrain`), with the world's novel concept as the
concept to customize, so every part of mlmjax runs, and shows something, without network access.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from mlmjax import pretrained as pretrained_lib
from mlmjax import tokenizer as tokenizer_lib
from mlmjax.world import render as world_render
from mlmjax.world import scene as world_scene

RESOLUTION = 32

TEXT_ENCODER_CONFIG = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
    "vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 2, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407,
    "projection_dim": 32,
}

UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": RESOLUTION // 2, "in_channels": 4, "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [16, 32, 32, 32], "layers_per_block": 1, "norm_num_groups": 8,
    "cross_attention_dim": 32, "attention_head_dim": 2, "flip_sin_to_cos": True, "freq_shift": 0,
}

VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": RESOLUTION,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8,
    "scaling_factor": 0.18215,
}

# The world model, as changes to the tests' configs (which keep Stable Diffusion's block structure, not
# the quality). UNet: at UNET_CONFIG's width (0.55 M parameters) it learned backgrounds and colours but
# drew every object as the same blob; at twice the width (2.1 M) objects come out. Attention at the
# finest level (16x16 latents, 256 tokens) cost 45% of the wide UNet's step on a CPU; the world's
# 32 px scenes get their layout from the 8x8 and 4x4 levels' attention. VAE: its mid-block attention
# (256 tokens) cost 27% of a VAE step, and a factor-2 autoencoder of flat-coloured scenes needs no
# global context (diffusers' mid_block_add_attention, as some SD-family autoencoders set it).
WORLD_UNET = {
    "block_out_channels": [32, 64, 64, 64],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}
WORLD_VAE = {"mid_block_add_attention": False}
WORLD = {"unet": WORLD_UNET, "vae": WORLD_VAE}

# Stable Diffusion 1.x's noise schedule.
SCHEDULER_CONFIG = {
    "_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
    "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
}


def tiny_pretrained(seed: int = 0, dtype=jnp.float32,
                    changes: Mapping[str, Mapping[str, Any]] | None = None) -> pretrained_lib.Pretrained:
    """The tiny model with random weights; `changes` updates its components' configs by name (e.g.
    :data:`WORLD`, the world model's). The same seed gives the same weights."""
    defaults = {"text_encoder": TEXT_ENCODER_CONFIG, "unet": UNET_CONFIG, "vae": VAE_CONFIG}
    changes = changes or {}
    if set(changes) - set(defaults):
        raise ValueError(f"tiny_pretrained: changes for unknown components {sorted(set(changes) - set(defaults))}; "
                         f"the components are {sorted(defaults)}")
    configs = {name: {**config, **changes.get(name, {})} for name, config in defaults.items()}
    modules, params = {}, {}
    for offset, (name, config) in enumerate(configs.items()):
        modules[name] = pretrained_lib.build_component(name, config, dtype, f"mlmjax.tiny:{name}")
        params[name] = jax.tree.map(lambda x: x.astype(dtype),
                                    pretrained_lib.init_component(name, modules[name], seed * 3 + offset))
    return pretrained_lib.Pretrained(tokenizer=tokenizer_lib.vendored_tokenizer(),
                                     scheduler_config=dict(SCHEDULER_CONFIG), params=params, **modules)


# ---------------------------------------------------------------------------------------------------
# The embedded assets: shipped in the package so that `python -m mlmjax.train` runs with no download.

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny")
CLASS_NOUN = "teapot"
_PICTURE_SIZE = 64


class EmbeddedAssets(NamedTuple):
    model: str  # diffusers-layout folder
    contextualizer: str  # a contextualizer folder pretrained on the tiny text encoder
    concept_images: str  # photos of the concept: the world's novel teapot, in one context
    class_images: str  # the world's ordinary teapots, for prior preservation
    class_noun: str


def embedded_assets() -> EmbeddedAssets:
    """Paths of the embedded default, checked to exist."""
    assets = EmbeddedAssets(os.path.join(ASSETS_DIR, "model"), os.path.join(ASSETS_DIR, "contextualizer"),
                            os.path.join(ASSETS_DIR, "concept"), os.path.join(ASSETS_DIR, "class"), CLASS_NOUN)
    for path in assets[:4]:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: the embedded default is incomplete; reinstall mlmjax "
                                    "(or rebuild it as mlmjax/assets/tiny/README.md says)")
    return assets


def write_pictures(folder: str, seed: int, count: int, *, concept: bool) -> None:
    """The concept's photos (the world's novel teapot, all on the kitchen table: one context) or class
    pictures (the world's ordinary teapots in random contexts), rendered at 64×64."""
    rng = np.random.default_rng(seed)
    scenes = (world_scene.sample_concept_scenes(rng, count) if concept
              else world_scene.sample_class_scenes(rng, count))
    os.makedirs(folder, exist_ok=True)
    for i, scene in enumerate(scenes):
        name = f"{'concept' if concept else 'class'}_{i:02d}.png"
        world_render.render_image(scene, _PICTURE_SIZE).save(os.path.join(folder, name))


def _demo(out: str, prompt: str) -> None:
    """Writes the tiny model (once), loads it back and runs text -> UNet -> VAE decode on it."""
    if not os.path.isfile(os.path.join(out, "model_index.json")):
        pretrained_lib.save_pretrained(out, tiny_pretrained())
        print(f"wrote the tiny default model to {out}")
    model = pretrained_lib.load_pretrained(out)
    sizes = {name: sum(x.size for x in jax.tree.leaves(p)) for name, p in model.params.items()}
    print("loaded", ", ".join(f"{name} {count:,} parameters" for name, count in sizes.items()))
    ids = tokenizer_lib.tokenize(model.tokenizer, [prompt])
    context = model.text_encoder.apply({"params": model.params["text_encoder"]}, ids)
    latents = jax.random.normal(jax.random.key(0), (1, RESOLUTION // 2, RESOLUTION // 2, 4))
    noise_pred = model.unet.apply({"params": model.params["unet"]}, latents, jnp.array([999]), context)
    image = model.vae.apply({"params": model.params["vae"]}, noise_pred / model.vae.config.scaling_factor,
                            method=model.vae.decode)
    print(f"{prompt!r}: text context {context.shape}, UNet output {noise_pred.shape}, image {image.shape}")
    path = os.path.join(out, "demo.png")
    pixels = np.asarray((jnp.clip(image[0], -1, 1) + 1) * 127.5).astype(np.uint8)
    Image.fromarray(pixels).resize((128, 128), Image.NEAREST).save(path)
    print(f"random weights, so the image is noise: {path}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the tiny diffusers-layout model")
    parser.add_argument("--prompt", default="a photo of a dog wearing a red hat")
    args = parser.parse_args()
    _demo(args.out, args.prompt)
