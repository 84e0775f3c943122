"""Concept and class images: reading through grain, run fingerprints, and VAE moments cached once.

Reading. An image source is a string, what ``config.concept.images`` and ``config.prior.images`` hold:

* a folder of photos (``.jpg``, ``.jpeg``, ``.png``, ``.webp``, ``.bmp``, any size), read in sorted
  file-name order; or
* ``tfds:NAME/CONCEPT[@DATA_DIR]``, one concept of a tensorflow-datasets collection built with
  :mod:`mlmjax.tfds_concepts` (e.g. ``tfds:concept_images/dog6@/data/tfds``; needs ``mlmjax[tfds]``).

Either way the source yields the photo files' bytes (:class:`EncodedImage`), and one grain pipeline
decodes them (:func:`decode_image`): EXIF orientation applied, transparency over white, greyscale and
16-bit turned into 8-bit RGB, then a bicubic resize to the training resolution, to a square without
cropping as the reference trainers do. Bad input raises :class:`DataError` with one line that names the
file and what to do. :func:`fingerprint` hashes the same bytes, so a resumed run can refuse changed data.

Moments. The concept set is a handful of photos, so every augmentation (each image, flipped or not) is
encoded by the VAE once, at start-up, and the train step samples latents from the cached posterior
moments. A batch is a pure function of (seed, step): resuming at step k draws exactly what an
uninterrupted run draws at step k, and every process can draw the global batch and feed the rows its
devices hold (``sharding.process_rows``).
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
from typing import Iterator, NamedTuple

import grain
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
TFDS_PREFIX = "tfds:"

# PIL's 16- and 32-bit integer greyscale modes: ``convert("RGB")`` would clip them at 255, not rescale.
_WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
# What PIL raises for a file that it recognises but cannot decode (truncated, corrupt, absurdly large).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class DataError(ValueError):
    """An image source that cannot be used; the one-line message names the file and what to do."""


class EncodedImage(NamedTuple):
    """One photo as stored: what a source yields and the decoding map takes.

    Attributes:
      name: the file name within its source; with ``data``, what :func:`fingerprint` hashes, so a
        folder and a TFDS concept built from it are the same data.
      data: the file's bytes, undecoded.
      location: where it is, for messages: a path, or the TFDS source and the file name.
    """
    name: str
    data: bytes
    location: str


# ---------------------------------------------------------------------------------------------------
# Sources: random access to the encoded files, in a fixed order.


def image_files(folder: str) -> list[str]:
    """The image files of ``folder``, sorted by name (hidden files and sub-folders left out).

    Raises:
      DataError: the folder does not exist, or holds no file with an image suffix.
    """
    if not os.path.isdir(folder):
        what = "is a file, not a folder" if os.path.exists(folder) else "image folder not found"
        raise DataError(f"{folder}: {what}; give a folder of photos, or tfds:NAME/CONCEPT[@DATA_DIR]")
    names = sorted(name for name in os.listdir(folder)
                   if not name.startswith(".") and os.path.isfile(os.path.join(folder, name)))
    files = [os.path.join(folder, name) for name in names if name.lower().endswith(IMAGE_SUFFIXES)]
    if not files:
        # Saying what is there helps with photos in another format (HEIC, GIF ...).
        others = f" (it holds {len(names)} other file{'s' * (len(names) > 1)}, e.g. {names[0]})" if names else ""
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder{others}; "
                        "add the photos, converted to one of these formats")
    return files


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror}); check that it exists and is readable") from None


class FolderSource:
    """The photos of a folder in sorted file-name order: a grain ``RandomAccessDataSource`` of
    :class:`EncodedImage`. Only the listing happens up front; each item reads its file."""

    def __init__(self, folder: str):
        self._folder = folder
        self._paths = image_files(folder)

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> EncodedImage:
        path = self._paths[index]
        return EncodedImage(name=os.path.basename(path), data=_read_file(path), location=path)

    def __repr__(self) -> str:
        return f"FolderSource({self._folder!r}, {len(self)} images)"


def open_source(source: str) -> grain.sources.RandomAccessDataSource[EncodedImage]:
    """The photos of ``source`` (a folder, or ``tfds:NAME/CONCEPT[@DATA_DIR]``) by random access.

    Raises:
      DataError: the folder or TFDS concept is missing or empty, or TFDS is not installed.
    """
    if not source.startswith(TFDS_PREFIX):
        return FolderSource(source)
    try:  # Imported here: mlmjax needs tensorflow-datasets only to read such sources.
        from mlmjax import tfds_concepts
    except ImportError as error:
        raise DataError(f"{source}: reading TFDS sources needs tensorflow-datasets and array_record "
                        f"({error}); pip install 'mlmjax[tfds]'") from None
    return tfds_concepts.open_concept(source)


def records(source: grain.sources.RandomAccessDataSource[EncodedImage]) -> Iterator[EncodedImage]:
    """The items of ``source`` in order, read one by one (no decoding)."""
    return (source[index] for index in range(len(source)))


# ---------------------------------------------------------------------------------------------------
# Decoding: bytes -> RGB -> square float image.


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB; transparent pixels over white, as a viewer shows them (black would be a false signal)."""
    if image.mode in _WIDE_GREY_MODES:
        # 0..65535 onto 0..255; 8 bits are all the VAE's input resolves.
        levels = np.round(np.asarray(image, np.float64) / 257.0).clip(0, 255)
        image = Image.fromarray(levels.astype(np.uint8))
    if image.mode in _ALPHA_MODES or "transparency" in image.info:  # the latter: P, L, RGB with a tRNS colour
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return image.convert("RGB")


