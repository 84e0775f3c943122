"""Class images for prior preservation: generated once, resumed exactly, refused when made otherwise."""

import json
import os

import pytest

from mlmjax import class_images, data, sampling, tiny

FAST = dict(prompt="a picture of a teapot", resolution=32, seed=5, model_fingerprint="sha256:tiny", steps=2,
            batch_size=2, compiler_options={"xla_backend_optimization_level": 0})


@pytest.fixture(scope="module")
def model():
    return tiny.tiny_pretrained()


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    """Three images generated in one go: the bytes every other generation must reproduce."""
    folder = class_images.ensure_class_images(model, str(tmp_path_factory.mktemp("reference")), count=3, **FAST)
    return [open(class_images.image_path(folder, i), "rb").read() for i in range(3)]


_GENERATE = sampling.generate


class _Interrupt(Exception):
    pass


def _count_batches(monkeypatch, stop_after: int | None = None) -> list:
    """Counts ``generate`` calls (one per batch); raises after ``stop_after`` to simulate a killed run."""
    calls = []

    def counted(*args, **kwargs):
        if stop_after is not None and len(calls) == stop_after:
            raise _Interrupt
        calls.append(1)
        return _GENERATE(*args, **kwargs)

    monkeypatch.setattr(sampling, "generate", counted)
    return calls


def test_generation_is_cached_and_resumes_exactly(model, reference, tmp_path, monkeypatch):
    folder = str(tmp_path / "class_images")
    _count_batches(monkeypatch, stop_after=1)
    with pytest.raises(_Interrupt):  # stopped after the first batch of two
        class_images.ensure_class_images(model, folder, count=3, **FAST)
    assert len(data.image_files(folder)) == 2
    with open(os.path.join(folder, ".class_00002.png.999.tmp"), "wb") as f:
        f.write(b"\x89PNG half")  # what a kill during a write leaves: never taken for an image
    assert len(data.image_files(folder)) == 2

    calls = _count_batches(monkeypatch)
    assert class_images.ensure_class_images(model, folder, count=3, **FAST) == folder
    assert len(calls) == 1  # only the missing batch
    assert [open(path, "rb").read() for path in data.image_files(folder)] == reference
    assert json.load(open(os.path.join(folder, class_images.MANIFEST)))["prompt"] == "a picture of a teapot"

    class_images.ensure_class_images(model, folder, count=3, **FAST)  # complete: reused as is
    class_images.ensure_class_images(model, folder, count=2, **FAST)
    assert len(calls) == 1
    os.remove(class_images.image_path(folder, 1))
    class_images.ensure_class_images(model, folder, count=4, **FAST)  # image 1 again, and a new one
    files = data.image_files(folder)
    assert len(calls) == 3 and len(files) == 4
    assert [open(path, "rb").read() for path in files[:3]] == reference


@pytest.mark.parametrize("change, message", [
    ({"prompt": "a picture of a dog"}, "prompt='a picture of a teapot', not 'a picture of a dog'"),
    ({"model_fingerprint": "sha256:other"}, "another base model"),
    ({"seed": 6}, "seed=5, not 6"),
])
def test_a_folder_made_otherwise_is_refused(model, tmp_path, change, message):
    folder = str(tmp_path / "class_images")
    class_images.ensure_class_images(model, folder, count=0, **FAST)  # the manifest alone
    with pytest.raises(class_images.ClassImagesError, match=message):
        class_images.ensure_class_images(model, folder, count=0, **{**FAST, **change})


def test_a_folder_of_unknown_images_is_refused(model, tmp_path):
    tiny.write_pictures(str(tmp_path), seed=0, count=1, concept=False)
    with pytest.raises(class_images.ClassImagesError, match="no manifest.json"):
        class_images.ensure_class_images(model, str(tmp_path), count=1, **FAST)


def test_a_process_other_than_0_samples_with_the_others_but_writes_nothing(model, reference, tmp_path, monkeypatch):
    """In a multi-process run every process samples the missing batches (a collective) and process 0
    alone writes; here one process plays "process 1" after process 0's manifest is in place."""
    folder = str(tmp_path / "class_images")
    class_images.ensure_class_images(model, folder, count=1, **FAST)  # as process 0: manifest + image 0
    before = sorted(os.listdir(folder))
    calls = _count_batches(monkeypatch)
    barriers = []
    monkeypatch.setattr(class_images.distributed, "is_primary", lambda: False)
    monkeypatch.setattr(class_images.distributed, "barrier", barriers.append)
    assert class_images.ensure_class_images(model, folder, count=3, **FAST) == folder
    assert len(calls) == 2  # it sampled the batches of the missing images 1 and 2 (batch size 2)
    assert sorted(os.listdir(folder)) == before  # and wrote nothing
    assert len(barriers) == 3
