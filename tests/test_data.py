"""Image reading (grain over folders and TFDS concepts), fingerprints, process shares and bad input.

Pure CPU, no network, a few seconds: the pictures are tiny and written by PIL in each test.
"""

import importlib.util
import io
import os
import pickle
import sys

import numpy as np
import pytest
from PIL import Image

import mlmjax
from mlmjax import data
from mlmjax.data import DataError

RES = 16


def smooth_picture(width: int, height: int, seed: int = 0) -> np.ndarray:
    """``[height, width, 3]`` uint8 gradients with a random tint: compresses well, survives JPEG."""
    y, x = np.mgrid[0:height, 0:width]
    tint = np.random.default_rng(seed).uniform(0.3, 1.0, 3)
    picture = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * tint * 255
    return picture.round().astype(np.uint8)


def save(image: Image.Image, path, **kwargs) -> str:
    image.save(path, **kwargs)
    return str(path)


def photo_folder(folder, count: int = 5, seed: int = 0) -> str:
    """A folder of photos in every format and of several sizes, written in reverse file-name order."""
    os.makedirs(folder, exist_ok=True)
    formats = [("png", {}), ("jpg", {"quality": 95}), ("webp", {"lossless": True}), ("bmp", {}), ("jpeg", {})]
    for i in range(count):
        suffix, kwargs = formats[i % len(formats)]
        picture = Image.fromarray(smooth_picture(40 + 3 * i, 34 + 5 * i, seed + i))
        save(picture, os.path.join(folder, f"{9 - i}_{i}.{suffix}"), **kwargs)
    return str(folder)


def expected(picture: np.ndarray, resolution: int = RES) -> np.ndarray:
    """What decoding should give for an RGB picture stored losslessly."""
    resized = Image.fromarray(picture).resize((resolution, resolution), Image.Resampling.BICUBIC)
    return np.asarray(resized, np.float32) / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------------
# Decoding.


def test_exif_orientation_is_honoured(tmp_path):
    # A landscape picture, red with a blue top-left corner, stored with "rotate 90° clockwise to view".
    picture = np.zeros((20, 40, 3), np.uint8)
    picture[...] = (255, 0, 0)
    picture[:10, :10] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = save(Image.fromarray(picture), tmp_path / "rotated.jpg", exif=exif, quality=95)

    image = data.load_image(path, RES)

    # Upright it is a portrait whose blue corner is top right; squashed to a square it is there still.
    blue, red = np.array([-1, -1, 1]), np.array([1, -1, -1])
    np.testing.assert_allclose(image[1, -2], blue, atol=0.15)
    np.testing.assert_allclose(image[1, 1], red, atol=0.15)
    np.testing.assert_allclose(image[-2, -2], red, atol=0.15)


def _transparent(mode: str) -> Image.Image:
    """Left half fully transparent, right half opaque green (grey for LA)."""
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[:, 8:] = (0, 160, 0, 255)
    image = Image.fromarray(rgba)
    if mode == "LA":
        return image.convert("LA")
    if mode == "P":
        return image.convert("P")  # PIL keeps the transparent entry in the palette's tRNS
    return image


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_become_white(tmp_path, mode):
    path = save(_transparent(mode), tmp_path / "alpha.png")
    image = data.load_image(path, RES)
    np.testing.assert_allclose(image[:, :6], 1.0)  # away from the edge the bicubic filter blends
    opaque = image[:, 10:]
    assert np.all(opaque < 0.5) and np.allclose(opaque, opaque[0, 0], atol=1e-6)


