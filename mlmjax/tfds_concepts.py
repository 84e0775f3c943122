"""Concept photo collections as a tensorflow-datasets dataset, built and read without TensorFlow.

For users who keep their concepts in TFDS. The builder :class:`ConceptImages` (dataset
``concept_images``) turns a local folder with one sub-folder per concept::

    photos/dog6/00.jpg 01.jpg ...
    photos/teapot/...

into one split per concept, stored as ``array_record`` files: random access (``tfds.data_source``,
what grain reads) with no TensorFlow installed. Each example keeps the photo file's bytes as they are,
not decoded pixels, so a concept read from TFDS decodes exactly as its folder does (EXIF orientation,
16-bit, transparency: :func:`mlmjax.data.decode_image`) and has the folder's
:func:`mlmjax.data.fingerprint`: a run may move from one to the other and still resume.

Build (once; ``--overwrite`` rebuilds after the photos changed)::

    python -m mlmjax.tfds_concepts --manual_dir=photos --data_dir=/data/tfds

Train on one concept with ``--config.concept.images=tfds:concept_images/dog6@/data/tfds``. The spec is
``tfds:NAME/CONCEPT[@DATA_DIR]``: NAME is the dataset as ``tfds.builder`` takes it (``concept_images``,
``concept_images:1.0.0``), CONCEPT a split of it, DATA_DIR the TFDS data folder (default
``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``). Any array_record dataset with this builder's features
(``image`` as file bytes, ``file_name``) and one split per concept can be read this way.

This module imports tensorflow-datasets at the top (it subclasses its builder), so mlmjax imports it
only for ``tfds:`` sources (``pip install 'mlmjax[tfds]'``).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import NamedTuple, Sequence

import numpy as np
import tensorflow_datasets as tfds

from mlmjax import data as data_lib
from mlmjax.data import DataError

DATASET = "concept_images"
# What TFDS accepts as a split name (its own check, less "all", which it reserves).
_SPLIT_NAME = re.compile(r"[\w-]+")
_SPEC = re.compile(re.escape(data_lib.TFDS_PREFIX) + r"(?P<name>[^@]+)/(?P<concept>[^/@]+)(?:@(?P<data_dir>.+))?")
_USAGE = "write tfds:NAME/CONCEPT[@DATA_DIR], e.g. tfds:concept_images/dog6@/data/tfds"


class ConceptImages(tfds.core.GeneratorBasedBuilder):
    """One split per concept (sub-folder of the manual dir); an example per photo, its bytes as stored."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version: image (file bytes), concept, file_name; a split per concept."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Put the photos in manual_dir, one sub-folder per concept, e.g. manual_dir/dog6/00.jpg ...
    (.jpg, .jpeg, .png, .webp or .bmp). A sub-folder's name becomes its split's name, so it may hold
    letters, digits, _ and - only. Then: python -m mlmjax.tfds_concepts --manual_dir=... --data_dir=...
    """

    def __init__(self, **kwargs):
        # array_record gives random access without TensorFlow; tfrecord, TFDS's default, would need it.
        kwargs.setdefault("file_format", tfds.core.FileFormat.ARRAY_RECORD)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Photos of personal concepts (objects, pets) for customizing text-to-image models; "
                        "a split per concept.",
            features=tfds.features.FeaturesDict({
                # Bytes, not pixels: decoding stays mlmjax's (EXIF, 16-bit, alpha) and lossless.
                "image": tfds.features.Tensor(shape=(), dtype=np.object_, doc="the photo file's bytes"),
                "concept": tfds.features.Text(doc="the concept's name, also its split's"),
                "file_name": tfds.features.Text(doc="the photo's file name in its concept folder"),
            }),
            # Examples stay in file-name order, the order in which a folder is read.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        return {concept: self._generate_examples(concept, folder)
                for concept, folder in concept_folders(os.fspath(dl_manager.manual_dir))}

    def _generate_examples(self, concept: str, folder: str):
        for image in data_lib.records(data_lib.FolderSource(folder)):
            data_lib.open_image(image.data, image.location)  # a bad photo fails the build, not a later run
            yield image.name, {"image": image.data, "concept": concept, "file_name": image.name}


def concept_folders(manual_dir: str) -> list[tuple[str, str]]:
    """``(concept, folder)`` for each sub-folder of ``manual_dir``, sorted by name.

    Raises:
      DataError: ``manual_dir`` is missing or has no sub-folder, or one's name cannot name a split.
    """
    if not os.path.isdir(manual_dir):
        raise DataError(f"{manual_dir}: manual_dir not found; give a folder with one sub-folder of photos "
                        "per concept")
    names = sorted(name for name in os.listdir(manual_dir)
                   if not name.startswith(".") and os.path.isdir(os.path.join(manual_dir, name)))
    if not names:
        raise DataError(f"{manual_dir}: no concept sub-folders; put each concept's photos in "
                        f"{os.path.join(manual_dir, '<concept>')}/")
    for name in names:
        if not _SPLIT_NAME.fullmatch(name) or name.lower() == "all":
            raise DataError(f"{os.path.join(manual_dir, name)}: {name!r} cannot name a TFDS split; rename "
                            "the folder with letters, digits, _ and - only (and not 'all')")
    return [(name, os.path.join(manual_dir, name)) for name in names]


def build(manual_dir: str, data_dir: str, *, overwrite: bool = False) -> str:
    """Builds ``concept_images`` from ``manual_dir`` into ``data_dir``; returns the dataset's folder.

    An existing build of the same version is kept unless ``overwrite`` (TFDS does not notice changed
    photos; runs do, by their fingerprint).
    """
    concept_folders(manual_dir)  # its DataError before TFDS's assertion about manual_dir
    builder = ConceptImages(data_dir=data_dir)
    modes = tfds.download.GenerateMode
    mode = modes.FORCE_REDOWNLOAD if overwrite else modes.REUSE_DATASET_IF_EXISTS
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir, download_mode=mode, try_download_gcs=False))
    return os.fspath(builder.data_dir)


# ---------------------------------------------------------------------------------------------------
# Reading: a TFDS spec -> a grain RandomAccessDataSource of EncodedImage.


class TfdsSpec(NamedTuple):
    """A parsed ``tfds:NAME/CONCEPT[@DATA_DIR]``."""
    name: str
    concept: str
    data_dir: str | None


def parse_spec(spec: str) -> TfdsSpec:
    """``tfds:NAME/CONCEPT[@DATA_DIR]`` in parts; NAME may carry ``/CONFIG`` and ``:VERSION``.

    Split at the first ``@`` (no dataset or split name holds one) and at the last ``/`` before it.
    """
    match = _SPEC.fullmatch(spec)
    if not match:
        raise DataError(f"{spec}: not a TFDS source; {_USAGE}")
    return TfdsSpec(match["name"], match["concept"], match["data_dir"])


class ConceptSource:
    """One concept of a TFDS dataset, in stored order: a grain ``RandomAccessDataSource`` of
    :class:`mlmjax.data.EncodedImage` over the split's array_record files."""

    def __init__(self, spec: str, records: Sequence[dict]):
        self._spec = spec
        self._records = records

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> data_lib.EncodedImage:
        example = self._records[index]
        name = example["file_name"].decode()
        return data_lib.EncodedImage(name=name, data=example["image"], location=f"{self._spec} ({name})")

    def __repr__(self) -> str:
        return f"ConceptSource({self._spec!r}, {len(self)} images)"


