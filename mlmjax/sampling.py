"""Text-to-image sampling with a customized model: DDIM or DDPM, classifier-free guidance, PNG grids.

The schedulers reproduce diffusers' ``DDIMScheduler`` (eta = 0) and ``DDPMScheduler`` (``fixed_small``
variance) built with ``from_config(scheduler_config)`` and ``set_timesteps(num_steps)``: the same
timesteps, the same "previous timestep" rules, the same config defaults. The paper samples its
evaluation images with DDPM, 50 steps, guidance 7.5 (PAPER.md §4).

The timesteps and per-step coefficients are computed once on the host (numpy, float32 as torch does);
each step is then one affine update in JAX, the same function for both schedulers::

    x0   = c0 · x_t + c1 · out                 (clipped to ±clip_sample_range if the config says so)
    x_t' = c2 · x0 + c3 · x_t + c4 · out + c5 · noise

The whole loop (text encoding, every UNet call, the VAE decode) is one ``jax.jit``, compiled once per
shapes and static options and shared by both schedulers; the batch is sharded over all devices when
there are several.

Seeds: ``generate`` takes one key for the whole batch, or one key per image (:func:`image_keys`). With
per-image keys an image's noise depends on its own key only, so it does not change with how many other
images share its batch, and a batch can be regenerated alone (class images resume this way).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from mlmjax import aot
from mlmjax import files
from mlmjax import sharding
from mlmjax import tokenizer as tokenizer_lib
from mlmjax.models.vae import AutoencoderKL
from mlmjax.noise_schedule import NoiseSchedule
from mlmjax.pretrained import Pretrained
from mlmjax.train_step import StepSpec, text_context

SCHEDULERS = ("ddim", "ddpm")


@dataclasses.dataclass(frozen=True)
class SamplingSchedule:
    """What one sampling run needs from the scheduler, precomputed on the host.

    Attributes:
      timesteps: ``[S]`` int32, the UNet's timestep at each step (diffusers' ``scheduler.timesteps``).
      coefficients: ``[S, 6]`` float32, ``c0 .. c5`` of the update in the module docstring.
      clip_sample_range: clip the predicted x0 to ± this, or None (``clip_sample`` false).
    """
    timesteps: np.ndarray
    coefficients: np.ndarray
    clip_sample_range: float | None


def inference_timesteps(scheduler_config: dict, num_steps: int) -> np.ndarray:
    """diffusers' ``set_timesteps(num_steps)`` for ``timestep_spacing`` leading (default), linspace, trailing."""
    n = int(scheduler_config.get("num_train_timesteps", 1000))
    if not 0 < num_steps <= n:
        raise ValueError(f"num_steps={num_steps} must be in [1, num_train_timesteps={n}]")
    spacing = scheduler_config.get("timestep_spacing", "leading")
    if spacing == "leading":
        steps = np.arange(num_steps)[::-1] * (n // num_steps) + int(scheduler_config.get("steps_offset", 0))
    elif spacing == "linspace":
        steps = np.linspace(0, n - 1, num_steps).round()[::-1]
    elif spacing == "trailing":
        steps = np.round(np.arange(n, 0, -n / num_steps)) - 1
    else:
        raise ValueError(f"scheduler_config: timestep_spacing {spacing!r} is not supported; use leading, "
                         "linspace or trailing")
    return steps.astype(np.int64)


def _check_supported(config: dict, scheduler: str) -> None:
    """Refuses options that would change the update rule rather than silently ignoring them."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler {scheduler!r} is not supported; use one of {SCHEDULERS}")
    refused = {"thresholding": False, "rescale_betas_zero_snr": False}
    if scheduler == "ddpm":
        refused["variance_type"] = "fixed_small"
    for key, wanted in refused.items():
        if config.get(key, wanted) != wanted:
            raise ValueError(f"scheduler_config: {key}={config[key]!r} is not supported by the {scheduler} "
                             f"sampler; only {wanted!r}")


def make_schedule(scheduler_config: dict, scheduler: str, num_steps: int) -> SamplingSchedule:
    """The timesteps and update coefficients of diffusers' DDIM (eta 0) or DDPM scheduler.

    Missing config keys take the defaults of the diffusers class named by ``scheduler`` (as its
    ``from_config`` would), e.g. ``set_alpha_to_one`` True and ``clip_sample`` True.
    """
    _check_supported(scheduler_config, scheduler)
    schedule = NoiseSchedule.from_config(scheduler_config)
    alphas_cumprod = schedule.alphas_cumprod  # float32, as torch holds it
    timesteps = inference_timesteps(scheduler_config, num_steps)
    one = np.float32(1.0)
    if scheduler == "ddim":  # DDIM steps back by a fixed stride whatever the spacing, ending at final_alpha
        prev = timesteps - schedule.num_train_timesteps // num_steps
        final = one if scheduler_config.get("set_alpha_to_one", True) else alphas_cumprod[0]
    else:  # DDPM steps to the next listed timestep, and to ᾱ = 1 after the last
        prev = np.append(timesteps[1:], -1)
        final = one
    rows = []
    for t, t_prev in zip(timesteps, prev):
        a = alphas_cumprod[t]
        a_prev = alphas_cumprod[t_prev] if t_prev >= 0 else final
        b, b_prev = one - a, one - a_prev
        if schedule.prediction_type == "epsilon":  # x0 = (x - √b·ε)/√a;  ε = out
            x0 = (one / np.sqrt(a), -np.sqrt(b) / np.sqrt(a))
            eps = (np.float32(0), one)
        else:  # v: x0 = √a·x - √b·v;  ε = √a·v + √b·x
            x0 = (np.sqrt(a), -np.sqrt(b))
            eps = (np.sqrt(b), np.sqrt(a))
        if scheduler == "ddim":
            update = (np.sqrt(a_prev), np.sqrt(b_prev) * eps[0], np.sqrt(b_prev) * eps[1], np.float32(0))
        else:
            alpha_t = a / a_prev
            beta_t = one - alpha_t
            variance = max(b_prev / b * beta_t, np.float32(1e-20))
            std = np.sqrt(variance) if t > 0 else np.float32(0)
            update = (np.sqrt(a_prev) * beta_t / b, np.sqrt(alpha_t) * b_prev / b, np.float32(0), std)
        rows.append((*x0, *update))
    clip = scheduler_config.get("clip_sample", True)
    return SamplingSchedule(
        timesteps=timesteps.astype(np.int32), coefficients=np.asarray(rows, np.float32),
        clip_sample_range=float(scheduler_config.get("clip_sample_range", 1.0)) if clip else None)


def scheduler_step(coefficients: jax.Array, sample: jax.Array, model_output: jax.Array, noise: jax.Array | float,
                   clip_sample_range: float | None = None) -> jax.Array:
    """One reverse step x_t → x_{t'} given the row of :class:`SamplingSchedule` coefficients."""
    c = coefficients
    x0 = c[0] * sample + c[1] * model_output
    if clip_sample_range is not None:
        x0 = jnp.clip(x0, -clip_sample_range, clip_sample_range)
    return c[2] * x0 + c[3] * sample + c[4] * model_output + c[5] * noise


def denoise(model_fn: Callable[[jax.Array, jax.Array], jax.Array], latents: jax.Array, timesteps: jax.Array,
            coefficients: jax.Array, *, noise_fn: Callable[[jax.Array], jax.Array] | None = None,
            clip_sample_range: float | None = None) -> jax.Array:
    """The reverse chain as one ``fori_loop``: ``model_fn(x, t)`` predicts, ``noise_fn(i)`` gives step i's noise."""
    timesteps, coefficients = jnp.asarray(timesteps), jnp.asarray(coefficients)

    def body(i, x):
        out = model_fn(x, timesteps[i]).astype(jnp.float32)
        noise = 0.0 if noise_fn is None else noise_fn(i)
        return scheduler_step(coefficients[i], x, out, noise, clip_sample_range)

    return jax.lax.fori_loop(0, timesteps.shape[0], body, latents.astype(jnp.float32))


def _interleave(a: jax.Array, b: jax.Array) -> jax.Array:
    """[a0, b0, a1, b1, ...]: each example's guidance pair stays on the device that holds the example."""
    return jnp.stack([a, b], axis=1).reshape(2 * a.shape[0], *a.shape[1:])


def _sample(params: dict, vae_params: dict, prompt_ids: jax.Array, negative_ids: jax.Array, rng: jax.Array,
            guidance_scale: jax.Array, timesteps: jax.Array, coefficients: jax.Array, *, spec: StepSpec,
            vae: AutoencoderKL, num_images: int, latent_shape: tuple[int, int, int], guided: bool,
            clip_sample_range: float | None, batch_sharding: NamedSharding | None) -> jax.Array:
    """Images in [-1, 1] for the (possibly padded) batch; noise is drawn for ``num_images`` only, so
    padding for sharding changes no real image. DDIM draws step noise too (its coefficient is 0): one
    executable serves both schedulers, and a draw costs nothing next to a UNet call.

    ``rng`` is one key (the batch's noise drawn at once) or ``[num_images]`` keys (each image's own)."""
    batch = prompt_ids.shape[0]
    per_image = rng.ndim == 1
    split = jax.vmap(jax.random.split) if per_image else jax.random.split
    fold_in = jax.vmap(jax.random.fold_in, in_axes=(0, None)) if per_image else jax.random.fold_in

    def draw(key: jax.Array) -> jax.Array:
        if per_image:
            x = jax.vmap(lambda k: jax.random.normal(k, latent_shape, jnp.float32))(key)
        else:
            x = jax.random.normal(key, (num_images, *latent_shape), jnp.float32)
        x = jnp.pad(x, [(0, batch - num_images)] + [(0, 0)] * len(latent_shape))
        return x if batch_sharding is None else jax.lax.with_sharding_constraint(x, batch_sharding)

    keys = split(rng)
    init_rng, noise_rng = keys[..., 0], keys[..., 1]
    # One text encoding of the interleaved ids also interleaves XTI's [layers, B, L, D] contexts.
    context = text_context(spec, params, _interleave(negative_ids, prompt_ids) if guided else prompt_ids)

    def model_fn(x: jax.Array, t: jax.Array) -> jax.Array:
        if not guided:
            return spec.unet.apply({"params": params["unet"]}, x, t, context)
        out = spec.unet.apply({"params": params["unet"]}, _interleave(x, x), t, context)
        out = out.astype(jnp.float32).reshape(batch, 2, *out.shape[1:])
        uncond, cond = out[:, 0], out[:, 1]
        return uncond + guidance_scale * (cond - uncond)

    latents = denoise(model_fn, draw(init_rng), timesteps, coefficients,
                      noise_fn=lambda i: draw(fold_in(noise_rng, i)), clip_sample_range=clip_sample_range)
    images = vae.apply({"params": vae_params}, latents / spec.scaling_factor, method=AutoencoderKL.decode)
    return jnp.clip(images.astype(jnp.float32), -1.0, 1.0)


@functools.lru_cache(maxsize=None)
def _jitted_sampler(compiler_options: tuple[tuple[str, Any], ...]) -> Callable:
    """One jitted sampler per set of XLA options; jit's own cache then keys on the static arguments."""
    return jax.jit(_sample, static_argnames=("spec", "vae", "num_images", "latent_shape", "guided",
                                             "clip_sample_range", "batch_sharding"),
                   compiler_options=dict(compiler_options) or None)


_CHOSEN_OPTIONS: dict[tuple, dict[str, str]] = {}


def _chosen_options(args: tuple, static: dict) -> dict[str, str]:
    """:func:`mlmjax.aot.cpu_compiler_options` for the sampler at these shapes, decided once per shape:
    on a CPU a sampler runs on XLA's own kernels (its convolutions make no kernel's gradient)."""
    key = (tuple(static.items()), tuple((np.shape(x), str(x.dtype)) for x in jax.tree.leaves(args)))
    if key not in _CHOSEN_OPTIONS:
        _CHOSEN_OPTIONS[key] = aot.cpu_compiler_options(lambda: _jitted_sampler(()).lower(*args, **static))
    return _CHOSEN_OPTIONS[key]


def plain_spec(model: Pretrained) -> StepSpec:
    """The spec that samples ``model`` as it is (no concept, no MLM), e.g. for class images."""
    schedule = NoiseSchedule.from_config(model.scheduler_config)
    return StepSpec(text_encoder=model.text_encoder, unet=model.unet, contextualizer=None,
                    prediction_type=schedule.prediction_type, scaling_factor=float(model.vae.config.scaling_factor),
                    alphas_cumprod=tuple(float(a) for a in schedule.alphas_cumprod))


def image_keys(seed: int, group: int, indices: Sequence[int]) -> jax.Array:
    """``[len(indices)]`` keys, one per image: ``key(seed)`` folded with ``group`` (e.g. a prompt's
    index), then with the image's index. Image (group, i) gets the same key whatever else is sampled."""
    base = jax.random.fold_in(jax.random.key(seed), group)
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base, jnp.asarray(indices, jnp.uint32))


def empty_prompt_ids(tokenizer: Any, count: int) -> np.ndarray:
    """``[count, 77]`` ids of the empty prompt, the unconditional input of classifier-free guidance."""
    return np.repeat(tokenizer_lib.tokenize(tokenizer, [""]).astype(np.int32), count, axis=0)


def _sampling_mesh() -> jax.sharding.Mesh:
    """All devices, one data axis: sampling splits its batch and replicates the weights."""
    devices = jax.devices()
    return jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def place_weights(params: Any, vae_params: Any) -> tuple[Any, Any]:
    """The weights where :func:`generate` uses them: on the device, replicated over all devices when
    there are several. Call it once before a loop of ``generate`` calls: weights read from disk are
    host arrays, which ``generate`` would otherwise copy to the devices on every call (3.4 GB for SD
    1.5's UNet). Arrays already in place are not copied again.
    """
    if len(jax.devices()) == 1:
        return jax.device_put((params, vae_params), jax.devices()[0])
    return sharding.put((params, vae_params), NamedSharding(_sampling_mesh(), PartitionSpec()))


def generate(spec: StepSpec, params: dict, vae: AutoencoderKL, vae_params: dict, prompt_ids: np.ndarray,
             rng: jax.Array, *, scheduler_config: dict, latent_hw: tuple[int, int],
             negative_ids: np.ndarray | None = None, tokenizer: Any = None, scheduler: str = "ddim",
             num_steps: int = 50, guidance_scale: float = 7.5,
             compiler_options: dict[str, Any] | None = None) -> np.ndarray:
    """Samples one image per prompt; returns ``[N, H, W, 3]`` float32 in [-1, 1] (see :func:`to_uint8`).

    Args:
      spec, params: the train step's static spec and merged parameter tree (``text_encoder``, ``unet``,
        ``concept``); prompts use token id ``vocab_size`` (+k for XTI) for the concept. Without
        ``concept`` the model samples as the plain pretrained one (e.g. prior images).
      prompt_ids: ``[N, 77]`` int.
      rng: one key for the batch, or ``[N]`` keys, one per image (see :func:`image_keys`).
      negative_ids: ``[N, 77]`` or ``[1, 77]`` unconditional ids; default the empty prompt tokenized by
        ``tokenizer`` (default the vendored SD 1.x tokenizer; SD 2.x pads differently, pass its own).
      guidance_scale: 1 skips the unconditional half; any other value applies
        ``uncond + scale · (cond − uncond)`` (diffusers ignores scales ≤ 1 instead).
      latent_hw: latent height and width (image size / 8 for SD).
      compiler_options: XLA options for the one executable, e.g. ``{"xla_backend_optimization_level": 0}``
        to halve compile time on CPU when the run is short. Default: :func:`mlmjax.aot.cpu_compiler_options`'s
        choice for the sampler at these shapes.

    The same ``rng`` gives the same images. With one key per image, image i's noise depends on
    ``rng[i]`` alone; its pixels then depend on the rest of the batch only through float rounding
    (bitwise equal when the batch is the same size). With several devices the batch is padded to a
    multiple of their count and sharded; the images equal one device's up to float rounding. With
    several processes, every process passes the same arguments and receives every image.
    """
    schedule = make_schedule(scheduler_config, scheduler, num_steps)
    prompt_ids = np.asarray(prompt_ids, np.int32)
    num_images = prompt_ids.shape[0]
    if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(rng)  # legacy uint32 keys: [2] is one key, not two
    if rng.ndim > 1 or (rng.ndim == 1 and rng.shape[0] != num_images):
        raise ValueError(f"rng: expected one key or {num_images} keys (one per prompt); got shape {rng.shape}")
    guided = guidance_scale != 1
    if negative_ids is None:
        negative_ids = empty_prompt_ids(tokenizer or tokenizer_lib.vendored_tokenizer(), 1)
    negative_ids = np.broadcast_to(np.asarray(negative_ids, np.int32), prompt_ids.shape)
    params = {k: params[k] for k in ("text_encoder", "unet", "concept") if k in params}
    params.setdefault("concept", {"embeddings": jnp.zeros((1, spec.text_encoder.config.hidden_size))})

    batch_sharding = None
    params, vae_params = place_weights(params, vae_params)
    devices = jax.devices()
    if len(devices) > 1:
        mesh = _sampling_mesh()
        batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
        pad = [(0, -num_images % len(devices)), (0, 0)]
        prompt_ids, negative_ids = sharding.put((np.pad(prompt_ids, pad, mode="edge"),
                                                 np.pad(negative_ids, pad, mode="edge")), batch_sharding)
        rng = sharding.replicate_key(rng, mesh)

    args = (params, vae_params, prompt_ids, negative_ids, rng, jnp.float32(guidance_scale), schedule.timesteps,
            schedule.coefficients)
    static = dict(spec=spec, vae=vae, num_images=num_images, latent_shape=(*latent_hw, spec.unet.config.in_channels),
                  guided=guided, clip_sample_range=schedule.clip_sample_range, batch_sharding=batch_sharding)
    if compiler_options is None:
        compiler_options = _chosen_options(args, static)
    images = _jitted_sampler(tuple(sorted(compiler_options.items())))(*args, **static)
    if not images.is_fully_addressable:  # several processes: each gets every image
        images = multihost_utils.process_allgather(images, tiled=True)
    return np.asarray(images)[:num_images]


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats to uint8 pixels, rounded as diffusers' ``numpy_to_pil`` does."""
    return np.round(np.clip(np.asarray(images, np.float32) / 2 + 0.5, 0, 1) * 255).astype(np.uint8)


def _check_uint8(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [N, H, W, 3] (see to_uint8); got {images.dtype} {images.shape}")
    return images


def save_png(image: np.ndarray, path: str) -> None:
    """Writes one ``[H, W, 3]`` uint8 image; the file appears complete or not at all.

    The PNG goes to a hidden temporary name in the same folder and is renamed into place, so a process
    killed mid-write leaves no truncated ``.png`` that a later reader would take for an image.
    """
    from PIL import Image

    with files.atomic_path(path) as temporary:
        Image.fromarray(image).save(temporary, format="PNG")


def save_images(images: np.ndarray, folder: str, prefix: str) -> list[str]:
    """One PNG per image, ``{folder}/{prefix}_{i:04d}.png``; returns the paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, image in enumerate(_check_uint8(images)):
        paths.append(os.path.join(folder, f"{prefix}_{i:04d}.png"))
        save_png(image, paths[-1])
    return paths


def make_grid(images: np.ndarray, columns: int) -> np.ndarray:
    """The images tiled row by row, ``columns`` wide; empty cells of the last row are black."""
    images = _check_uint8(images)
    n, h, w, c = images.shape
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * columns, h, w, c), np.uint8)
    grid[:n] = images
    return grid.reshape(rows, columns, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, columns * w, c)


def save_grid(images: np.ndarray, folder: str, columns: int, name: str = "grid.png") -> str:
    """Writes :func:`make_grid` as one PNG and returns its path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    save_png(make_grid(images, columns), path)
    return path