def test_sixteen_bit_greyscale_is_rescaled_not_clipped(tmp_path):
    levels = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    path = save(Image.fromarray(levels), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")
    image = data.load_image(path, RES)  # same size: the resize is the identity
    grey = np.round(levels / 257.0) / 127.5 - 1.0
    for channel in range(3):
        np.testing.assert_allclose(image[..., channel], grey, atol=1e-6)


@pytest.mark.parametrize("suffix, kwargs, atol", [
    ("png", {}, 0), ("bmp", {}, 0), ("webp", {"lossless": True}, 0), ("webp", {"quality": 90}, 0.1),
    ("jpg", {"quality": 95}, 0.1)])
def test_formats_shape_dtype_range(tmp_path, suffix, kwargs, atol):
    picture = smooth_picture(48, 32)
    image = data.load_image(save(Image.fromarray(picture), tmp_path / f"photo.{suffix}", **kwargs), RES)
    assert image.shape == (RES, RES, 3) and image.dtype == np.float32
    assert -1.0 <= image.min() and image.max() <= 1.0
    np.testing.assert_allclose(image, expected(picture), atol=atol + 1e-6)


def test_resize_squashes_to_a_square_without_cropping(tmp_path):
    picture = np.zeros((20, 60, 3), np.uint8)
    picture[:, :20] = 255  # the left third white: a crop to the centre would lose it
    image = data.load_image(save(Image.fromarray(picture), tmp_path / "wide.png"), 12)
    np.testing.assert_allclose(image, expected(picture, 12))
    assert np.all(image[:, :3] > 0.9) and np.all(image[:, -3:] < -0.9)


def test_the_embedded_default_photos_read_at_its_resolution():
    from mlmjax import tiny

    images = data.load_images(tiny.embedded_assets().concept_images, tiny.RESOLUTION)
    assert images.shape[1:] == (tiny.RESOLUTION, tiny.RESOLUTION, 3) and len(images) > 0


# ---------------------------------------------------------------------------------------------------
# Folders through grain.


def test_image_files_are_sorted_and_filtered(tmp_path):
    folder = photo_folder(tmp_path / "photos", count=3)
    for extra in (".hidden.png", "notes.txt", "LOUD.PNG"):
        (tmp_path / "photos" / extra).write_bytes((tmp_path / "photos" / "9_0.png").read_bytes())
    (tmp_path / "photos" / "sub.png").mkdir()
    names = [os.path.basename(path) for path in data.image_files(folder)]
    assert names == ["7_2.webp", "8_1.jpg", "9_0.png", "LOUD.PNG"]


def test_grain_pipeline_equals_per_file_decoding_and_is_deterministic(tmp_path):
    folder = photo_folder(tmp_path / "photos", count=7)
    straight = np.stack([data.load_image(path, RES) for path in data.image_files(folder)])
    assert straight.shape == (7, RES, RES, 3)
    np.testing.assert_array_equal(data.load_images(folder, RES), straight)
    np.testing.assert_array_equal(data.load_images(folder, RES, num_threads=1), straight)
    np.testing.assert_array_equal(data.load_images(folder, RES, num_threads=3), straight)
    assert len(data.image_dataset(folder, RES)) == 7


# ---------------------------------------------------------------------------------------------------
# Fingerprints and process shares.


def test_fingerprint_follows_content_not_place(tmp_path):
    folder = photo_folder(tmp_path / "a", count=3)
    reference = data.fingerprint(folder)
    assert len(reference) == 64
    assert data.fingerprint(photo_folder(tmp_path / "b", count=3)) == reference  # moved: same run

    os.rename(os.path.join(folder, "9_0.png"), os.path.join(folder, "a_0.png"))
    renamed = data.fingerprint(folder)
    photo_folder(tmp_path / "c", count=3)
    edited_file = tmp_path / "c" / "9_0.png"
    contents = bytearray(edited_file.read_bytes())
    contents[-20] ^= 0xFF  # one byte: the hash does not care whether the file still decodes
    edited_file.write_bytes(bytes(contents))
    edited = data.fingerprint(str(tmp_path / "c"))
    added = data.fingerprint(photo_folder(tmp_path / "d", count=4))
    assert len({reference, renamed, edited, added}) == 4


def _png(width=32, height=32) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _jpeg_with_garbage() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(smooth_picture(32, 32)).save(buffer, "JPEG")
    jpeg = bytearray(buffer.getvalue())
    jpeg[2:200] = np.random.default_rng(0).integers(0, 255, 198, np.uint8).tobytes()  # over the headers
    return bytes(jpeg)


BAD_FILES = {
    "truncated png": ("half.png", lambda: (png := _png())[: len(png) // 2], "corrupt or truncated image"),
    "jpeg with garbage": ("garbled.jpg", _jpeg_with_garbage, "not an image file"),
    "not an image": ("notes.jpg", lambda: b"shopping list: tea\n", "not an image file"),
    "too small": ("small.png", lambda: _png(24, 40), "24x40 pixels is smaller than the training resolution 32x32"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_bad_file_is_named_with_what_to_do(tmp_path, case):
    name, contents, message = BAD_FILES[case]
    folder = photo_folder(tmp_path / "photos", count=2)
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        f.write(contents())
    with pytest.raises(DataError) as error:
        data.load_images(folder, 32)
    text = str(error.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text
    assert "remove or replace it" in text or "use a larger photo" in text


def _missing(root) -> str:
    return str(root / "missing")


def _empty(root) -> str:
    (root / "empty").mkdir()
    return str(root / "empty")


def _other_formats(root) -> str:
    (root / "heic").mkdir()
    (root / "heic" / "IMG_1.HEIC").write_bytes(b"not for PIL")
    return str(root / "heic")


def _a_file(root) -> str:
    (root / "photo.png").write_bytes(_png())
    return str(root / "photo.png")


@pytest.mark.parametrize("make, message", [
    (_missing, "image folder not found"),
    (_empty, "no images (.jpg"),
    (_other_formats, "it holds 1 other file, e.g. IMG_1.HEIC"),
    (_a_file, "is a file, not a folder"),
])
def test_a_bad_folder_is_named_with_what_to_do(tmp_path, make, message):
    folder = make(tmp_path)
    with pytest.raises(DataError) as error:
        data.load_images(folder, 32)
    text = str(error.value)
    assert text.startswith(f"{folder}: ") and message in text and "\n" not in text


# ---------------------------------------------------------------------------------------------------
# TFDS: build from a manual dir, read back by random access, no TensorFlow.


@pytest.fixture(scope="module")
def tfds_build(tmp_path_factory):
    pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("array_record")
    from mlmjax import tfds_concepts

    root = tmp_path_factory.mktemp("tfds")
    manual_dir = root / "photos"
    photo_folder(manual_dir / "dog6", count=6, seed=0)
    photo_folder(manual_dir / "cat-2", count=3, seed=10)
    (manual_dir / "README.txt").write_text("loose files beside the concept folders are left out\n")
    data_dir = str(root / "tfds")
    assert tfds_concepts.main([f"--manual_dir={manual_dir}", f"--data_dir={data_dir}"]) == 0
    return str(manual_dir), data_dir


def test_tfds_concept_reads_as_its_folder(tfds_build):
    manual_dir, data_dir = tfds_build
    for concept in ("dog6", "cat-2"):
        spec, folder = f"tfds:concept_images/{concept}@{data_dir}", os.path.join(manual_dir, concept)
        np.testing.assert_array_equal(data.load_images(spec, RES), data.load_images(folder, RES))
        assert data.fingerprint(spec) == data.fingerprint(folder)
    assert "tensorflow" not in sys.modules  # TFDS ran on numpy and array_record alone


def test_tfds_spec_syntax(tfds_build):
    from mlmjax import tfds_concepts

    _, data_dir = tfds_build
    assert tfds_concepts.parse_spec(f"tfds:concept_images:1.0.0/dog6@{data_dir}") == (
        "concept_images:1.0.0", "dog6", data_dir)
    assert tfds_concepts.parse_spec("tfds:concept_images/dog6") == ("concept_images", "dog6", None)
    assert len(data.load_images(f"tfds:concept_images:1.0.0/cat-2@{data_dir}", RES)) == 3


def test_a_tfds_dataset_of_other_features_is_refused(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")

    class DecodedPhotos(tfds.core.GeneratorBasedBuilder):  # pixels, not file bytes
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(2, 2, 3), dtype=np.uint8), "file_name": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"dog6": self._generate_examples()}

        def _generate_examples(self):
            yield "a", {"image": np.zeros((2, 2, 3), np.uint8), "file_name": "a.png"}

    DecodedPhotos(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    with pytest.raises(DataError, match="decoded_photos is not a concept_images dataset"):
        data.load_images(f"tfds:decoded_photos/dog6@{tmp_path}", RES)


@pytest.mark.parametrize("spec, message", [
    ("tfds:concept_images/dog7@{data_dir}", "no concept 'dog7' in concept_images (it has: cat-2, dog6)"),
    ("tfds:concept_images/dog6@{data_dir}/elsewhere", "no TFDS dataset 'concept_images' in"),
    ("tfds:concept_images:9.0.0/dog6@{data_dir}", "no TFDS dataset 'concept_images:9.0.0'"),
    ("tfds:not_a_dataset_here/dog6@{data_dir}", "no TFDS dataset 'not_a_dataset_here'"),
    ("tfds:dog6", "not a TFDS source; write tfds:NAME/CONCEPT[@DATA_DIR]"),
])
def test_a_bad_tfds_source_is_named_with_what_to_do(tfds_build, spec, message):
    spec = spec.format(data_dir=tfds_build[1])
    with pytest.raises(DataError) as error:
        data.load_images(spec, RES)
    text = str(error.value)
    assert text.startswith(f"{spec}: ") and message in text and "\n" not in text


def _badly_named_concept(manual_dir):
    photo_folder(manual_dir / "my dog")


def _no_concepts(manual_dir):
    manual_dir.mkdir()


def _empty_concept(manual_dir):
    (manual_dir / "dog").mkdir(parents=True)


def _broken_photo(manual_dir):
    photo_folder(manual_dir / "dog")
    (manual_dir / "dog" / "x.png").write_bytes(b"?")


@pytest.mark.parametrize("setup, message", [
    (_badly_named_concept, "'my dog' cannot name a TFDS split"),
    (_no_concepts, "no concept sub-folders"),
    (_empty_concept, "no images (.jpg"),
    (_broken_photo, "x.png: not an image file"),
])
def test_a_bad_manual_dir_fails_the_build(tmp_path, setup, message):
    pytest.importorskip("tensorflow_datasets")
    from mlmjax import tfds_concepts

    setup(tmp_path / "photos")
    with pytest.raises(DataError) as error:
        tfds_concepts.build(str(tmp_path / "photos"), str(tmp_path / "tfds"))
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not os.path.exists(tmp_path / "tfds" / "concept_images" / "1.0.0")


# ---------------------------------------------------------------------------------------------------
# What is never done.


def test_reading_never_unpickles(tfds_build, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("unpickling during image reading")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    spec = f"tfds:concept_images/dog6@{tfds_build[1]}"
    assert len(data.load_images(photo_folder(tmp_path / "photos", count=2), RES)) == 2
    assert len(data.load_images(spec, RES)) == 6 and data.fingerprint(spec)


def test_without_tfds_installed_folders_work_and_tfds_sources_say_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes `import tensorflow_datasets` fail
    monkeypatch.delitem(sys.modules, "mlmjax.tfds_concepts", raising=False)
    monkeypatch.delattr(mlmjax, "tfds_concepts", raising=False)
    # A fresh copy of the module, imported with TFDS unavailable (the one under test stays as it is).
    spec = importlib.util.spec_from_file_location("data_without_tfds", data.__file__)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    assert len(fresh.load_images(photo_folder(tmp_path / "photos", count=2), RES)) == 2
    with pytest.raises(DataError, match="needs tensorflow-datasets .*; pip install 'mlmjax\\[tfds\\]'"):
        data.load_images("tfds:concept_images/dog6", RES)