def open_concept(spec: str) -> ConceptSource:
    """The photos of ``tfds:NAME/CONCEPT[@DATA_DIR]``.

    Raises:
      DataError: a malformed spec; no such dataset in the data dir; no such concept; a dataset without
        this builder's features, not stored as array_record, or with an empty concept.
    """
    name, concept, data_dir = parse_spec(spec)
    where = data_dir or tfds.core.constants.DATA_DIR
    missing = DataError(f"{spec}: no TFDS dataset {name!r} in {where}; build it with python -m "
                        f"mlmjax.tfds_concepts --manual_dir=<photos> --data_dir={where}")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except (ValueError, AssertionError, OSError):  # what tfds raises for unknown names and versions
        raise missing from None
    except ImportError as error:  # a catalogue builder that imports TensorFlow
        raise DataError(f"{spec}: tensorflow-datasets cannot open {name!r} without TensorFlow ({error}); "
                        "use a dataset built by mlmjax.tfds_concepts") from None
    if not builder.is_prepared():
        raise missing
    features = builder.info.features
    if not {"image", "file_name"} <= set(features.keys()) or features["image"].np_dtype != np.object_:
        raise DataError(f"{spec}: {name} is not a concept_images dataset (its features are "
                        f"{', '.join(features.keys())}, not image as file bytes and file_name); {_USAGE}")
    if concept not in builder.info.splits:
        concepts = ", ".join(sorted(builder.info.splits.keys()))
        raise DataError(f"{spec}: no concept {concept!r} in {name} (it has: {concepts}); "
                        "pick one of these, or add the folder and rebuild with --overwrite")
    try:
        records = builder.as_data_source(split=concept)
    except NotImplementedError:  # what tfds raises for tfrecord files
        raise DataError(f"{spec}: {name} is not stored as array_record, so it has no random access "
                        "without TensorFlow; rebuild it with file_format=array_record") from None
    if not len(records):
        raise DataError(f"{spec}: concept {concept!r} has no photos; add some and rebuild with --overwrite")
    return ConceptSource(spec, records)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlmjax.tfds_concepts",
                                     description="Build the concept_images TFDS dataset from a folder of "
                                                 "concept folders (array_record, no TensorFlow needed).")
    parser.add_argument("--manual_dir", required=True, help="a folder with one sub-folder of photos per concept")
    parser.add_argument("--data_dir", required=True, help="the TFDS data folder to write to")
    parser.add_argument("--overwrite", action="store_true", help="rebuild even if a build exists")
    args = parser.parse_args(argv)
    try:
        folder = build(args.manual_dir, args.data_dir, overwrite=args.overwrite)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    concepts = [name for name, _ in concept_folders(args.manual_dir)]
    print(f"{folder}: {len(concepts)} concepts; train on one with "
          f"--config.concept.images=tfds:{DATASET}/{concepts[0]}@{args.data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
