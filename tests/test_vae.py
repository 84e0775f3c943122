"""The Flax VAE against diffusers' ``AutoencoderKL`` (PyTorch, CPU, float32), on tiny configs."""

import functools
import json
import os

import diffusers
import jax
import numpy as np
import pytest
import safetensors.numpy
import torch

from helpers import relative_error
from mlmjax import weights
from mlmjax.models import vae
from torch_reference import randomize_

TOLERANCE = 1e-5
WEIGHTS = "diffusion_pytorch_model.safetensors"

CONFIGS = {
    "sd": dict(block_out_channels=[16, 32], down_block_types=["DownEncoderBlock2D"] * 2,
               up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=2, norm_num_groups=8, latent_channels=4),
    # The switches of newer AutoencoderKL configs, all off.
    "no_quant_no_attention": dict(block_out_channels=[16, 32, 32], down_block_types=["DownEncoderBlock2D"] * 3,
                                  up_block_types=["UpDecoderBlock2D"] * 3, layers_per_block=1, norm_num_groups=8,
                                  latent_channels=3, use_quant_conv=False, use_post_quant_conv=False,
                                  mid_block_add_attention=False),
}

_JIT_OPTIONS = dict(static_argnums=0, compiler_options={"xla_backend_optimization_level": 0})


@functools.partial(jax.jit, **_JIT_OPTIONS)
def _encode(module, params, images):
    return module.apply({"params": params}, images, method="encode")


@functools.partial(jax.jit, **_JIT_OPTIONS)
def _decode(module, params, latents):
    return module.apply({"params": params}, latents, method="decode")


def _load(folder: str, config: vae.VAEConfig) -> dict:
    state_dict, source = weights.read_safetensors(folder, WEIGHTS)
    abstract = jax.eval_shape(functools.partial(vae.init_params, vae.AutoencoderKL(config)), jax.random.key(0))
    return weights.params_from_state_dict(state_dict, abstract, source=source, rename=vae.rename_checkpoint_key,
                                          ignore=vae.IGNORED_CHECKPOINT_KEYS)


def _save_reference(name: str, folder: str) -> diffusers.AutoencoderKL:
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(**CONFIGS[name]).eval()
    randomize_(model, seed=2)
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_encode_and_decode_match_diffusers(tmp_path, name):
    model = _save_reference(name, str(tmp_path))
    with open(tmp_path / "config.json") as f:
        config = vae.VAEConfig.from_dict(json.load(f), str(tmp_path / "config.json"))
    params = _load(str(tmp_path), config)
    module = vae.AutoencoderKL(config)

    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 16, 24, 3)).astype(np.float32)
    mean, logvar = _encode(module, params, images)
    latents = rng.standard_normal(mean.shape, dtype=np.float32)
    decoded = _decode(module, params, latents)
    with torch.no_grad():
        posterior = model.encode(torch.tensor(images).permute(0, 3, 1, 2)).latent_dist
        want_decoded = model.decode(torch.tensor(latents).permute(0, 3, 1, 2)).sample
    errors = {
        "mean": relative_error(mean, posterior.mean.permute(0, 2, 3, 1)),
        "logvar": relative_error(logvar, posterior.logvar.permute(0, 2, 3, 1)),
        "decode": relative_error(decoded, want_decoded.permute(0, 2, 3, 1)),
    }
    print(name, {k: f"{v:.2e}" for k, v in errors.items()})
    assert max(errors.values()) <= TOLERANCE
    assert config.scaling_factor == pytest.approx(0.18215)


def test_legacy_attention_names_load_to_the_same_params(tmp_path):
    _save_reference("sd", str(tmp_path / "current"))
    config = vae.VAEConfig.from_dict(CONFIGS["sd"], "sd")
    tensors = safetensors.numpy.load_file(tmp_path / "current" / WEIGHTS)
    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, value in tensors.items():
        for new, old in legacy_names.items():
            if f".attentions.0.{new}." in key:
                key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
                if value.ndim == 2:  # the oldest checkpoints store these projections as 1x1 convs
                    value = value[:, :, None, None]
        legacy[key] = value
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
    os.makedirs(tmp_path / "legacy")
    safetensors.numpy.save_file(legacy, str(tmp_path / "legacy" / WEIGHTS))

    want, got = _load(str(tmp_path / "current"), config), _load(str(tmp_path / "legacy"), config)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)


def test_sd_vae_shapes():
    config = vae.VAEConfig.from_dict({
        "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 2, "sample_size": 512}, "sd-vae")
    abstract = jax.eval_shape(functools.partial(vae.init_params, vae.AutoencoderKL(config)), jax.random.key(0))
    assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(abstract)) == 83_653_863


def test_config_round_trips_and_refuses_what_it_cannot_run():
    d = dict(CONFIGS["no_quant_no_attention"], _class_name="AutoencoderKL", force_upcast=False, sample_size=64)
    config = vae.VAEConfig.from_dict(d, "vae/config.json")
    exported = config.to_dict()
    assert all(exported[k] == v for k, v in d.items()) and exported["scaling_factor"] == 0.18215
    assert vae.VAEConfig.from_dict(exported, "exported") == config
    assert diffusers.AutoencoderKL.from_config(exported).config.use_quant_conv is False
    for key, value in [("shift_factor", 0.1159), ("act_fn", "gelu"), ("down_block_types", ["DownEncoderBlock2D"]),
                       ("norm_num_groups", 5), ("new_option", True)]:
        with pytest.raises(weights.WeightsError, match=rf"^vae/config\.json: .*{key}"):
            vae.VAEConfig.from_dict({**d, key: value}, "vae/config.json")
