"""The sampler: scheduler parity with diffusers, end-to-end sampling on the tiny model, PNG output."""

import dataclasses
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from helpers import relative_error
from mlmjax import pretrained as pretrained_lib
from mlmjax import sampling, tiny
from mlmjax import tokenizer as tokenizer_lib
from mlmjax.noise_schedule import NoiseSchedule
from mlmjax.train_step import StepSpec

# SD 1.x (the tiny default), SD 2.1 (v-prediction, as its DDIM config), and diffusers' own defaults
# (linear betas, clip_sample on, no steps offset: the last DDPM step is t = 0).
CONFIGS = {
    "sd1": tiny.SCHEDULER_CONFIG,
    "sd2": {**tiny.SCHEDULER_CONFIG, "prediction_type": "v_prediction", "set_alpha_to_one": False},
    "defaults": {"beta_schedule": "linear"},
}
NUM_IMAGES = 3  # not a multiple of 4 devices: the sharded test pads
LATENT_HW = (8, 8)
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # compile time dominates these short runs


def _fake_model(x, t):
    """A fixed stand-in for the UNet, written once for numpy, torch and JAX arrays."""
    return 0.1 * x + 0.05 * t / 1000


def _diffusers_scheduler(scheduler: str, config: dict):
    """Imported here, not at the top: the 4-device subprocess imports this module and needs no torch."""
    import diffusers

    return {"ddim": diffusers.DDIMScheduler, "ddpm": diffusers.DDPMScheduler}[scheduler].from_config(config)


def _reference_trajectory(scheduler: str, config: dict, num_steps: int, x: np.ndarray):
    """diffusers' sampling loop, and the noise its DDPM steps drew (replayed from a twin generator)."""
    import torch

    reference = _diffusers_scheduler(scheduler, config)
    reference.set_timesteps(num_steps)
    sample = torch.from_numpy(x)
    generator, twin = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    noises = []
    for t in reference.timesteps:
        drawn = scheduler == "ddpm" and t > 0  # when DDPMScheduler.step calls randn_tensor
        noises.append(torch.randn(sample.shape, generator=twin) if drawn else torch.zeros(sample.shape))
        sample = reference.step(_fake_model(sample, t), t, sample, generator=generator).prev_sample
    return reference.timesteps.numpy(), sample.numpy(), np.stack([n.numpy() for n in noises])


@pytest.mark.parametrize("scheduler", sampling.SCHEDULERS)
@pytest.mark.parametrize("config_name", CONFIGS)
def test_scheduler_matches_diffusers(scheduler, config_name):
    config = CONFIGS[config_name]
    x = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    timesteps, expected, noises = _reference_trajectory(scheduler, config, 50, x)
    schedule = sampling.make_schedule(config, scheduler, 50)
    np.testing.assert_array_equal(schedule.timesteps, timesteps)
    run = jax.jit(lambda x, noises: sampling.denoise(
        _fake_model, x, schedule.timesteps, schedule.coefficients, noise_fn=lambda i: noises[i],
        clip_sample_range=schedule.clip_sample_range))
    error = relative_error(run(x, noises), expected)
    assert error < 1e-5, error


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("num_steps", [1, 7, 50, 999])
def test_timesteps_match_diffusers(spacing, num_steps):
    config = {**tiny.SCHEDULER_CONFIG, "timestep_spacing": spacing}
    for scheduler in sampling.SCHEDULERS:
        reference = _diffusers_scheduler(scheduler, config)
        reference.set_timesteps(num_steps)
        np.testing.assert_array_equal(sampling.inference_timesteps(config, num_steps), reference.timesteps.numpy())
        assert sampling.make_schedule(config, scheduler, num_steps).timesteps.shape == (num_steps,)


