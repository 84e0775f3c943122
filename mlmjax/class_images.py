"""Class images for prior preservation: generated once with the base model, cached in the workdir.

DreamBooth and Custom Diffusion keep the class prior by training on images that the *base* model makes
of the class ("a picture of a teapot"). When ``config.prior.images`` is empty they are sampled here,
before training, into ``<workdir>/class_images/``, and every later run or resume reuses them.

The folder holds ``class_00000.png``, ``class_00001.png``, ... and ``manifest.json``, which records what
made them: the prompt, seed, sampler, resolution and the base model's fingerprint. A folder whose
manifest disagrees is refused rather than reused (its images would show another class or come from
another model). The count is not part of it: image i is the same whatever the count, so asking for
more images adds only the new ones, and asking for fewer uses the first ones.

Resuming is exact. Image i's noise comes from its own key (seed, i), and it is always generated in
the same batch, images ``[b·B, (b+1)·B)`` for batch size B, so the batches that an interrupted
generation left incomplete are regenerated bit for bit (given the same batch size and devices;
otherwise up to float rounding). Every PNG is written under a temporary name and renamed into place,
so a killed process never leaves a half-written image that would later count.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from tqdm import tqdm

from mlmjax import data as data_lib
from mlmjax import distributed
from mlmjax import files
from mlmjax import sampling
from mlmjax import tokenizer as tokenizer_lib
from mlmjax.pretrained import Pretrained

MANIFEST = "manifest.json"
_PREFIX = "class_"


class ClassImagesError(ValueError):
    """A class-image folder that cannot be reused for this run; the message says why and what to do."""


def image_path(folder: str, index: int) -> str:
    """Where image ``index`` lives; zero-padded so that sorted file names are in index order."""
    return os.path.join(folder, f"{_PREFIX}{index:05d}.png")


def missing_images(folder: str, count: int) -> set[int]:
    """The indices below ``count`` whose image ``folder`` does not hold (yet)."""
    return {i for i in range(count) if not os.path.exists(image_path(folder, i))}


def ensure_class_images(model: Pretrained, folder: str, *, prompt: str, count: int, resolution: int, seed: int,
                        model_fingerprint: str, scheduler: str = "ddpm", steps: int = 50, guidance: float = 7.5,
                        batch_size: int = 8, compiler_options: dict[str, Any] | None = None) -> str:
    """Makes sure ``folder`` holds class images 0 .. count-1 of ``prompt``; returns ``folder``.

    Only missing images are generated (a tqdm bar counts the batches). The folder may hold more images
    from an earlier, larger request: read the first ``count`` of its sorted files.

    Args:
      model: the base model, sampled as is (no concept tokens, even if its tokenizer has them).
      folder: the cache, created if needed, e.g. ``<workdir>/class_images``.
      prompt: the class prompt, already formatted, e.g. ``"a picture of a teapot"``.
      count: how many images the run needs.
      resolution: image side in pixels.
      seed: image i's noise comes from (seed, i) alone.
      model_fingerprint: a content hash of ``model``, recorded and checked; a folder made by another
        model is refused.
      scheduler, steps, guidance: the sampler (default DDPM, 50 steps, guidance 7.5).
      batch_size: images per jitted call (over all devices); part of what makes a resume bitwise exact.
      compiler_options: XLA options for the sampler (see :func:`mlmjax.sampling.generate`).

    Raises:
      ClassImagesError: the folder was made with another prompt, seed, sampler, resolution or model,
        or holds images without a manifest.
    """
    if count < 0 or batch_size < 1:
        raise ValueError(f"class images: count={count} must be >= 0 and batch_size={batch_size} >= 1")
    manifest = {"prompt": prompt, "seed": seed, "scheduler": scheduler, "steps": steps, "guidance": guidance,
                "resolution": resolution, "model": model_fingerprint}
    # Several processes sample together and process 0 writes. Each decides what is missing from the
    # folder as it was before anything is written, so all sample the same batches (a collective).
    if distributed.is_primary():
        _claim(folder, manifest)
    distributed.barrier("mlmjax.class_images: manifest written")
    _claim(folder, manifest)  # the others check the manifest process 0 wrote; for it, a re-check
    missing = missing_images(folder, count)
    distributed.barrier("mlmjax.class_images: folder read")
    if missing:
        _generate(model, folder, missing, prompt=prompt, resolution=resolution, seed=seed, scheduler=scheduler,
                  steps=steps, guidance=guidance, batch_size=batch_size, compiler_options=compiler_options)
    distributed.barrier("mlmjax.class_images: images written")
    return folder


def _generate(model: Pretrained, folder: str, missing: set[int], *, prompt: str, resolution: int, seed: int,
              scheduler: str, steps: int, guidance: float, batch_size: int,
              compiler_options: dict[str, Any] | None) -> None:
    """Samples the batches holding the ``missing`` indices; process 0 writes the missing ones."""
    spec = sampling.plain_spec(model)
    # On the devices once, not per batch (weights read from disk are host arrays).
    params, vae_params = sampling.place_weights({name: model.params[name] for name in ("text_encoder", "unet")},
                                                model.params["vae"])
    ids = np.repeat(tokenizer_lib.tokenize(model.tokenizer, [prompt]).astype(np.int32), batch_size, axis=0)
    latent_hw = (resolution // model.vae_scale_factor,) * 2
    for batch in tqdm(sorted({i // batch_size for i in missing}), desc="class images", unit="batch",
                      dynamic_ncols=True):
        # Whole batches, padded past `count` with the next indices' keys: a batch's content never
        # depends on the count or on which of its images were already there.
        indices = range(batch * batch_size, (batch + 1) * batch_size)
        images = sampling.generate(spec, params, model.vae, vae_params, ids,
                                   sampling.image_keys(seed, 0, indices), scheduler_config=model.scheduler_config,
                                   latent_hw=latent_hw, tokenizer=model.tokenizer, scheduler=scheduler,
                                   num_steps=steps, guidance_scale=guidance, compiler_options=compiler_options)
        for index, image in zip(indices, sampling.to_uint8(images)):
            if index in missing and distributed.is_primary():
                sampling.save_png(image, image_path(folder, index))


def _claim(folder: str, manifest: dict) -> None:
    """Checks that ``folder`` is new, empty or made with ``manifest``, and records the manifest there."""
    manifest = json.loads(json.dumps(manifest))  # compare as read back (tuples become lists, ...)
    path = os.path.join(folder, MANIFEST)
    if os.path.isfile(path):
        saved = files.read_json_object(path, ClassImagesError, "delete the folder to regenerate it")
        for key, wanted in manifest.items():
            if saved.get(key) != wanted:
                shown = "another base model" if key == "model" else f"{key}={saved.get(key)!r}, not {wanted!r}"
                raise ClassImagesError(f"{folder}: holds class images made with {shown}; delete the folder to "
                                       "regenerate them, or set config.prior.images to a folder of your own")
        return
    os.makedirs(folder, exist_ok=True)
    images = [name for name in os.listdir(folder)
              if name.lower().endswith(data_lib.IMAGE_SUFFIXES) and not name.startswith(".")]
    if images:
        raise ClassImagesError(f"{folder}: holds images ({images[0]}, ...) but no {MANIFEST}, so what made them "
                               "is unknown; empty the folder, or set config.prior.images to it to use them as is")
    files.write_json_atomic(path, manifest)
