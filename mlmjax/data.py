"""Concept and class images: decoding, resizing, flips, and VAE moments cached once per augmentation.

The concept set is a handful of photos, so every augmentation (each image, flipped or not) is
encoded by the VAE once, at start-up, and the train step samples latents from the cached posterior
moments. A batch is a pure function of (seed, step): resuming at step k draws exactly what an
uninterrupted run draws at step k.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class DataError(ValueError):
    """A concept or class image folder that cannot be used; the message names the file."""


def image_files(folder: str) -> list[str]:
    """The image files of ``folder``, sorted, or a DataError saying what is wrong with it."""
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: image folder not found; set concept.images to a folder of photos")
    files = sorted(os.path.join(folder, name) for name in os.listdir(folder)
                   if name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith("."))
    if not files:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder")
    return files


def load_image(path: str, resolution: int) -> np.ndarray:
    """``[resolution, resolution, 3]`` float32 in [-1, 1]: EXIF orientation applied, RGB, bicubic resize.

    Like the reference trainers, the image is resized to a square without cropping.
    """
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale: scale to 8 bits
                image = Image.fromarray((np.asarray(image, np.float64) / 257.0).clip(0, 255).astype(np.uint8))
            if image.mode in ("RGBA", "LA", "P"):  # transparent pixels become white, not black
                rgba = image.convert("RGBA")
                image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
            image = image.convert("RGB").resize((resolution, resolution), Image.BICUBIC)
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{path}: not a readable image ({error}); remove or replace it") from None
    return np.asarray(image, np.float32) / 127.5 - 1.0


def load_images(folder: str, resolution: int) -> np.ndarray:
    """All images of ``folder`` as ``[N, resolution, resolution, 3]``."""
    return np.stack([load_image(path, resolution) for path in image_files(folder)])


def encode_moments(vae, vae_params, images: np.ndarray, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """VAE posterior (mean, logvar) of every image and of its mirror: ``[2, N, h, w, c]`` each.

    Index 0 is the image as is, index 1 its horizontal flip.
    """
    encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode))
    views = np.concatenate([images, images[:, :, ::-1]])
    means, logvars = [], []
    for start in range(0, len(views), batch_size):
        mean, logvar = encode(vae_params, jnp.asarray(views[start:start + batch_size]))
        means.append(np.asarray(mean, np.float32))
        logvars.append(np.asarray(logvar, np.float32))
    mean, logvar = np.concatenate(means), np.concatenate(logvars)
    return mean.reshape(2, len(images), *mean.shape[1:]), logvar.reshape(2, len(images), *logvar.shape[1:])


def sample_moments(moments: tuple[np.ndarray, np.ndarray], rng: np.random.Generator, batch_size: int,
                   flip_prob: float) -> tuple[np.ndarray, np.ndarray]:
    """A batch of cached moments: uniform images, each mirrored with probability ``flip_prob``."""
    mean, logvar = moments
    index = rng.integers(mean.shape[1], size=batch_size)
    flip = (rng.random(batch_size) < flip_prob).astype(int)
    return mean[flip, index], logvar[flip, index]