def open_image(data: bytes, location: str) -> Image.Image:
    """The photo in ``data`` as 8-bit RGB, upright (EXIF orientation applied), at its own size.

    Raises:
      DataError: ``data`` is not an image, or a corrupt or truncated one (naming ``location``).
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decodes now, so a truncated file fails here and not later
            return _to_rgb(ImageOps.exif_transpose(image))
    except Image.UnidentifiedImageError:
        raise DataError(f"{location}: not an image file (no JPEG, PNG, WebP or BMP data); "
                        "remove or replace it") from None
    except _DECODE_ERRORS as error:
        raise DataError(f"{location}: corrupt or truncated image ({error}); remove or replace it") from None


def decode_image(data: bytes, resolution: int, location: str = "<bytes>") -> np.ndarray:
    """``[resolution, resolution, 3]`` float32 in [-1, 1] from an image file's bytes.

    The upright RGB photo (:func:`open_image`) is resized to a square with PIL's bicubic filter (which
    averages over the footprint when shrinking), without cropping.

    Raises:
      DataError: naming ``location``: not an image, corrupt, or smaller than ``resolution`` on a side
        (upsampling would train the model on blur).
    """
    image = open_image(data, location)
    if min(image.size) < resolution:
        width, height = image.size
        raise DataError(f"{location}: {width}x{height} pixels is smaller than the training resolution "
                        f"{resolution}x{resolution}; use a larger photo or a lower config.resolution")
    image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
    return np.asarray(image, np.float32) / 127.5 - 1.0


def load_image(path: str, resolution: int) -> np.ndarray:
    """The image file at ``path`` as :func:`decode_image` makes it."""
    return decode_image(_read_file(path), resolution, path)


def _decode_record(record: EncodedImage, resolution: int) -> np.ndarray:
    return decode_image(record.data, resolution, record.location)


def image_dataset(source: str, resolution: int) -> grain.MapDataset:
    """The grain pipeline: the photos of ``source``, in order, each decoded by :func:`decode_image`."""
    return grain.MapDataset.source(open_source(source)).map(
        functools.partial(_decode_record, resolution=resolution))


def load_images(source: str, resolution: int, *, num_threads: int = 4) -> np.ndarray:
    """All photos of ``source`` (a folder or a TFDS spec) as ``[N, resolution, resolution, 3]`` float32.

    Files are read and decoded in ``num_threads`` threads (PIL releases the GIL while decoding and
    resizing); the order is the source's whatever the thread count, and so is every value.
    """
    dataset = image_dataset(source, resolution)
    read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)
    images = np.empty((len(dataset), resolution, resolution, 3), np.float32)
    for index, image in enumerate(dataset.to_iter_dataset(read_options)):
        images[index] = image
    return images


# ---------------------------------------------------------------------------------------------------
# Run identity and multi-process batches.


def fingerprint(source: str) -> str:
    """sha256 over the names and bytes of the photos that ``source`` yields, in order.

    It changes when a photo is added, removed, renamed or edited, and not when the folder moves; a
    TFDS concept has the fingerprint of the folder it was built from.
    """
    digest = hashlib.sha256()
    for record in records(open_source(source)):
        # Name and length first, so that no two different sets of files hash the same stream.
        digest.update(record.name.encode() + b"\0" + len(record.data).to_bytes(8, "little"))
        digest.update(record.data)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------
# VAE moments, cached once per augmentation.


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