def test_unsupported_options_are_refused():
    with pytest.raises(ValueError, match="thresholding"):
        sampling.make_schedule({**tiny.SCHEDULER_CONFIG, "thresholding": True}, "ddim", 10)
    with pytest.raises(ValueError, match="variance_type"):
        sampling.make_schedule({**tiny.SCHEDULER_CONFIG, "variance_type": "learned"}, "ddpm", 10)
    with pytest.raises(ValueError, match="scheduler"):
        sampling.make_schedule(tiny.SCHEDULER_CONFIG, "euler", 10)


@dataclasses.dataclass(frozen=True)
class Tiny:
    """What ``generate`` needs: a spec, parameters with a random concept vector, the VAE, prompts."""
    spec: StepSpec
    params: dict
    vae: object
    vae_params: dict
    tokenizer: object
    prompt_ids: np.ndarray


def tiny_setup() -> Tiny:
    """The tiny model's text encoder and VAE, with its UNet cut to two of four levels (cross-attention
    down, mid and up remain): compile time is nearly all of these tests' time, and the UNet is not
    their subject. Built from the configs directly, as ``tiny_pretrained`` would, minus its UNet."""
    unet_config = {**tiny.UNET_CONFIG, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                   "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "block_out_channels": [16, 32]}
    configs = {"text_encoder": tiny.TEXT_ENCODER_CONFIG, "unet": unet_config, "vae": tiny.VAE_CONFIG}
    modules = {name: pretrained_lib.build_component(name, config) for name, config in configs.items()}
    params = {name: pretrained_lib.init_component(name, module, seed) for seed, (name, module) in
              enumerate(modules.items())}
    schedule = NoiseSchedule.from_config(tiny.SCHEDULER_CONFIG)
    spec = StepSpec(text_encoder=modules["text_encoder"], unet=modules["unet"], contextualizer=None,
                    prediction_type=schedule.prediction_type, scaling_factor=tiny.VAE_CONFIG["scaling_factor"],
                    alphas_cumprod=tuple(schedule.alphas_cumprod.tolist()))
    width = tiny.TEXT_ENCODER_CONFIG["hidden_size"]
    params["concept"] = {"embeddings": np.random.default_rng(1).standard_normal((1, width), np.float32)}
    tokenizer = tokenizer_lib.vendored_tokenizer()
    prompts = ["a photo of a dog", "a dog on the beach", "a dog wearing a red hat"]
    ids = tokenizer_lib.tokenize(tokenizer, prompts[:NUM_IMAGES]).astype(np.int32)
    ids[ids == tokenizer.convert_tokens_to_ids("dog</w>")] = tiny.TEXT_ENCODER_CONFIG["vocab_size"]  # the concept
    return Tiny(spec, params, modules["vae"], params.pop("vae"), tokenizer, ids)


def sample(setup: Tiny, rng: int = 0, **kwargs) -> np.ndarray:
    """``generate`` on the tiny setup, 4 steps; keyword arguments override."""
    kwargs = {"params": setup.params, "prompt_ids": setup.prompt_ids, "scheduler_config": tiny.SCHEDULER_CONFIG,
              "num_steps": 4, "latent_hw": LATENT_HW, "compiler_options": FAST_COMPILE, **kwargs}
    return sampling.generate(setup.spec, kwargs.pop("params"), setup.vae, setup.vae_params,
                             kwargs.pop("prompt_ids"), jax.random.key(rng), **kwargs)


@pytest.fixture(scope="module")
def setup() -> Tiny:
    return tiny_setup()


@pytest.fixture(scope="module")
def ddpm_images(setup):
    return sample(setup, scheduler="ddpm")


def test_generate_shape_and_determinism(setup, ddpm_images):
    assert ddpm_images.shape == (NUM_IMAGES, 16, 16, 3) and ddpm_images.dtype == np.float32
    assert np.all(np.abs(ddpm_images) <= 1.0) and np.std(ddpm_images) > 1e-3
    np.testing.assert_array_equal(sample(setup, scheduler="ddpm"), ddpm_images)
    assert np.abs(sample(setup, rng=1, scheduler="ddpm") - ddpm_images).mean() > 1e-3
    assert np.abs(ddpm_images[0] - ddpm_images[1]).mean() > 1e-4  # different prompts, one batch


def test_generate_guidance_concept_and_scheduler_matter(setup, ddpm_images):
    assert np.abs(sample(setup, scheduler="ddpm", guidance_scale=1.0) - ddpm_images).mean() > 1e-4
    other = {**setup.params, "concept": {"embeddings": -setup.params["concept"]["embeddings"]}}
    assert np.abs(sample(setup, scheduler="ddpm", params=other) - ddpm_images).mean() > 1e-4
    assert np.abs(sample(setup, scheduler="ddim") - ddpm_images).mean() > 1e-4


def test_guidance_puts_the_unconditional_half_first(setup):
    """At scale 0, CFG is the negative prompt's prediction alone: the same images as sampling that
    prompt unguided (this catches swapped or misaligned guidance halves)."""
    negative = tokenizer_lib.tokenize(setup.tokenizer, ["a blurry photo"] * NUM_IMAGES).astype(np.int32)
    guided = sample(setup, negative_ids=negative, guidance_scale=0.0)
    error = relative_error(guided, sample(setup, prompt_ids=negative, guidance_scale=1.0))
    assert error < 1e-5, error
    assert relative_error(sample(setup, negative_ids=negative), guided) > 1e-2


def test_without_options_the_sampler_takes_the_cpu_kernels_aot_chooses(setup, ddpm_images, monkeypatch):
    """No ``compiler_options``: the sampler, whose convolutions make no kernel gradient, runs on XLA's
    own kernels (as a sampler above ``aot``'s FLOP threshold would); given options, it takes them. Either
    draws the same images up to float rounding."""
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setattr(sampling, "_CHOSEN_OPTIONS", {})
    chosen = sample(setup, scheduler="ddpm", compiler_options=None)
    assert list(sampling._CHOSEN_OPTIONS.values()) == [{"xla_cpu_experimental_ynn_fusion_type": ""}]
    default = sample(setup, scheduler="ddpm", compiler_options={})
    for images in (chosen, ddpm_images):
        assert relative_error(images, default) < 1e-5


def test_sharded_sampling_matches_one_device(ddpm_images, tmp_path):
    """Four host devices, batch padded 3 → 4 and sharded: the same images as one device."""
    out = tmp_path / "sharded.npy"
    script = ("import sys, jax, numpy as np; sys.path.insert(0, sys.argv[2]); import test_sampling as t; "
              "assert len(jax.devices()) == 4; "
              "np.save(sys.argv[1], t.sample(t.tiny_setup(), scheduler='ddpm'))")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", script, str(out), os.path.dirname(__file__)], env=env, check=True,
                   timeout=300)
    error = relative_error(np.load(out), ddpm_images)  # 2.8e-6 here: per-device GEMM sizes round differently
    assert error < 1e-5, error


def test_png_and_grid_writing(tmp_path):
    images = sampling.to_uint8(np.linspace(-1.2, 1.2, 5 * 4 * 6 * 3).reshape(5, 4, 6, 3))
    assert images.dtype == np.uint8 and images.min() == 0 and images.max() == 255
    paths = sampling.save_images(images, str(tmp_path / "out"), "dog")
    assert [os.path.basename(p) for p in paths] == [f"dog_{i:04d}.png" for i in range(5)]
    for path, image in zip(paths, images):
        np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
    grid = sampling.make_grid(images, columns=2)
    assert grid.shape == (3 * 4, 2 * 6, 3)
    np.testing.assert_array_equal(grid[4:8, 6:12], images[3])
    assert not grid[8:, 6:].any()  # the empty sixth cell
    path = sampling.save_grid(images, str(tmp_path / "out"), columns=2)
    assert os.path.basename(path) == "grid.png"
    np.testing.assert_array_equal(np.asarray(Image.open(path)), grid)
    with pytest.raises(ValueError, match="uint8"):
        sampling.make_grid(images.astype(np.float32), 2)
